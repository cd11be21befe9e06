"""One container stack for the container tests: a Docker network, Kafka, the S3 API, topics and both
workers from the local images (``testkit.containers``), for one module: stopped when the module ends, so the
idle broker, S3 API and workers do not load the machine for the rest of the session. Deselected when no engine
answers (see tests/conftest.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from testkit.containers import WorkerSpec, WorkerStack

ANNOTATION_ENV = {"CLS_RESULT_PART_SIZE": "16", "CLS_DRAIN_TIMEOUT_S": "60"}
TRAINING_ENV = {"CLS_TORCH_THREADS": "2"}


@pytest.fixture(scope="module")
def stack() -> Iterator[WorkerStack]:
    with WorkerStack(annotation=WorkerSpec("annotation", env=ANNOTATION_ENV),
                     training=WorkerSpec("training", env=TRAINING_ENV)) as running:
        yield running


def photo_jpeg(index: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A real photo (scikit-image), resized and cropped a little differently per index, as JPEG."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    image = Image.fromarray(np.asarray(photos[index % len(photos)], dtype=np.uint8))
    shift = index % 17
    image = image.crop((shift, shift, image.width - shift, image.height - shift)).resize(size)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()
