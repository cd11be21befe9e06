"""Error types raised by training and trained-model loading (permanent unless stated); each carries the wire
error code (``code``) the training handler reports it with."""

from __future__ import annotations


class UnknownModelError(ValueError):
    """The model name is not a timm architecture known to this installation."""

    code = "unknown_model"


class DatasetError(ValueError):
    """The samples cannot be trained on: empty split, label out of range, undecodable image."""

    code = "invalid_dataset"


class ConfigError(ValueError):
    """The training configuration is inconsistent (e.g. class names vs num_classes, unsupported image size)."""

    code = "invalid_request"


class PretrainedWeightsError(ValueError):
    """Pretrained weights could not be loaded: missing file, refused pickle, wrong architecture, hub unavailable."""

    code = "pretrained_unavailable"


class PackageError(ValueError):
    """A model package directory is malformed or holds weights in a refused format (anything but safetensors)."""

    code = "package_failed"


class TrainingOutOfMemory(ValueError):
    """Out of memory even with a micro-batch of one sample (the batch was halved down to 1 first)."""

    code = "out_of_memory"


class TrainingStopped(Exception):
    """Training stopped at a step boundary because ``should_stop()`` returned a reason; a checkpoint was written.

    ``reason`` is what ``should_stop()`` returned (``"cancel"`` or ``"preempt"``); ``epoch`` is the 1-based epoch
    that was running and ``step`` the number of its training steps already done (the checkpoint resumes there).
    """

    def __init__(self, reason: str, epoch: int = 0, step: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.epoch = epoch
        self.step = step

    def __reduce__(self):  # keep reason/epoch/step across pickling (executors, subprocesses)
        return (type(self), (self.reason, self.epoch, self.step))
