"""The handlers' configs as the workers build them from the settings' defaults (``consumers.settings``, their
only home), with a test's overrides."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from consumers.annotation_worker import model_config as _model_config
from consumers.settings import Settings
from consumers.training_worker import training_settings as _training_settings
from handlers.model_config import ModelConfig
from handlers.training import TrainingSettings


def model_config(**overrides: Any) -> ModelConfig:
    return replace(_model_config(Settings()), **overrides)


def training_settings(**overrides: Any) -> TrainingSettings:
    return replace(_training_settings(Settings().worker), **overrides)
