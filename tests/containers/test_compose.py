"""deploy/compose.yaml runs: with deploy/compose.local.yaml (local images, no GPU, random tiny CLIP), the
stack comes up, topics are provisioned by its `topics` service, one request goes in with
`cls-worker send` from the host, its result comes back, and everything is torn down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from testkit.containers import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, free_port
from testkit.pictures import photo_jpeg
from testkit.local import REPO

pytestmark = pytest.mark.container

FILES = ["-f", str(REPO / "deploy" / "compose.yaml"), "-f", str(REPO / "deploy" / "compose.local.yaml")]


def compose_command() -> list[str]:
    """``docker compose`` (v2): the override's ``!reset`` needs it."""
    for docker in ("docker", "/usr/bin/docker"):
        path = shutil.which(docker)
        if path and subprocess.run([path, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
            return [path, "compose"]
    pytest.fail("an engine answers but `docker compose` (v2) is missing: deploy/images/engine.sh start installs it",
                pytrace=False)


def test_compose_stack_answers_a_request_sent_from_the_host(tmp_path):
    project = f"cls-compose-{uuid.uuid4().hex[:6]}"
    ports = {"KAFKA_HOST_PORT": free_port(), "MINIO_PORT": free_port(), "MINIO_CONSOLE_PORT": free_port()}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    base = [*compose_command(), "-p", project, *FILES]

    def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    try:
        up = compose("up", "-d", "--no-build", "--wait", "annotation")
        assert up.returncode == 0, up.stderr[-4000:] + compose("logs", "--tail", "40").stdout[-6000:]
        listed = compose("ps", "-a", "--format", "json").stdout.strip()
        # one JSON object per line (Compose >= 2.21) or one JSON array (older v2)
        services = json.loads(listed) if listed.startswith("[") else [json.loads(line) for line in listed.splitlines()]
        states = {s["Service"]: (s["State"], s.get("ExitCode")) for s in services}
        assert states["topics"] == ("exited", 0) and states["minio-buckets"] == ("exited", 0), states
        assert states["annotation"][0] == "running" and "prometheus" not in states and "training" not in states

        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['MINIO_PORT']}", region_name=REGION,
                          aws_access_key_id=ACCESS_KEY_ID, aws_secret_access_key=SECRET_ACCESS_KEY)
        s3.put_object(Bucket="datasets", Key="compose/cat.jpg", Body=photo_jpeg(1))
        send_env = {**env, "KAFKA_BOOTSTRAP_SERVERS": f"localhost:{ports['KAFKA_HOST_PORT']}"}
        sent = subprocess.run([sys.executable, "-m", "consumers.cli", "send", "annotate", "s3://datasets/compose/cat.jpg",
                               "--classes", "cat,dog,coffee", "--json", "--timeout", "120", "--id", f"{project}-req"],
                              env=send_env, capture_output=True, text=True, timeout=180, cwd=REPO)
        assert sent.returncode == 0, sent.stdout[-3000:] + sent.stderr[-3000:] + compose("logs", "annotation").stdout[-4000:]
        events = [json.loads(line) for line in sent.stdout.splitlines() if line.startswith("{")]
        result = events[-1]
        assert result["request_id"] == f"{project}-req" and result["status"] == "completed", result
        assert result["model"] == {"family": "clip", "variant": "cls-tiny-clip", "weights": "random", "prompt_set": "full"}
        (entry,) = result["results"]
        assert "error" not in entry or entry["error"] is None, entry
        assert {p["class"] for p in entry["predictions"]} <= {"cat", "dog", "coffee"} and entry["predictions"]
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "30")
        assert down.returncode == 0, down.stderr[-2000:]
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True, timeout=30)
    assert left.stdout.strip() == "", "containers left behind"
