"""Shared fixtures: one real Kafka broker and one real S3 API server per session."""

pytest_plugins = [
    "tests.fixtures.kafka",
]
