"""Training: fine-tune a timm classifier on a labeled dataset of image URLs; cancel; status events.

Status flow per job: ``queued`` -> ``running`` (per-epoch progress, heartbeats inside long epochs) ->
``completed`` | ``failed`` | ``cancelled``. ``seq`` orders a job's events (a fold must never move a job
backwards: ignore an event whose ``seq`` is below the stored one). Ids are deterministic from the job
id and the event's position (status, epoch, heartbeat), so a redelivered job repeats them; heartbeats
are progress only and may be folded loosely.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.common import ErrorInfo, Identifier, InputModel, OutputModel, derive_message_id
from schemas.urls import OutputUrl, Url

MAX_DATASET_URLS = 200_000
MAX_CLASSES = 10_000

Augmentation = Literal["none", "light", "medium", "heavy"]
ClassWeighting = Literal["none", "balanced", "sampler"]
ExportFormat = Literal["onnx"]
TrainingStatusValue = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
TRAINING_STATUS_EVENT = "training.status"


MAX_LABELS_PER_IMAGE = MAX_CLASSES
MultiLabelLoss = Literal["bce", "asymmetric"]


class LabeledUrl(BaseModel):
    """A dataset entry: ``{"url", "label"}`` (single-label jobs) or ``{"url", "labels": [...]}`` (multi-label jobs;
    an empty list is an image with none of the tags)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    url: Url
    label: str | None = Field(default=None, min_length=1, max_length=200)
    labels: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=MAX_LABELS_PER_IMAGE,
                                     description="Multi-label jobs: the image's tags (class names), possibly none.")

    @model_validator(mode="after")
    def _one_kind(self) -> "LabeledUrl":
        if (self.label is None) == (self.labels is None):
            raise ValueError("an entry needs either 'label' (single-label) or 'labels' (multi-label), not both or neither")
        return self


def multi_label_entry_problem(entry: "LabeledUrl | str", multi_label: bool, class_names: list[str] | set[str]) -> str | None:
    """Why a dataset entry does not fit the job, or None: a multi-label job takes ``labels`` (known, distinct class
    names); a single-label job takes ``label`` or a folder-labeled URL. (A single-label entry's label outside the
    classes is left to the dataset step, which reports them all together.)"""
    if not multi_label:
        if isinstance(entry, LabeledUrl) and entry.labels is not None:
            return "has 'labels' but config.multi_label is false (give one 'label', or set multi_label)"
        return None
    if not isinstance(entry, LabeledUrl):
        return "is a plain URL; multi-label jobs need {\"url\", \"labels\": [...]} (folder labels are single-label)"
    if entry.labels is None:
        return "has 'label' but config.multi_label is true (give 'labels': [...], possibly empty)"
    cleaned = [label.strip() for label in entry.labels]
    repeated = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if repeated:
        return f"repeats labels {[r[:60] for r in repeated[:5]]}"
    unknown = [label for label in cleaned if label not in class_names]
    if unknown:
        return f"has labels not in class_names: {[u[:60] for u in unknown[:5]]}"
    return None


