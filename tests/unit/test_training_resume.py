"""Checkpoint, stop, resume: preempt at an epoch boundary and mid-epoch, cancel, foreign checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from ml.training import NullCallbacks, TrainingStopped, stratified_split, train
from ml.training.checkpoint import checkpoint_path, load_checkpoint
from tests.fixtures.trained_model import digits_dataset, digits_spec  # noqa: F401  (fixture)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def small_digits(digits_dataset):
    samples, _, _ = digits_dataset
    subset, _ = stratified_split(samples[:400], 0.5, seed=1)  # 200 images, stratified
    train_samples, val_samples = stratified_split(subset, 0.3, seed=1)
    return train_samples, val_samples


def _spec(**overrides):
    values = dict(model_name="test_resnet", epochs=3, batch_size=32, learning_rate=3e-3, image_size=16, heartbeat_s=3600)
    values.update(overrides)
    return digits_spec(**values)


class Recorder(NullCallbacks):
    """Records callbacks; after epoch ``arm_after_epoch`` ends, returns ``reason`` on the ``on_call``-th check."""

    def __init__(self, reason: str | None = None, arm_after_epoch: int | None = None, on_call: int = 1) -> None:
        self.reason = reason
        self.armed = arm_after_epoch == 0
        self.arm_after_epoch = arm_after_epoch
        self.on_call = on_call
        self.calls_since_armed = 0
        self.epochs: list[tuple[int, int, dict]] = []
        self.heartbeats: list[tuple[int, int, int, dict]] = []

    def on_epoch_end(self, epoch, epochs, metrics):
        self.epochs.append((epoch, epochs, metrics))
        if epoch == self.arm_after_epoch:
            self.armed = True

    def on_heartbeat(self, epoch, step, steps, metrics):
        self.heartbeats.append((epoch, step, steps, metrics))

    def should_stop(self):
        if not self.armed or self.reason is None:
            return None
        self.calls_since_armed += 1
        return self.reason if self.calls_since_armed >= self.on_call else None


@pytest.fixture(scope="module")
def uninterrupted(small_digits, tmp_path_factory):
    train_samples, val_samples = small_digits
    recorder = Recorder()
    result = train(_spec(), train_samples, val_samples, tmp_path_factory.mktemp("straight"), recorder)
    return result, recorder


def _assert_same_weights(a, b):
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _history_without_timing(result):
    """Per-epoch metrics minus timings; train_loss rounded (its float64 partial sums are flushed at other steps)."""
    timing = {"images_per_s", "epoch_time_s", "eta_s"}
    return [
        {k: round(v, 9) if k == "train_loss" else v for k, v in entry.items() if k not in timing}
        for entry in result.metrics["epochs"]
    ]


def test_preempt_after_epoch_one_then_resume_matches_uninterrupted_run(small_digits, uninterrupted, tmp_path):
    train_samples, val_samples = small_digits
    first = Recorder("preempt", arm_after_epoch=1)
    with pytest.raises(TrainingStopped) as info:
        train(_spec(), train_samples, val_samples, tmp_path, first)
    assert info.value.reason == "preempt" and (info.value.epoch, info.value.step) == (2, 0)
    assert [e[0] for e in first.epochs] == [1]
    state = load_checkpoint(tmp_path)
    assert (state["epoch"], state["step"]) == (1, 0)

    second = Recorder()
    result = train(_spec(), train_samples, val_samples, tmp_path, second)
    assert result.resumed_from_epoch == 1 and result.resumed_from_step == 0
    assert [e[0] for e in second.epochs] == [2, 3]
    assert result.epochs_run == 3 and len(result.metrics["epochs"]) == 3
    reference, _ = uninterrupted
    assert result.metrics.keys() == reference.metrics.keys()
    # CPU, num_workers=0: the resumed run is bit-identical to the uninterrupted one
    _assert_same_weights(result, reference)
    assert _history_without_timing(result) == _history_without_timing(reference)
    assert result.best_epoch == reference.best_epoch
    assert result.metrics["confusion_matrix"] == reference.metrics["confusion_matrix"]


# Checks in an epoch: one at its start, one after each of the 5 training steps, one after each validation batch.
@pytest.mark.parametrize(
    ("on_call", "stopped_at_step"),
    [(3, 2), (7, 5)],  # after step 2 of epoch 2; during epoch 2's validation (resumes with validation)
)
def test_preempt_mid_epoch_resumes_at_the_next_step(on_call, stopped_at_step, small_digits, uninterrupted, tmp_path):
    train_samples, val_samples = small_digits
    first = Recorder("preempt", arm_after_epoch=1, on_call=on_call)
    with pytest.raises(TrainingStopped) as info:
        train(_spec(), train_samples, val_samples, tmp_path, first)
    assert (info.value.epoch, info.value.step) == (2, stopped_at_step)
    second = Recorder()
    result = train(_spec(), train_samples, val_samples, tmp_path, second)
    assert result.resumed_from_epoch == 1 and result.resumed_from_step == stopped_at_step
    assert [e[0] for e in second.epochs] == [2, 3]
    reference, _ = uninterrupted
    _assert_same_weights(result, reference)
    assert _history_without_timing(result) == _history_without_timing(reference)


def test_cancel_raises_training_stopped_after_checkpointing(small_digits, tmp_path):
    train_samples, val_samples = small_digits
    with pytest.raises(TrainingStopped) as info:
        train(_spec(), train_samples, val_samples, tmp_path, Recorder("cancel", arm_after_epoch=0))
    assert info.value.reason == "cancel" and str(info.value) == "cancel"
    assert checkpoint_path(tmp_path).is_file()
    assert not (tmp_path / "package").exists()


def test_a_finished_checkpoint_repackages_without_training(small_digits, uninterrupted, tmp_path):
    train_samples, val_samples = small_digits
    result = train(_spec(epochs=1), train_samples, val_samples, tmp_path, NullCallbacks())
    again = Recorder()
    repeated = train(_spec(epochs=1), train_samples, val_samples, tmp_path, again)
    assert again.epochs == [] and repeated.resumed_from_epoch == 1
    _assert_same_weights(result, repeated)
    assert json.loads((repeated.package_dir / "metrics.json").read_text())["best_epoch"] == result.best_epoch


def test_a_checkpoint_of_another_run_is_ignored(small_digits, tmp_path):
    train_samples, val_samples = small_digits
    with pytest.raises(TrainingStopped):
        train(_spec(), train_samples, val_samples, tmp_path, Recorder("preempt", arm_after_epoch=1))
    result = train(_spec(epochs=1, learning_rate=1e-3), train_samples, val_samples, tmp_path, NullCallbacks())
    assert result.resumed_from_epoch is None and result.epochs_run == 1


def test_heartbeats_and_epoch_metrics(small_digits, tmp_path):
    train_samples, val_samples = small_digits
    recorder = Recorder()
    train(_spec(epochs=1, heartbeat_s=1e-9), train_samples, val_samples, tmp_path, recorder)
    train_beats = [b for b in recorder.heartbeats if b[3]["phase"] == "train"]
    assert train_beats and train_beats[0][:3] == (1, 1, 5)  # 140 images / 32 -> 5 steps
    assert {"train_loss", "lr", "images_per_s", "eta_s"} <= set(train_beats[0][3])
    (epoch, epochs, metrics), = recorder.epochs
    assert (epoch, epochs) == (1, 1)
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "images_per_s", "eta_s", "epoch_time_s"} <= set(metrics)


def test_early_stopping_stops_after_patience(small_digits, tmp_path):
    train_samples, val_samples = small_digits
    # a learning rate this small cannot improve accuracy every epoch; patience 1 stops at the first miss
    recorder = Recorder()
    result = train(
        _spec(epochs=6, learning_rate=1e-7, early_stopping_patience=1), train_samples, val_samples, tmp_path, recorder
    )
    assert result.stopped_early and result.epochs_run < 6
    assert result.epochs_run == result.best_epoch + 1


def test_worker_processes_load_data_and_stop_cleanly(small_digits, tmp_path):
    train_samples, val_samples = small_digits
    with pytest.raises(TrainingStopped):
        train(_spec(num_workers=2), train_samples, val_samples, tmp_path, Recorder("preempt", arm_after_epoch=0, on_call=2))
    result = train(_spec(num_workers=2, epochs=1), train_samples, val_samples, tmp_path / "fresh", NullCallbacks())
    assert result.epochs_run == 1 and result.metrics["val_accuracy"] >= 0.0
