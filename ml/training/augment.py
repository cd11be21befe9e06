"""Preprocessing and augmentation presets built from timm's data config and transform factory.

Presets (train side; evaluation always resizes + centre-crops + normalises with the model's data config):
- ``none``: the evaluation transform itself, with ``crop_pct=1.0`` (resize shorter side, centre crop) so train
  and eval see the same pixels;
- ``light``: random-resized crop (scale 0.5-1) + horizontal flip;
- ``medium``: random-resized crop (scale 0.25-1) + flip + RandAugment ``rand-m9-mstd0.5`` (timm drops colour
  jitter when RandAugment is on);
- ``heavy``: random-resized crop (0.08-1) + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing (p 0.25)
  + per-batch mixup (alpha 0.8) / cutmix (alpha 1.0) via ``timm.data.Mixup`` with soft-target loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import timm.data
from timm.data import Mixup
from torch import nn

MIXUP_ALPHA = 0.8
CUTMIX_ALPHA = 1.0
_TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "light": {"scale": (0.5, 1.0), "hflip": 0.5, "color_jitter": None},
    "medium": {"scale": (0.25, 1.0), "hflip": 0.5, "color_jitter": None, "auto_augment": "rand-m9-mstd0.5"},
    "heavy": {
        "scale": (0.08, 1.0),
        "hflip": 0.5,
        "color_jitter": None,
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "re_prob": 0.25,
        "re_mode": "pixel",
        "re_count": 1,
    },
}


@dataclass(frozen=True)
class DataConfig:
    """Evaluation preprocessing of a model; recorded in the package's config.json."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str = "center"

    @property
    def image_size(self) -> int:
        return int(self.input_size[-1])

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        data["image_size"] = self.image_size
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "DataConfig":
        return cls(
            input_size=tuple(int(v) for v in data["input_size"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            crop_pct=float(data["crop_pct"]),
            crop_mode=str(data.get("crop_mode") or "center"),
        )


def resolve_data_config(model: nn.Module, image_size: int | None, augmentation: str) -> DataConfig:
    """The model's timm data config, ``input_size`` overridden by ``image_size`` (square), crop_pct 1.0 for ``none``."""
    cfg = timm.data.resolve_data_config({}, model=model)
    input_size = tuple(int(v) for v in cfg["input_size"])
    if image_size is not None:
        input_size = (input_size[0], int(image_size), int(image_size))
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation == "random":
        interpolation = "bilinear"
    crop_pct = 1.0 if augmentation == "none" else float(cfg.get("crop_pct") or 0.875)
    return DataConfig(
        input_size=input_size,  # type: ignore[arg-type]
        interpolation=interpolation,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        crop_pct=crop_pct,
        crop_mode=cfg.get("crop_mode") or "center",
    )


def eval_transform(cfg: DataConfig) -> Callable:
    """PIL RGB image -> normalised CHW float tensor; the same transform TrainedModel.preprocess uses."""
    return timm.data.create_transform(
        input_size=cfg.input_size,
        is_training=False,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
    )


def train_transform(cfg: DataConfig, augmentation: str) -> Callable:
    """The training transform of a preset (see the module docstring)."""
    if augmentation == "none":
        return eval_transform(cfg)
    options = _TRAIN_PRESETS[augmentation]
    return timm.data.create_transform(
        input_size=cfg.input_size,
        is_training=True,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        **options,
    )


def build_mixup(augmentation: str, num_classes: int, label_smoothing: float, multi_label: bool = False) -> Mixup | None:
    """Batch mixup/cutmix for ``heavy`` (targets become soft, smoothed), else None. ``multi_label``: the targets are
    multi-hot vectors, mixed with the same weights as the images."""
    if augmentation != "heavy":
        return None
    return Mixup(
        mixup_alpha=MIXUP_ALPHA,
        cutmix_alpha=CUTMIX_ALPHA,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=label_smoothing,
        num_classes=num_classes,
        multi_label=multi_label,
    )
