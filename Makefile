# Two commands from a fresh machine (Python >= 3.11, Java 17, Maven):
#   make run    local Kafka + S3 API + both workers + a demo of the two workflows
#   make test   the whole suite against a real broker and a real S3 API
# Setup is idempotent: a second run installs nothing.
#   make images (root) a Docker engine, then the images the container tests use (tests/containers): the CPU
#               worker image, Kafka and the S3 API; make images-gpu adds the GPU worker image
# make setup installs the project with its `worker` (the ML stack) and `test` extras; a backend installs
# the base alone, or with `testkit` (docs/client.md).
# Installs are pinned by constraints.txt (committed), so two fresh machines get the same versions;
# `make constraints` regenerates it from the current venv after a deliberate upgrade.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
JARS := deploy/local/lib/.complete
PYTEST_ARGS ?=

.PHONY: setup chromium run test test-containers engine images images-gpu bench bench-annotation bench-training bench-duplicates bench-records kafka-start kafka-stop schemas docs clean constraints

setup: $(STAMP) $(JARS)

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(VENV)/bin/python
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[worker,test]'
	touch $(STAMP)

# Pin every installed distribution (but the project itself) at its current version.
constraints: | $(VENV)/bin/python
	$(PY) -m pip freeze --exclude-editable --exclude cls-workers | sort -f > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	touch $(STAMP)

$(JARS): deploy/local/pom.xml
	deploy/local/kafka.sh jars

# The report test drives Debian's headless Chromium (no browser download); installed here when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Container tests (marker `container`) run when a Docker engine answers and the local images exist;
# otherwise pytest prints that they were deselected. CLS_REQUIRE_CONTAINERS=1 (.ci/run) makes that a failure.
test: setup chromium
	$(PY) -m pytest --durations=40 $(PYTEST_ARGS)

test-containers: setup
	$(PY) -m pytest --durations=15 -m container tests/containers $(PYTEST_ARGS)

# A Docker engine (Debian's docker.io + Compose v2, dockerd in the background; root), started when none answers.
engine:
	deploy/images/engine.sh start

# The bases (debootstrap), the CPU worker, Kafka and S3 API images, built locally (no registry needed).
images: $(JARS) engine
	deploy/images/build-local.sh

# The GPU worker image (torch's CUDA wheels, ~6.6 GB), on the same bookworm base.
images-gpu: $(JARS) engine
	deploy/images/build-local.sh base worker

run: setup
	$(PY) -m examples.demo $(DEMO_ARGS)

bench: bench-annotation bench-training bench-duplicates bench-records

bench-annotation: setup
	$(PY) bench/annotation.py

bench-training: setup
	$(PY) bench/training.py

bench-duplicates: setup
	$(PY) bench/duplicates.py

bench-records: setup
	$(PY) bench/records.py

kafka-start: $(JARS)
	deploy/local/kafka.sh start

kafka-stop:
	deploy/local/kafka.sh stop

schemas: setup
	$(VENV)/bin/cls-worker schemas export schemas/json --asyncapi docs/asyncapi.yaml

# docs/configuration.md from the settings' declarations (consumers/settings.py); a test fails while it is stale
docs: setup
	$(PY) -m consumers.settings_doc docs/configuration.md

clean:
	rm -rf $(VENV) deploy/local/lib deploy/local/target .state .pytest_cache
