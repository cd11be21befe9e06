"""Offline checks of deploy/: the image, the compose stack and the Kubernetes manifests.

No Docker engine and no cluster exist where these tests run, so nothing here builds an image or
applies a manifest. What is checked instead:

- every Kubernetes manifest against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
  fields fail), for the oldest and the newest Kubernetes version we target;
- KEDA resources against tests/data/keda-v2.schema.json (written from KEDA's CRDs and scaler docs), and a
  ScaledJob's jobTargetRef as a batch/v1 Job;
- that the manifests, the compose file and the Dockerfile agree with the code: every environment variable
  is a real setting and the values parse, every command line parses with the real CLI parser, the probe
  paths exist on the real health server, KEDA scales within the topic's partitions on the right group and
  topic, grace periods exceed the drain timeout;
- the Dockerfile's stages, user, entrypoint and build context (the context builds a wheel with pip).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from consumers.cli import build_parser
from consumers.settings import KafkaSettings, Settings, WorkerSettings, all_setting_env_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
KEDA_SCHEMA = ROOT / "tests" / "data" / "keda-v2.schema.json"

K8S_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())
ALTERNATIVE_MANIFESTS = {"training-scaledjob.yaml"}  # documented swaps, not in kustomization.yaml
IMAGE = "cls-workers"

# Standard variables read by boto3/botocore (the S3 client) besides the settings' own aliases.
AWS_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
           "AWS_ENDPOINT_URL"}
# Variables the image sets for third-party libraries and the OS, not for cls-worker's settings.
IMAGE_ENV = {"PATH", "HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
             "PIP_DISABLE_PIP_VERSION_CHECK", "DEBIAN_FRONTEND"}
WORKER_COMMANDS = {"annotation", "training"}


# ---------------------------------------------------------------------------------------------------
# loading


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = k8s_documents()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(owner, pod spec) of every workload, ScaledJob included."""
    out = []
    for file, doc in DOCS:
        kind = doc["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{file}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        elif kind == "ScaledJob":
            out.append((f"{file}:{doc['metadata']['name']}", doc["spec"]["jobTargetRef"]["template"]["spec"]))
    return out


def containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(owner, pod spec, container) of every container."""
    return [(owner, pod, c) for owner, pod in pod_specs() for c in pod.get("initContainers", []) + pod["containers"]]


def cli(args: list[str]):
    return build_parser().parse_args(args)


def configmap_env() -> dict[str, str]:
    return dict(named("ConfigMap", "cls-workers-settings")["data"])


def secret_env(name: str) -> dict[str, str]:
    secret = named("Secret", name)
    assert "data" not in secret, "placeholders go in stringData"
    return dict(secret.get("stringData", {}))


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a container gets: envFrom (in order), then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named("ConfigMap", source["configMapRef"]["name"])["data"])
        elif "secretRef" in source:
            env.update(secret_env(source["secretRef"]["name"]))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from valueFrom>")
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Build the real Settings from exactly ``env`` (the test machine's own variables removed)."""
    for name in list(os.environ):
        if name.startswith(("CLS_", "KAFKA_", "AWS_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(KafkaSettings(), WorkerSettings())


def effective(env: dict[str, str], setting: str) -> Any:
    """A WorkerSettings value as the container sees it (its env, else the default)."""
    field = WorkerSettings.model_fields[setting]
    name = f"CLS_{setting.upper()}"
    return getattr(WorkerSettings.model_validate({setting: env[name]}), setting) if name in env else field.default


def worker_command(container: dict[str, Any]) -> str | None:
    if container.get("image") != IMAGE:
        return None
    args = cli(container.get("args", []))
    return args.command


# ---------------------------------------------------------------------------------------------------
# Kubernetes schemas


K8S_PARAMS = [pytest.param(doc, id=f"{file}:{doc['kind']}/{doc['metadata']['name']}")
              for file, doc in DOCS if not doc["apiVersion"].startswith("keda.sh/")]
KEDA_PARAMS = [pytest.param(doc, id=f"{file}:{doc['kind']}/{doc['metadata']['name']}")
               for file, doc in DOCS if doc["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", K8S_PARAMS)
def test_manifest_valid_against_kubernetes_schema(doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validator_is_not_vacuous():
    deployment = json.loads(json.dumps(named("Deployment", "cls-annotation")))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagee"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    probe = json.loads(json.dumps(named("Deployment", "cls-annotation")))
    probe["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSeconds"] = "15"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(probe, K8S_VERSIONS[-1], strict=True)


def keda_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    resource = Resource.from_contents(schema, default_specification=DRAFT202012)
    registry = Registry().with_resource(schema["$id"], resource)
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)


@pytest.mark.parametrize("doc", KEDA_PARAMS)
def test_keda_resource_valid_against_crd_schema(doc):
    keda_validator(doc["kind"]).validate(doc)
    if doc["kind"] == "ScaledJob":  # jobTargetRef is a batch/v1 JobSpec
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": doc["metadata"]["name"]},
               "spec": doc["spec"]["jobTargetRef"]}
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)


@pytest.mark.parametrize("mutate, message", [
    (lambda so: so["spec"].update(maxReplicas=3), "maxReplicas"),
    (lambda so: so["spec"]["triggers"][0]["metadata"].update(lagThreshold=20), "20"),
    (lambda so: so["spec"]["triggers"][0]["metadata"].pop("consumerGroup"), "consumerGroup"),
    (lambda so: so["spec"]["triggers"][0]["metadata"].update(offsetResetPolicy="oldest"), "oldest"),
    (lambda so: so["spec"]["triggers"][0]["metadata"].update(lagTreshold="5"), "lagTreshold"),
    (lambda so: so["spec"].pop("scaleTargetRef"), "scaleTargetRef"),
])
def test_keda_schema_is_not_vacuous(mutate, message):
    scaled = json.loads(json.dumps(named("ScaledObject", "cls-annotation")))
    mutate(scaled)
    with pytest.raises(jsonschema.ValidationError, match=message):
        keda_validator("ScaledObject").validate(scaled)


def test_kustomization_lists_every_manifest_and_sets_the_image():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk - ALTERNATIVE_MANIFESTS
    assert ALTERNATIVE_MANIFESTS <= on_disk
    named("Namespace", kustomization["namespace"])
    for _, doc in DOCS:
        assert "namespace" not in doc["metadata"], "the kustomization sets the namespace"
    assert [image["name"] for image in kustomization["images"]] == [IMAGE]
    assert {c["image"] for _, _, c in containers()} == {IMAGE}


# ---------------------------------------------------------------------------------------------------
# manifests agree with the code


def test_every_manifest_env_var_is_a_real_setting(monkeypatch):
    known = all_setting_env_names() | AWS_ENV
    for owner, _, container in containers():
        env = container_env(container)
        unknown = sorted(set(env) - known)
        assert not unknown, f"{owner}: not settings of consumers/settings.py: {unknown}"
        settings = settings_from(env, monkeypatch)  # the values parse (pydantic validates them)
        settings.kafka.client_kwargs()  # SASL settings complete, SSL context builds
    for name in configmap_env():
        assert name in known, name


def test_env_sources_exist():
    for _, _, container in containers():
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            named(kind, ref["name"])
    for auth in of_kind("TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            assert ref["key"] in secret_env(ref["name"]), ref


def test_container_args_are_cli_subcommands():
    commands = {}
    for owner, _, container in containers():
        assert "command" not in container, f"{owner}: keep the image's ENTRYPOINT (cls-worker)"
        commands[owner] = cli(container["args"])
    actions = {(a.command, getattr(a, "action", None)) for a in commands.values()}
    assert {("annotation", None), ("training", None), ("topics", "create")} <= actions


def test_workers_request_one_gpu_and_the_topic_job_none():
    for owner, _, container in containers():
        resources = container.get("resources", {})
        gpu = (resources.get("requests", {}).get("nvidia.com/gpu"), resources.get("limits", {}).get("nvidia.com/gpu"))
        if worker_command(container) in WORKER_COMMANDS:
            assert gpu == (1, 1), f"{owner}: GPU request and limit must both be 1"
        else:
            assert gpu == (None, None), owner
        assert "memory" in resources.get("limits", {}), owner


def test_probes_use_the_health_server_paths_on_the_metrics_port():
    for owner, _, container in containers():
        command = worker_command(container)
        if command not in WORKER_COMMANDS:
            continue
        env = container_env(container)
        port = int(env["CLS_METRICS_PORT"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"metrics": port}, owner
        liveness = container["livenessProbe"]["httpGet"]
        assert (liveness["path"], liveness["port"]) == ("/healthz", "metrics"), owner
        if "readinessProbe" in container:
            readiness = container["readinessProbe"]["httpGet"]
            assert (readiness["path"], readiness["port"]) == ("/readyz", "metrics"), owner
        else:
            assert owner.startswith("training-scaledjob.yaml"), f"{owner}: a Deployment's pods need /readyz"
        if "startupProbe" in container:
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


async def test_probe_paths_exist_on_the_real_health_server():
    import aiohttp

    from consumers.health import HealthServer

    paths = set()
    for _, _, container in containers():
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container:
                paths.add(container[probe]["httpGet"]["path"])
    paths.add("/metrics")

    class NotReady:
        ready = False

    settings = Settings(KafkaSettings(), WorkerSettings(metrics_port=0, metrics_host="127.0.0.1"))
    server = HealthServer(settings, NotReady())
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            for path in sorted(paths):
                async with session.get(f"http://127.0.0.1:{server.port}{path}") as response:
                    assert response.status != 404, path
                    expected = 503 if path == "/readyz" else 200
                    assert response.status == expected, (path, response.status)
    finally:
        await server.stop()


def test_pods_run_as_the_image_user():
    uid = int(dockerfile_arg("APP_UID"))
    for owner, pod in pod_specs():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, owner
        assert security["runAsUser"] == uid, owner
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, owner


def test_grace_periods_exceed_drain_timeouts():
    for owner, pod, container in containers():
        if worker_command(container) not in WORKER_COMMANDS:
            continue
        drain = effective(container_env(container), "drain_timeout_s")
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > drain, f"{owner}: terminationGracePeriodSeconds {grace} <= CLS_DRAIN_TIMEOUT_S {drain}"
        if worker_command(container) == "training":
            assert drain >= 60, f"{owner}: a training job needs time to checkpoint and upload"


def kafka_triggers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(scaled, trigger) for scaled in of_kind("ScaledObject") + of_kind("ScaledJob")
            for trigger in scaled["spec"]["triggers"] if trigger["type"] == "kafka"]


def scaled_container(scaled: dict[str, Any]) -> dict[str, Any]:
    if scaled["kind"] == "ScaledJob":
        return scaled["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]
    ref = scaled["spec"]["scaleTargetRef"]
    assert ref.get("kind", "Deployment") == "Deployment" and ref.get("apiVersion", "apps/v1") == "apps/v1"
    return named("Deployment", ref["name"])["spec"]["template"]["spec"]["containers"][0]


def test_keda_scales_within_the_request_topic_partitions():
    partitions = effective(configmap_env(), "request_topic_partitions")
    assert kafka_triggers(), "no KEDA kafka trigger"
    for scaled, _ in kafka_triggers():
        max_replicas = scaled["spec"].get("maxReplicaCount")
        assert max_replicas is not None, "KEDA's default maxReplicaCount is 100: set it"
        assert 1 <= max_replicas <= partitions, (scaled["metadata"]["name"], max_replicas, partitions)
        assert scaled["spec"].get("minReplicaCount", 0) <= max_replicas


def test_keda_watches_the_workers_group_topic_and_brokers():
    import inspect

    from consumers import runtime

    assert 'auto_offset_reset="earliest"' in inspect.getsource(runtime)
    sasl_names = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
    for scaled, trigger in kafka_triggers():
        container = scaled_container(scaled)
        env = container_env(container)
        command = worker_command(container)
        assert command in WORKER_COMMANDS
        meta = trigger["metadata"]
        assert meta["bootstrapServers"] == env["KAFKA_BOOTSTRAP_SERVERS"]
        assert meta["consumerGroup"] == effective(env, f"{command}_group_id")
        from schemas.topology import request_topics

        assert meta["topic"] in {effective(env, decl.setting) for decl in request_topics(command)}
        assert meta["offsetResetPolicy"] == "earliest"
        protocol = env.get("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
        assert meta.get("tls", "disable") == ("enable" if protocol.endswith("SSL") else "disable")
        if protocol.startswith("SASL"):
            assert meta["sasl"] == sasl_names[env["KAFKA_SASL_MECHANISM"]]
            named("TriggerAuthentication", trigger["authenticationRef"]["name"])
        if scaled["kind"] == "ScaledJob":
            assert cli(container["args"]).max_jobs == 1, "a ScaledJob's pod handles one job and exits"
            assert meta["lagThreshold"] == "1"


def test_scratch_volume_holds_the_workers_directories():
    image_env = dockerfile_env()
    for owner, _, container in containers():
        if worker_command(container) not in WORKER_COMMANDS:
            continue
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        for setting in ("CLS_MODEL_DIR", "CLS_TRAINING_WORK_DIR", "CLS_DATASET_CACHE_DIR"):
            path = container_env(container).get(setting, image_env[setting])
            assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (owner, setting, path, mounts)
        if worker_command(container) == "annotation":
            # the disk text cache is on, on the scratch volume (a restarted container skips the text pass)
            path = container_env(container).get("CLS_TEXT_CACHE_DIR")
            assert path and any(path.startswith(m.rstrip("/") + "/") for m in mounts), (owner, path, mounts)


# ---------------------------------------------------------------------------------------------------
# compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def resolve_defaults(value: Any) -> str:
    """``${VAR:-default}`` -> default, as compose resolves it with VAR unset."""
    text = str(value)
    assert "${" not in re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", "", text), f"variable without a default: {text}"
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", text))


def our_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in spec["services"].items() if s.get("build", {}).get("dockerfile")}


def test_compose_services_and_order():
    spec = compose()
    services = spec["services"]
    assert {"kafka", "minio", "topics", "annotation", "training", "prometheus"} <= set(services)
    ours = our_services(spec)
    assert set(ours) == {"topics", "annotation", "training"}
    for service in ours.values():
        assert service["build"]["context"] == ".." and (COMPOSE.parent / service["build"]["context"]
                                                        / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    topics = services["topics"]
    args = cli(topics["command"])
    assert (args.command, args.action) == ("topics", "create")
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics["restart"] == "no"
    for name in ("annotation", "training"):
        service = services[name]
        assert cli(service["command"]).command == name
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in topics or not topics["deploy"], "topic creation needs no GPU"
    assert services["minio-buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
            if isinstance(service["depends_on"], dict) and \
                    service["depends_on"][dependency].get("condition") == "service_healthy":
                assert "test" in services[dependency]["healthcheck"], (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
            else:
                assert source in spec["volumes"], source


def test_compose_kafka_is_kraft_with_explicit_topics():
    kafka = compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert not any("ZOOKEEPER" in name for name in env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    advertised = env["KAFKA_ADVERTISED_LISTENERS"]
    workers_see = {resolve_defaults(s["environment"]["KAFKA_BOOTSTRAP_SERVERS"]) for s in our_services(compose()).values()}
    assert workers_see == {"kafka:9092"} and "PLAINTEXT://kafka:9092" in advertised


def test_compose_images_are_pinned():
    for name, service in compose()["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), (name, image)


def test_compose_worker_env_is_real_settings(monkeypatch):
    known = all_setting_env_names() | AWS_ENV
    for name, service in our_services(compose()).items():
        env = {k: resolve_defaults(v) for k, v in service["environment"].items()}
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name}: not settings: {unknown}"
        settings = settings_from(env, monkeypatch)
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        if name != "topics":
            assert settings.worker.metrics_port is not None
            assert settings.worker.s3_endpoint_url == "http://minio:9000"
            grace = duration_s(service["stop_grace_period"])
            assert grace > settings.worker.drain_timeout_s, name
    annotation = compose()["services"]["annotation"]
    mounts = [volume.split(":")[1] for volume in compose()["x-worker"]["volumes"]]
    text_dir = annotation["environment"]["CLS_TEXT_CACHE_DIR"]
    assert any(text_dir.startswith(m.rstrip("/") + "/") for m in mounts), (text_dir, mounts)
    assert settings_from({k: resolve_defaults(v) for k, v in compose()["services"]["topics"]["environment"].items()},
                         monkeypatch).worker.request_topic_partitions == 12


def test_prometheus_scrapes_every_worker_service_on_its_metrics_port():
    spec = compose()
    prometheus = spec["services"]["prometheus"]
    mount = next(v for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    config_path = (COMPOSE.parent / mount.split(":")[0]).resolve()
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                scraped[host] = sd["port"]
    workers = {name: s for name, s in our_services(spec).items() if name != "topics"}
    assert set(scraped) == set(workers)
    for name, service in workers.items():
        assert scraped[name] == int(service["environment"]["CLS_METRICS_PORT"]), name
        assert str(scraped[name]) in [str(p) for p in service.get("expose", [])]


# ---------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending
    return instructions


def stages() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], list[str]]:
    """Global ARG defaults, stage name -> instructions (FROM first), stage order."""
    global_args: dict[str, str] = {}
    by_stage: dict[str, list[tuple[str, str]]] = {}
    order: list[str] = []
    current: str | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            parts = rest.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"every stage is named: FROM {rest}"
            current = parts[2]
            by_stage[current] = [(keyword, parts[0])]
            order.append(current)
        elif current is None:
            assert keyword == "ARG", keyword
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            by_stage[current].append((keyword, rest))
    return global_args, by_stage, order


def chain(stage: str, args: dict[str, str]) -> list[str]:
    """The stage and its ancestors (base stage first)."""
    _, by_stage, _ = stages()
    base = by_stage[stage][0][1]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    return (chain(base, args) if base in by_stage else []) + [stage]


def final_chain(prefetch: str) -> list[tuple[str, str]]:
    global_args, by_stage, order = stages()
    args = dict(global_args, PREFETCH=prefetch)
    return [instruction for stage in chain(order[-1], args) for instruction in by_stage[stage]]


def dockerfile_arg(name: str) -> str:
    for keyword, rest in final_chain("false"):
        if keyword == "ARG" and rest.partition("=")[0] == name:
            return rest.partition("=")[2]
    raise KeyError(name)


def dockerfile_env(prefetch: str = "false") -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in final_chain(prefetch):
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def json_form(keyword: str, prefetch: str = "false") -> list[str]:
    values = [rest for k, rest in final_chain(prefetch) if k == keyword]
    assert values, f"no {keyword}"
    parsed = json.loads(values[-1])  # exec form only: no shell between the signal and the worker
    assert isinstance(parsed, list)
    return parsed


@pytest.mark.parametrize("prefetch", ["false", "true"])
def test_dockerfile_entrypoint_and_cmd_are_cli_commands(prefetch):
    assert json_form("ENTRYPOINT", prefetch) == ["cls-worker"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^cls-worker = "consumers\.cli:main"$', pyproject, re.M)
    assert cli(json_form("CMD", prefetch)).command == "annotation"
    instructions = final_chain(prefetch)
    runs = [rest for k, rest in instructions if k == "RUN"]
    prefetch_runs = [r for r in runs if "cls-worker prefetch" in r]
    if prefetch == "true":
        assert len(prefetch_runs) == 1
        words = shlex.split(prefetch_runs[0].split("cls-worker", 1)[1])
        assert cli(words).command == "prefetch"
    else:
        assert not prefetch_runs


@pytest.mark.parametrize("prefetch", ["false", "true"])
def test_dockerfile_runs_as_a_created_non_root_user(prefetch):
    instructions = final_chain(prefetch)
    users = [rest for k, rest in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    user = users[-1]
    creating = [rest for k, rest in instructions if k == "RUN" and "useradd" in rest]
    assert creating, "the USER must be created in the final image's stages"
    useradd = shlex.split(creating[0].split("useradd", 1)[1].split("&&")[0])
    assert useradd[-1] == user
    uid = useradd[useradd.index("--uid") + 1]
    assert uid == "${APP_UID}" and int(dockerfile_arg("APP_UID")) >= 1000
    # the caches belong to that user
    assert any(k == "RUN" and f"chown -R {user}:{user} /cache" in rest for k, rest in instructions)
    # the prefetch RUN comes after USER, so the weights are written as the user
    if prefetch == "true":
        kinds = [k if "cls-worker prefetch" not in rest else "PREFETCH" for k, rest in instructions]
        assert kinds.index("USER") < kinds.index("PREFETCH")


def test_dockerfile_base_volume_env_and_port():
    global_args, by_stage, order = stages()
    assert re.match(r"(nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+|pytorch/pytorch:.*-runtime)$",
                    global_args["BASE_IMAGE"])
    instructions = final_chain("false")
    volumes = [json.loads(rest) for k, rest in instructions if k == "VOLUME"]
    assert volumes == [["/cache"]]
    assert [k for k, _ in by_stage[order[-1]]].index("VOLUME") > 0, "VOLUME last, after any prefetch"
    env = dockerfile_env()
    settings_env = {name for name in env if name.startswith(("CLS_", "KAFKA_"))}
    assert settings_env <= all_setting_env_names(), settings_env - all_setting_env_names()
    assert set(env) - settings_env <= IMAGE_ENV, set(env) - settings_env - IMAGE_ENV
    for name in ("CLS_MODEL_DIR", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "CLS_TRAINING_WORK_DIR",
                 "CLS_DATASET_CACHE_DIR"):
        assert env[name] == "/cache" or env[name].startswith("/cache/"), name
    exposed = [rest for k, rest in instructions if k == "EXPOSE"]
    assert exposed == [env["CLS_METRICS_PORT"]]
    assert [rest for k, rest in instructions if k == "STOPSIGNAL"] in ([], ["SIGTERM"])


def copied_sources() -> list[str]:
    _, by_stage, _ = stages()
    sources = []
    for instructions in by_stage.values():
        for keyword, rest in instructions:
            if keyword == "COPY" and not rest.startswith("--from"):
                words = [w for w in rest.split() if not w.startswith("--")]
                sources += words[:-1]
    return sources


def dockerignored(path: str) -> bool:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") or path == p for p in patterns)


def test_dockerfile_copies_the_package_and_dockerignore_keeps_the_rest_out():
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'include = \[(.*?)\]', pyproject).group(1)
    package_dirs = {p.strip().strip('"').rstrip("*") for p in packages.split(",")}
    sources = copied_sources()
    assert package_dirs | {"pyproject.toml"} <= set(sources)
    for source in sources:
        if "*" in source:
            continue
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"{source} is copied but .dockerignore excludes it"
    for heavy in (".venv", ".git", "tests", "deploy/local/lib", ".state"):
        assert dockerignored(heavy), heavy


def test_build_context_builds_a_wheel_with_the_entry_point_and_schemas(tmp_path):
    """What the build stage copies is enough for `pip install .` (pip builds the wheel it would install)."""
    context = tmp_path / "context"
    context.mkdir()
    for source in copied_sources():
        for path in ROOT.glob(source):
            if path.is_dir():
                shutil.copytree(path, context / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(path, context / path.name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"),
         str(context)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cls_workers-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "cls-worker = consumers.cli:main" in entry_points
    assert {f"schemas/json/{p.name}" for p in (ROOT / "schemas" / "json").glob("*.json")} <= set(names)
    assert "schemas/asyncapi.py" in names


def test_dockerfile_cpu_variant_is_a_build_argument_of_the_same_stages():
    """TORCH=cpu swaps only the Python stage (Debian's CPU torch); the GPU default is unchanged."""
    global_args, by_stage, order = stages()
    assert global_args["TORCH"] == "cuda"
    gpu = chain(order[-1], dict(global_args, PREFETCH="false"))
    cpu = chain(order[-1], dict(global_args, TORCH="cpu", PREFETCH="false"))
    assert "python-cpu" not in gpu and "python-cuda" in gpu
    assert cpu[:2] == ["python-cuda", "python-cpu"]
    assert [s for s in cpu if s != "python-cpu"] == gpu
    installs = " ".join(rest for keyword, rest in by_stage["python-cpu"] if keyword == "RUN")
    assert "python3-torch" in installs and "python3-torchvision" in installs and "is_built()" in installs
    deps = " ".join(rest for keyword, rest in by_stage["deps"] if keyword == "RUN")
    assert "--system-site-packages" in deps and "['optional-dependencies']['worker']" in deps
