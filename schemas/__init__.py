"""The event contract of cls-workers: one pydantic v2 model per message, topic and header names."""

from schemas.annotation import (
    AnnotationRequest,
    AnnotationResult,
    ImageRef,
    ImageResult,
    ModelDescriptor,
    Prediction,
)
from schemas.common import SCHEMA_VERSION, ErrorDetail, ErrorInfo, derive_message_id
from schemas.training import (
    CancelRequest,
    LabeledUrl,
    Progress,
    TrainingConfig,
    TrainingDataset,
    TrainingMetrics,
    TrainingRequest,
    TrainingStatus,
)

__all__ = [
    "SCHEMA_VERSION",
    "AnnotationRequest",
    "AnnotationResult",
    "CancelRequest",
    "ErrorDetail",
    "ErrorInfo",
    "ImageRef",
    "ImageResult",
    "LabeledUrl",
    "ModelDescriptor",
    "Prediction",
    "Progress",
    "TrainingConfig",
    "TrainingDataset",
    "TrainingMetrics",
    "TrainingRequest",
    "TrainingStatus",
    "derive_message_id",
]
