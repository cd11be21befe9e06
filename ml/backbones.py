"""Build any backbone by family: the one place that imports the family modules.

``load_zero_shot_model`` builds CLIP / SigLIP (image and text towers, for classification);
``load_image_embedder`` builds an :class:`~ml.embedding.ImageEmbedder` of any family, for embeddings.
Family modules import ``ml.embedding`` (and ``ml.zeroshot``), never each other or this module.
"""

from __future__ import annotations

from typing import Literal

from ml.device import resolve_device
from ml.embedding import ImageEmbedder, WeightsSource
from ml.errors import ModelLoadError
from ml.text_cache import TextEmbeddingCache
from ml.zeroshot import ZeroShotModel

__all__ = ["load_image_embedder", "load_zero_shot_model"]

Family = Literal["clip", "siglip"]


def load_zero_shot_model(
    family: Family,
    variant: str,
    weights: str,
    *,
    device: str = "auto",
    text_cache_size: int = 256,
    text_cache: TextEmbeddingCache | None = None,
    seed: int = 0,
) -> ZeroShotModel:
    """Build a zero-shot model of ``family`` / ``variant`` (the worker's defaults are settings:
    ``consumers.settings``) with the given weights spec (see ``ml.zeroshot``), in eval mode on ``device``. Raises
    :class:`~ml.errors.ModelLoadError`.

    ``text_cache``: a cache shared with other models (keys name the model); default: a new one of
    ``text_cache_size`` entries."""
    if family not in ("clip", "siglip"):
        raise ModelLoadError(f"unknown zero-shot model family {family!r} (expected one of ['clip', 'siglip'])")
    if not variant:
        raise ModelLoadError(f"{family} needs a model variant")
    try:
        target = resolve_device(device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    source = WeightsSource.parse(weights)
    text_cache = text_cache if text_cache is not None else TextEmbeddingCache(text_cache_size)
    if family == "clip":
        from ml.clip import load_clip

        return load_clip(variant, source, device=target, text_cache=text_cache, seed=seed)
    from ml.siglip import load_siglip

    return load_siglip(variant, source, device=target, text_cache=text_cache, seed=seed)


def load_image_embedder(family: str, variant: str, weights: str, *, device: str = "auto",
                        seed: int = 0) -> ImageEmbedder:
    """An :class:`~ml.embedding.ImageEmbedder`: ``clip`` / ``siglip`` (the zero-shot model, whose image tower
    embeds), or ``timm`` (``variant`` = any timm model name; weights ``pretrained``, ``random`` or a file).
    Models trained here are loaded by ``ml.trained.TrainedModel`` (a package, not a weights spec)."""
    if family in ("clip", "siglip"):
        return load_zero_shot_model(family, variant, weights, device=device, seed=seed)  # type: ignore[arg-type]
    if family != "timm":
        raise ModelLoadError(f"unknown embedding family {family!r} (expected clip, siglip or timm)")
    if not variant:
        raise ModelLoadError("timm needs a model name")
    try:
        target = resolve_device(device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    from ml.timm_backbone import load_timm_embedder

    return load_timm_embedder(variant, WeightsSource.parse(weights), device=target, seed=seed)
