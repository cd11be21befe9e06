"""Which models the annotation worker serves: a model's identity (family, variant, weights), the worker's
defaults per family, and the allow-list of variants a request may name (CLS_ALLOWED_MODEL_VARIANTS)."""

from __future__ import annotations

from dataclasses import dataclass

from handlers.errors import PermanentError

MODEL_UNAVAILABLE = "model_unavailable"


@dataclass(frozen=True)
class ModelKey:
    family: str
    variant: str
    weights: str


DEFAULT_TIMM_VARIANTS = frozenset({"resnet50", "convnext_tiny", "efficientnet_b0", "vit_base_patch16_224",
                                   "vit_small_patch16_224", "resnet18", "resnet10t", "test_vit", "test_resnet"})
"""timm model names an embed request may name when CLS_ALLOWED_MODEL_VARIANTS is not set."""

DEFAULT_CLIP_VARIANTS = frozenset({
    "RN50", "RN50-quickgelu", "RN101", "RN101-quickgelu", "ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-32-256",
    "ViT-B-16", "ViT-B-16-quickgelu", "ViT-B-16-plus-240", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-L-14-336",
    "ViT-L-14-336-quickgelu", "convnext_base", "convnext_base_w", "convnext_base_w_320", "MobileCLIP-S1",
    "MobileCLIP-S2", "MobileCLIP-B", "cls-tiny-clip"})
"""open_clip architectures a message may name when CLS_ALLOWED_MODEL_VARIANTS is not set: up to ViT-L-14's size
(~430 M parameters, 1.7 GB of fp32 weights), which a worker holds beside its default model. The larger ones
(ViT-H-14, ViT-bigG-14, EVA02-E-14: 1-5 B parameters, multi-GB downloads, up to ~20 GB allocated) only by
setting (``clip:ViT-H-14`` or ``clip:*``), or CLS_CLIP_VARIANT_WEIGHTS naming weights for them."""


