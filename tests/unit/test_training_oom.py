"""Out of memory during training: the real loop halves the micro-batch, keeps the effective batch
with gradient accumulation, reports both, and fails with out_of_memory only below one image per micro-batch.

The fault is injected into the real model: a forward pre-hook raises the allocator's own error whenever a forward
pass gets more than ``limit`` images (the CPU ``RuntimeError`` or ``torch.cuda.OutOfMemoryError``).
"""

from __future__ import annotations

import pytest
import torch

import ml.training.loop as loop_module
from ml.training import NullCallbacks, TrainingOutOfMemory, stratified_split, train
from tests.fixtures.trained_model import digits_dataset, digits_spec  # noqa: F401  (fixture)

torch.set_num_threads(2)


class Recorder(NullCallbacks):
    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_epoch_end(self, epoch, epochs, metrics):
        self.epochs.append(metrics)


@pytest.fixture(scope="module")
def tiny_digits(digits_dataset):
    samples, _, _ = digits_dataset
    subset, _ = stratified_split(samples[:300], 0.8, seed=2)  # 60 images
    return stratified_split(subset, 0.3, seed=2)


def _inject_oom(monkeypatch, limit: int, error: type[BaseException] | None = None) -> dict[str, list[int]]:
    """Every model the loop builds raises OOM for forward passes over more than ``limit`` images."""
    seen: dict[str, list[int]] = {"ok": [], "refused": []}
    real_build = loop_module.build_model

    def build_with_fault(*args, **kwargs):
        model, model_kwargs = real_build(*args, **kwargs)

        def hook(_module, inputs):
            size = inputs[0].shape[0]
            if size > limit:
                seen["refused"].append(size)
                if error is not None:
                    raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
                raise RuntimeError(
                    f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                    f"you tried to allocate {size * 1_000_000_000} bytes. Error code 12 (Cannot allocate memory)")
            seen["ok"].append(size)

        model.register_forward_pre_hook(hook)
        return model, model_kwargs

    monkeypatch.setattr(loop_module, "build_model", build_with_fault)
    return seen


def _spec(**overrides):
    values = dict(model_name="test_resnet", epochs=2, batch_size=16, learning_rate=3e-3, image_size=16,
                  heartbeat_s=3600, augmentation="none")
    values.update(overrides)
    return digits_spec(**values)


def test_cpu_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_digits, tmp_path, monkeypatch):
    train_samples, val_samples = tiny_digits
    seen = _inject_oom(monkeypatch, limit=5)
    callbacks = Recorder()
    result = train(_spec(), train_samples, val_samples, tmp_path, callbacks)
    assert result.epochs_run == 2
    assert seen["refused"][:2] == [16, 8]  # 16 -> 8 -> 4 fits
    assert max(seen["ok"]) == 4 and all(size <= 5 for size in seen["ok"])
    assert set(seen["refused"]) == {16, 8}  # once halved, later steps start at the small micro-batch
    for metrics in callbacks.epochs:
        assert (metrics["effective_batch"], metrics["micro_batch"], metrics["accumulation_steps"]) == (16, 4, 4)
    assert result.metrics["epochs"][-1]["effective_batch"] == 16  # recorded in the package's metrics too


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tiny_digits, tmp_path, monkeypatch):
    """A whole-batch step in micro-batches lands on the same weights as one plain step (a model without
    BatchNorm, whose batch statistics would differ by design)."""
    train_samples, val_samples = tiny_digits
    spec = dict(model_name="test_vit", image_size=32, epochs=1, batch_size=len(train_samples), learning_rate=1e-4)
    plain = train(_spec(**spec), train_samples, val_samples, tmp_path / "a", NullCallbacks())
    seen = _inject_oom(monkeypatch, limit=len(train_samples) // 4)
    split = train(_spec(**spec), train_samples, val_samples, tmp_path / "b", NullCallbacks())
    assert seen["refused"] and split.metrics["epochs"][0]["accumulation_steps"] == 4
    for (name, a), (_, b) in zip(plain.model.state_dict().items(), split.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert plain.metrics["train_loss"] == pytest.approx(split.metrics["train_loss"], rel=1e-5)


def test_cuda_oom_error_type_is_handled_too(tiny_digits, tmp_path, monkeypatch):
    train_samples, val_samples = tiny_digits
    seen = _inject_oom(monkeypatch, limit=3, error=torch.cuda.OutOfMemoryError)
    result = train(_spec(epochs=1), train_samples, val_samples, tmp_path, NullCallbacks())
    assert result.metrics["epochs"][0]["micro_batch"] == 2 and seen["refused"][:3] == [16, 8, 4]


def test_out_of_memory_below_one_image_fails_with_out_of_memory(tiny_digits, tmp_path, monkeypatch):
    train_samples, val_samples = tiny_digits
    seen = _inject_oom(monkeypatch, limit=0)
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(_spec(), train_samples, val_samples, tmp_path, NullCallbacks())
    assert caught.value.code == "out_of_memory" and "micro-batch of 1" in str(caught.value)
    assert seen["refused"] == [16, 8, 4, 2, 1]


def test_out_of_memory_in_the_optimizer_step_fails_typed_without_halving(tiny_digits, tmp_path, monkeypatch):
    """The optimizer's memory is the model's (weights, gradients, two moments): halving the batch cannot help."""
    train_samples, val_samples = tiny_digits
    seen = _inject_oom(monkeypatch, limit=1_000)  # forward passes always fit
    steps: list[int] = []

    def step_out_of_memory(self, closure=None):
        steps.append(1)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 94371840 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(torch.optim.AdamW, "step", step_out_of_memory)
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(_spec(epochs=1), train_samples, val_samples, tmp_path, NullCallbacks())
    message = str(caught.value)
    assert caught.value.code == "out_of_memory" and "optimizer step" in message and "smaller batch cannot help" in message
    assert "M trainable parameters" in message and "MiB" in message
    assert steps == [1] and seen["refused"] == []  # failed at once, no halving of the micro-batch


def test_other_runtime_errors_are_not_taken_for_oom(tiny_digits, tmp_path, monkeypatch):
    train_samples, val_samples = tiny_digits
    real_build = loop_module.build_model

    def broken(*args, **kwargs):
        model, kwargs_out = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, _i: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
        return model, kwargs_out

    monkeypatch.setattr(loop_module, "build_model", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train(_spec(epochs=1), train_samples, val_samples, tmp_path, NullCallbacks())
