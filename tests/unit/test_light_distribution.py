"""The light distribution (``pip install 'cls-workers[testkit]'``, no ``worker`` extra) in a fresh venv: small,
quick to install from the local wheel cache, and importing the client, the contract and the test kit loads
no part of the ML stack (docs/client.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

#: top-level modules that belong to the workers' ML stack (or to the workers themselves)
HEAVY = {"torch", "torchvision", "numpy", "PIL", "timm", "open_clip", "transformers", "scipy", "sklearn",
         "onnxruntime", "faiss", "triton", "consumers", "handlers", "ml"}
IMPORTS = "import cls_client, schemas, schemas.export, testkit.containers"


def test_light_venv_is_small_installs_quickly_and_has_no_ml_stack(light_venv):
    assert light_venv.size_bytes < 150e6, f"{light_venv.size_bytes / 1e6:.1f} MB"
    # CPU time: the wall time on this shared 2-core machine is mostly waiting for the neighbours' work
    assert light_venv.install_cpu_s < 60, f"{light_venv.install_cpu_s:.1f} s CPU ({light_venv.install_s:.1f} s wall)"
    listed = light_venv.run("-m", "pip", "list", "--format", "json")
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert {"cls-workers", "pydantic", "aiokafka", "testcontainers"} <= installed
    assert not installed & {"torch", "torchvision", "numpy", "pillow", "timm", "open-clip-torch", "transformers",
                            "pydantic-settings", "aioboto3", "scikit-learn"}, installed


def test_importing_the_client_and_test_kit_loads_nothing_of_the_ml_stack(light_venv):
    result = light_venv.run("-X", "importtime", "-c", f"{IMPORTS}; import sys; print(sorted(sys.modules))")
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "cls_client" in imported and "testkit.containers" in imported
    assert not {name.split(".")[0] for name in imported} & HEAVY, sorted(n for n in imported if n.split(".")[0] in HEAVY)
    loaded = set(eval(result.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own printed list of names
    assert not {name.split(".")[0] for name in loaded} & HEAVY


def test_the_client_builds_and_encodes_requests_in_the_light_venv(light_venv):
    code = ("from cls_client import encode_request; import json; r = encode_request({'task': 'classify', "
            "'model': 'clip', 'classes': ['cat', 'dog'], 'images': [{'id': 'a', 'url': 's3://d/a.jpg'}]}); "
            "print(r.topic, json.loads(r.value)['classes'])")
    result = light_venv.run("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "cls.annotation.requests ['cat', 'dog']"
