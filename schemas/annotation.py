"""Annotation: zero-shot (CLIP, SigLIP) or trained-model ("custom") classification of images by URL.

Confidence semantics:
- ``clip``: a softmax over the given classes of ``logit_scale * cos(image, text)``; confidences of one
  image sum to 1 over *all* classes (before ``top_k``/``threshold``).
- ``siglip``: an independent sigmoid per class, ``sigmoid(logit_scale * cos + logit_bias)``; they do not
  sum to 1, several classes may be confident at once.
- ``custom``: a softmax over the trained model's classes, or over the subset named in ``classes``.

Multi-label (``multi_label: true``): every class gets an independent probability and an image may have any number of
the classes, none included. ``siglip``: its sigmoid, as above. ``clip``: ``sigmoid(logit_scale * (cos(image, class
prompt) - cos(image, class-neutral prompt)))``, the two-way softmax of the class prompt against the prompt rendered
for "object" (a rule without examples: trust its ranking within a class more than its absolute values). ``custom``
follows the package: a multi-label package gives its calibrated per-class sigmoids whatever the request says, and
each result lists ``labels``, the tags reaching the package's per-class thresholds. ``top_k`` caps, ``threshold``
applies to each class's own probability, and ``margin`` is absent.

``top_k`` is applied first (the k most confident classes, sorted by confidence), then ``threshold``
drops those below it. ``top_k`` defaults to 3; one above the number of classes (the request's, or the
custom model's when the request names none) means all of them: unset with 2 classes answers at most 2
predictions, and so does ``top_k: 10``. It is never a reason to refuse a request. ``margin`` is top-1 minus top-2 confidence (before both), so a labeling UI can
sort uncertain images first. One bad image yields an error entry for that image, never a failed
request; ``status: failed`` means the whole request could not run (invalid request, model not
loadable).

Large requests are answered in parts: part ``k`` of ``parts`` holds the images at request positions
``[k*N, (k+1)*N)`` for the worker's configured N, so a redelivered request yields the same parts.
The one exception is ``"task": "audit"``: its parts are in review order (highest ``issue_score`` first, ties
in request order, failed images last), which is just as deterministic for the same embeddings.

Few-shot: a classify request with labeled ``examples`` (or an ``examples_url`` manifest) is classified by a
head fitted on their embeddings (``few_shot.method``; ``auto`` picks by cross-validation on the support set).
Its confidences are a softmax over the classes for every family (SigLIP too); classes without examples keep
their zero-shot weights (clip, siglip) or are refused (custom, timm). Each part says what ran in ``few_shot``.
With ``multi_label: true`` the examples carry tag sets (``labels``, possibly empty) and one-vs-rest heads give
independent per-class probabilities (``few_shot.method`` ``one_vs_rest``; ``examples_per_class`` counts positive
examples); a class without a positive example keeps its zero-shot rule (clip, siglip) or is refused (custom, timm).
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from schemas.common import ErrorInfo, Identifier, InputModel, OutputModel, derive_message_id
from schemas.urls import OutputUrl, Url

MAX_IMAGES_PER_REQUEST = 10_000
MAX_CLASSES = 2_000
DEFAULT_TOP_K = 3
"""``top_k`` when a classify request does not say; one above the number of classes means all of them."""
MAX_CLASS_NAME_LENGTH = 200
MAX_PROMPT_TEMPLATES = 100
MAX_TEMPLATE_LENGTH = 300
# Prompt volume: what one request may make a worker render, tokenise and embed.
MAX_PLACEHOLDERS_PER_TEMPLATE = 4
"""Class placeholders (``{}`` or ``{c}``, whichever the template uses) in one template."""
MAX_PROMPTS = 160_000
"""Prompts = classes x templates (2,000 classes x the 80 default templates fit; ImageNet's 1,000 x 80 too)."""
MAX_PROMPT_CHARS = 16_000_000
"""Characters of all rendered prompts together (about 16 MB of text)."""


def placeholder_count(template: str) -> int:
    """How many class placeholders rendering fills in: ``{c}`` if the template has one, else ``{}``."""
    return template.count("{c}") if "{c}" in template else template.count("{}")


def rendered_prompt_chars(classes: list[str], templates: list[str]) -> int:
    """Characters of all prompts ``templates x classes`` would render to, counted without rendering them."""
    class_chars = sum(len(c) for c in classes)
    return sum(
        len(classes) * (len(t) - len("{c}" if "{c}" in t else "{}") * placeholder_count(t))
        + placeholder_count(t) * class_chars
        for t in templates
    )


def prompt_volume_problem(classes: list[str], templates: list[str], templates_origin: str = "templates") -> str | None:
    """Why ``classes`` x ``templates`` is over a prompt limit (the message names the limit), or None."""
    for template in templates:
        if placeholder_count(template) > MAX_PLACEHOLDERS_PER_TEMPLATE:
            return (f"prompt template {template[:60]!r} has {placeholder_count(template)} class placeholders; "
                    f"the limit MAX_PLACEHOLDERS_PER_TEMPLATE is {MAX_PLACEHOLDERS_PER_TEMPLATE}")
    prompts = len(classes) * len(templates)
    if prompts > MAX_PROMPTS:
        return (f"{len(classes)} classes x {len(templates)} {templates_origin} = {prompts} prompts; "
                f"the limit MAX_PROMPTS is {MAX_PROMPTS}")
    chars = rendered_prompt_chars(classes, templates)
    if chars > MAX_PROMPT_CHARS:
        return (f"{len(classes)} classes x {len(templates)} {templates_origin} render to {chars} characters; "
                f"the limit MAX_PROMPT_CHARS is {MAX_PROMPT_CHARS}")
    return None

ClassifyModelFamily = Literal["clip", "siglip", "custom", "timm"]
"""Classify: 'timm' (a backbone without a classifier) only with few-shot examples."""
EmbedModelFamily = Literal["clip", "siglip", "custom", "timm"]
MAX_AGAINST_FILES = 64
"""Earlier embedding files one embed request may compare against."""
DEFAULT_DUPLICATE_THRESHOLD = 0.96
DEFAULT_LABEL_CONFLICT_THRESHOLD = 0.95
ANNOTATION_RESULT_EVENT = "annotation.result"


class ImageRef(BaseModel):
    """One image to classify: the caller's id and where to fetch it."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    id: Identifier
    url: Url


# Few-shot classification: a labeled support set adapts the classifier per request.
MAX_FEW_SHOT_EXAMPLES = 10_000
"""Examples one request may carry inline or in its manifest (the worker's CLS_FEWSHOT_MAX_EXAMPLES may be lower)."""
MAX_LABEL_LENGTH = MAX_CLASS_NAME_LENGTH
FEW_SHOT_TEXT_METHODS = ("linear_probe", "tip_adapter")
"""Methods for models with a text tower (clip, siglip); ``ml.fewshot.TEXT_METHODS``."""
FEW_SHOT_VISION_METHODS = ("prototype", "knn", "logistic_regression")
"""Methods for models without one (custom, timm); ``ml.fewshot.VISION_METHODS``."""
FEW_SHOT_MULTI_LABEL_METHODS = ("one_vs_rest",)
"""Methods for ``multi_label`` requests (every family); ``ml.fewshot_multilabel.METHOD``."""
FewShotMethod = Literal["auto", "linear_probe", "tip_adapter", "prototype", "knn", "logistic_regression", "one_vs_rest"]


class LabeledExample(BaseModel):
    """One support example: an image URL and its label (one of the request's classes), or, on a ``multi_label``
    request, its tag set ``labels`` (possibly empty: an image with none of the classes)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    url: Url
    label: str | None = Field(default=None, min_length=1, max_length=MAX_LABEL_LENGTH,
                              description="Single-label requests: the example's class.")
    labels: list[Annotated[str, Field(min_length=1, max_length=MAX_LABEL_LENGTH)]] | None = Field(
        default=None, max_length=MAX_CLASSES,
        description="Multi-label requests: the example's classes, each at most once (empty: none of them).")

    @model_validator(mode="after")
    def _one_kind(self) -> "LabeledExample":
        if (self.label is None) == (self.labels is None):
            raise ValueError("an example needs either 'label' (single-label) or 'labels' (multi_label: true), not both")
        return self


def example_problem(example: LabeledExample, multi_label: bool, classes: list[str] | set[str] | None) -> str | None:
    """Why one example does not fit its request (``multi_label``; ``classes``, None: any name), or None."""
    if multi_label:
        if example.labels is None:
            return "has 'label' but the request has multi_label: true (give 'labels': [...], possibly empty)"
        repeated = sorted(t for t, n in Counter(example.labels).items() if n > 1)
        if repeated:
            return f"repeats labels {repeated[:10]}"
        names = example.labels
    else:
        if example.labels is not None:
            return "has 'labels' but the request is single-label (give one 'label', or set multi_label: true)"
        names = [example.label] if example.label is not None else []
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            return f"has labels that are not among the classes: {unknown[:10]}"
    return None


def examples_problem(examples: list[LabeledExample], multi_label: bool, classes: list[str] | None,
                     where: str = "examples[{i}]") -> str | None:
    """The bad examples of a support set (their count, then the first three, each named by ``where`` with its
    0-based position for ``{i}``), or None."""
    wanted = set(classes) if classes else None
    bad = [(i, problem) for i, example in enumerate(examples)
           if (problem := example_problem(example, multi_label, wanted)) is not None]
    if not bad:
        return None
    head = "; ".join(f"{where.replace('{i}', str(i))} {problem}" for i, problem in bad[:3])
    return head if len(bad) == 1 else f"{len(bad)} bad examples: {head}" + (" ..." if len(bad) > 3 else "")


def example_label_names(examples: list[LabeledExample]) -> set[str]:
    """Every class name the examples use (``label`` or ``labels``)."""
    names: set[str] = set()
    for example in examples:
        if example.labels is not None:
            names.update(example.labels)
        elif example.label is not None:
            names.add(example.label)
    return names


class FewShotSpec(BaseModel):
    """How to learn from the examples: ``auto`` (cross-validation on the support set picks the method) or one method."""

    model_config = ConfigDict(extra="ignore")
    method: FewShotMethod = Field(
        default="auto",
        description="auto | linear_probe | tip_adapter (clip, siglip: with the zero-shot text classifier) | prototype | "
                    "knn | logistic_regression (custom, timm). auto cross-validates the family's methods on the "
                    "support set and fits the best; with one example in some class it takes linear_probe (text "
                    "tower) or prototype. multi_label requests: one_vs_rest (auto picks it).")


def few_shot_problem(model: str, classes: list[str] | None, examples: list[LabeledExample] | None,
                     examples_url: str | None, few_shot: FewShotSpec | None, multi_label: bool = False) -> str | None:
    """Why a classify request's few-shot fields do not fit together (or with ``model``, ``multi_label``), or None."""
    has_examples = examples is not None or examples_url is not None
    if examples is not None and examples_url is not None:
        return "give either examples or examples_url, not both"
    if few_shot is not None and not has_examples:
        return "few_shot needs examples or examples_url (the labeled support set)"
    if model == "timm" and not has_examples:
        return "model 'timm' classifies only with few-shot examples (or use task 'embed')"
    if few_shot is not None and few_shot.method != "auto":
        if multi_label:
            allowed = FEW_SHOT_MULTI_LABEL_METHODS
        else:
            allowed = FEW_SHOT_TEXT_METHODS if model in ("clip", "siglip") else FEW_SHOT_VISION_METHODS
        if few_shot.method not in allowed:
            return (f"few-shot method {few_shot.method!r} is not available for model {model!r}"
                    f"{' with multi_label' if multi_label else ''}; use auto or one of {list(allowed)}")
    if examples is not None:
        problem = examples_problem(examples, multi_label, classes)
        if problem:
            return problem
        labels = example_label_names(examples)
        if not classes and len(labels) > MAX_CLASSES:
            return f"{len(labels)} distinct example labels; at most {MAX_CLASSES} classes"
    return None


class AnnotationRequest(InputModel):
    """``cls.annotation.requests``, keyed by request id."""

    task: Literal["classify"] = Field(description="Discriminator: always 'classify'.")
    request_id: Identifier | None = Field(default=None, description="Defaults to the record key, then to a new UUID.")
    model: ClassifyModelFamily = Field(
        default="clip",
        description="clip | siglip (zero-shot) | custom (a model trained here) | timm (a timm backbone by name, only "
                    "with few-shot examples).")
    model_variant: str | None = Field(
        default=None,
        max_length=200,
        description="Architecture, e.g. 'ViT-B-32', 'ViT-L-14', 'google/siglip-base-patch16-224'; with 'timm' the timm "
                    "model name (required). Default from settings.",
    )
    model_url: Url | None = Field(default=None, description="With model 'custom': where the trained model package is (s3://.../ prefix).")
    images: list[ImageRef] = Field(min_length=1, max_length=MAX_IMAGES_PER_REQUEST)
    classes: list[str] | None = Field(
        default=None,
        max_length=MAX_CLASSES,
        description="Class names (required for clip/siglip; for custom, an optional subset of the model's classes).",
    )
    top_k: int = Field(
        default=DEFAULT_TOP_K, ge=1, le=MAX_CLASSES,
        description=f"Keep at most this many classes per image (applied first); default {DEFAULT_TOP_K}. Above the number "
                    "of classes (the request's, or the custom model's) it means all of them: the worker uses "
                    "min(top_k, number of classes).")
    threshold: float = Field(default=0.1, ge=0.0, le=1.0, description="Then drop predictions below this confidence.")
    multi_label: bool = Field(
        default=False,
        description="Tags, not one class: an independent probability per class (siglip: its sigmoid; clip: class prompt "
                    "against a class-neutral prompt; custom: follows the package, which must be multi-label). "
                    "Results list 'labels' (the tag set); 'margin' is absent.")
    priority: Literal["interactive", "bulk"] | None = Field(
        default=None,
        description="Scheduling lane. 'interactive' (a person waits) is handled before bulk work, with its own "
                    "in-flight budget; default: interactive up to CLS_INTERACTIVE_MAX_IMAGES images (16; few-shot examples count, an "
                    "examples_url makes it bulk), else bulk; "
                    "always interactive on the interactive topic.",
    )
    auto_accept_precision: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="With model 'custom': mark each result whose top-1 label the model's validated thresholds accept "
                    "at this precision (auto_accept: true); a multi-label package lists instead, per image, the tags "
                    "its per-class thresholds accept (accepted_labels). The smallest tabulated target >= this one is "
                    "used (0.90, 0.95, 0.98, 0.99); above 0.99 nothing is accepted.")
    prompt_templates: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PROMPT_TEMPLATES,
        description="Zero-shot prompt templates with '{}' (or '{c}') for the class name, e.g. 'a photo of a {}.' "
        f"Limits: {MAX_PLACEHOLDERS_PER_TEMPLATE} placeholders per template; classes x templates <= {MAX_PROMPTS} "
        f"prompts of {MAX_PROMPT_CHARS} characters in all (the worker's default templates count too).",
    )
    examples: list[LabeledExample] | None = Field(
        default=None, min_length=1, max_length=MAX_FEW_SHOT_EXAMPLES,
        description="Few-shot: labeled support images [{url, label}], or [{url, labels: [...]}] with multi_label; each "
                    "label one of classes (without classes on custom/timm, the labels are the classes). The worker embeds them (cached by content) and fits a "
                    "head; examples that fail to fetch or decode are skipped and counted. At most "
                    "CLS_FEWSHOT_MAX_EXAMPLES (default 2000) per request.")
    examples_url: Url | None = Field(
        default=None,
        description="Few-shot: a JSON Lines manifest of {url, label} ({url, labels} with multi_label) (s3://, or file:// where the worker allows it) "
                    "instead of inline examples, for large support sets.")
    few_shot: FewShotSpec | None = Field(
        default=None, description="Few-shot options (with examples or examples_url; default method auto).")

    @field_validator("classes")
    @classmethod
    def _classes_valid(cls, classes: list[str] | None) -> list[str] | None:
        return None if classes is None else check_class_names([c.strip() for c in classes])

    @field_validator("prompt_templates")
    @classmethod
    def _templates_valid(cls, templates: list[str] | None) -> list[str] | None:
        if templates is None:
            return None
        for template in templates:
            if "{}" not in template and "{c}" not in template:
                raise ValueError(f"prompt template {template!r} must contain '{{}}' or '{{c}}' for the class name")
            if len(template) > MAX_TEMPLATE_LENGTH:
                raise ValueError(f"prompt templates are limited to {MAX_TEMPLATE_LENGTH} characters")
            if placeholder_count(template) > MAX_PLACEHOLDERS_PER_TEMPLATE:
                raise ValueError(
                    f"prompt template {template[:60]!r} has {placeholder_count(template)} class placeholders; "
                    f"the limit MAX_PLACEHOLDERS_PER_TEMPLATE is {MAX_PLACEHOLDERS_PER_TEMPLATE}"
                )
        return templates

    @field_validator("images")
    @classmethod
    def _unique_image_ids(cls, images: list[ImageRef]) -> list[ImageRef]:
        return unique_image_ids(images)

    @model_validator(mode="after")
    def _model_specific(self) -> "AnnotationRequest":
        if self.model in ("clip", "siglip"):
            if not self.classes:
                raise ValueError(f"classes are required for model {self.model!r}")
            if self.model_url is not None:
                raise ValueError("model_url is only allowed with model 'custom'")
            if self.auto_accept_precision is not None:
                raise ValueError("auto_accept_precision is only allowed with model 'custom'")
        if self.model == "custom" and not self.model_url:
            raise ValueError("model 'custom' needs model_url (the trained model package)")
        if self.model == "timm":
            if not self.model_variant:
                raise ValueError("model 'timm' needs model_variant (a timm model name)")
            if self.auto_accept_precision is not None:
                raise ValueError("auto_accept_precision is only allowed with model 'custom'")
        problem = few_shot_problem(self.model, self.classes, self.examples, self.examples_url, self.few_shot,
                                   self.multi_label)
        if problem:
            raise ValueError(problem)
        if self.has_examples and self.auto_accept_precision is not None:
            raise ValueError("auto_accept_precision needs the trained model's own classifier, not few-shot examples")
        if self.classes and self.prompt_templates and self.model != "custom":
            problem = prompt_volume_problem(self.classes, self.prompt_templates)
            if problem:
                raise ValueError(problem)
        return self

    def top_k_for(self, class_count: int) -> int:
        """How many predictions per image at most, for ``class_count`` classes: ``min(top_k, class_count)``."""
        return min(self.top_k, class_count)

    @property
    def has_examples(self) -> bool:
        """Whether this is a few-shot request (examples inline or by manifest)."""
        return self.examples is not None or self.examples_url is not None


