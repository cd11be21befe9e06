"""Small pieces of ml.training: spec validation, split, batches, schedule, metrics, RNG checkpoint round trip."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ml.training import ConfigError, TrainSpec, stratified_split
from ml.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ml.training.data import EpochBatches, balanced_class_weights, balanced_sample_weights, check_samples
from ml.training.errors import DatasetError
from ml.training.metrics import classification_metrics, confusion_matrix
from ml.training.schedule import (
    MIN_LR_FACTOR,
    SHORT_SCHEDULE_EPOCHS,
    schedule_defaults,
    warmup_cosine,
    warmup_stable_decay,
)


def _spec(**overrides) -> TrainSpec:
    values = dict(model_name="resnet10t", num_classes=2, class_names=["a", "b"])
    values.update(overrides)
    return TrainSpec(**values)


def test_spec_validate_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        _spec(class_names=["a"], augmentation="extreme", epochs=0).validate()
    message = str(info.value)
    assert "len(class_names)" in message and "augmentation" in message and "epochs" in message


def test_spec_from_config_takes_known_fields_only():
    config = SimpleNamespace(
        model_name="convnext_tiny", num_classes=2, epochs=3, batch_size=8, learning_rate=0.01,
        augmentation="heavy", pretrained=True, pretrained_url="s3://b/w.safetensors", val_fraction=0.2,
        image_size=None, seed=7,
    )
    spec = TrainSpec.from_config(config, ["cat", "dog"], pretrained_path="/tmp/w.safetensors", device="cpu")
    assert spec.model_name == "convnext_tiny" and spec.epochs == 3 and spec.seed == 7
    assert spec.class_names == ["cat", "dog"] and spec.pretrained_path == "/tmp/w.safetensors"
    assert spec.weight_decay == 0.05  # default kept
    spec.validate()


def test_stratified_split_keeps_class_proportions_and_is_deterministic():
    samples = [(f"{label}-{i}", label) for label, count in [(0, 50), (1, 10), (2, 2), (3, 1)] for i in range(count)]
    train, val = stratified_split(samples, 0.2, seed=3)
    assert sorted(train + val) == sorted(samples)
    val_counts = {label: sum(1 for _, l in val if l == label) for label in range(4)}
    assert val_counts == {0: 10, 1: 2, 2: 1, 3: 0}  # a lone sample stays in train
    assert stratified_split(samples, 0.2, seed=3) == (train, val)
    assert stratified_split(samples, 0.2, seed=4) != (train, val)
    with pytest.raises(ValueError):
        stratified_split(samples, 1.0, seed=0)


def test_check_samples_rejects_empty_and_out_of_range_labels():
    with pytest.raises(DatasetError, match="empty"):
        check_samples([], 3, "val")
    with pytest.raises(DatasetError, match="label 3"):
        check_samples([("x.png", 3)], 3, "train")


def test_epoch_batches_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    batches = EpochBatches(num_samples=10, batch_size=4, seed=1)
    batches.set_epoch(2)
    full = list(batches)
    assert [len(b) for b in full] == [4, 4, 2]
    assert sorted(i for b in full for i in b) == list(range(10))
    batches.set_epoch(2, start_step=1)
    assert list(batches) == full[1:] and len(batches) == 2
    batches.set_epoch(3)
    assert list(batches) != full
    single_left = EpochBatches(num_samples=9, batch_size=4, seed=1)
    assert single_left.steps_per_epoch == 2  # a trailing batch of one is dropped (BatchNorm)


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=10, warmup_steps=2)
    values = [factor(step) for step in range(10)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0) and values[2] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(MIN_LR_FACTOR)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_warmup_stable_decay_schedule():
    factor = warmup_stable_decay(total_steps=20, warmup_steps=2)
    values = [factor(step) for step in range(20)]
    assert values[0] == pytest.approx(0.5) and values[1:16] == [1.0] * 15  # warmup, then the base lr held
    assert all(a > b for a, b in zip(values[15:], values[16:]))  # the last fifth (4 steps) decays
    assert values[-1] == pytest.approx(MIN_LR_FACTOR) and factor(25) == pytest.approx(MIN_LR_FACTOR)
    assert [warmup_stable_decay(1, 0)(0)] == [pytest.approx(MIN_LR_FACTOR)]  # one step: it is the last
    short = warmup_stable_decay(total_steps=3, warmup_steps=3)  # all warmup: no step is left to decay
    assert [short(step) for step in range(3)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]


def test_unset_warmup_and_smoothing_scale_with_the_schedule():
    from schemas.training import TrainingConfig

    short = TrainSpec.from_config(TrainingConfig(model_name="resnet10t", num_classes=2, epochs=3), ["a", "b"])
    assert (short.warmup_epochs, short.label_smoothing) == (0.0, 0.0)
    long = _spec(epochs=40)
    assert (long.warmup_epochs, long.label_smoothing) == (2.0, 0.1)
    assert schedule_defaults(1000) == (5.0, 0.1)  # warmup is capped, whatever the schedule
    assert schedule_defaults(SHORT_SCHEDULE_EPOCHS - 1) == (0.0, 0.0)
    assert schedule_defaults(SHORT_SCHEDULE_EPOCHS) == (0.5, 0.1)
    # what a request sets is kept, including an explicit zero on a long schedule
    explicit = TrainSpec.from_config(
        TrainingConfig(model_name="resnet10t", num_classes=2, epochs=40, warmup_epochs=0, label_smoothing=0.2), ["a", "b"])
    assert (explicit.warmup_epochs, explicit.label_smoothing) == (0.0, 0.2)
    assert explicit.to_json_dict()["label_smoothing"] == 0.2 and long.to_json_dict()["warmup_epochs"] == 2.0


def test_classification_metrics():
    targets = np.array([0, 0, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0])
    metrics = classification_metrics(targets, predictions, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(0.6)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert metrics["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert confusion_matrix(targets, predictions, 3).sum() == 5


def test_checkpoint_round_trip_restores_rng_states(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    rng = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path, {"rng": rng, "model": {"w": torch.ones(2)}})
    assert not list((tmp_path / "checkpoint").glob("*.tmp"))
    state = load_checkpoint(tmp_path)
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(state["model"]["w"], torch.ones(2))


def test_unreadable_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"garbage")
    assert load_checkpoint(tmp_path) is None


def test_classification_metrics_macro_f1_and_balanced_accuracy():
    targets = np.array([0] * 8 + [1] * 2)
    predictions = np.array([0] * 8 + [0, 1])
    metrics = classification_metrics(targets, predictions, ["a", "b", "c"])  # "c" has no image: not averaged
    f1_a, f1_b = 2 * (8 / 9) / (8 / 9 + 1), 2 * 1 * 0.5 / 1.5
    assert metrics["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["accuracy"] == pytest.approx(0.9)


def test_weighted_epoch_batches_balance_classes_deterministically():
    samples = [("x", 0)] * 90 + [("y", 1)] * 10
    weights = balanced_sample_weights(samples, 2)
    batches = EpochBatches(num_samples=100, batch_size=10, seed=0, weights=weights)
    batches.set_epoch(0)
    drawn = [i for batch in batches for i in batch]
    assert len(drawn) == 100 and drawn == [i for batch in batches for i in batch]
    minority = sum(1 for i in drawn if samples[i][1] == 1)
    assert 35 <= minority <= 65  # ~50 of 100 draws, not ~10
    batches.set_epoch(1)
    assert [i for batch in batches for i in batch] != drawn
    assert balanced_class_weights(samples, 3) == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 1.0])


def test_spec_validates_class_weighting_and_export():
    with pytest.raises(ConfigError) as info:
        _spec(class_weighting="oversample", export=["tflite"]).validate()
    assert "class_weighting" in str(info.value) and "tflite" in str(info.value)
    _spec(class_weighting="sampler", export=["onnx"]).validate()
