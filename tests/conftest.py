"""Shared fixtures: one real Kafka broker and one real S3 API server per session, a local image
server, and a trained model shared by the tests that need one."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.s3",
    "tests.fixtures.http_server",
    "tests.fixtures.trained_model",
]
