"""The models a request without ``model_variant`` gets, written once: ``consumers.settings`` declares its
``CLS_CLIP_*`` / ``CLS_SIGLIP_*`` defaults from these, and the contract's examples show them."""

from __future__ import annotations

DEFAULT_CLIP_VARIANT = "ViT-B-32"
"""An open_clip architecture name (``CLS_CLIP_VARIANT``)."""
DEFAULT_CLIP_WEIGHTS = "laion2b_s34b_b79k"
"""An open_clip pretrained tag of :data:`DEFAULT_CLIP_VARIANT` (``CLS_CLIP_WEIGHTS``)."""
DEFAULT_SIGLIP_VARIANT = "google/siglip-base-patch16-224"
"""A hub id (``CLS_SIGLIP_VARIANT``)."""
DEFAULT_SIGLIP_WEIGHTS = "pretrained"
"""The hub cache (``CLS_SIGLIP_WEIGHTS``)."""
