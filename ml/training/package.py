"""The model package: a directory with model.safetensors (weights), config.json (how to rebuild and preprocess)
and metrics.json. Written by training, read by ml.trained.TrainedModel."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch

from ml.training.errors import PackageError

PACKAGE_DIR = "package"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
PACKAGE_FORMAT = "cls-workers/timm-classifier"
PACKAGE_FORMAT_VERSION = 1
PACKAGE_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)


def build_package_config(
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    class_names: list[str],
    data_config: Mapping[str, Any],
    training: Mapping[str, Any],
    best_epoch: int,
) -> dict[str, Any]:
    """config.json content: timm model name and kwargs, classes, eval preprocessing, training config."""
    return {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_FORMAT_VERSION,
        "library": "timm",
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        **dict(data_config),
        "weights": WEIGHTS_FILE,
        "best_epoch": best_epoch,
        "training": dict(training),
        "versions": {"timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
    }


def write_package(
    package_dir: Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], metrics: Mapping[str, Any]
) -> Path:
    """Write the three files into a sibling temp dir, then swap it into place (an old package is replaced)."""
    package_dir = Path(package_dir)
    tmp = package_dir.with_name(package_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    safetensors.torch.save_file(
        tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "model_name": str(config["model_name"])}
    )
    _write_json(tmp / CONFIG_FILE, config)
    _write_json(tmp / METRICS_FILE, metrics)
    if package_dir.exists():
        shutil.rmtree(package_dir)
    os.replace(tmp, package_dir)
    return package_dir


def read_package_config(package_dir: Path) -> dict[str, Any]:
    """config.json of a package, checked for format and required fields; PackageError otherwise.

    Only safetensors weights are accepted: a package naming any other weights file is refused.
    """
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise PackageError(f"model package {package_dir} is not a directory")
    config_file = package_dir / CONFIG_FILE
    if not config_file.is_file():
        raise PackageError(f"model package {package_dir} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackageError(f"model package {CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"model package {CONFIG_FILE} is not a {PACKAGE_FORMAT} config")
    if config.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(f"model package format_version {config.get('format_version')!r} is not supported")
    required = ("model_name", "class_names", "num_classes", "input_size", "mean", "std", "interpolation", "crop_pct")
    missing = [key for key in required if key not in config]
    if missing:
        raise PackageError(f"model package {CONFIG_FILE} lacks {missing}")
    if len(config["class_names"]) != config["num_classes"]:
        raise PackageError("model package class_names and num_classes disagree")
    weights = config.get("weights", WEIGHTS_FILE)
    if weights != WEIGHTS_FILE or Path(weights).suffix != ".safetensors":
        raise PackageError(f"model package weights {weights!r} refused: only {WEIGHTS_FILE} (safetensors) is loaded")
    if not (package_dir / WEIGHTS_FILE).is_file():
        others = sorted(p.name for p in package_dir.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"))
        detail = f" (found {others}: only safetensors is loaded)" if others else ""
        raise PackageError(f"model package {package_dir} has no {WEIGHTS_FILE}{detail}")
    return config


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value
