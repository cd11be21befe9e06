"""Preprocessing and augmentation presets built from timm's data config and transform factory.

Presets (train side; evaluation always resizes + centre-crops + normalises with the model's data config):
- ``none``: the evaluation transform itself, with ``crop_pct=1.0`` (resize shorter side, centre crop) so train
  and eval see the same pixels;
- ``light``: random-resized crop (scale 0.5-1) + horizontal flip;
- ``medium``: random-resized crop (scale 0.25-1) + flip + RandAugment ``rand-m9-mstd0.5`` (timm drops colour
  jitter when RandAugment is on);
- ``heavy``: random-resized crop (0.08-1) + flip + RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing (p 0.25)
  + per-batch mixup (alpha 0.8) / cutmix (alpha 1.0) via ``timm.data.Mixup`` with soft-target loss.

Multi-label runs keep the WHOLE image in view, because a tag may sit anywhere in it: a crop that cuts a tagged object
out would train the model to see a tag that is not there. Evaluation resizes the whole image to the input size
(``crop_mode`` ``squash``, ``crop_pct`` 1.0; recorded in the package, so inference does the same), and the train
presets replace the random-resized crop by that resize: ``light`` adds the horizontal flip, ``medium`` RandAugment
with its photometric operations only (its rotations, shears and translations move content near the border out of
the frame), ``heavy`` the same plus mixup/cutmix with mixed multi-hot targets and no random erasing (it can erase a
tagged object).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import timm.data
from timm.data import Mixup
from torch import nn

GEOMETRIC_RAND_AUGMENT_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
                                        "TranslateX", "TranslateY"})
"""RandAugment operations that move pixels (and so can move a tagged object out of the frame): left out for
multi-label runs."""
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


def resolve_data_config(model: nn.Module, image_size: int | None, augmentation: str,
                        multi_label: bool = False) -> DataConfig:
    """The model's timm data config, ``input_size`` overridden by ``image_size`` (square), crop_pct 1.0 for ``none``;
    ``multi_label``: the whole image squashed to the input size (``crop_mode`` squash, crop_pct 1.0)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    input_size = tuple(int(v) for v in cfg["input_size"])
    if image_size is not None:
        input_size = (input_size[0], int(image_size), int(image_size))
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation == "random":
        interpolation = "bilinear"
    crop_pct = 1.0 if augmentation == "none" or multi_label else float(cfg.get("crop_pct") or 0.875)
    return DataConfig(
        input_size=input_size,  # type: ignore[arg-type]
        interpolation=interpolation,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        crop_pct=crop_pct,
        crop_mode="squash" if multi_label else cfg.get("crop_mode") or "center",
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


def train_transform(cfg: DataConfig, augmentation: str, multi_label: bool = False) -> Callable:
    """The training transform of a preset (see the module docstring)."""
    if augmentation == "none":
        return eval_transform(cfg)
    if multi_label:
        return _whole_image_train_transform(cfg, augmentation)
    options = _TRAIN_PRESETS[augmentation]
    return timm.data.create_transform(
        input_size=cfg.input_size,
        is_training=True,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        **options,
    )


def _whole_image_train_transform(cfg: DataConfig, augmentation: str) -> Callable:
    """Multi-label presets: resize the whole image to the input size, flip, and (``medium``/``heavy``) RandAugment's
    photometric operations; no crop, no erasing, nothing that moves content out of the frame."""
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, rand_augment_transform
    from timm.data.transforms import MaybeToTensor, str_to_interp_mode, str_to_pil_interp
    from torchvision import transforms as T

    interpolation = str_to_interp_mode(cfg.interpolation)
    steps: list[Callable] = [T.Resize(tuple(cfg.input_size[1:]), interpolation=interpolation),
                             T.RandomHorizontalFlip(0.5)]
    config_str = _TRAIN_PRESETS[augmentation].get("auto_augment")
    if config_str:
        ops = _RAND_INCREASING_TRANSFORMS if "inc1" in config_str else _RAND_TRANSFORMS
        hparams = {"img_mean": tuple(min(255, round(255 * m)) for m in cfg.mean),
                   "interpolation": str_to_pil_interp(cfg.interpolation)}
        steps.append(rand_augment_transform(config_str, hparams,
                                            transforms=[op for op in ops if op not in GEOMETRIC_RAND_AUGMENT_OPS]))
    steps += [MaybeToTensor(), T.Normalize(mean=cfg.mean, std=cfg.std)]
    return T.Compose(steps)


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