def check_class_names(names: list[str]) -> list[str]:
    """``names`` unchanged when they are a non-empty list of unique, non-empty names of at most
    ``MAX_CLASS_NAME_LENGTH`` characters; else ValueError (naming at most 10 repeated names)."""
    if not names:
        raise ValueError("classes must not be empty")
    for name in names:
        if not name:
            raise ValueError("class names must be non-empty")
        if len(name) > MAX_CLASS_NAME_LENGTH:
            raise ValueError(f"class name longer than {MAX_CLASS_NAME_LENGTH} characters")
    if len(set(names)) != len(names):
        counts = Counter(names)
        raise ValueError(f"class names must be unique; duplicated: {sorted(n for n, c in counts.items() if c > 1)[:10]}")
    return names


def unique_image_ids(images: list[ImageRef]) -> list[ImageRef]:
    """``images`` unchanged; ValueError naming repeated ids."""
    seen: set[str] = set()
    duplicates: set[str] = set()
    for image in images:
        (duplicates if image.id in seen else seen).add(image.id)
    if duplicates:
        raise ValueError(f"image ids must be unique; duplicated: {sorted(duplicates)[:10]}")
    return images


class DuplicatesSpec(BaseModel):
    """Find duplicates among the request's images (and the ``against`` files): exact ones by content hash,
    near ones by cosine similarity of the embeddings at or above ``threshold``, or by a perceptual hash within
    10 bits when their cosine is at least 0.6 (re-encodes, resizes, brightness changes)."""

    model_config = ConfigDict(extra="ignore")
    threshold: float = Field(default=DEFAULT_DUPLICATE_THRESHOLD, gt=0.0, le=1.0,
                             description="Cosine similarity at or above which two images are near-duplicates.")


