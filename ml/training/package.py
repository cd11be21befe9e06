"""The model package: a directory with model.safetensors (weights), config.json (how to rebuild and preprocess,
and the calibration: temperature and auto-accept thresholds), metrics.json, and optionally model.onnx.
Written by training, read by ml.trained.TrainedModel."""

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
ONNX_FILE = "model.onnx"
PACKAGE_FORMAT = "cls-workers/timm-classifier"
PACKAGE_FORMAT_VERSION = 1
PACKAGE_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)
REPORT_FILE = "report.html"
OPTIONAL_PACKAGE_FILES = (ONNX_FILE, REPORT_FILE)
"""Written only when asked (``export``); uploaded before metrics.json, which marks a package complete."""


def build_package_config(
    *,
    model_name: str,
    model_kwargs: Mapping[str, Any],
    class_names: list[str],
    data_config: Mapping[str, Any],
    training: Mapping[str, Any],
    best_epoch: int,
    calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json content: timm model name and kwargs, classes, eval preprocessing, training config, and
    ``calibration`` (``{"temperature", "auto_accept": {"global", "per_class"}}``) that inference applies."""
    config = {
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
    if calibration is not None:
        config["calibration"] = dict(calibration)
    return config


def write_package(
    package_dir: Path,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    extra_files: Mapping[str, Path] | None = None,
) -> Path:
    """Write the three files (and move ``extra_files``, ``{name in the package: local file}``, in) into a sibling
    temp dir, then swap it into place (an old package is replaced)."""
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
    for name, source in (extra_files or {}).items():
        shutil.move(str(source), str(tmp / name))
    if package_dir.exists():
        shutil.rmtree(package_dir)
    os.replace(tmp, package_dir)
    return package_dir


MAX_CONFIG_BYTES = 4 * 1024 * 1024
ALLOWED_MODEL_KWARGS = frozenset({"img_size", "drop_rate", "drop_path_rate"})
"""The only ``model_kwargs`` a package may carry to ``timm.create_model``: sizes and rates, never a path
(``checkpoint_path``, ``pretrained_cfg``, ``pretrained_cfg_overlay`` ... would make timm read files)."""
MAX_INPUT_SIDE = 1024
"""The largest input side a package may declare (``input_size``, ``model_kwargs.img_size``): the training schema's
``image_size`` limit; timm's largest classifiers use 448-800."""
MAX_RESIZE_SIDE = 2048
"""The largest shortest-side resize of the evaluation transform (``input side / crop_pct``): ``crop_pct`` 0.5 at
1024 px, 0.11 at 224 px. A smaller ``crop_pct`` would make every image a ``Resize(input / crop_pct)`` of gigabytes."""
INTERPOLATIONS = frozenset({"nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random"})


def read_package_config(package_dir: Path) -> dict[str, Any]:
    """config.json of a package, checked against the strict schema (:func:`check_package_config`) and for
    its weights file; PackageError otherwise.

    Only safetensors weights are accepted: a package naming any other weights file is refused.
    """
    package_dir = Path(package_dir)
    if not package_dir.is_dir():
        raise PackageError(f"model package {package_dir} is not a directory")
    config_file = package_dir / CONFIG_FILE
    if not config_file.is_file():
        raise PackageError(f"model package {package_dir} has no {CONFIG_FILE}")
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise PackageError(f"model package {CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
    config = parse_package_config(config_file.read_bytes())
    if not (package_dir / WEIGHTS_FILE).is_file():
        others = sorted(p.name for p in package_dir.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"))
        detail = f" (found {others}: only safetensors is loaded)" if others else ""
        raise PackageError(f"model package {package_dir} has no {WEIGHTS_FILE}{detail}")
    return config


def parse_package_config(raw: bytes) -> dict[str, Any]:
    """Parse and check config.json bytes (PackageError naming the problem, never echoing the content)."""
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackageError(f"model package {CONFIG_FILE} is not valid JSON ({type(exc).__name__})") from exc
    except RecursionError:
        raise PackageError(f"model package {CONFIG_FILE} is JSON nested too deeply to parse") from None
    check_package_config(config)
    return config


def check_package_config(config: Any) -> None:
    """The strict schema of config.json: format, known fields with sane types, ``model_kwargs`` limited to
    :data:`ALLOWED_MODEL_KWARGS` with numeric values, a timm architecture name (no hub prefix, no path),
    safetensors weights only. Raises PackageError."""
    if not isinstance(config, dict) or config.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"model package {CONFIG_FILE} is not a {PACKAGE_FORMAT} config")
    if config.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(f"model package format_version {config.get('format_version')!r} is not supported")
    required = ("model_name", "class_names", "num_classes", "input_size", "mean", "std", "interpolation", "crop_pct")
    missing = [key for key in required if key not in config]
    if missing:
        raise PackageError(f"model package {CONFIG_FILE} lacks {missing}")
    problems: list[str] = []
    name = config["model_name"]
    if not isinstance(name, str) or not _is_architecture_name(name):
        problems.append("model_name must be a timm architecture name (letters, digits, '_', one optional '.tag')")
    kwargs = config.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        problems.append("model_kwargs must be an object")
    else:
        refused = sorted(set(kwargs) - ALLOWED_MODEL_KWARGS)
        if refused:
            problems.append(f"model_kwargs keys {refused[:5]} are not allowed (allowed: {sorted(ALLOWED_MODEL_KWARGS)})")
        for key in sorted(set(kwargs) & ALLOWED_MODEL_KWARGS):
            if not _is_kwarg_value(key, kwargs[key]):
                problems.append(f"model_kwargs.{key} has an invalid value")
    classes, count = config["class_names"], config["num_classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) and 0 < len(c) <= 200 for c in classes):
        problems.append("class_names must be a list of non-empty strings")
    elif not _is_int(count) or len(classes) != count or not 2 <= count <= 100_000:
        problems.append("class_names and num_classes disagree")
    size = config["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and _is_int(size[0]) and 1 <= size[0] <= 4
            and all(_is_int(v) and 8 <= v <= MAX_INPUT_SIDE for v in size[1:])):
        problems.append(f"input_size must be [channels, height, width] with sides in [8, {MAX_INPUT_SIDE}]")
    for key in ("mean", "std"):
        values = config[key]
        if not (isinstance(values, list) and 1 <= len(values) <= 4 and all(_is_number(v) for v in values)):
            problems.append(f"{key} must be a list of numbers")
    if config["interpolation"] not in INTERPOLATIONS:
        problems.append(f"interpolation must be one of {sorted(INTERPOLATIONS)}")
    if not (_is_number(config["crop_pct"]) and 0 < config["crop_pct"] <= 4):
        problems.append("crop_pct must be a number in (0, 4]")
    elif "input_size must" not in " ".join(problems) and max(size[1:]) / config["crop_pct"] > MAX_RESIZE_SIDE:
        problems.append(f"crop_pct {config['crop_pct']:g} resizes images to {max(size[1:]) / config['crop_pct']:,.0f} px "
                        f"(input side / crop_pct); at most {MAX_RESIZE_SIDE} px")
    if config.get("crop_mode", "center") not in ("center", "squash", "border"):
        problems.append("crop_mode must be center, squash or border")
    calibration = config.get("calibration", {})
    if not isinstance(calibration, dict):
        problems.append("calibration must be an object")
    else:
        temperature = calibration.get("temperature", 1.0)
        if not (_is_number(temperature) and temperature > 0):
            problems.append("calibration.temperature must be a positive number")
        if not isinstance(calibration.get("auto_accept", {}), dict):
            problems.append("calibration.auto_accept must be an object")
    if problems:
        raise PackageError(f"model package {CONFIG_FILE} refused: " + "; ".join(problems))
    weights = config.get("weights", WEIGHTS_FILE)
    if weights != WEIGHTS_FILE:
        raise PackageError(f"model package weights refused: only {WEIGHTS_FILE} (safetensors) is loaded")


def _is_architecture_name(name: str) -> bool:
    arch, _, tag = name.partition(".")
    ok = lambda part: 0 < len(part) <= 120 and all(c.isascii() and (c.isalnum() or c == "_") for c in part)  # noqa: E731
    return ok(arch) and (not tag or ok(tag))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_kwarg_value(key: str, value: Any) -> bool:
    if key == "img_size":
        if _is_int(value):
            return 8 <= value <= MAX_INPUT_SIDE
        return isinstance(value, list) and len(value) == 2 and all(_is_int(v) and 8 <= v <= MAX_INPUT_SIDE for v in value)
    return _is_number(value) and 0.0 <= value < 1.0


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
