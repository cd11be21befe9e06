"""timm fine-tuning: synchronous, local paths only. The handler layer moves files to and from S3/HTTP."""

from ml.training.config import AUGMENTATIONS, NullCallbacks, TrainingCallbacks, TrainResult, TrainSpec
from ml.training.data import split_readable, stratified_split
from ml.training.errors import (
    ConfigError,
    DatasetError,
    PackageError,
    PretrainedWeightsError,
    TrainingOutOfMemory,
    TrainingStopped,
    UnknownModelError,
)
from ml.training.loop import train
from ml.training.models import check_model_name

__all__ = [
    "AUGMENTATIONS",
    "ConfigError",
    "DatasetError",
    "NullCallbacks",
    "PackageError",
    "PretrainedWeightsError",
    "TrainResult",
    "TrainSpec",
    "TrainingCallbacks",
    "TrainingOutOfMemory",
    "TrainingStopped",
    "UnknownModelError",
    "check_model_name",
    "split_readable",
    "stratified_split",
    "train",
]
