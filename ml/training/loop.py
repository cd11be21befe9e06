"""The training loop: fine-tune a timm classifier, checkpoint every epoch, resume, stop on request, package.

Out of memory (CUDA's error, or the CPU allocator's ``RuntimeError``) during a step halves the micro-batch and
redoes the step with gradient accumulation over micro-batches, so the effective batch (``batch_size``) and the
optimizer's steps stay as asked; validation runs in micro-batches of the same size. Only when a micro-batch of one
sample does not fit does the run fail (``TrainingOutOfMemory``, code ``out_of_memory``). Progress metrics report
``effective_batch``, ``micro_batch`` and ``accumulation_steps``.

Resume semantics: a checkpoint is written after EVERY epoch and whenever ``should_stop()`` returns a reason.
A stop inside an epoch checkpoints at that step boundary, and the resumed run continues the SAME epoch from
the next step (the batch order of an epoch depends only on (seed, epoch)); a stop during validation resumes
with validation. With ``num_workers=0`` on CPU a resumed run reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm.optim
import torch
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from ml.training.augment import DataConfig, build_mixup, eval_transform, resolve_data_config, train_transform
from ml.training.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ml.training.config import TrainingCallbacks, TrainResult, TrainSpec
from ml.training.auto_accept import auto_accept_tables, summary as auto_accept_summary
from ml.training.calibration import calibrate, calibration_report, softmax
from ml.training.data import (
    EpochBatches,
    ImageFileDataset,
    Sample,
    balanced_class_weights,
    balanced_sample_weights,
    check_samples,
    epoch_seed,
)
from ml.device import DevicePolicy, is_out_of_memory, policy_for
from ml.training.errors import ConfigError, TrainingOutOfMemory, TrainingStopped
import ml.training.multilabel as multilabel
from ml.training.metrics import classification_metrics
from ml.training.models import build_model, check_model_name
from ml.training.package import ONNX_FILE, PACKAGE_DIR, build_package_config, write_package
from ml.training.schedule import warmup_cosine, warmup_stable_decay

log = logging.getLogger(__name__)

_PREFETCH_FACTOR = 4


def train(
    spec: TrainSpec,
    train_samples: list[Sample],
    val_samples: list[Sample],
    workdir: Path,
    callbacks: TrainingCallbacks,
) -> TrainResult:
    """Fine-tune ``spec.model_name`` on local image files and write the model package under ``workdir``.

    Resumes from ``workdir/checkpoint/`` when it holds a checkpoint of the same run (same spec and dataset
    shape); raises TrainingStopped after checkpointing when ``callbacks.should_stop()`` returns a reason.
    Errors: ConfigError, UnknownModelError, DatasetError, PretrainedWeightsError (all ValueError: permanent).
    """
    spec.validate()
    check_model_name(spec.model_name)
    train_samples = check_samples(train_samples, spec.num_classes, "train", spec.multi_label)
    val_samples = check_samples(val_samples, spec.num_classes, "val", spec.multi_label)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = _TrainingRun(spec, train_samples, val_samples, workdir, callbacks)
    try:
        return run.execute()
    finally:
        run.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_fingerprint(spec: TrainSpec, train_samples: list[Sample], val_samples: list[Sample]) -> str:
    """Identity of a run for resuming: spec (minus runtime settings) and the labels of both splits.

    Paths are left out on purpose: a redelivered job may download the same images to other local paths.
    """
    payload = spec.to_json_dict()
    payload["train_labels"] = _labels_digest(train_samples)
    payload["val_labels"] = _labels_digest(val_samples)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _labels_digest(samples: list[Sample]) -> str:
    digest = hashlib.sha256()
    for _, label in samples:
        if isinstance(label, tuple):  # multi-label: the count of tags, then the tags
            digest.update(len(label).to_bytes(4, "little", signed=True))
            for tag in label:
                digest.update(tag.to_bytes(4, "little"))
        else:
            digest.update(label.to_bytes(4, "little"))
    return f"{len(samples)}:{digest.hexdigest()}"


@dataclass
class _EpochProgress:
    """Running totals of the current epoch's training phase (survive a mid-epoch checkpoint)."""

    loss_sum: float = 0.0
    count: int = 0
    train_time_s: float = 0.0

    def to_state(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "count": self.count, "train_time_s": self.train_time_s}