class EmbedRequest(InputModel):
    """``"task": "embed"`` on the annotation request topics: L2-normalised image embeddings, stored for the backend.

    Each result part names the object holding its vectors (``embeddings_url``: a ``.npz`` with ``ids`` and
    float16 ``embeddings``, see docs/contract.md); ``inline: true`` also puts each vector in its result entry
    (bounded by the worker's CLS_EMBED_INLINE_MAX_IMAGES and by the record size). With ``duplicates``, the
    last part lists duplicate groups (exact by content hash, near by cosine similarity).
    """

    task: Literal["embed"] = Field(description="Discriminator: always 'embed'.")
    request_id: Identifier | None = Field(default=None, description="Defaults to the record key, then to a new UUID.")
    model: EmbedModelFamily = Field(
        default="clip",
        description="clip | siglip (image towers) | custom (a model trained here: pooled pre-logits features) | "
                    "timm (any timm model name as model_variant, allowed by the worker's settings).")
    model_variant: str | None = Field(
        default=None, max_length=200,
        description="clip/siglip architecture (default from settings); with 'timm' the timm model name (required).")
    model_url: Url | None = Field(
        default=None,
        description="With 'custom': the trained model package (s3://.../ prefix). With 'timm': a safetensors state "
                    "dict (s3:// or a fenced file://); absent: the hub cache.")
    images: list[ImageRef] = Field(min_length=1, max_length=MAX_IMAGES_PER_REQUEST)
    output_path: OutputUrl | None = Field(
        default=None,
        description="Prefix the vector files go under (s3://bucket/prefix or a fenced file://); default: the worker's "
                    "CLS_EMBED_OUTPUT_PATH. Part k is written to <output_path>/<request_id>/part-<k>.npz.")
    inline: bool = Field(default=False, description="Also put each vector in its result entry (small requests only).")
    duplicates: DuplicatesSpec | None = Field(default=None, description="Report duplicate groups in the last part.")
    against: list[Url] | None = Field(
        default=None, max_length=MAX_AGAINST_FILES,
        description="Earlier embedding files (embeddings_url of earlier results, same model) to find duplicates "
                    "against; needs 'duplicates'.")
    priority: Literal["interactive", "bulk"] | None = Field(
        default=None, description="Scheduling lane, as for classify requests.")

    @field_validator("images")
    @classmethod
    def _unique_image_ids(cls, images: list[ImageRef]) -> list[ImageRef]:
        return unique_image_ids(images)

    @model_validator(mode="after")
    def _model_specific(self) -> "EmbedRequest":
        problem = embedding_model_problem(self.model, self.model_variant, self.model_url)
        if problem:
            raise ValueError(problem)
        if self.against and self.duplicates is None:
            raise ValueError("'against' needs 'duplicates' (e.g. {\"threshold\": 0.95})")
        return self