class TrainingConfig(BaseModel):
    """Hyper-parameters. The backend's names are kept; the rest are optional with sensible defaults."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model_name: str = Field(min_length=1, max_length=200, description="Any timm model name, e.g. convnext_tiny.")
    num_classes: int = Field(ge=2, le=MAX_CLASSES, description="Must equal len(dataset.class_names).")
    epochs: int = Field(default=10, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=10.0)
    augmentation: Augmentation = "light"
    pretrained: bool = Field(default=True, description="Start from pretrained weights (hub cache, or pretrained_url).")
    pretrained_url: Url | None = Field(default=None, description="safetensors / state dict file (path or s3://) to start from.")
    image_size: int | None = Field(default=None, ge=8, le=1024, description="Default: the model's own input size.")
    weight_decay: float = Field(default=0.05, ge=0.0, le=1.0)
    warmup_epochs: float | None = Field(
        default=None, ge=0.0, le=100.0,
        description="Linear warmup before the lr schedule (single-label: cosine over the rest; multi-label: held, then a "
                    "cosine over the last fifth of the steps). Unset: scales with the schedule (0 below 10 epochs, "
                    "else 5% of the epochs, at most 5).")
    label_smoothing: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="Unset: scales with the schedule (0 below 10 epochs, else 0.1).")
    grad_clip_norm: float | None = Field(default=1.0, gt=0.0)
    early_stopping_patience: int | None = Field(default=None, ge=1, description="Stop after this many epochs without a better val_accuracy.")
    seed: int = Field(default=0, ge=0)
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0, description="Split from train (stratified) when val is empty.")
    max_bad_fraction: float = Field(default=0.05, ge=0.0, le=1.0, description="Fail when more images than this fraction are unusable.")
    num_workers: int = Field(default=0, ge=0, le=64, description="Data-loader worker processes.")
    class_weighting: ClassWeighting = Field(
        default="none",
        description="Imbalanced classes: none | balanced (loss weight n / (C * n_c) per class) | sampler (every class "
                    "drawn equally often, with replacement).")
    multi_label: bool = Field(
        default=False,
        description="Each image has a set of tags (dataset entries {url, labels: [...]}): one sigmoid per class, "
                    "best epoch by validation mAP, per-class calibration and thresholds in config.json.")
    multi_label_loss: MultiLabelLoss = Field(
        default="bce",
        description="Multi-label only: bce (binary cross-entropy) | asymmetric (Ridnik et al. 2021, for sets where "
                    "most tags of an image are negatives).")
    export: list[ExportFormat] = Field(
        default_factory=list, max_length=1,
        description="Extra formats in the package: 'onnx' adds model.onnx (dynamic batch, raw logits), checked "
                    "against the torch model with onnxruntime (max abs difference <= 1e-4) at export time.")


class TrainingDataset(BaseModel):
    """Image URLs with labels: ``{"url", "label"}`` objects, or plain URLs labeled by their parent folder."""

    model_config = ConfigDict(extra="ignore")
    train_urls: list[LabeledUrl | Url] = Field(default_factory=list, max_length=MAX_DATASET_URLS)
    val_urls: list[LabeledUrl | Url] = Field(default_factory=list, max_length=MAX_DATASET_URLS)
    class_names: list[str] = Field(min_length=2, max_length=MAX_CLASSES)
    manifest_url: Url | None = Field(
        default=None,
        description="JSON Lines file of {url, label, split} (multi-label: {url, labels, split}) for large datasets.")

    @field_validator("class_names")
    @classmethod
    def _unique_names(cls, names: list[str]) -> list[str]:
        cleaned = [n.strip() for n in names]
        if any(not n for n in cleaned):
            raise ValueError("class names must be non-empty")
        duplicates = sorted({n for n in cleaned if cleaned.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique; duplicated: {duplicates}")
        return cleaned

    @model_validator(mode="after")
    def _has_images(self) -> "TrainingDataset":
        if not self.train_urls and not self.manifest_url:
            raise ValueError("dataset needs train_urls or manifest_url")
        return self


class TrainingRequest(InputModel):
    """``cls.training.requests``, keyed by job id."""

    task: Literal["train"] = Field(description="Discriminator: always 'train'.")
    job_id: Identifier | None = Field(default=None, description="Defaults to the record key, then to a new UUID.")
    config: TrainingConfig
    dataset: TrainingDataset
    output_path: OutputUrl = Field(description="Where the model package goes: s3://bucket/prefix (or file:// when enabled).")

    @model_validator(mode="after")
    def _classes_match(self) -> "TrainingRequest":
        if self.config.num_classes != len(self.dataset.class_names):
            raise ValueError(
                f"config.num_classes ({self.config.num_classes}) must equal len(dataset.class_names) "
                f"({len(self.dataset.class_names)})"
            )
        names = set(self.dataset.class_names)
        problems: list[str] = []
        for split in ("train_urls", "val_urls"):
            for index, entry in enumerate(getattr(self.dataset, split)):
                problem = multi_label_entry_problem(entry, self.config.multi_label, names)
                if problem:
                    problems.append(f"dataset.{split}[{index}] {problem}")
        if problems:
            count = f"{len(problems)} dataset entries do not fit the job; " if len(problems) > 1 else ""
            raise ValueError(count + "; ".join(problems[:3]))
        return self


class CancelRequest(InputModel):
    """``cls.training.control``, keyed by job id (compacted topic)."""

    task: Literal["cancel"] = Field(description="Discriminator: always 'cancel'.")
    job_id: Identifier | None = Field(default=None, description="Defaults to the record key.")
    reason: str | None = Field(default=None, max_length=1000)


class Progress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=0, description="1-based epoch being reported (0 before the first).")
    epochs: int = Field(ge=1)
    step: int | None = Field(default=None, ge=0, description="Step within the epoch (heartbeats).")
    steps: int | None = Field(default=None, ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict, description="train_loss, val_loss, val_accuracy, lr, images_per_s, eta_s ...")


class BeforeAfter(BaseModel):
    """A calibration measure before and after the temperature, on the validation split."""

    model_config = ConfigDict(extra="allow")
    before: float | None = None
    after: float | None = None


class AutoAcceptRow(BaseModel):
    """Auto-accept the top-1 label at ``confidence >= threshold`` for a validation precision of at least
    ``precision`` (the Clopper-Pearson 95% lower bound, not the point estimate); ``threshold`` null: never.
    ``coverage``: the share of validation images that would be auto-accepted."""

    model_config = ConfigDict(extra="allow")
    precision: float = Field(gt=0.0, lt=1.0)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    coverage: float = Field(ge=0.0, le=1.0)


class TrainingMetrics(BaseModel):
    """Metrics of the best epoch on validation. Calibrated confidences are ``softmax(logits / temperature)``.

    A ``completed`` event keeps every headline value; when all of them would make the event too large,
    the large ones (``per_class``, ``confusion_matrix``, ``epochs``) are left out, named in ``omitted``,
    and ``metrics_url`` points to the package's metrics.json, which has them all."""

    model_config = ConfigDict(extra="allow")
    train_loss: float | None = None
    val_accuracy: float | None = None
    best_epoch: int | None = None
    metrics_url: str | None = Field(default=None, description="<output_path>/metrics.json, set when large metrics were left out of this event.")
    omitted: list[str] | None = Field(default=None, description="Names of the metrics left out of this event (they are in metrics_url).")
    macro_f1: float | None = Field(default=None, description="Unweighted mean F1 over the classes with validation images "
                                                             "(multi-label: with positive validation images, at the per-class thresholds).")
    multi_label: bool | None = Field(default=None, description="True for a multi-label model (val_accuracy: exact tag sets).")
    map: float | None = Field(default=None, description="Multi-label: mean over the classes of the validation average precision.")
    per_class_ap: dict[str, float | None] | None = Field(default=None, description="Multi-label: average precision per class (null: no positive).")
    micro_f1: float | None = Field(default=None, description="Multi-label: F1 over all (image, class) pairs at the per-class thresholds.")
    thresholds: dict[str, float] | None = Field(
        default=None, description="Multi-label: per-class probability thresholds (best validation F1), as in config.json.")
    balanced_accuracy: float | None = Field(default=None, description="Mean recall over the classes with validation images.")
    temperature: float | None = Field(default=None, gt=0.0, description="Fitted on validation (NLL); custom inference applies it.")
    temperature_note: str | None = Field(
        default=None, description="Why the temperature was not fitted (a validation split without errors keeps it at 1).")
    ece: BeforeAfter | None = Field(default=None, description="Expected calibration error, 15 equal-width bins.")
    nll: BeforeAfter | None = Field(default=None, description="Mean negative log-likelihood.")
    auto_accept: list[AutoAcceptRow] | None = Field(
        default=None, description="Global thresholds for target precisions 0.90, 0.95, 0.98, 0.99 (per class: metrics.json).")
    report_url: str | None = Field(default=None, description="report.html beside the package, when written.")
    report_skipped: str | None = Field(default=None, description="Why report.html was not written (the model package "
                                       "is complete without it); absent when it was.")


