"""``make run``'s demo in its non-interactive mode finishes, exits 0 and leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.kafka import REPO

pytestmark = pytest.mark.slow


def test_demo_once_runs_both_workflows_and_cleans_up(tmp_path):
    env = {**os.environ, "DEMO_ONCE": "1", "DEMO_STATE_DIR": str(tmp_path / "demo"), "CLS_CLIP_VARIANT": "cls-tiny-clip"}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "AWS_ENDPOINT_URL"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900, stdin=subprocess.DEVNULL)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert "ZERO-SHOT WEIGHTS ARE RANDOM" in text
    assert "AI labeling workflow" in text and "training curve" in text
    accuracy = float(re.search(r"correct: accuracy ([0-9.]+)", text).group(1))
    assert accuracy >= 0.9
    assert re.search(r"report: s3://\S+/report.html", text) and (tmp_path / "demo" / "report.html").is_file()
    assert "calibration: temperature" in text
    accepted = re.search(r"auto-applied (\d+) of \d+ labels at precision 0.95: (\d+) right", text)
    assert accepted and int(accepted.group(1)) > 0 and int(accepted.group(2)) >= 0.95 * int(accepted.group(1))
    pids = [int(p) for p in re.search(r"workers are up \(pids ([0-9 ]+);", text).group(1).split()]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left behind: {leftover.stdout}"
