"""The few-shot code path for CLIP: ViT-B-32 with random weights (no hub here), its own text classifier and
image embeddings of a few digits. Random weights prove the mechanics, not the gains (those are measured on
the model trained here, tests/unit/test_fewshot_digits.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ml.backbones import load_zero_shot_model
from ml.fewshot import SupportSet, fit_few_shot, zero_shot_weights
from ml.zeroshot import DEFAULT_TEMPLATES

CLASSES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def clip_features():
    from sklearn.datasets import load_digits

    torch.set_num_threads(2)
    model = load_zero_shot_model("clip", "ViT-B-32", "random", device="cpu")
    digits = load_digits()
    rows = np.concatenate([np.flatnonzero(digits.target == c)[:6] for c in range(len(CLASSES))])
    images = [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((64, 64)).convert("RGB") for i in rows]
    pixels = torch.stack([model.preprocess(image) for image in images])
    embeddings = model.encode_images(pixels).numpy()
    return model, embeddings, digits.target[rows]


def test_clip_text_classifier_and_heads_run_end_to_end(clip_features):
    model, embeddings, labels = clip_features
    text = zero_shot_weights(model, CLASSES, DEFAULT_TEMPLATES[:2])
    assert text.weights.shape == (4, embeddings.shape[1]) and text.logit_scale == pytest.approx(float(model.logit_scale))
    np.testing.assert_allclose(np.linalg.norm(text.weights, axis=1), 1.0, atol=1e-5)
    # the text classifier's softmax is the model's own zero-shot confidence
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(text.logits(embeddings)), dim=1).numpy(),
        model.scores(torch.from_numpy(embeddings), torch.from_numpy(text.weights)).numpy(), atol=1e-5)
    support_rows = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(4)])
    query_rows = np.setdiff1d(np.arange(labels.size), support_rows)
    support = SupportSet.from_examples(embeddings[support_rows], [CLASSES[i] for i in labels[support_rows]], CLASSES)
    for method in ("auto", "tip_adapter", "linear_probe"):
        result = fit_few_shot(support, method, text)
        probabilities = result.probabilities(embeddings[query_rows])
        assert probabilities.shape == (query_rows.size, 4) and np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert result.examples_per_class == dict.fromkeys(CLASSES, 4) and result.cv_folds == 4
        assert result.method in ("tip_adapter", "linear_probe") and 0.0 <= result.cv_accuracy <= 1.0
