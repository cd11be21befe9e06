"""What a training run is asked to do (TrainSpec), what it returns (TrainResult), and how it reports (callbacks)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ml.training.errors import ConfigError

AUGMENTATIONS = ("none", "light", "medium", "heavy")
CLASS_WEIGHTINGS = ("none", "balanced", "sampler")
EXPORT_FORMATS = ("onnx",)


@dataclass
class TrainSpec:
    """Hyper-parameters of one run; field names follow ``schemas.training.TrainingConfig``.

    ``pretrained_path`` is a LOCAL file (safetensors, or a tensor-only state dict readable with
    ``torch.load(weights_only=True)``); the handler downloads ``pretrained_url`` there. It is used when
    ``pretrained`` is true (the classifier head is always re-initialised for ``num_classes``); with
    ``pretrained`` true and no path, timm's own weights come from the hub cache (or a download).
    ``image_size`` None means the model's own default input size.
    ``class_weighting``: ``none``; ``balanced`` weights the loss of class c by ``n / (C * n_c)`` (its train
    count ``n_c``); ``sampler`` draws each epoch's training images with replacement, every class equally likely.
    ``export``: extra formats written into the package (``onnx`` -> model.onnx, checked against torch).
    ``report``: write report.html (curves, confusion matrix, reliability, auto-accept, worst images) into the package.
    ``warmup_epochs`` / ``label_smoothing`` None: scaled with the schedule (``schedule.schedule_defaults``);
    the resolved numbers are what the run uses and what config.json records.
    ``mixed_precision`` (runtime only): autocast as the device policy says (``ml.device``); False trains in fp32
    on any device (bench/device.py's baseline for AMP).
    """

    model_name: str
    num_classes: int
    class_names: list[str]
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-4
    augmentation: str = "light"
    pretrained: bool = True
    pretrained_path: str | None = None
    image_size: int | None = None
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    grad_clip_norm: float | None = 1.0
    early_stopping_patience: int | None = None
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    heartbeat_s: float = 30.0
    class_weighting: str = "none"
    export: list[str] = field(default_factory=list)
    report: bool = True
    mixed_precision: bool = True

    def __post_init__(self) -> None:
        from ml.training.schedule import schedule_defaults

        warmup, smoothing = schedule_defaults(self.epochs if isinstance(self.epochs, int) else 1)
        if self.warmup_epochs is None:
            self.warmup_epochs = warmup
        if self.label_smoothing is None:
            self.label_smoothing = smoothing

    @classmethod
    def from_config(cls, config: Any, class_names: list[str], **overrides: Any) -> "TrainSpec":
        """Build from any object with TrainingConfig-like attributes (duck-typed; ``schemas`` is not imported).

        Attributes that TrainSpec does not have (``pretrained_url``, ``val_fraction`` ...) are ignored; pass
        ``pretrained_path=``, ``device=`` etc. as overrides.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(config, name) for name in names if hasattr(config, name)}
        values["class_names"] = list(class_names)
        if "export" in values:
            values["export"] = list(values["export"] or [])
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        """Raise ConfigError when fields are out of range or inconsistent."""
        problems: list[str] = []
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            problems.append("model_name must be a non-empty string")
        if self.num_classes < 2:
            problems.append(f"num_classes must be >= 2, got {self.num_classes}")
        if len(self.class_names) != self.num_classes:
            problems.append(f"len(class_names) ({len(self.class_names)}) must equal num_classes ({self.num_classes})")
        if len(set(self.class_names)) != len(self.class_names):
            problems.append("class_names must be unique")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.augmentation not in AUGMENTATIONS:
            problems.append(f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"image_size must be >= 8, got {self.image_size}")
        if self.weight_decay < 0:
            problems.append("weight_decay must be >= 0")
        if self.warmup_epochs < 0:
            problems.append("warmup_epochs must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append("label_smoothing must be in [0, 1)")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            problems.append("grad_clip_norm must be > 0 or None")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append("early_stopping_patience must be >= 1 or None")
        if self.num_workers < 0:
            problems.append("num_workers must be >= 0")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            problems.append(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}")
        unknown_exports = [f for f in self.export if f not in EXPORT_FORMATS]
        if unknown_exports:
            problems.append(f"export formats {unknown_exports} are not supported (supported: {list(EXPORT_FORMATS)})")
        if self.heartbeat_s <= 0:
            problems.append("heartbeat_s must be > 0")
        if problems:
            raise ConfigError("invalid training spec: " + "; ".join(problems))

    def to_json_dict(self) -> dict[str, Any]:
        """The fields recorded in the package's config.json (local paths and runtime settings left out)."""
        data = dataclasses.asdict(self)
        for runtime_only in ("pretrained_path", "device", "heartbeat_s", "num_workers", "report", "mixed_precision"):
            data.pop(runtime_only)
        data["pretrained_from_file"] = self.pretrained_path is not None
        return data


@dataclass
class TrainResult:
    """Outcome of a completed run.

    ``metrics`` describe the BEST epoch (the weights in the package): train_loss, val_loss, val_accuracy,
    best_epoch, per_class, confusion_matrix (None above ``metrics.MAX_CONFUSION_CLASSES`` classes), epochs
    (per-epoch history). ``epochs_run`` counts all epochs completed, across resumed attempts.
    ``resumed_from_epoch`` is the number of epochs the resumed checkpoint had completed (None on a fresh start);
    ``resumed_from_step`` the training steps of the next epoch it had done (0 at an epoch boundary).
    ``model`` is the in-memory model with the best weights (CPU, eval mode); drop it when not needed.
    """

    package_dir: Path
    metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    resumed_from_epoch: int | None
    resumed_from_step: int | None = None
    stopped_early: bool = False
    model: Any = field(default=None, repr=False, compare=False)


@runtime_checkable
class TrainingCallbacks(Protocol):
    """How train() reports progress and learns it must stop. Called from the training thread."""

    def on_epoch_end(self, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        """After each epoch's checkpoint is written. ``epoch`` is 1-based. metrics: train_loss, val_loss,
        val_accuracy, lr, images_per_s, eta_s, epoch_time_s, best_epoch, best_val_accuracy."""

    def on_heartbeat(self, epoch: int, step: int, steps: int, metrics: dict[str, Any]) -> None:
        """Inside an epoch, at most every ``spec.heartbeat_s``. metrics: phase, train_loss, lr, images_per_s, eta_s."""

    def should_stop(self) -> str | None:
        """Checked at every step boundary: None to go on, or a reason ("cancel", "preempt")."""


class NullCallbacks:
    """Callbacks that report nothing and never stop; subclass and override what you need."""

    def on_epoch_end(self, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        return None

    def on_heartbeat(self, epoch: int, step: int, steps: int, metrics: dict[str, Any]) -> None:
        return None

    def should_stop(self) -> str | None:
        return None
