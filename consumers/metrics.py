"""Prometheus metrics of the workers (exposed by consumers.health when CLS_METRICS_PORT is set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS_CONSUMED = Counter("cls_records_consumed_total", "Records taken from an input topic", ["topic"])
RECORDS_HANDLED = Counter("cls_records_handled_total", "Records handled and committed", ["topic", "outcome"])
RECORDS_DLQ = Counter("cls_records_dlq_total", "Records sent to the dead-letter topic", ["topic", "code"])
RECORDS_INVALID = Counter("cls_records_invalid_total", "Requests answered with invalid_request", ["topic"])
RETRIES = Counter("cls_handler_retries_total", "Retries after a retryable failure", ["topic"])
EVENTS_PRODUCED = Counter("cls_events_produced_total", "Events produced and acknowledged", ["topic"])
HANDLER_SECONDS = Histogram(
    "cls_handler_seconds",
    "Time from taking a record to committing it",
    ["topic"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200),
)
IN_FLIGHT = Gauge("cls_in_flight_records", "Records being handled now", ["topic"])
PAUSED_PARTITIONS = Gauge("cls_paused_partitions", "Partitions paused because the worker is at capacity", ["topic"])
