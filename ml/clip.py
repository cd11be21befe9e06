"""CLIP zero-shot models, built and run through open_clip.

Architectures are open_clip's model configs plus this project's own (``ml/model_configs/open_clip``,
e.g. the tiny ``cls-tiny-clip`` used by tests), all on the same code path. Weights:

- ``"random"``: ``open_clip.create_model(variant, pretrained=None)`` under ``torch.manual_seed(seed)``;
- a pretrained tag of the variant (``"openai"``, ``"laion2b_s34b_b79k"``, ...): open_clip's own
  download/cache path, with QuickGELU switched on when the tag was trained with it;
- a local state-dict file, or a directory holding one (``open_clip_model.safetensors``,
  ``open_clip_pytorch_model.bin``, ``model.safetensors``, ... or a single weight file).

Tokenizer and preprocessing are open_clip's for the variant (the bundled BPE tokenizer for the
classic CLIP architectures, so text encoding works offline).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from ml.device import place_for_inference
from ml.embedding import ModelInfo, WeightsSource
from ml.errors import ModelLoadError, WeightsFileError
from ml.text_cache import TextEmbeddingCache
from ml.weights import load_state_dict_file
from ml.zeroshot import NEUTRAL_CLASS, ZeroShotEmbeddingModel, neutral_sigmoid_logits, neutral_sigmoid_scores, softmax_scores

__all__ = ["CONFIG_DIR", "DEFAULT_PRETRAINED_TAGS", "ClipModel", "default_pretrained_tag", "known_variants",
           "load_clip", "pretrained_tags", "register_model_configs"]

CONFIG_DIR = Path(__file__).parent / "model_configs" / "open_clip"
"""This project's extra open_clip architecture configs (one JSON file per variant)."""

_WEIGHT_FILE_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.pth",
    "model.pt",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_register_lock = threading.Lock()

DEFAULT_PRETRAINED_TAGS: dict[str, str] = {
    "ViT-B-32": "laion2b_s34b_b79k",
    "ViT-B-16": "laion2b_s34b_b88k",
    "ViT-L-14": "laion2b_s32b_b82k",
    "ViT-H-14": "laion2b_s32b_b79k",
}
"""The tag used for these variants when no setting names one; other variants get the first tag of
open_clip's own pretrained table (usually ``openai``)."""


def canonical_variant(variant: str) -> str:
    """OpenAI spelling ``ViT-B/32`` -> open_clip's ``ViT-B-32``."""
    return variant.replace("/", "-")


def known_variants() -> list[str]:
    """Every architecture open_clip can build here (its own configs and this project's)."""
    register_model_configs()
    return list(open_clip.list_models())


def pretrained_tags(variant: str) -> list[str]:
    """The pretrained tags open_clip's table lists for ``variant`` (empty when it lists none)."""
    return list(open_clip.list_pretrained_tags_by_model(canonical_variant(variant)))


def default_pretrained_tag(variant: str) -> str | None:
    """The default pretrained tag of ``variant``: :data:`DEFAULT_PRETRAINED_TAGS`, else open_clip's first."""
    tags = pretrained_tags(variant)
    preferred = DEFAULT_PRETRAINED_TAGS.get(canonical_variant(variant))
    if preferred in tags:
        return preferred
    return tags[0] if tags else None


def register_model_configs() -> None:
    """Add this project's configs to open_clip's registry (idempotent)."""
    names = {path.stem for path in CONFIG_DIR.glob("*.json")}
    with _register_lock:
        if not names.issubset(open_clip.list_models()):
            open_clip.add_model_config(CONFIG_DIR)


