"""Prometheus metrics of the workers (exposed by consumers.health when CLS_METRICS_PORT is set).

Requests refused at admission are counted where the rule lives: ``cls_admission_refused_total{budget}`` in
``handlers.admission`` (same registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS_CONSUMED = Counter("cls_records_consumed_total", "Records taken from an input topic", ["topic"])
RECORDS_HANDLED = Counter("cls_records_handled_total", "Records handled and committed", ["topic", "outcome"])
RECORDS_DLQ = Counter("cls_records_dlq_total", "Records sent to the dead-letter topic", ["topic", "code"])
RECORDS_INVALID = Counter("cls_records_invalid_total", "Requests answered with invalid_request", ["topic"])
RETRIES = Counter("cls_handler_retries_total", "Retries after a retryable failure", ["topic"])
COMMITS = Counter("cls_offset_commits_total", "Offset commit requests sent (one may cover many records; "
                  "records handled / commits is the coalescing ratio)", ["topic"])
EVENTS_PRODUCED = Counter("cls_events_produced_total", "Events produced and acknowledged", ["topic"])
HANDLER_SECONDS = Histogram(
    "cls_handler_seconds",
    "Time from taking a record to committing it",
    ["topic"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200),
)
IN_FLIGHT = Gauge("cls_in_flight_records", "Records being handled now", ["topic"])
OLDEST_UNFINISHED = Gauge("cls_oldest_unfinished_record_seconds",
                          "Age of the oldest record of a partition taken and not yet finished (stuck partition signal)",
                          ["topic", "partition"])
LANE_IN_FLIGHT = Gauge("cls_lane_in_flight_records", "Records being handled now, per lane", ["lane"])
LANE_PARKED = Gauge("cls_lane_queued_records", "Records read and waiting for a slot in their lane (queue depth)", ["lane"])
LANE_WAIT_SECONDS = Histogram("cls_lane_wait_seconds", "Time from reading a record to starting it, per lane", ["lane"],
                              buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
LANE_LATENCY_SECONDS = Histogram("cls_lane_latency_seconds", "Time from reading a record to committing it, per lane",
                                 ["lane"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
PAUSED_PARTITIONS = Gauge("cls_paused_partitions", "Partitions paused because the worker is at capacity", ["topic"])

BATCH_SIZE = Histogram("cls_batch_images", "Images per model forward", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_REQUESTS = Histogram("cls_batch_requests", "Distinct requests sharing one model forward", buckets=(1, 2, 3, 4, 8, 16))
BATCH_FORWARD_SECONDS = Histogram("cls_batch_forward_seconds", "Time of one model forward (stack + forward on the "
                                  "GPU thread); lane=interactive when the batch holds an interactive image", ["lane"],
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16))
IMAGES = Counter("cls_images_total", "Images classified (rate() gives images per second)")
MODEL_LOAD_SECONDS = Gauge("cls_model_load_seconds", "Time to load and warm a model", ["family", "variant"])
TEXT_CACHE = Counter("cls_text_cache_total", "Text-embedding cache lookups", ["result"])
FEW_SHOT_HEADS = Counter("cls_fewshot_heads_total", "Few-shot heads a request used: fitted, or from the head cache "
                         "(or another request's fit in flight)", ["result"])
FEW_SHOT_FIT_SECONDS = Histogram("cls_fewshot_fit_seconds", "Time of one few-shot fit (CPU pool, auto's cross-validation "
                                 "included)", buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
TRAINING_EPOCH_SECONDS = Histogram("cls_training_epoch_seconds", "Training epoch duration",
                                   buckets=(1, 5, 10, 30, 60, 300, 900, 3600, 14400))
GPU_MEMORY_BYTES = Gauge("cls_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated() where there is a GPU")


def observe_batch(size: int, requests: int) -> None:
    BATCH_SIZE.observe(size)
    BATCH_REQUESTS.observe(requests)
    IMAGES.inc(size)


def observe_forward(lane: str, seconds: float) -> None:
    BATCH_FORWARD_SECONDS.labels(lane).observe(seconds)


def observe_text_cache(hit: bool) -> None:
    TEXT_CACHE.labels("hit" if hit else "miss").inc()


def observe_few_shot_head(fitted: bool) -> None:
    FEW_SHOT_HEADS.labels("fitted" if fitted else "cached").inc()


def observe_few_shot_fit(seconds: float) -> None:
    FEW_SHOT_FIT_SECONDS.observe(seconds)


def observe_model_load(key, seconds: float) -> None:
    MODEL_LOAD_SECONDS.labels(key.family, key.variant).set(seconds)
