"""The handlers' configs and limits as the workers build them from the settings (``consumers.settings``, the
only home of their defaults; ``CLS_*`` where the environment sets one), with a caller's overrides: for tests
and benchmarks that build a handler's pieces without a worker."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from consumers import worker
from consumers.settings import Settings
from handlers.fetch import FetchLimits
from handlers.images import DecodeLimits
from handlers.manifests import ManifestLimits
from handlers.model_config import ModelConfig
from handlers.training import TrainingSettings


def model_config(**overrides: Any) -> ModelConfig:
    from consumers.annotation_worker import model_config as _model_config  # the model stack: imported on use

    return replace(_model_config(Settings()), **overrides)


def training_settings(**overrides: Any) -> TrainingSettings:
    from consumers.training_worker import training_settings as _training_settings

    return replace(_training_settings(Settings().worker), **overrides)


def fetch_limits(**overrides: Any) -> FetchLimits:
    return replace(worker.fetch_limits(Settings()), **overrides)


def decode_limits(**overrides: Any) -> DecodeLimits:
    """The per-image limits; no shared decode budget unless ``budget`` is given (the worker has one)."""
    return replace(worker.decode_limits(Settings()), **{"budget": None, **overrides})


def manifest_limits(**overrides: Any) -> ManifestLimits:
    return replace(worker.manifest_limits(Settings().worker), **overrides)


def dataset_options(**overrides: Any) -> dict[str, Any]:
    """``handlers.dataset.prepare_dataset``'s settings-backed keyword arguments as the training handler passes
    them (download concurrency, manifest limits)."""
    settings = training_settings()
    return {"concurrency": settings.download_concurrency, "manifest_limits": settings.manifest_limits, **overrides}
