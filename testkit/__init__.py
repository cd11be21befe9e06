"""Test kit for the backend and this project's own suite: ``testkit.containers`` runs Kafka, an S3 API
and the workers as containers (testcontainers), wired together."""