class TrainingStatus(OutputModel):
    """``cls.training.status``, keyed by job id."""

    event_type: Literal["training.status"] = TRAINING_STATUS_EVENT
    job_id: str
    status: TrainingStatusValue
    seq: int = Field(ge=0, description="Orders this job's events; a fold ignores a lower seq than it has.")
    attempt: int = Field(default=1, ge=1, description="Delivery attempt of the job (1 first; more after a resume).")
    progress: Progress | None = None
    metrics: TrainingMetrics | None = None
    model_url: str | None = None
    error: ErrorInfo | None = None
    heartbeat: bool | None = Field(default=None, description="True for in-epoch heartbeats (progress only).")

    @staticmethod
    def message_id_for(job_id: str, status: str, epoch: int = 0, step: int | None = None) -> str:
        position: list[object] = [status, epoch]
        if step is not None:
            position.append(step)
        return derive_message_id("training.status", job_id, *position)


SEQ_EPOCH_STRIDE = 1_000_000
"""seq = epoch * stride + step for running events; terminal events use ``TERMINAL_SEQ``."""
TERMINAL_SEQ = 2**53 - 1


def status_seq(status: str, epoch: int = 0, step: int | None = None) -> int:
    """``seq`` of a status event: queued 0, running by epoch/step, terminal events above everything."""
    if status in TERMINAL_STATUSES:
        return TERMINAL_SEQ
    if status == "queued":
        return 0
    return running_seq(epoch, step)


def running_seq(epoch: int, step: int | None = None) -> int:
    """``seq`` of a running event: epoch-end events sort after every heartbeat of that epoch."""
    return epoch * SEQ_EPOCH_STRIDE + (SEQ_EPOCH_STRIDE - 1 if step is None else min(step, SEQ_EPOCH_STRIDE - 2))
