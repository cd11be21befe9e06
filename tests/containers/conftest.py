"""One container stack for the container tests: a Docker network, Kafka, the S3 API, topics and both
workers from the local images (``testkit.containers``), for one module: stopped when the module ends, so the
idle broker, S3 API and workers do not load the machine for the rest of the session. Deselected when no engine
answers (see tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testkit.containers import WorkerSpec, WorkerStack

ANNOTATION_ENV = {"CLS_RESULT_PART_SIZE": "16", "CLS_DRAIN_TIMEOUT_S": "60"}
TRAINING_ENV = {"CLS_TORCH_THREADS": "2"}


@pytest.fixture(scope="module")
def stack() -> Iterator[WorkerStack]:
    with WorkerStack(annotation=WorkerSpec("annotation", env=ANNOTATION_ENV),
                     training=WorkerSpec("training", env=TRAINING_ENV)) as running:
        yield running

