"""Inference with a model package written by ml.training (safetensors weights + config.json).

Confidences are calibrated: ``softmax(logits / temperature)`` with the temperature fitted on validation at
training time (``config.json`` ``calibration.temperature``; 1.0 for a package without one). The package's
auto-accept thresholds say whether a top-1 label may be accepted at a stated precision (:meth:`auto_accept`).

A multi-label package (``config.json`` ``"multi_label": true``) has one independent probability per class:
``sigmoid(a_c * logit_c + b_c)`` with the per-class calibration ``calibration.per_class[c] = {a, b}``, and a tag
is predicted when it reaches ``thresholds[c]`` (:meth:`tags`), and auto-accepted at a stated precision when it reaches
that class's auto-accept threshold (:meth:`tag_auto_accept_thresholds`). A subset of classes selects, never
renormalises.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from PIL import Image
from torch import nn

from ml.device import DevicePolicy, StagedBatch, policy_for, run_halving_on_oom
from ml.training.augment import DataConfig, eval_transform
from ml.training.auto_accept import threshold_for
from ml.training.errors import PackageError, UnknownModelError
from ml.training.models import create_model
from ml.training.package import WEIGHTS_FILE, read_package_config


class TrainedModel:
    """A fine-tuned timm classifier loaded from a package directory (safetensors only, never pickles)."""

    def __init__(self, model: nn.Module, config: dict[str, Any], policy: DevicePolicy, weights_sha256: str) -> None:
        self.model = model
        self.config = config
        self.policy = policy
        self.device = policy.device
        self.class_names: list[str] = list(config["class_names"])
        self.data_config = DataConfig.from_json_dict(config)
        self.image_size: int = self.data_config.image_size
        self.info_variant: str = str(config["model_name"])
        self.weights_sha256 = weights_sha256
        self._index = {name: i for i, name in enumerate(self.class_names)}
        calibration = config.get("calibration") or {}
        self.temperature: float = float(calibration.get("temperature", 1.0))
        self.auto_accept_tables: dict[str, Any] | None = calibration.get("auto_accept") or None
        self.multi_label = bool(config.get("multi_label", False))
        per_class = calibration.get("per_class") or {}
        self.calibration_a = torch.tensor([float((per_class.get(n) or {}).get("a", 1.0)) for n in self.class_names])
        self.calibration_b = torch.tensor([float((per_class.get(n) or {}).get("b", 0.0)) for n in self.class_names])
        thresholds = config.get("thresholds") or {}
        self.thresholds = torch.tensor([float(thresholds.get(n, 0.5)) for n in self.class_names])
        self._transform = eval_transform(self.data_config)

    @classmethod
    def load(cls, package_dir: Path, device: str = "auto") -> "TrainedModel":
        """Rebuild the architecture with random init (no download) and load model.safetensors strictly."""
        package_dir = Path(package_dir)
        config = read_package_config(package_dir)
        weights_file = package_dir / WEIGHTS_FILE
        try:
            state = safetensors.torch.load_file(str(weights_file), device="cpu")
        except Exception as exc:
            raise PackageError(f"cannot read {WEIGHTS_FILE}: {exc}") from exc
        try:
            model = create_model(config["model_name"], int(config["num_classes"]), config.get("model_kwargs") or {})
        except UnknownModelError as exc:
            raise PackageError(f"model package names a model this timm does not know: {exc}") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise PackageError(f"{WEIGHTS_FILE} does not fit {config['model_name']!r}: {str(exc)[:500]}") from exc
        try:
            policy = policy_for(device, model)
        except ValueError as exc:
            raise PackageError(str(exc)) from exc
        model.to(policy.device, memory_format=policy.memory_format).eval()
        return cls(model, config, policy, _sha256(weights_file))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess_work_bytes(self, width: int, height: int) -> int:
        """Bytes the evaluation transform allocates for a ``width x height`` image, an upper bound: the shortest-side
        resize to ``input side / crop_pct`` (RGB, 4 B/pixel as Pillow stores it, or uint8 plus its float copy in
        the tensor path: counted twice), the crop, and the float tensor."""
        cfg = self.data_config
        side = math.floor(max(cfg.input_size[1:]) / cfg.crop_pct)
        short, long = max(1, min(width, height)), max(width, height)
        resized = side * math.ceil(side * long / short)
        return 8 * resized + 4 * side * side + 12 * cfg.input_size[1] * cfg.input_size[2]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The package's evaluation transform (resize, centre crop, normalise) -> CPU float tensor [3, H, W]."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._transform(image)

    def calibrated_logits(self, pixels: torch.Tensor | StagedBatch) -> torch.Tensor:
        """Multi-label: ``a_c * logit_c + b_c`` per class (CPU float32 ``[B, num_classes]``); their sigmoid is the
        calibrated probability of each tag."""
        if isinstance(pixels, StagedBatch):
            pixels = pixels.get()
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)

        def run(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                on_device = self.policy.to_device(batch.to(torch.float32))
                with self.policy.autocast():
                    logits = self.model(on_device)
                return logits.float().cpu() * self.calibration_a + self.calibration_b

        return run_halving_on_oom(run, pixels, self.device)

    def tags(self, probabilities: torch.Tensor, subset: Sequence[str] | None = None) -> list[list[str]]:
        """Multi-label: per row of :meth:`predict` probabilities (over ``subset`` when given), the classes that reach
        their threshold, most probable first."""
        indices = self.subset_indices(subset) or list(range(self.num_classes))
        thresholds = self.thresholds[indices]
        out: list[list[str]] = []
        for row in probabilities:
            hits = [(float(p), self.class_names[i]) for p, i, t in zip(row.tolist(), indices, thresholds.tolist()) if p >= t]
            out.append([name for _, name in sorted(hits, key=lambda h: -h[0])])
        return out

    def tag_auto_accept_thresholds(self, precision: float) -> torch.Tensor:
        """Multi-label: per class, the calibrated probability at which its tag is auto-accepted at ``precision``
        (the class's own table where it has one, else the pooled one; ``inf`` where nothing is accepted),
        ``[num_classes]``."""
        values = [threshold_for(self.auto_accept_tables, name, precision, own_table_decides=True)
                  for name in self.class_names]
        return torch.tensor([math.inf if v is None else v for v in values])

    def predict(self, pixels: torch.Tensor, subset: Sequence[str] | None = None) -> torch.Tensor:
        """Multi-label packages: the calibrated sigmoid per class, ``[B, num_classes]`` or ``[B, len(subset)]``.
        Otherwise calibrated softmax probabilities (``softmax(logits / temperature)``), CPU float32: ``[B, num_classes]``,
        or ``[B, len(subset)]`` in subset order.

        With ``subset`` the softmax runs over those classes' logits only (probabilities renormalised among them).
        ``pixels`` is ``[B, 3, H, W]`` (or one ``[3, H, W]``) from :meth:`preprocess`.
        """
        if self.multi_label:
            indices = self.subset_indices(subset)
            logits = self.calibrated_logits(pixels)
            return (logits if indices is None else logits[:, indices]).sigmoid()
        return self.log_probabilities(pixels, subset).exp()

    def log_probabilities(self, pixels: torch.Tensor | StagedBatch, subset: Sequence[str] | None = None) -> torch.Tensor:
        """``log`` of :meth:`predict`, computed stably (a subset's softmax of tiny probabilities does not underflow).

        On CUDA an out-of-memory error halves the batch (down to one image, where it is re-raised)."""
        if isinstance(pixels, StagedBatch):
            pixels = pixels.get()
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        return run_halving_on_oom(lambda batch: self._log_probabilities(batch, subset), pixels, self.device)

    def _log_probabilities(self, pixels: torch.Tensor, subset: Sequence[str] | None) -> torch.Tensor:
        indices = self.subset_indices(subset)
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 4:
            raise ValueError(f"pixels must be [B, 3, H, W] or [3, H, W], got shape {tuple(pixels.shape)}")
        with torch.inference_mode():
            batch = self.policy.to_device(pixels.to(torch.float32))
            with self.policy.autocast():
                logits = self.model(batch)
            logits = logits.float() / self.temperature
            if indices is not None:
                logits = logits[:, torch.tensor(indices, device=logits.device)]
            return logits.log_softmax(dim=-1).cpu()

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled pre-logits features (``forward_head(..., pre_logits=True)``), CPU float32 ``[B, D]``:
        the embedding of this model's own domain."""
        import torch.nn.functional as F

        from ml.timm_backbone import pre_logits_features

        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(0)
        with torch.inference_mode():
            features = pre_logits_features(self.model, pixels.to(self.device, dtype=torch.float32))
            return F.normalize(features.float().flatten(1), dim=-1).cpu()

    def auto_accept_threshold(self, class_name: str, precision: float) -> float | None:
        """The calibrated top-1 confidence at which ``class_name`` is auto-accepted at ``precision``; None: never."""
        return threshold_for(self.auto_accept_tables, class_name, precision)

    def auto_accept(self, probabilities: torch.Tensor, precision: float) -> list[bool]:
        """Per row of full-class probabilities from :meth:`predict`: may its top-1 class be accepted at ``precision``?"""
        confidence, index = probabilities.max(dim=1)
        decisions: list[bool] = []
        for value, position in zip(confidence.tolist(), index.tolist(), strict=True):
            threshold = self.auto_accept_threshold(self.class_names[position], precision)
            decisions.append(threshold is not None and value >= threshold)
        return decisions

    def subset_indices(self, subset: Sequence[str] | None) -> list[int] | None:
        """Class indices of ``subset`` in its order; ValueError naming unknown or repeated names."""
        if subset is None:
            return None
        if isinstance(subset, str):
            raise ValueError("subset must be a list of class names, not a single string")
        names = list(subset)
        if not names:
            raise ValueError("subset must name at least one class")
        unknown = [name for name in names if name not in self._index]
        if unknown:
            known = ", ".join(repr(n) for n in self.class_names[:20])
            more = f" (and {len(self.class_names) - 20} more)" if len(self.class_names) > 20 else ""
            raise ValueError(
                f"subset has class names this model was not trained on: {unknown}; "
                f"model {self.info_variant!r} knows: {known}{more}"
            )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"subset names a class more than once: {repeated}")
        return [self._index[name] for name in names]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
