"""Embeddings of held-back digits from the model trained here (the ``trained_digits`` fixture of tests.fixtures.trained_model): a real embedding
of the digits domain for few-shot and audit tests. The pool is the trained model's validation and test
splits, which its weights never trained on (validation only picked the best epoch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_MEMO: dict[str, object] = {}


@dataclass(frozen=True)
class DigitEmbeddings:
    train: np.ndarray  # [N_train, D] the backbone's own training split
    train_labels: np.ndarray
    pool: np.ndarray  # [N_pool, D] validation + test splits
    pool_labels: np.ndarray
    class_names: list[str]


def _embed(model, samples: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    pixels = torch.stack([model.preprocess(Image.open(path)) for path, _ in samples])
    features = torch.cat([model.embed(batch) for batch in pixels.split(256)])  # the "custom" family's embedding
    return features.numpy(), np.array([label for _, label in samples], dtype=np.int64)


def digit_embeddings(trained) -> DigitEmbeddings:
    """Pooled pre-logits embeddings (L2-normalised) of every digit, computed once per process."""
    if "digits" not in _MEMO:
        from ml.trained import TrainedModel

        model = TrainedModel.load(trained.package_dir, device="cpu")
        train, train_labels = _embed(model, trained.train)
        pool, pool_labels = _embed(model, trained.val + trained.test)
        _MEMO["digits"] = DigitEmbeddings(train, train_labels, pool, pool_labels, list(trained.class_names))
    return _MEMO["digits"]  # type: ignore[return-value]
