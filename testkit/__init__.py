"""Test kit for the backend and this project's own suite, installed with the project (so scripts outside
``tests/`` use it too); every helper that is not a pytest fixture lives here (fixtures: ``tests/fixtures``).

- services: ``testkit.local`` (free ports, a Kafka broker from jars, an S3 API in its own process
  (``testkit.s3server``), worker subprocesses), ``testkit.worker_processes`` (the annotation, training and echo
  workers and ``cls-worker send`` on a test run's topics), ``testkit.echo_worker`` (the real consumer runtime with a
  trivial handler, for runtime tests and ``bench/records.py``), ``testkit.kafka`` (clients, per-run topics),
  ``testkit.containers`` (Kafka, an S3 API and the workers as containers with testcontainers, wired together),
  ``testkit.secure_kafka`` (a local broker with TLS and SASL listeners, workers answered or refused over them),
  ``testkit.browser`` (headless Chromium over the DevTools protocol);
- data: ``testkit.images`` (sample pictures, digits, reference and hostile images, an image server on
  loopback), ``testkit.image_copies`` (injected near-copies), ``testkit.duplicate_set``,
  ``testkit.digit_embeddings``, ``testkit.learned_sets``, ``testkit.real_backbone``;
- ``testkit.configs``: the handlers' configs and limits as the workers build them from the settings.

The local pieces bind 127.0.0.1 and every wait is bounded."""