def embedding_model_problem(model: str, model_variant: str | None, model_url: str | None) -> str | None:
    """Why the model fields of an embed, audit or select request do not fit together, or None."""
    if model in ("clip", "siglip") and model_url is not None:
        return "model_url is only allowed with model 'custom' or 'timm'"
    if model == "custom" and not model_url:
        return "model 'custom' needs model_url (the trained model package)"
    if model == "timm" and not model_variant:
        return "model 'timm' needs model_variant (a timm model name)"
    return None


MAX_AUDIT_FOLDS = 20
MAX_AUDIT_NEIGHBOURS = 100


class AuditImage(ImageRef):
    """One image to audit: the caller's id, where to fetch it, and the label it has now."""

    label: str = Field(min_length=1, max_length=MAX_CLASS_NAME_LENGTH, description="The image's current label (a class name).")


class AuditSpec(BaseModel):
    """How the audit is computed (see docs/contract.md, Label audit)."""

    model_config = ConfigDict(extra="ignore")
    folds: int = Field(default=5, ge=2, le=MAX_AUDIT_FOLDS,
                       description="Cross-validation folds (fewer when no class has this many images).")
    neighbours: int = Field(default=10, ge=1, le=MAX_AUDIT_NEIGHBOURS,
                            description="Nearest images the outlier score averages over.")
    duplicate_threshold: float = Field(
        default=DEFAULT_LABEL_CONFLICT_THRESHOLD, gt=0.0, le=1.0,
        description="Cosine similarity at or above which two differently labeled images are a label conflict.")


