"""Fixtures shared by the zero-shot model tests (import them into a test module to use them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _few_threads():
    """Two torch threads per test (a 2-core machine), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Four real photos from scikit-image and scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), load_sample_image("china.jpg")]
    return [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in arrays]