@dataclass
class _Best:
    """The best epoch so far. ``score`` picks it: validation accuracy (single-label) or mAP (multi-label)."""

    epoch: int = 0
    val_accuracy: float = -1.0
    val_loss: float = math.inf
    train_loss: float | None = None
    state: dict[str, torch.Tensor] | None = None
    targets: np.ndarray | None = None
    predictions: np.ndarray | None = None
    score: float = -1.0

    def improved_by(self, score: float, val_loss: float) -> bool:
        """Higher score wins; an equal score and lower loss also wins."""
        return score > self.score or (score == self.score and val_loss < self.val_loss)


class _TrainingRun:
    def __init__(
        self,
        spec: TrainSpec,
        train_samples: list[Sample],
        val_samples: list[Sample],
        workdir: Path,
        callbacks: TrainingCallbacks,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.callbacks = callbacks
        try:
            self.device = policy_for(spec.device).device  # checked before anything is built
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.cuda = self.device.type == "cuda"
        self.fingerprint = run_fingerprint(spec, train_samples, val_samples)

        checkpoint = load_checkpoint(workdir)
        if checkpoint is not None and checkpoint.get("fingerprint") != self.fingerprint:
            log.warning("checkpoint in %s belongs to another run (spec or dataset differ); starting over", workdir)
            checkpoint = None

        seed_everything(spec.seed)
        fresh = checkpoint is None
        self.model, self.model_kwargs = build_model(
            spec.model_name,
            spec.num_classes,
            spec.image_size,
            pretrained=spec.pretrained and fresh,
            pretrained_path=spec.pretrained_path if fresh else None,
        )
        self.data_config: DataConfig = resolve_data_config(self.model, spec.image_size, spec.augmentation,
                                                           spec.multi_label)
        self.policy: DevicePolicy = policy_for(self.device, self.model)
        if not spec.mixed_precision:
            self.policy = dataclasses.replace(self.policy, amp_dtype=None, grad_scaler=False)
        self.model.to(self.device, memory_format=self.policy.memory_format)
        if self.cuda:
            torch.backends.cudnn.benchmark = True

        multi = spec.multi_label
        sample_weights = None
        if spec.class_weighting == "sampler":
            sample_weights = (multilabel.balanced_sample_weights([label for _, label in train_samples], spec.num_classes)
                              if multi else balanced_sample_weights(train_samples, spec.num_classes))
        self.batches = EpochBatches(len(train_samples), spec.batch_size, spec.seed, shuffle=True, weights=sample_weights)
        self.val_batches = EpochBatches(len(val_samples), spec.batch_size, spec.seed, shuffle=False)
        self.steps = self.batches.steps_per_epoch
        hot = spec.num_classes if multi else None  # multi-label targets: multi-hot vectors
        train_set = ImageFileDataset(train_samples, train_transform(self.data_config, spec.augmentation, multi), hot)
        self.train_loader = self._loader(train_set, self.batches, salt=1)
        self.val_loader = self._loader(ImageFileDataset(val_samples, eval_transform(self.data_config), hot),
                                       self.val_batches, salt=2)
        self.val_size = len(val_samples)
        self.val_samples = val_samples

        # fused AdamW on CUDA; the multi-tensor (foreach) kernels on CPU, several times faster than per-tensor
        optimizer_kwargs: dict[str, Any] = {"fused": True} if self.cuda else {"foreach": True}
        self.optimizer = timm.optim.create_optimizer_v2(
            self.model, "adamw", lr=spec.learning_rate, weight_decay=spec.weight_decay, **optimizer_kwargs
        )
        warmup_steps = round(spec.warmup_epochs * self.steps)
        schedule = warmup_stable_decay if multi else warmup_cosine  # each measured on its own bench (schedule.py)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule(spec.epochs * self.steps, warmup_steps))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.policy.grad_scaler)
        self.mixup = build_mixup(spec.augmentation, spec.num_classes, 0.0 if multi else spec.label_smoothing,
                                 multi_label=multi)
        class_weights = None
        self.criterion: nn.Module
        if multi:  # BCE / asymmetric on (mixed) multi-hot targets; "balanced" weights each class's positives
            pos_weight = None
            if spec.class_weighting == "balanced":
                pos_weight = torch.tensor(multilabel.balanced_pos_weights([label for _, label in train_samples],
                                                                          spec.num_classes),
                                          dtype=torch.float32, device=self.device)
            self.criterion = multilabel.build_loss(spec.multi_label_loss, pos_weight)
            self.val_criterion = multilabel.BceLoss()
            spec_class_weighting = "none"  # handled above
        else:
            spec_class_weighting = spec.class_weighting
        if spec_class_weighting == "balanced":
            class_weights = torch.tensor(balanced_class_weights(train_samples, spec.num_classes), dtype=torch.float32,
                                         device=self.device)
        if multi:
            pass  # criteria set above
        elif self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy() if class_weights is None else _WeightedSoftTargetCrossEntropy(class_weights)
            self.val_criterion = nn.CrossEntropyLoss(reduction="sum")
        else:
            self.criterion = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=spec.label_smoothing)
            self.val_criterion = nn.CrossEntropyLoss(reduction="sum")

        self.completed_epochs = 0
        self.start_step = 0
        self.progress = _EpochProgress()
        self.best = _Best()
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        self.resumed_from_epoch: int | None = None
        self.resumed_from_step: int | None = None
        self.epoch_times: list[float] = []
        self.val_time_s = 0.0
        self.micro_batch = spec.batch_size  # halved on out-of-memory; gradients accumulate over micro-batches
        if checkpoint is not None:
            self._restore(checkpoint)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def execute(self) -> TrainResult:
        spec = self.spec
        for epoch in range(self.completed_epochs, spec.epochs):
            if self.stopped_early:
                break
            self._run_epoch(epoch)
        reason = self.callbacks.should_stop()
        if reason:  # the last epoch's checkpoint is on disk: resuming goes straight to packaging
            raise TrainingStopped(reason, self.completed_epochs, 0)
        return self._finish()

    def close(self) -> None:
        """Stop data-loader workers and drop model/optimizer references (a raised exception's traceback keeps
        this object alive; its device memory should not stay with it)."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                try:
                    iterator._shutdown_workers()
                except Exception:  # best effort at teardown
                    log.debug("data loader shutdown failed", exc_info=True)
        for name in ("model", "optimizer", "scheduler", "scaler", "best", "train_loader", "val_loader"):
            if hasattr(self, name):
                setattr(self, name, None)

    # -- one epoch -------------------------------------------------------------------------------------------

    def _run_epoch(self, epoch: int) -> None:
        spec = self.spec
        start_step = self.start_step
        epoch_started = time.monotonic()
        earlier_attempts_s = self.progress.train_time_s  # time this epoch already took before a resume
        self._check_stop(epoch, start_step)
        self.model.train()
        self.batches.set_epoch(epoch, start_step)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        phase_started = time.monotonic()
        last_beat = phase_started
        steps_done = start_step
        for images, targets in self.train_loader:
            images, targets = self._to_device(images, targets)
            batch_size = self._train_step(images, targets, loss_sum)
            self.progress.count += batch_size
            steps_done += 1
            now = time.monotonic()
            if now - last_beat >= spec.heartbeat_s:
                last_beat = now
                self._flush_progress(loss_sum, phase_started, now)
                phase_started = now
                self.callbacks.on_heartbeat(epoch + 1, steps_done, self.steps, self._heartbeat_metrics(epoch, steps_done))
            reason = self.callbacks.should_stop()
            if reason:
                self._flush_progress(loss_sum, phase_started, time.monotonic())
                self._save(epoch, steps_done)
                raise TrainingStopped(reason, epoch + 1, steps_done)
        self._flush_progress(loss_sum, phase_started, time.monotonic())

        val_started = time.monotonic()
        val_loss, val_accuracy, targets, predictions, val_map = self._validate(epoch)
        self.val_time_s = time.monotonic() - val_started
        score = val_accuracy if val_map is None else val_map

        train_loss = self.progress.loss_sum / max(1, self.progress.count)
        if self.best.improved_by(score, val_loss):
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = _Best(epoch + 1, val_accuracy, val_loss, train_loss, state, targets, predictions, score)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        patience = spec.early_stopping_patience
        if patience is not None and self.bad_epochs >= patience and epoch + 1 < spec.epochs:
            self.stopped_early = True

        epoch_time = time.monotonic() - epoch_started + earlier_attempts_s
        self.epoch_times.append(epoch_time)
        remaining = 0 if self.stopped_early else spec.epochs - (epoch + 1)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": self.progress.count / self.progress.train_time_s if self.progress.train_time_s else 0.0,
            "epoch_time_s": epoch_time,
            "eta_s": remaining * (sum(self.epoch_times) / len(self.epoch_times)),
            "best_epoch": self.best.epoch,
            "best_val_accuracy": self.best.val_accuracy,
            "stopped_early": self.stopped_early,
            **self._batch_metrics(),
        }
        if val_map is not None:
            metrics["val_map"] = val_map
            metrics["best_val_map"] = self.best.score
        self.history.append(metrics)
        self.completed_epochs = epoch + 1
        self.start_step = 0
        self.progress = _EpochProgress()
        self._save(self.completed_epochs, 0)
        self.callbacks.on_epoch_end(epoch + 1, spec.epochs, dict(metrics))

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, loss_sum: torch.Tensor) -> int:
        if self.mixup is not None:
            images, targets = self._mix(images, targets)
        while True:
            try:
                loss = self._accumulate_gradients(images, targets)
                break
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                del exc  # its traceback holds the step's tensors
                self.optimizer.zero_grad(set_to_none=True)
                self._halve_micro_batch(message)
        try:
            if self.spec.grad_clip_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip_norm)
            self.scaler.step(self.optimizer)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise self._optimizer_out_of_memory(exc) from None
        self.scaler.update()
        self.scheduler.step()
        batch_size = images.shape[0]
        loss_sum += loss * batch_size
        return batch_size

    def _accumulate_gradients(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward/backward over micro-batches of ``self.micro_batch``; gradients of the whole batch's mean loss.

        Returns the batch's mean loss (float64, detached). One micro-batch is exactly the plain step.
        """
        self.optimizer.zero_grad(set_to_none=True)
        count = images.shape[0]
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for start in range(0, count, self.micro_batch):
            chunk = slice(start, start + self.micro_batch)
            chunk_images, chunk_targets = images[chunk], targets[chunk]
            weight = chunk_images.shape[0] / count
            with self._autocast():
                logits = self.model(chunk_images)
                loss = self.criterion(logits, chunk_targets)
            self.scaler.scale(loss * weight if weight != 1 else loss).backward()
            total += loss.detach().double() * weight
        return total

    def _optimizer_out_of_memory(self, exc: BaseException) -> TrainingOutOfMemory:
        """The optimizer step ran out of memory: its size is the model's, so a smaller batch cannot help."""
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.empty_cache()
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        # fp32 weights + gradients + AdamW's two moments
        need_mib = params * 4 * 4 / 2**20
        return TrainingOutOfMemory(
            f"out of memory in the optimizer step of {self.spec.model_name!r} ({params / 1e6:.1f} M trainable "
            f"parameters; weights, gradients and AdamW state need about {need_mib:,.0f} MiB): a smaller batch "
            f"cannot help, use a smaller model or a device with more memory: {message[:300]}"
        )

    def _halve_micro_batch(self, message: str) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
        if self.micro_batch <= 1:
            raise TrainingOutOfMemory(
                f"out of memory training {self.spec.model_name!r} even with a micro-batch of 1 image "
                f"(batch_size {self.spec.batch_size}): {message[:300]}"
            )
        self.micro_batch = max(1, self.micro_batch // 2)
        log.warning("out of memory: micro-batch halved to %d (effective batch %d, %d accumulation steps)",
                    self.micro_batch, self.spec.batch_size, self._accumulation_steps())

    def _accumulation_steps(self) -> int:
        return math.ceil(self.spec.batch_size / self.micro_batch)

    def _batch_metrics(self) -> dict[str, int]:
        return {"effective_batch": self.spec.batch_size, "micro_batch": self.micro_batch,
                "accumulation_steps": self._accumulation_steps()}

    def _eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Validation logits in micro-batches (halved on out-of-memory like training)."""
        while True:
            try:
                with self._autocast():
                    return torch.cat([self.model(images[start : start + self.micro_batch])
                                      for start in range(0, images.shape[0], self.micro_batch)])
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                del exc
                self._halve_micro_batch(message)

    def _mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mixup is not None
        if images.shape[0] == 1:  # mixup needs pairs: a lone sample trains on its own target
            if self.spec.multi_label:
                return images, targets
            return images, mixup_target(targets, self.spec.num_classes, 1.0, self.spec.label_smoothing)
        if images.shape[0] % 2:
            images, targets = images[:-1], targets[:-1]
        return self.mixup(images, targets)

    def _validate(self, epoch: int) -> tuple[float, float, np.ndarray, np.ndarray, float | None]:
        """(val_loss, val_accuracy, targets, predictions, val_map). Multi-label: targets and predictions are 0/1
        matrices (predictions at 0.5), accuracy is exact-set accuracy at 0.5 and ``val_map`` the mAP; else
        ``val_map`` is None."""
        self.model.eval()
        multi = self.spec.multi_label
        all_scores: list[torch.Tensor] = []
        loss_total = torch.zeros((), device=self.device, dtype=torch.float64)
        all_targets: list[torch.Tensor] = []
        all_predictions: list[torch.Tensor] = []
        last_beat = time.monotonic()
        with torch.inference_mode():
            for index, (images, targets) in enumerate(self.val_loader):
                images, targets = self._to_device(images, targets)
                logits = self._eval_logits(images).float()
                if multi:  # the criterion is a per-image mean: make it a sum
                    loss_total += self.val_criterion(logits, targets).double() * images.shape[0]
                    all_scores.append(logits.sigmoid())
                    all_predictions.append((logits >= 0).long())
                    all_targets.append(targets.long())
                else:
                    loss_total += self.val_criterion(logits, targets).double()
                    all_targets.append(targets)
                    all_predictions.append(logits.argmax(dim=1))
                now = time.monotonic()
                if now - last_beat >= self.spec.heartbeat_s:
                    last_beat = now
                    self.callbacks.on_heartbeat(
                        epoch + 1, self.steps, self.steps, {"phase": "val", "val_batches_done": index + 1}
                    )
                reason = self.callbacks.should_stop()
                if reason:
                    self._save(epoch, self.steps)
                    raise TrainingStopped(reason, epoch + 1, self.steps)
        targets_np = torch.cat(all_targets).cpu().numpy()
        predictions_np = torch.cat(all_predictions).cpu().numpy()
        val_loss = float(loss_total.item()) / max(1, len(targets_np))
        val_map = None
        if multi:
            val_accuracy = float((targets_np == predictions_np).all(axis=1).mean())
            scores = torch.cat(all_scores).cpu().numpy()
            val_map = multilabel.mean_average_precision(
                multilabel.per_class_average_precision(scores, targets_np, self.spec.class_names))
        else:
            val_accuracy = float((targets_np == predictions_np).mean())
        self.model.train()
        return val_loss, val_accuracy, targets_np, predictions_np, val_map

    # -- helpers ---------------------------------------------------------------------------------------------

    def _check_stop(self, epoch: int, step: int) -> None:
        reason = self.callbacks.should_stop()
        if reason:
            self._save(epoch, step)
            raise TrainingStopped(reason, epoch + 1, step)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.policy.autocast()

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.to_device(images), targets.to(self.device, non_blocking=True)

    def _flush_progress(self, loss_sum: torch.Tensor, phase_started: float, now: float) -> None:
        """Fold the device-side loss sum and elapsed time into the epoch totals (one device sync)."""
        self.progress.loss_sum += float(loss_sum.item())
        loss_sum.zero_()
        self.progress.train_time_s += now - phase_started

    def _heartbeat_metrics(self, epoch: int, steps_done: int) -> dict[str, Any]:
        rate = self.progress.count / self.progress.train_time_s if self.progress.train_time_s else 0.0
        step_time = self.progress.train_time_s / max(1, steps_done)
        remaining_steps = (self.steps - steps_done) + (self.spec.epochs - epoch - 1) * self.steps
        remaining_vals = self.spec.epochs - epoch
        return {
            "phase": "train",
            "train_loss": self.progress.loss_sum / max(1, self.progress.count),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": rate,
            "eta_s": remaining_steps * step_time + remaining_vals * self.val_time_s,
            **self._batch_metrics(),
        }

    def _loader(self, dataset: ImageFileDataset, batches: EpochBatches, salt: int) -> DataLoader:
        workers = self.spec.num_workers
        extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": _PREFETCH_FACTOR} if workers else {}
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=workers,
            pin_memory=self.policy.pin_memory,
            generator=torch.Generator().manual_seed(epoch_seed(self.spec.seed, 0, salt)),
            **extra,
        )

    # -- checkpoint ------------------------------------------------------------------------------------------

    def _save(self, completed_epochs: int, step: int) -> None:
        """Checkpoint: ``completed_epochs`` finished, ``step`` training steps of the next epoch done."""
        best_is_model = step == 0 and self.best.epoch == completed_epochs
        best = self.best
        state = {
            "fingerprint": self.fingerprint,
            "epoch": completed_epochs,
            "step": step,
            "progress": self.progress.to_state(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best": {
                "epoch": best.epoch,
                "val_accuracy": best.val_accuracy,
                "val_loss": best.val_loss,
                "score": best.score,
                "train_loss": best.train_loss,
                "state": None if best_is_model else best.state,
                "targets": None if best.targets is None else torch.from_numpy(best.targets.astype(np.int64)),
                "predictions": None if best.predictions is None else torch.from_numpy(best.predictions.astype(np.int64)),
            },
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "history": self.history,
            "rng": capture_rng_state(),
        }
        save_checkpoint(self.workdir, state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.completed_epochs = int(state["epoch"])
        self.start_step = int(state["step"])
        self.progress = _EpochProgress(**state["progress"])
        best = state["best"]
        best_state = best["state"]
        if best_state is None and best["epoch"] > 0:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.best = _Best(
            epoch=int(best["epoch"]),
            val_accuracy=float(best["val_accuracy"]),
            val_loss=float(best["val_loss"]),
            train_loss=best["train_loss"],
            state=best_state,
            targets=None if best["targets"] is None else best["targets"].numpy(),
            predictions=None if best["predictions"] is None else best["predictions"].numpy(),
            score=float(best.get("score", best["val_accuracy"])),
        )
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped_early = bool(state["stopped_early"])
        self.history = list(state["history"])
        self.resumed_from_epoch = self.completed_epochs
        self.resumed_from_step = self.start_step
        restore_rng_state(state["rng"])
        log.info("resumed from checkpoint: %d epochs done, step %d", self.completed_epochs, self.start_step)

    # -- package ---------------------------------------------------------------------------------------------

    def _finish(self) -> TrainResult:
        spec = self.spec
        best_state = self.best.state
        assert best_state is not None and self.best.targets is not None and self.best.predictions is not None
        self.model.load_state_dict(best_state)
        if spec.multi_label:
            return self._finish_multilabel(best_state)
        report = classification_metrics(self.best.targets, self.best.predictions, spec.class_names)
        logits, targets = self._best_val_logits()
        fitted = calibrate(logits, targets)
        temperature = fitted.temperature
        calibration = calibration_report(logits, targets, temperature)
        tables = auto_accept_tables(softmax(logits, temperature), targets.numpy(), spec.class_names)
        metrics: dict[str, Any] = {
            **self._run_metrics(self.best.val_accuracy),
            "macro_f1": report["macro_f1"],
            "balanced_accuracy": report["balanced_accuracy"],
            "temperature": temperature,
            **({"temperature_note": fitted.note} if fitted.note else {}),
            "ece": calibration["ece"],
            "nll": calibration["nll"],
            **self._auto_accept_metrics(tables),
            "reliability": calibration["reliability"],
            "per_class": report["per_class"],
            "confusion_matrix": report["confusion_matrix"],
            "epochs": copy.deepcopy(self.history),
        }
        config = self._package_config({"temperature": temperature, "auto_accept": tables})
        wrong = self._confidently_wrong(softmax(logits, temperature), targets.numpy())

        def report_writer(path: Path) -> None:
            from ml.training.report import write_report

            write_report(path, metrics, spec.class_names, spec.model_name, wrong)

        return self._package(best_state, config, metrics, report_writer)

    def _run_metrics(self, val_accuracy: float) -> dict[str, Any]:
        """The metrics every package reports about the run and its best epoch."""
        return {
            "train_loss": self.best.train_loss,
            "val_loss": self.best.val_loss,
            "val_accuracy": val_accuracy,
            "best_epoch": self.best.epoch,
            "epochs_run": self.completed_epochs,
            "stopped_early": self.stopped_early,
        }

    @staticmethod
    def _auto_accept_metrics(tables: dict[str, Any]) -> dict[str, Any]:
        return {"auto_accept": auto_accept_summary(tables), "auto_accept_per_class": tables["per_class"],
                "auto_accept_global": tables["global"]}

    def _package_config(self, calibration: dict[str, Any]) -> dict[str, Any]:
        """config.json: the model, classes, eval preprocessing, the training config and sizes, ``calibration``."""
        spec = self.spec
        return build_package_config(
            model_name=spec.model_name,
            model_kwargs=self.model_kwargs,
            class_names=spec.class_names,
            data_config=self.data_config.to_json_dict(),
            training={
                **{k: v for k, v in spec.to_json_dict().items() if k != "class_names"},
                "train_size": self.batches.num_samples,
                "val_size": self.val_size,
            },
            best_epoch=self.best.epoch,
            calibration=calibration,
        )

    def _package(self, best_state: dict[str, torch.Tensor], config: dict[str, Any], metrics: dict[str, Any],
                 report_writer: Callable[[Path], None]) -> TrainResult:
        """report.html (when asked; ``report_writer(path)`` writes it), ONNX (when asked), then the package written;
        the run's result. A report that fails is skipped and said in ``metrics``: it never costs the model."""
        spec = self.spec
        extra_files: dict[str, Path] = {}
        if spec.report:
            from ml.training.report import REPORT_FILE

            report_path = self.workdir / "export" / REPORT_FILE
            report_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                report_writer(report_path)
            except Exception as exc:  # noqa: BLE001 - a report never costs the trained model: the package goes on
                log.warning("report.html skipped: %s: %s", type(exc).__name__, str(exc)[:300])
                metrics["report_skipped"] = f"{type(exc).__name__}: {exc}"[:500]
            else:
                metrics["report_url"] = REPORT_FILE  # relative to the package; the handler makes it absolute
                extra_files[REPORT_FILE] = report_path
        model = self.model.to("cpu").to(memory_format=torch.contiguous_format).eval()
        if "onnx" in spec.export:
            from ml.training.export import export_onnx

            onnx_path = self.workdir / "export" / ONNX_FILE
            parity = export_onnx(model, self._export_check_images(), onnx_path)
            metrics["onnx"] = parity
            config["onnx"] = {"file": ONNX_FILE, **parity}
            extra_files[ONNX_FILE] = onnx_path
        package_dir = write_package(self.workdir / PACKAGE_DIR, best_state, config, metrics, extra_files)
        return TrainResult(
            package_dir=package_dir,
            metrics=metrics,
            best_epoch=self.best.epoch,
            epochs_run=self.completed_epochs,
            resumed_from_epoch=self.resumed_from_epoch,
            resumed_from_step=self.resumed_from_step,
            stopped_early=self.stopped_early,
            model=model,
        )

    def _finish_multilabel(self, best_state: dict[str, torch.Tensor]) -> TrainResult:
        """Metrics, per-class calibration, thresholds and auto-accept tables on validation; the package."""
        spec = self.spec
        names = spec.class_names
        logits, targets = self._best_val_logits()
        truth = targets.numpy().astype(np.int64)
        raw = multilabel.calibrated_probabilities(logits, np.ones(len(names)), np.zeros(len(names)))
        calibration = multilabel.fit_calibration(logits, truth, names)
        a, b = multilabel.calibration_arrays(calibration, names)
        probabilities = multilabel.calibrated_probabilities(logits, a, b)
        per_class_ap = multilabel.per_class_average_precision(probabilities, truth, names)
        thresholds = multilabel.tune_thresholds(probabilities, truth)
        f1 = multilabel.f1_report(probabilities, truth, thresholds, names)
        tables = multilabel.auto_accept_tables(probabilities, truth, names)
        threshold_map = {name: float(thresholds[c]) for c, name in enumerate(names)}
        metrics: dict[str, Any] = {
            "multi_label": True,
            **self._run_metrics(f1["subset_accuracy"]),
            "map": multilabel.mean_average_precision(per_class_ap),
            "per_class_ap": per_class_ap,
            "micro_f1": f1["micro_f1"],
            "macro_f1": f1["macro_f1"],
            "thresholds": threshold_map,
            "ece": {"before": multilabel.expected_calibration_error(raw, truth),
                    "after": multilabel.expected_calibration_error(probabilities, truth)},
            "nll": {"before": multilabel.mean_nll(raw, truth), "after": multilabel.mean_nll(probabilities, truth)},
            "calibration": {name: row["method"] for name, row in calibration.items()},
            **self._auto_accept_metrics(tables),
            "per_class": f1["per_class"],
            "epochs": copy.deepcopy(self.history),
        }
        config = self._package_config({"per_class": calibration, "auto_accept": tables})
        config["multi_label"] = True
        config["thresholds"] = threshold_map

        def report_writer(path: Path) -> None:
            from ml.training.report import write_multilabel_report

            write_multilabel_report(path, metrics, names, spec.model_name, probabilities, truth)

        return self._package(best_state, config, metrics, report_writer)

    def _best_val_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation logits of the best weights (float32, CPU) and their targets: one more validation pass."""
        self.model.eval()
        all_logits: list[torch.Tensor] = []
        all_targets: list[torch.Tensor] = []
        with torch.inference_mode():
            for images, targets in self.val_loader:
                images, targets = self._to_device(images, targets)
                all_logits.append(self._eval_logits(images).float().cpu())
                all_targets.append(targets.cpu())
        return torch.cat(all_logits), torch.cat(all_targets)

    def _confidently_wrong(self, probabilities: np.ndarray, targets: np.ndarray, limit: int = 16) -> list[tuple[str, str, str, float]]:
        """The most confidently wrong validation images: (path, true name, predicted name, confidence)."""
        names = self.spec.class_names
        confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
        wrong = np.flatnonzero(predicted != targets)
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
        return [(self.val_samples[i][0], names[targets[i]], names[predicted[i]], float(confidence[i])) for i in wrong]

    def _export_check_images(self, limit: int = 16) -> torch.Tensor:
        """Up to ``limit`` validation images (CPU) to check an export against the torch model."""
        images: list[torch.Tensor] = []
        for batch, _ in self.val_loader:
            images.append(batch.cpu())
            if sum(b.shape[0] for b in images) >= limit:
                break
        return torch.cat(images)[:limit].contiguous()


class _WeightedSoftTargetCrossEntropy(nn.Module):
    """Soft-target cross-entropy (mixup) with class weights: the weighted mean like ``CrossEntropyLoss(weight=)``,
    each sample weighted by its target mix of the class weights."""

    def __init__(self, class_weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weighted = targets * self.class_weights
        loss = -(weighted * logits.log_softmax(dim=-1)).sum(dim=-1)
        return loss.sum() / weighted.sum().clamp_min(1e-12)