class ClipModel(ZeroShotEmbeddingModel):
    """An open_clip model as a :class:`~ml.zeroshot.ZeroShotModel` (softmax confidences)."""

    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        info: ModelInfo,
        device: torch.device,
        text_cache: TextEmbeddingCache,
    ) -> None:
        preprocess_cfg = PreprocessCfg(**module.visual.preprocess_cfg)
        size = preprocess_cfg.size
        super().__init__(info, device, int(size if isinstance(size, int) else size[0]), text_cache)
        self.module = module
        self.preprocess_cfg = preprocess_cfg
        self._tokenizer = tokenizer
        self._transform = image_transform_v2(preprocess_cfg, is_train=False)
        self._pil_steps, self._mean, self._std = _split_transform(self._transform)
        self.logit_scale = module.logit_scale.detach().float().exp().cpu()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if self._pil_steps is None:
            return self._transform(image)
        for step in self._pil_steps:  # resize, crop, RGB: Pillow
            image = step(image)
        # ToTensor + Normalize in numpy: identical values, and no torch intra-op threads per image
        # (torch's element-wise ops on small tensors fight the model's threads on a busy CPU).
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def scores(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        return softmax_scores(image_embeddings, text_embeddings, self.logit_scale)

    multi_label_extra_classes = (NEUTRAL_CLASS,)

    def multi_label_scores(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Independent per-class confidences: each class prompt against the class-neutral prompt, whose text
        embedding is the last row (the caller adds ``multi_label_extra_classes`` to the classes)."""
        return neutral_sigmoid_scores(image_embeddings, text_embeddings, self.logit_scale)

    def multi_label_logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """The logits of :meth:`multi_label_scores` (their sigmoid is the confidence), ``[B, C]``."""
        return neutral_sigmoid_logits(image_embeddings, text_embeddings, self.logit_scale)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module.encode_image(pixels)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self._tokenizer(prompts)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module.encode_text(tokens)


def _split_transform(transform: Any) -> tuple[list[Any] | None, np.ndarray, np.ndarray]:
    """(PIL steps before ToTensor, mean, std) of a ``Compose([..., ToTensor(), Normalize()])``; None when
    the transform has another shape (then the transform itself is used)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None, np.zeros(3, np.float32), np.ones(3, np.float32)
    normalize = steps[-1]
    mean = np.asarray(normalize.mean, dtype=np.float32)
    std = np.asarray(normalize.std, dtype=np.float32)
    return steps[:-2], mean, std


def load_clip(
    variant: str, source: WeightsSource, *, device: torch.device, text_cache: TextEmbeddingCache, seed: int = 0
) -> ClipModel:
    """Build the open_clip ``variant`` with ``source`` weights on ``device`` (eval mode)."""
    register_model_configs()
    variant = canonical_variant(variant)
    if variant not in open_clip.list_models():
        raise ModelLoadError(f"unknown CLIP variant {variant!r}: not an open_clip architecture")
    try:
        module = _create_module(variant, source, seed)
        tokenizer = open_clip.get_tokenizer(variant)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load CLIP {variant} with weights {source.value!r}: {exc}") from exc
    place_for_inference(module, device, f"CLIP {variant}")
    info = ModelInfo(family="clip", variant=variant, weights=source.value)
    return ClipModel(module, tokenizer, info, device, text_cache)


def _create_module(variant: str, source: WeightsSource, seed: int) -> torch.nn.Module:
    if source.kind == "pretrained":
        tag = source.value
        tag_cfg = open_clip.get_pretrained_cfg(variant, tag)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(variant)
            raise ModelLoadError(f"unknown pretrained tag {tag!r} for CLIP {variant}; known tags: {tags}")
        try:
            return open_clip.create_model(
                variant,
                pretrained=tag,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                require_pretrained=True,
            )
        except Exception as exc:
            raise ModelLoadError(
                f"cannot fetch pretrained weights {tag!r} for CLIP {variant} (hub cache or download): {exc}"
            ) from exc
    with _seeded(seed):
        module = open_clip.create_model(variant, pretrained=None)
    if source.kind == "random":
        return module
    weight_file = Path(source.value) if source.kind == "file" else _find_weight_file(Path(source.value))
    try:
        state = load_state_dict_file(weight_file)
    except WeightsFileError as exc:
        raise ModelLoadError(str(exc)) from exc
    _load_state(module, state, variant, weight_file)
    return module


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], variant: str, origin: Path) -> None:
    for name in ("logit_scale", "logit_bias"):
        own = getattr(module, name, None)
        if name in state and isinstance(own, torch.Tensor) and state[name].ndim != own.ndim:
            state[name] = state[name].reshape(own.shape)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelLoadError(f"weights in {origin} do not fit CLIP {variant}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"weights in {origin} do not fit CLIP {variant}: "
            f"missing {result.missing_keys[:5]} ({len(result.missing_keys)}), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )


def _find_weight_file(directory: Path) -> Path:
    for name in _WEIGHT_FILE_NAMES:
        if (directory / name).is_file():
            return directory / name
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelLoadError(f"no weight file ({', '.join(_WEIGHT_SUFFIXES)}) in {directory}")
    raise ModelLoadError(f"several weight files in {directory}, name one: {[p.name for p in candidates]}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the CPU RNG seeded to ``seed``, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
