"""Worker settings, read from the environment once at start-up (never at import time).

Kafka connection settings use Kafka's usual names (``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SASL_*``,
``KAFKA_SSL_*``); everything else is ``CLS_*``. ``cls-worker settings`` prints the effective values
(secrets masked).
"""

from __future__ import annotations

import ssl
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import topics as default_topics
from schemas.annotation import MAX_FEW_SHOT_EXAMPLES, MAX_IMAGES_PER_REQUEST
from schemas.defaults import DEFAULT_CLIP_VARIANT, DEFAULT_CLIP_WEIGHTS, DEFAULT_SIGLIP_VARIANT, DEFAULT_SIGLIP_WEIGHTS


class KafkaSettings(BaseSettings):
    """How to reach the brokers (``KAFKA_*``)."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_", extra="ignore")

    bootstrap_servers: str = Field(default="127.0.0.1:19092", description="Comma-separated host:port of the Kafka brokers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(default=None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL protocol).")
    sasl_username: str | None = Field(default=None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (masked by `cls-worker settings`).")
    ssl_cafile: str | None = Field(default=None, description="CA bundle that signs the brokers' certificates (SSL protocols); default: the system's.")
    ssl_certfile: str | None = Field(default=None, description="Client certificate for mutual TLS.")
    ssl_keyfile: str | None = Field(default=None, description="Private key of the client certificate.")
    ssl_check_hostname: bool = Field(default=True, description="Check that the broker's certificate names its host.")
    client_id: str = Field(default="cls-worker", description="Client id the brokers see (quotas, logs).")
    request_timeout_ms: int = Field(default=30_000, description="Timeout of one request to a broker.")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by aiokafka's consumer, producer and admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol.startswith("SASL"):
            if not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
                raise ValueError(
                    "KAFKA_SECURITY_PROTOCOL=%s needs KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
                    % self.security_protocol
                )
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        if self.security_protocol.endswith("SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            context.check_hostname = self.ssl_check_hostname
            kwargs["ssl_context"] = context
        return kwargs


class WorkerSettings(BaseSettings):
    """Everything else (``CLS_*``)."""

    model_config = SettingsConfigDict(env_prefix="CLS_", extra="ignore")

    # topics
    annotation_requests_topic: str = Field(default=default_topics.ANNOTATION_REQUESTS, description="Bulk classify / embed / audit requests.")
    annotation_interactive_topic: str = Field(default=default_topics.ANNOTATION_INTERACTIVE, description="Interactive requests (their own lane, answered before bulk ones).")
    annotation_results_topic: str = Field(default=default_topics.ANNOTATION_RESULTS, description="Annotation result parts and failed events.")
    training_requests_topic: str = Field(default=default_topics.TRAINING_REQUESTS, description="Training jobs.")
    training_status_topic: str = Field(default=default_topics.TRAINING_STATUS, description="Training status events.")
    training_control_topic: str = Field(default=default_topics.TRAINING_CONTROL, description="Training cancels (compacted, read from its start).")
    annotation_group_id: str = Field(default="cls-annotation-workers", description="Consumer group of the annotation workers.")
    training_group_id: str = Field(default="cls-training-workers", description="Consumer group of the training workers.")

    # provisioning (cls-worker topics create)
    request_topic_partitions: int = Field(default=12, ge=1, description="Partitions of each request topic (`cls-worker topics create`).")
    output_topic_partitions: int = Field(default=12, ge=1, description="Partitions of each output and dead-letter topic (`cls-worker topics create`).")
    topic_replication_factor: int = Field(default=1, ge=1, description="Replication factor of the topics `cls-worker topics create` makes.")
    request_retention_ms: int = Field(default=7 * 24 * 3600 * 1000, description="Retention of the request topics.")
    output_retention_ms: int = Field(default=14 * 24 * 3600 * 1000, description="Retention of the output topics.")
    dlq_retention_ms: int = Field(default=30 * 24 * 3600 * 1000, description="Retention of the dead-letter topics.")

    # consumer runtime
    max_in_flight: int = Field(default=8, ge=1, description="Records handled concurrently per worker (bulk lane).")
    interactive_max_in_flight: int = Field(default=4, ge=1, description="Interactive requests handled concurrently, "
                                           "besides max_in_flight bulk ones (annotation).")
    interactive_max_images: int = Field(default=16, ge=0, description="A request without 'priority' is interactive up "
                                        "to this many images.")
    lane_lookahead: int = Field(default=16, ge=0, description="Records read ahead while their lane is full, so an "
                                "interactive request behind bulk ones on the same topic is seen.")
    max_poll_interval_ms: int = Field(default=300_000, ge=1000, description="Kafka's max.poll.interval.ms (the runtime keeps polling while handlers run).")
    session_timeout_ms: int = Field(default=30_000, ge=1000, description="Kafka's session.timeout.ms: a worker silent this long leaves the group.")
    heartbeat_interval_ms: int = Field(default=3_000, ge=100, description="Kafka's heartbeat.interval.ms.")
    poll_timeout_ms: int = Field(default=200, ge=10, description="How long one poll waits for records.")
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=10_000, description="How long the broker may hold a "
                                   "fetch for a partition with nothing new. A fetch in flight holds back the next "
                                   "one for partitions just drained, so with one partition caught up and others "
                                   "backlogged this bounds the gap between their fetches (Kafka's default is 500).")
    max_record_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest record read or produced; topics are created to match.")
    retry_attempts: int = Field(default=3, ge=0, description="Retries of a retryable failure before a failed event.")
    max_attempts: int = Field(default=3, ge=1, description="Attempts at a record that fails unexpectedly (or kills the "
                              "worker) before it ends as a failed event or a dead letter.")
    stuck_record_s: float | None = Field(default=None, gt=0, description="/readyz reports not ready when a partition's "
                                         "oldest unfinished record is older; default: the handler timeout + 300 s "
                                         "(annotation), off for training.")
    retry_backoff_s: float = Field(default=0.5, ge=0, description="First delay between attempts (doubled each time).")
    retry_backoff_max_s: float = Field(default=10.0, ge=0, description="Longest delay between attempts.")
    handler_timeout_s: float = Field(default=3600.0, gt=0, description="Annotation: a request running longer fails.")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="On SIGTERM: wait this long for in-flight work.")
    torch_threads: int | None = Field(default=None, ge=1, description="torch.set_num_threads; default: torch's own.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: Literal["auto", "json", "console"] = Field(default="auto", description="json (one object a line), console, or auto: json unless on a terminal.")
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Prometheus /metrics, /healthz, /readyz.")
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics and health server binds.")

    # fetching
    fetch_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Largest image a URL may return.")
    fetch_connect_timeout_s: float = Field(default=5.0, description="Connect timeout of an image fetch.")
    fetch_read_timeout_s: float = Field(default=15.0, description="Read timeout (between bytes) of an image fetch.")
    fetch_total_timeout_s: float = Field(default=30.0, description="Whole-fetch timeout of one image.")
    fetch_max_redirects: int = Field(default=3, ge=0, description="Redirects an image URL may take (each one checked against the URL rules).")
    fetch_concurrency: int = Field(default=16, ge=1, description="Concurrent fetches per host pool; training: concurrent dataset downloads.")
    allow_private_networks: bool = Field(default=False, description="Allow URLs in messages to reach private, loopback and link-local addresses.")
    allow_file_urls: bool = Field(default=False, description="Allow file:// URLs in messages (under CLS_FILE_ROOT).")
    file_root: str | None = Field(default=None, description="The directory file:// URLs must stay under.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Width x height of an image at most; beyond it: too_many_pixels.")
    s3_endpoint_url: str | None = Field(default=None, validation_alias=AliasChoices("CLS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"), description="S3 API endpoint (also AWS_ENDPOINT_URL); default: AWS.")
    s3_region: str | None = Field(default=None, validation_alias=AliasChoices("CLS_S3_REGION", "AWS_DEFAULT_REGION", "AWS_REGION"), description="S3 region (also AWS_DEFAULT_REGION, AWS_REGION).")

    # annotation models
    clip_variant: str = Field(default=DEFAULT_CLIP_VARIANT, description="The CLIP architecture a request without model_variant gets (an open_clip name).")
    clip_weights: str = Field(default=DEFAULT_CLIP_WEIGHTS, description="pretrained tag, local path, s3:// URL or 'random'.")
    siglip_variant: str = Field(default=DEFAULT_SIGLIP_VARIANT, description="The SigLIP model a request without model_variant gets (a hub id).")
    siglip_weights: str = Field(default=DEFAULT_SIGLIP_WEIGHTS, description="'pretrained' (hub cache), local dir/file, s3:// URL or 'random'.")
    preload_models: str = Field(default="clip", description="Comma-separated families (or family:variant) loaded and warmed at start-up.")
    model_cache_size: int = Field(default=2, ge=1, description="Models kept loaded (least recently used out).")
    model_dir: str = Field(default="~/.cache/cls-workers/models", description="Downloaded weights and trained packages.")
    text_cache_size: int = Field(default=512, ge=1, description="Class text embeddings cached across requests, in entries (with CLS_TEXT_CACHE_MB).")
    device: str = Field(default="auto", description="auto (CUDA when available), cuda, cuda:N or cpu.")
    seed: int = Field(default=0, description="Seed of random weights ('random' in tests).")
    max_images_per_request: int = Field(default=MAX_IMAGES_PER_REQUEST, ge=1, description="Images one classify or embed request may carry; default: the contract's ceiling.")
    preprocess: Literal["pil", "tensor"] = Field(
        default="tensor", description="Image preprocessing: torchvision tensor ops on decoded uint8 tensors ('tensor', "
        "ml/preprocess.py; about 2.5x the images/s of 'pil' per CPU core, bench/device.py) or the model families' "
        "Pillow transforms ('pil').")
    gpu_decode: bool = Field(
        default=True, description="With CLS_PREPROCESS=tensor and a model on CUDA: baseline JPEGs of concurrent images are "
        "decoded together on the GPU (nvJPEG, torchvision.io.decode_jpeg) and resized / normalised there; other images "
        "and any GPU decode failure take the CPU path. false: every image is decoded on the CPU pool.")
    batch_size: int = Field(default=32, ge=1, description="Images per micro-batched forward.")
    batch_wait_ms: float = Field(default=10.0, ge=0, description="How long a batch waits to fill.")
    batch_size_while_interactive: int | None = Field(
        default=None, ge=1, description="Bulk batches hold at most this many images while a person is active (an "
                                        "interactive image within CLS_INTERACTIVE_ACTIVE_S); default three quarters of CLS_BATCH_SIZE.")
    interactive_active_s: float = Field(default=10.0, ge=0, description="How long after an interactive image bulk "
                                        "batches stay at CLS_BATCH_SIZE_WHILE_INTERACTIVE (0: never smaller).")
    result_part_size: int = Field(default=500, ge=1, description="Images per result part (N).")
    default_prompt_templates: str | None = Field(default=None, description="'|'-separated; default: open_clip's ImageNet ensemble.")
    quick_prompt_templates: str = Field(
        default="a photo of a {}.", description="'|'-separated templates that answer an interactive request at once "
        "when the default ensemble of its classes is not cached yet; the ensemble is then computed in the background "
        "and answers the next request (the result's model.prompt_set says which). Empty: interactive requests wait "
        "for the ensemble, as bulk ones do.")
    text_cache_dir: str | None = Field(
        default=None, description="Class text embeddings on local disk (one file per model, class and template "
        "list), shared by the workers of a node and kept across restarts; unset: memory only.")
    text_cache_disk_mb: int = Field(default=256, ge=0, description="Bound of CLS_TEXT_CACHE_DIR in MB (least "
                                    "recently used files out; 0: no disk cache).")

    # input limits
    max_aspect_ratio: float = Field(default=20.0, ge=1.0, description="Long side / short side of an image; beyond it: bad_aspect_ratio.")
    decode_memory_mb: int = Field(default=512, ge=16, description="Estimated peak bytes of all image decodes at once; one image over it: too_many_pixels.")
    text_cache_mb: int = Field(default=256, ge=0, description="Class text embeddings cached across requests and models, in MB (with text_cache_size entries).")

    # embed task
    embed_output_path: str | None = Field(default=None, description="Default prefix of embed results' vector files "
                                          "(s3://bucket/prefix or, with file URLs allowed, file:///dir).")
    embed_inline_max_images: int = Field(default=64, ge=0, description="An embed request may ask for inline vectors "
                                         "up to this many images.")
    embed_against_max_mb: int = Field(default=256, ge=1, description="An embed request's 'against' files together, in "
                                      "MB: as stored, and their arrays once decompressed (from the .npy headers, "
                                      "checked before they are read).")
    embedding_cache_mb: int = Field(default=256, ge=0, description="Image embeddings cached by (content hash, model), "
                                    "shared by classify and embed, in MB (0: off).")
    timm_weights: str = Field(default="pretrained", description="Weights of a timm embed model without model_url: "
                              "'pretrained' (hub cache) or 'random' (tests).")

    # few-shot classify
    fewshot_max_examples: int = Field(default=2000, ge=1, le=MAX_FEW_SHOT_EXAMPLES, description="Labeled examples one classify request "
                                      "may carry (inline or in its examples_url manifest).")
    fewshot_head_cache_mb: int = Field(default=256, ge=0, description="Fitted few-shot heads kept across requests by "
                                       "support-set hash, in MB (0: off; concurrent identical requests still fit once).")
    fewshot_max_fit_cost: int = Field(default=1_000_000_000, ge=1, description="Classes x examples x embedding dim "
                                      "of one few-shot fit, checked before any example is embedded (the fit's CPU "
                                      "time grows with it: ~2.5 s for 100 x 2,000 x 512 on one busy core).")
    fewshot_fit_threads: int = Field(default=1, ge=1, le=64, description="Threads of the few-shot fit pool (fits "
                                     "never run on the CPU pool that decodes images; more fits wait their turn).")
    # audit task
    audit_max_images: int = Field(default=100_000, ge=1, description="Images of one audit request: a manifest_url may "
                                  f"list this many (inline images stay within the contract's {MAX_IMAGES_PER_REQUEST:,}).")
    audit_max_cells: int = Field(default=10_000_000, ge=1, description="Images x classes of one audit: the fit's time "
                                 "and its probability table grow with both.")

    # training
    training_work_dir: str = Field(default="~/.cache/cls-workers/training", description="Local work directory of training jobs.")
    dataset_cache_dir: str = Field(default="~/.cache/cls-workers/images", description="Downloaded training images, cached by URL.")
    dataset_cache_mb: int = Field(default=10 * 1024, ge=1, description="Training images cached on local disk, in MB: "
                                  "least recently used files are removed to make room; a job whose own images do "
                                  "not fit fails with too_large.")
    heartbeat_s: float = Field(default=30.0, gt=0, description="Seconds between a training job's running events.")
    checkpoint_prefix_suffix: str = Field(default=".checkpoints", description="Checkpoints go to <output_path><suffix>/")
    max_jobs: int | None = Field(default=None, ge=1, description="Training worker: exit after this many jobs (tests, one-shot workers).")

    # fences and limits
    s3_allowed_buckets: str = Field(default="", description="Comma-separated buckets any s3:// URL may name; empty: any.")
    training_memory_budget_mb: int | None = Field(
        default=None, ge=1, description="Host memory one training job may need (estimate: the model's parameters x 24 B "
        "for weights, gradients and AdamW state, plus one batch's activations and loader buffers); default: half the "
        "memory available at start-up.")
    allowed_training_models: str = Field(
        default="", description="Comma-separated timm architectures (fnmatch patterns, e.g. 'resnet*,convnext_tiny') a "
        "training request may name; empty: any timm architecture whose estimated memory fits "
        "CLS_TRAINING_MEMORY_BUDGET_MB.")
    training_max_workers: int | None = Field(
        default=None, ge=0, description="Cap on a request's num_workers; default: the CPU cores this process may use.")
    clip_variant_weights: str = Field(
        default="", description="Comma-separated variant=weights (tag, path, s3:// or 'random') overriding the per-variant default tag.")
    allowed_model_variants: str = Field(
        default="", description="Comma-separated family:variant a message may ask for (clip:ViT-L-14, siglip:<hub id>, "
        "clip:* for any open_clip architecture); empty: the configured variants, the open_clip architectures up to "
        "ViT-L-14's size (handlers.model_config.DEFAULT_CLIP_VARIANTS), the SigLIP variants this package knows and the "
        "timm embedders of handlers.model_config.DEFAULT_TIMM_VARIANTS.")

    # budgets: manifests (training manifest_url, few-shot examples_url, audit manifest_url)
    manifest_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="A manifest's size in bytes "
                                    "(streamed, never whole in memory); over it: the request fails naming this setting.")
    manifest_max_line_bytes: int = Field(default=64 * 1024, ge=256, description="One manifest line in bytes.")
    manifest_max_lines: int = Field(default=1_000_000, ge=1, description="Entries of a training manifest (few-shot "
                                    "and audit manifests are bounded by CLS_FEWSHOT_MAX_EXAMPLES / CLS_AUDIT_MAX_IMAGES).")

    # test-only fault injection: crash (os._exit(137)) after the events of the Nth handled record
    # are acknowledged by the broker and before its offset is committed.
    fault_crash_after_publish: int | None = Field(default=None, ge=1, description="Test only: the process exits after the events of the Nth record are acknowledged, before its commit.")
    # test-only: the process os._exit(137)s when it starts handling this request/job id
    fault_exit_on_request: str | None = Field(default=None, description="Test only: the process exits when it starts handling this request or job id.")
    # test-only: "id:N,id2:M": the first N publishes of events for that id fail as a transport error
    fault_fail_publish: str | None = Field(default=None, description="Test only: 'id:N,...': the first N publishes of events for that id fail as a transport error.")

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("quick_prompt_templates", "default_prompt_templates")
    @classmethod
    def _templates_name_the_class(cls, value: str | None) -> str | None:
        for template in (value or "").split("|"):
            if template.strip() and "{}" not in template and "{c}" not in template:
                raise ValueError(f"prompt template {template!r} has no class placeholder ({{}} or {{c}})")
        return value


class Settings:
    """The two groups together, read from the environment."""

    def __init__(self, kafka: KafkaSettings | None = None, worker: WorkerSettings | None = None) -> None:
        self.kafka = kafka or KafkaSettings()
        self.worker = worker or WorkerSettings()

    def redacted(self) -> dict[str, Any]:
        """Effective settings for logs and ``cls-worker settings``: secrets masked."""
        kafka = self.kafka.model_dump()
        if kafka.get("sasl_password") is not None:
            kafka["sasl_password"] = "**********"
        return {"kafka": kafka, "worker": self.worker.model_dump()}


def all_setting_env_names() -> set[str]:
    """Every environment variable a setting reads (used to check deploy manifests)."""
    names = {f"KAFKA_{name.upper()}" for name in KafkaSettings.model_fields}
    for name, field in WorkerSettings.model_fields.items():
        names.add(f"CLS_{name.upper()}")
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
    return names