def audit_label_problem(labels: list[str], classes: list[str] | None) -> str | None:
    """Why an audit of images with these ``labels`` (over ``classes``, default: the labels) cannot run, or None:
    a label outside the classes, fewer than 2 labels, or a label held by a single image (no fold could score
    it out of sample)."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if classes is not None:
        unknown = sorted(set(counts) - set(classes))
        if unknown:
            return f"{len(unknown)} label(s) are not in classes: {[u[:60] for u in unknown[:10]]}"
    if len(counts) < 2:
        return f"an audit needs images of at least 2 labels; got {len(counts)}"
    single = sorted(label for label, count in counts.items() if count < 2)
    if single:
        return (f"every label needs at least 2 images (cross-validation scores each image by a model that did not see it); "
                f"{len(single)} label(s) have one: {[s[:60] for s in single[:10]]}")
    return None


class EmbeddedSetRequest(InputModel):
    """What audit and select requests share: the embedding backbone, the class names labels may take, and the
    rule that the images come inline or behind a manifest URL, not both."""

    task: str = Field(description="Discriminator: each subclass's literal.")
    request_id: Identifier | None = Field(default=None, description="Defaults to the record key, then to a new UUID.")
    model: EmbedModelFamily = Field(default="clip", description="The embedding backbone, as for embed requests.")
    model_variant: str | None = Field(default=None, max_length=200, description="As for embed requests.")
    model_url: Url | None = Field(default=None, description="As for embed requests ('custom', 'timm').")

    @field_validator("classes", check_fields=False)
    @classmethod
    def _classes_valid(cls, classes: list[str] | None) -> list[str] | None:
        return None if classes is None else check_class_names(classes)

    def _source_problem(self) -> str | None:
        """Why the images and the backbone cannot be used, or None (run by each subclass's model validator)."""
        if (getattr(self, "images") is None) == (getattr(self, "manifest_url") is None):
            return "give either images or manifest_url (one of them)"
        return embedding_model_problem(self.model, self.model_variant, self.model_url)


class AuditRequest(EmbeddedSetRequest):
    """``"task": "audit"`` on the annotation request topics: which current labels are probably wrong.

    The worker embeds the images (as ``embed`` does), scores each image's label out of sample (k-fold logistic
    regression on the embeddings), flags label issues by the confident-learning rule with a suggested label,
    and scores outliers and differently labeled near-duplicates. **Parts are in review order**, not request
    order (an exception to the parts rule): part 0 holds the images with the highest ``issue_score``; ties keep
    request order; images that failed come last. The last part lists ``label_conflicts``; every part names the
    whole table as CSV (``audit_url``) and the vectors (``embeddings_url``), both under
    ``<output_path>/<request_id>/``.
    """

    task: Literal["audit"] = Field(description="Discriminator: always 'audit'.")
    images: list[AuditImage] | None = Field(
        default=None, min_length=1, max_length=MAX_IMAGES_PER_REQUEST,
        description="The images with their labels; or manifest_url for larger sets.")
    manifest_url: Url | None = Field(
        default=None,
        description="Instead of images: a JSON Lines object ({\"id\", \"url\", \"label\"} per line; s3:// or a fetchable "
                    "URL), up to the worker's CLS_AUDIT_MAX_IMAGES lines.")
    classes: list[str] | None = Field(
        default=None, max_length=MAX_CLASSES,
        description="The class names labels may take (a label outside them is invalid); default: the labels given. "
                    "A class no image holds is never suggested.")
    output_path: OutputUrl | None = Field(
        default=None,
        description="Prefix the files go under (as for embed; default CLS_EMBED_OUTPUT_PATH): "
                    "<output_path>/<request_id>/audit.csv and embeddings.npz.")
    options: AuditSpec = Field(default_factory=AuditSpec, description="Folds, neighbours, conflict threshold.")
    priority: Literal["interactive", "bulk"] | None = Field(default=None, description="Scheduling lane, as for classify requests.")

    @field_validator("images")
    @classmethod
    def _unique_image_ids(cls, images: list[AuditImage] | None) -> list[AuditImage] | None:
        return None if images is None else unique_image_ids(images)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _model_specific(self) -> "AuditRequest":
        problem = self._source_problem()
        if problem:
            raise ValueError(problem)
        if self.images is not None:
            problem = audit_label_problem([image.label for image in self.images], self.classes)
            if problem:
                raise ValueError(problem)
        return self


MAX_SELECT_BUDGET = 10_000
"""Images one select request may ask for (the parts and the CSV list them all)."""
SelectStrategy = Literal["auto", "random", "typiclust", "margin", "kcenter"]


class SelectSpec(BaseModel):
    """How a selection treats near-duplicates."""

    model_config = ConfigDict(extra="ignore")
    duplicate_threshold: float = Field(
        default=DEFAULT_DUPLICATE_THRESHOLD, gt=0.0, le=1.0,
        description="Cosine similarity at or above which two images are near-duplicates: of a group of them (or of an "
                    "image near a labeled one) at most one is selected, and none when a labeled image is in the group.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the random choices (k-means, random order).")


class SelectRequest(EmbeddedSetRequest):
    """``"task": "select"`` on the annotation request topics: which unlabeled images to label next (active learning).

    The worker embeds the pool (``images`` or ``manifest_url``) and the labeled set (``labeled`` or ``labeled_url``,
    may be empty: a cold start), and picks ``budget`` pool images by ``strategy``: ``random`` (seeded),
    ``typiclust`` (the most typical image of each of the largest clusters no labeled image covers), ``margin`` (the
    smallest top-1 minus top-2 probability of a head fitted on the labeled embeddings, or of the zero-shot
    classifier when the model has a text tower and ``classes`` are given and no head can be fitted), ``kcenter`` (greedy
    farthest point from the labeled and selected images) or ``auto`` (typical images while the labeled set is small
    per class, then uncertain images shared out over the predicted classes, each far from the labeled and the other
    selected images). Near-duplicates
    of each other or of a labeled image are never both selected. **Parts are in selection order** (rank 0 first;
    pool images that failed come last as error entries); the whole pool's ranking is also written as CSV
    (``selection_url``: ``<output_path>/<request_id>/selection.csv``). The same inputs give the same parts.
    """

    task: Literal["select"] = Field(description="Discriminator: always 'select'.")
    images: list[ImageRef] | None = Field(
        default=None, min_length=1, max_length=MAX_IMAGES_PER_REQUEST,
        description="The unlabeled pool [{id, url}]; or manifest_url for larger pools.")
    manifest_url: Url | None = Field(
        default=None,
        description="Instead of images: a JSON Lines object of the pool ({\"id\", \"url\"} per line), up to the "
                    "worker's CLS_AUDIT_MAX_IMAGES lines (pool and labeled set together).")
    labeled: list[AuditImage] | None = Field(
        default=None, max_length=MAX_IMAGES_PER_REQUEST,
        description="The images labeled so far [{id, url, label}] (may be empty: a cold start).")
    labeled_url: Url | None = Field(
        default=None, description="Instead of labeled: a JSON Lines object of {\"id\", \"url\", \"label\"}.")
    budget: int = Field(ge=1, le=MAX_SELECT_BUDGET, description="How many pool images to select.")
    strategy: SelectStrategy = Field(
        default="auto", description="auto | random | typiclust | margin | kcenter (see the task's description).")
    classes: list[str] | None = Field(
        default=None, max_length=MAX_CLASSES,
        description="The class names labels may take (a label outside them is invalid); default: the labels given.")
    output_path: OutputUrl | None = Field(
        default=None,
        description="Prefix the CSV goes under (as for embed; default CLS_EMBED_OUTPUT_PATH): "
                    "<output_path>/<request_id>/selection.csv.")
    options: SelectSpec = Field(default_factory=SelectSpec, description="Near-duplicate threshold, seed.")
    priority: Literal["interactive", "bulk"] | None = Field(default=None, description="Scheduling lane, as for classify requests.")

    @field_validator("images")
    @classmethod
    def _unique_image_ids(cls, images: list[ImageRef] | None) -> list[ImageRef] | None:
        return None if images is None else unique_image_ids(images)

    @field_validator("labeled")
    @classmethod
    def _unique_labeled_ids(cls, labeled: list[AuditImage] | None) -> list[AuditImage] | None:
        return None if labeled is None else unique_image_ids(labeled)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _model_specific(self) -> "SelectRequest":
        problem = self._source_problem()
        if problem:
            raise ValueError(problem)
        if self.labeled is not None and self.labeled_url is not None:
            raise ValueError("give either labeled or labeled_url, not both")
        if self.images is not None and self.labeled:
            problem = select_inputs_problem(self.images, self.labeled, self.classes, self.budget)
            if problem:
                raise ValueError(problem)
        elif self.images is not None and self.budget > len(self.images):
            raise ValueError(f"budget {self.budget} is more than the {len(self.images)} pool images")
        return self


def select_inputs_problem(pool: list[ImageRef], labeled: list[AuditImage], classes: list[str] | None,
                          budget: int) -> str | None:
    """Why a selection from ``pool`` given ``labeled`` cannot run, or None: a label outside ``classes``, an id in
    both sets, or a budget larger than the pool."""
    if budget > len(pool):
        return f"budget {budget} is more than the {len(pool)} pool images"
    if classes is not None:
        unknown = sorted({image.label for image in labeled} - set(classes))
        if unknown:
            return f"{len(unknown)} label(s) are not in classes: {[u[:60] for u in unknown[:10]]}"
    both = sorted({image.id for image in pool} & {image.id for image in labeled})
    if both:
        return f"{len(both)} id(s) are both in the pool and labeled: {[b[:60] for b in both[:10]]}"
    return None


AnyAnnotationRequest = Annotated[AnnotationRequest | EmbedRequest | AuditRequest | SelectRequest,
                                 Field(discriminator="task")]
"""What the annotation request topics carry: ``task`` classify, embed, audit or select."""


class AnnotationRequestMessage(RootModel[AnyAnnotationRequest]):
    """A record on the annotation request topics: a classify, embed, audit or select request (by ``task``)."""


def lane_of(body: dict, topic_lane: str, interactive_max_images: int) -> str:
    """The lane of a request read from a topic of lane ``topic_lane`` (the raw body: decided before validation).

    The interactive topic makes every request interactive; on the request topic, an explicit
    ``priority`` wins, else a request with at most ``interactive_max_images`` images to embed is interactive:
    its images plus its few-shot ``examples``; a support set or image list behind a manifest URL
    (``examples_url``, ``manifest_url``) is of unknown size, so such a request is bulk.
    """
    if topic_lane == "interactive":
        return "interactive"
    priority = body.get("priority")
    if priority in ("interactive", "bulk"):
        return str(priority)
    if body.get("examples_url") or body.get("manifest_url") or body.get("labeled_url"):
        return "bulk"
    images = body.get("images")
    examples = body.get("examples")
    labeled = body.get("labeled")
    if not isinstance(images, list):
        return "bulk"
    count = (len(images) + (len(examples) if isinstance(examples, list) else 0)
             + (len(labeled) if isinstance(labeled, list) else 0))
    return "interactive" if 0 < len(images) and count <= interactive_max_images else "bulk"


class Prediction(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    class_name: str = Field(alias="class", description="The class name, exactly as given.")
    confidence: float = Field(ge=0.0, le=1.0)


class AuditEntry(BaseModel):
    """One image's audit. Probabilities are out of sample: from the model fitted on the other folds."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(description="The label the request gave.")
    label_probability: float = Field(ge=0.0, le=1.0, description="Out-of-sample probability of the given label.")
    label_issue: bool = Field(description="The confident-learning rule says the label is probably wrong.")
    suggested_label: str = Field(description="The class the rule assigns (the given label when there is no issue).")
    suggested_probability: float = Field(ge=0.0, le=1.0, description="Out-of-sample probability of suggested_label.")
    issue_score: float = Field(ge=0.0, le=1.0, description="1 - label_probability: the review order, highest first.")
    outlier_score: float = Field(ge=0.0, le=2.0, description="1 - mean cosine similarity to the nearest other images.")
    rank: int = Field(ge=0, description="0-based position in the review order (by issue_score; ties: request order).")


class LabelConflict(BaseModel):
    """Two near-duplicate images with different labels."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=2, max_length=2)
    labels: list[str] = Field(min_length=2, max_length=2, description="Their labels, in the order of ids.")
    similarity: float = Field(ge=-1.0, le=1.0, description="Cosine similarity of their embeddings.")


class AuditSummary(BaseModel):
    """The whole audit in numbers (on every part)."""

    model_config = ConfigDict(extra="forbid")
    images: int = Field(ge=0, description="Images in the request.")
    audited: int = Field(ge=0, description="Images embedded and scored (the others have error entries).")
    label_issues: int = Field(ge=0, description="Images flagged label_issue.")
    label_conflicts: int = Field(ge=0, description="Differently labeled near-duplicate pairs found (all, file included).")
    classes: int = Field(ge=0)
    folds: int = Field(ge=0, description="Cross-validation folds used.")
    cv_accuracy: float = Field(ge=0.0, le=1.0, description="Out-of-sample accuracy against the given labels.")


class SelectEntry(BaseModel):
    """One selected image, in selection order."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="The pool image's id.")
    rank: int = Field(ge=0, description="0-based position in the selection (label rank 0 first).")
    score: float = Field(description="The strategy's score of the image at its pick: typicality (typiclust, auto while "
                                     "typical), 1 - margin (margin, auto while uncertain), distance to the nearest "
                                     "labeled or earlier selected image (kcenter), 0 (random).")
    reason: Literal["typical", "uncertain", "diverse", "random"] = Field(
        description="typical: the most typical image of an uncovered cluster; uncertain: the head is unsure; "
                    "diverse: far from everything labeled or selected; random: the random strategy.")
    predicted: Prediction | None = Field(
        default=None, description="The current head's top-1 class and its probability (for pre-filling the labeling "
                                  "form), or the zero-shot classifier's (clip, siglip with classes) while there is no "
                                  "head; null without either (see select_summary.predicted_by).")


class SelectSummary(BaseModel):
    """What a selection ran on (on every part)."""

    model_config = ConfigDict(extra="forbid")
    strategy: str = Field(description="The strategy that ran: auto's choice (typiclust or diverse_margin), or the "
                                      "one asked for; margin without a head (fewer than 2 labeled classes) and without "
                                      "a zero-shot classifier runs typiclust.")
    requested_strategy: str = Field(description="The request's strategy.")
    pool: int = Field(ge=0, description="Pool images in the request.")
    embedded: int = Field(ge=0, description="Pool images embedded (the others have error entries).")
    candidates: int = Field(ge=0, description="Pool images that could be selected: near-duplicates of a labeled image "
                                              "and all but one of each near-duplicate group left out.")
    labeled: int = Field(ge=0, description="Labeled images embedded and used.")
    labeled_failed: int = Field(ge=0, description="Labeled images that could not be fetched or decoded (not used).")
    classes: int = Field(ge=0, description="Classes (the request's, or the labels given).")
    selected: int = Field(ge=0, description="Images selected (the budget, or fewer when fewer candidates remain).")
    cv_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Cross-validated accuracy of the head on the labeled set; null when no class has 2 labeled images.")
    predicted_by: Literal["head", "zero_shot"] | None = Field(
        default=None,
        description="The classifier behind the margins and `predicted`: head (fitted on the labeled set), zero_shot "
                    "(the model's text tower on `classes`, while the labeled set gives no head or auto is below its "
                    "switch point), null: none.")


MAX_IMAGE_ERROR_CHARS = 240
"""A per-image error message is stored as at most this many printable ASCII characters (an image
host's reason phrase can be kilobytes of anything), so a result part's size has a known bound."""


def _short_ascii(message: str) -> str:
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in message[:MAX_IMAGE_ERROR_CHARS + 1])
    return text if len(text) <= MAX_IMAGE_ERROR_CHARS else text[:MAX_IMAGE_ERROR_CHARS - 3] + "..."


class ImageResult(BaseModel):
    """Predictions for one image, or its error (then ``predictions`` is empty). Embed results: ``predictions``
    is empty; ``embedding`` holds the vector when the request asked for it inline. Audit results:
    ``predictions`` is empty; ``audit`` holds the image's row."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str
    predictions: list[Prediction] = Field(default_factory=list)
    margin: float | None = Field(default=None, description="top-1 minus top-2 confidence (before top_k/threshold); absent for multi-label.")
    labels: list[str] | None = Field(
        default=None,
        description="Multi-label results: the image's tag set, most probable first (possibly empty). Zero-shot: the "
                    "classes of 'predictions'; custom: the classes whose calibrated probability reaches the package's "
                    "per-class threshold, at most top_k.")
    auto_accept: bool | None = Field(
        default=None,
        description="Only when the request set auto_accept_precision: whether the model's top-1 class over all its "
                    "classes (the first prediction, when it is in the requested classes) may be accepted at that precision.")
    accepted_labels: list[str] | None = Field(
        default=None,
        description="Multi-label packages, only when the request set auto_accept_precision: the requested classes whose "
                    "calibrated probability reaches that class's auto-accept threshold at that precision (validated at "
                    "training time per class, or pooled over all classes where a class had too few validation "
                    "positives), most probable first, at most top_k; possibly empty.")
    embedding: list[float] | None = Field(
        default=None, description="Embed with inline: the L2-normalised vector (float16 precision).")
    audit: AuditEntry | None = Field(default=None, description="Audit results: this image's audit row (absent on an error entry).")
    error: ErrorInfo | None = Field(
        default=None, description=f"Why this image failed; the message is at most {MAX_IMAGE_ERROR_CHARS} printable ASCII characters.")

    @field_validator("error")
    @classmethod
    def _short_error(cls, error: ErrorInfo | None) -> ErrorInfo | None:
        if error is not None:
            message = _short_ascii(error.message)
            if message != error.message or error.details:
                error = error.model_copy(update={"message": message, "details": None})
        return error


class ModelDescriptor(BaseModel):
    """Which model produced a result."""

    model_config = ConfigDict(extra="forbid")
    family: str = Field(description="clip | siglip | custom | timm")
    variant: str = Field(description="Architecture or model name, e.g. ViT-B-32.")
    weights: str = Field(description="Weights source: pretrained tag, hub id, path/URL, or 'random' (tests only).")
    prompt_set: Literal["full", "quick", "request"] | None = Field(
        default=None,
        description="Zero-shot classify only: which prompt templates made the class embeddings. 'full': the worker's "
        "default ensemble (CLS_DEFAULT_PROMPT_TEMPLATES; default the 80 ImageNet templates); 'quick': the worker's "
        "small interactive set (CLS_QUICK_PROMPT_TEMPLATES; default 'a photo of a {}.'), used to answer an "
        "interactive request at once while the full ensemble for its classes is computed in the background "
        "(a later request gets 'full'; CLIP's paper reports 3.5 points less ImageNet accuracy for the one template "
        "than for the 80); 'request': the request's own prompt_templates.",
    )


class DuplicateSignals(BaseModel):
    """Why a near group was joined: each linking pair had cosine >= the threshold, or a perceptual hash within
    10 of 64 bits and cosine >= 0.6. ``cosine``: the lowest cosine among the links; ``hash_distance``: the
    largest perceptual-hash distance among them (null when no linked pair had both hashes)."""

    model_config = ConfigDict(extra="forbid")
    hash_distance: int | None = Field(default=None, ge=0, le=64)
    cosine: float | None = Field(default=None, ge=-1.0, le=1.0)


class DuplicateGroup(BaseModel):
    """Images that are copies of each other: ``exact`` (same bytes) or ``near`` (cosine similarity, or a
    perceptual-hash match that the embedding does not contradict; ``signals`` says which)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=2, description="Image ids; ids from an 'against' file are '<file url>#<id>'.")
    kind: Literal["exact", "near"]
    similarity: float = Field(ge=-1.0, le=1.0, description="The lowest pairwise cosine similarity that joined the group (1.0 for exact).")
    signals: DuplicateSignals | None = Field(default=None, description="Near groups: the signals of the links that joined them.")


class FewShotSummary(BaseModel):
    """What a few-shot classify request ran: the method, the support set it learned from, how well."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="The method that classified (auto's pick): linear_probe, tip_adapter, prototype, "
                                    "knn or logistic_regression.")
    examples_per_class: dict[str, int] = Field(
        description="Usable examples per class (classes without any are absent: zero-shot fallback).")
    examples_failed: int = Field(ge=0, description="Examples skipped because they could not be fetched or decoded.")
    cv_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Cross-validated accuracy of the method on the support set (stratified folds); null when some "
                    "class has a single example (nothing to cross-validate).")
    fitted: bool = Field(description="false: the head came from the worker's cache (same model, support set and method).")


class AnnotationResult(OutputModel):
    """``cls.annotation.results``, keyed by request id; one or more parts per request."""

    event_type: Literal["annotation.result"] = ANNOTATION_RESULT_EVENT
    request_id: str
    status: Literal["completed", "failed"]
    model: ModelDescriptor | None = Field(default=None, description="Absent only when the request failed before a model was chosen.")
    results: list[ImageResult] = Field(default_factory=list)
    part: int = Field(default=0, ge=0)
    parts: int = Field(default=1, ge=1)
    error: ErrorInfo | None = Field(default=None, description="Why the whole request failed (status 'failed').")
    task: Literal["classify", "embed", "audit", "select"] | None = Field(
        default=None, description="'embed', 'audit' or 'select' on those results (absent: classify). Audit parts are in "
                                  "review order (highest issue_score first, failed images last), select parts in "
                                  "selection order (rank 0 first, failed pool images last), not request order.")
    embeddings_url: str | None = Field(
        default=None, description="Embed: the .npz object holding this part's vectors ('ids', float16 'embeddings'; "
                                  "the images without an error entry, in request order). Absent when none succeeded. "
                                  "Audit: one object with all the request's vectors (request order), on every part.")
    dim: int | None = Field(default=None, ge=1, description="Embed, audit: the vectors' dimension.")
    duplicates: list[DuplicateGroup] | None = Field(
        default=None, description="Embed with 'duplicates': the groups found (last part only).")
    duplicates_url: str | None = Field(
        default=None, description="Embed: the JSON file holding all groups when they were too many for the record "
                                  "(then 'duplicates' holds the first ones).")
    few_shot: FewShotSummary | None = Field(
        default=None, description="Classify with examples: what the few-shot head is (on every part).")
    audit_url: str | None = Field(
        default=None, description="Audit: the whole table as CSV (header row; one row per image in review order; "
                                  "id,label,label_probability,label_issue,suggested_label,suggested_probability,"
                                  "issue_score,outlier_score,error).")
    audit_summary: AuditSummary | None = Field(default=None, description="Audit: the whole audit in numbers.")
    label_conflicts: list[LabelConflict] | None = Field(
        default=None, description="Audit: differently labeled near-duplicates, most similar first (last part only).")
    label_conflicts_url: str | None = Field(
        default=None, description="Audit: the JSON file holding all conflicts when they were too many for the record "
                                  "(then 'label_conflicts' holds the first ones).")
    selection: list[SelectEntry] | None = Field(
        default=None, description="Select: this part's selected images, in rank order (the failed pool images, after "
                                  "all selected ones, are error entries in 'results').")
    selection_url: str | None = Field(
        default=None, description="Select: the whole selection as CSV (header row; one row per selected image in rank "
                                  "order, then the failed pool images: id,rank,score,reason,predicted,"
                                  "predicted_confidence,error).")
    select_summary: SelectSummary | None = Field(default=None, description="Select: what the selection ran on.")

    @staticmethod
    def message_id_for(request_id: str, part: int) -> str:
        return derive_message_id("annotation.result", request_id, part)

    @classmethod
    def completed_part(cls, request_id: str, part: int, parts: int, **fields: Any) -> "AnnotationResult":
        """Part ``part`` of ``parts`` of a completed request, its message id derived from the request id and the
        part (the same on redelivery); ``fields``: the task's own (model, results, few_shot, embeddings_url, ...)."""
        return cls(message_id=cls.message_id_for(request_id, part), request_id=request_id, status="completed",
                   part=part, parts=parts, **fields)