@dataclass(frozen=True)
class ModelConfig:
    """The worker's model settings (``consumers.annotation_worker.model_config`` builds it from ``CLS_*``; the
    defaults live in ``consumers.settings`` only)."""

    clip_variant: str  # CLS_CLIP_VARIANT
    clip_weights: str  # CLS_CLIP_WEIGHTS
    siglip_variant: str  # CLS_SIGLIP_VARIANT
    siglip_weights: str  # CLS_SIGLIP_WEIGHTS
    device: str  # CLS_DEVICE
    seed: int  # CLS_SEED
    text_cache_size: int  # CLS_TEXT_CACHE_SIZE
    text_cache_bytes: int | None  # CLS_TEXT_CACHE_MB: one cache shared by every loaded zero-shot model
    cache_size: int  # CLS_MODEL_CACHE_SIZE
    model_dir: str  # CLS_MODEL_DIR
    timm_weights: str  # CLS_TIMM_WEIGHTS: timm weights without model_url ('pretrained': the hub cache)
    text_cache_dir: str | None = None  # CLS_TEXT_CACHE_DIR: class embeddings on disk, shared by the node's workers
    text_cache_disk_bytes: int = 0  # CLS_TEXT_CACHE_DISK_MB (0: no disk cache)
    clip_variant_weights: tuple[tuple[str, str], ...] = ()  # (variant, weights) overrides, CLS_CLIP_VARIANT_WEIGHTS
    allowed_variants: frozenset[str] | None = None  # "family:variant" (or "family:*"); None: the default policy
    timm_variants: frozenset[str] = DEFAULT_TIMM_VARIANTS  # timm names allowed by the default policy

    def key_for(self, family: str, variant: str | None, model_url: str | None = None) -> ModelKey:
        """The cache key of a request's model; a variant a message names must pass the allow-list first."""
        if family == "custom":
            if not model_url:
                raise PermanentError("invalid_request", "model 'custom' needs model_url")
            return ModelKey("custom", model_url, model_url)
        if family == "clip":
            from ml.clip import canonical_variant

            name = canonical_variant(variant) if variant else self.clip_variant
            self._check_allowed("clip", name)
            return ModelKey("clip", name, self.clip_weights_for(name))
        if family == "siglip":
            name = variant or self.siglip_variant
            self._check_allowed("siglip", name)
            return ModelKey("siglip", name, self.siglip_weights)
        if family == "timm":
            if not variant:
                raise PermanentError("invalid_request", "model 'timm' needs model_variant (a timm model name)")
            self._check_allowed("timm", variant)
            return ModelKey("timm", variant, model_url or self.timm_weights)
        raise PermanentError("invalid_request", f"unknown model family {family!r}")

    def clip_weights_for(self, variant: str) -> str:
        """Weights of a CLIP variant: CLS_CLIP_VARIANT_WEIGHTS, else CLS_CLIP_WEIGHTS for the configured variant
        (or for any variant when it is 'random' or one of that variant's tags), else the variant's default tag
        from open_clip's table; ``model_unavailable`` naming the setting when there is none."""
        from ml.clip import default_pretrained_tag, pretrained_tags

        overrides = dict(self.clip_variant_weights)
        if variant in overrides:
            return overrides[variant]
        if variant == self.clip_variant or self.clip_weights == "random":
            return self.clip_weights
        if self.clip_weights in pretrained_tags(variant):
            return self.clip_weights
        tag = default_pretrained_tag(variant)
        if tag is None:
            raise PermanentError(
                MODEL_UNAVAILABLE,
                f"no pretrained weights known for CLIP {variant!r} (open_clip lists no tag for it); set "
                f"CLS_CLIP_VARIANT_WEIGHTS={variant}=<tag, local path or s3:// URL>",
            )
        return tag

    def _check_allowed(self, family: str, variant: str) -> None:
        if family != "timm" and variant == (self.clip_variant if family == "clip" else self.siglip_variant):
            return  # the configured default is always allowed
        if self.allowed_variants is not None:
            allowed = {f"{family}:{variant}", f"{family}:*"} & self.allowed_variants
        elif family == "timm":
            allowed = variant in self.timm_variants
        elif family == "clip":
            allowed = variant in DEFAULT_CLIP_VARIANTS or dict(self.clip_variant_weights).get(variant) is not None
        else:
            from ml.siglip import known_variants as siglip_variants

            allowed = variant in siglip_variants()
        if not allowed:
            known = "" if self.allowed_variants is not None else " (not a variant this worker allows by default)"
            raise PermanentError(
                MODEL_UNAVAILABLE,
                f"model_variant {variant!r} is not allowed for {family} on this worker{known}; an operator can allow "
                f"it with CLS_ALLOWED_MODEL_VARIANTS={family}:<variant>",
            )


def parse_variant_weights(text: str) -> tuple[tuple[str, str], ...]:
    """``"ViT-L-14=openai,RN50=s3://b/rn50.safetensors"`` -> pairs (CLS_CLIP_VARIANT_WEIGHTS)."""
    pairs = []
    for item in text.split(","):
        if item.strip():
            variant, sep, weights = item.partition("=")
            if not sep or not variant.strip() or not weights.strip():
                raise ValueError(f"CLS_CLIP_VARIANT_WEIGHTS entry {item!r} is not variant=weights")
            pairs.append((variant.strip().replace("/", "-"), weights.strip()))
    return tuple(pairs)


def parse_allowed_variants(text: str) -> frozenset[str] | None:
    """``"clip:ViT-L-14,siglip:google/siglip-so400m-patch14-384"`` -> entries; empty -> None (default policy)."""
    entries = frozenset(item.strip() for item in text.split(",") if item.strip())
    for entry in entries:
        if entry.partition(":")[0] not in ("clip", "siglip", "timm") or not entry.partition(":")[2]:
            raise ValueError(f"CLS_ALLOWED_MODEL_VARIANTS entry {entry!r} is not clip:<variant>, siglip:<hub id> "
                             "or timm:<model name>")
    return entries or None
