"""Shared fixtures: one real Kafka broker, one real S3 API server and one real PostgreSQL server per
session (each started only when a test asks for it), a local image server, and a trained model shared by
the tests that need one.

Two kinds of tests are deselected where the machine cannot run them, never silently:
- ``cuda`` (``tests/cuda``) without a CUDA device (the header and the summary say so);
- ``container`` (``tests/containers``) without a Docker engine or the local images (``make images``);
  with ``CLS_REQUIRE_CONTAINERS=1`` (set by ``.ci/run``) that is a failure instead.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.s3",
    "tests.fixtures.postgres",
    "tests.fixtures.http_server",
    "tests.fixtures.trained_model",
    "tests.fixtures.real_backbone",
    "tests.fixtures.light_venv",
]

REQUIRE_CONTAINERS_ENV = "CLS_REQUIRE_CONTAINERS"

_DESELECTED_CUDA: list[str] = []
_DESELECTED_CONTAINERS: list[str] = []


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_report_header(config):  # type: ignore[no-untyped-def]
    if _cuda_available():
        import torch

        return f"cuda: {torch.cuda.get_device_name()} (tests marked cuda run)"
    return "cuda: not available - tests marked cuda are deselected (bench/device_check.sh runs them on a GPU)"


def container_tests_blocker() -> str | None:
    """Why the container tests cannot run here, or None when they can."""
    from testkit.containers import Images, engine_answers, missing_images

    if not engine_answers():
        return "no Docker engine answers (as root: deploy/images/engine.sh start)"
    missing = missing_images(Images.from_env())
    if missing:
        return f"images missing: {', '.join(missing)} (make images)"
    return None


def _deselect(config: pytest.Config, items: list[pytest.Item], marker: str) -> list[pytest.Item]:
    chosen = [item for item in items if item.get_closest_marker(marker) is not None]
    if chosen:
        config.hook.pytest_deselected(items=chosen)
        items[:] = [item for item in items if item.get_closest_marker(marker) is None]
    return chosen


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _cuda_available():
        _DESELECTED_CUDA.extend(item.nodeid for item in _deselect(config, items, "cuda"))
    if not any(item.get_closest_marker("container") for item in items):
        return
    blocker = container_tests_blocker()
    if blocker is None:
        return
    if os.environ.get(REQUIRE_CONTAINERS_ENV) == "1":
        raise pytest.UsageError(f"{REQUIRE_CONTAINERS_ENV}=1 but the container tests cannot run: {blocker}")
    deselected = _deselect(config, items, "container")
    _DESELECTED_CONTAINERS.append(f"!!!! {len(deselected)} container tests DESELECTED: {blocker}")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_DESELECTED_CONTAINERS[-1], yellow=True, bold=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if _DESELECTED_CUDA:
        terminalreporter.write_line(
            f"cuda: {len(_DESELECTED_CUDA)} CUDA tests deselected: no CUDA device here "
            "(run bench/device_check.sh on a GPU machine)", yellow=True)
    for line in _DESELECTED_CONTAINERS:
        terminalreporter.write_line(line, yellow=True, bold=True)
