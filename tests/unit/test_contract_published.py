"""The published contract: schemas/json/*.json and docs/asyncapi.yaml.

- the committed files are what the code generates now (regenerated into a temporary directory);
- every example in the AsyncAPI document validates against its message's payload and headers schemas
  (jsonschema), against the committed JSON Schema file, and against the pydantic model; output examples
  carry the headers and the derived message ids the workers really produce;
- the document passes the official AsyncAPI parser (@asyncapi/parser, run by node from
  tools/asyncapi-validate; `npm ci` there first when node_modules is missing).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from schemas.annotation import AnnotationResult
from schemas.asyncapi import DLQ_ERROR_CODES, build_asyncapi, write_asyncapi
from schemas.codec import Invalid, NotAJsonObject, decode, parse_json_object, TRAINING_ADAPTER, ANNOTATION_ADAPTER
from schemas.export import MESSAGES, export
from schemas.training import TrainingStatus

ROOT = Path(__file__).resolve().parents[2]
JSON_DIR = ROOT / "schemas" / "json"
ASYNCAPI = ROOT / "docs" / "asyncapi.yaml"
VALIDATOR_DIR = ROOT / "tools" / "asyncapi-validate"
DOC_URI = "urn:cls-workers:asyncapi"

# AsyncAPI message id -> the export's message name (schemas/json/<name>.json)
MESSAGE_FILES = {
    "annotationRequest": "annotation-request",
    "annotationResult": "annotation-result",
    "trainingRequest": "training-request",
    "trainingStatus": "training-status",
    "trainingCancel": "training-cancel",
}
OUTPUTS = {"annotationResult", "trainingStatus"}


def committed_doc() -> dict[str, Any]:
    return yaml.safe_load(ASYNCAPI.read_text())


DOC = committed_doc()
EXAMPLES = [
    pytest.param(message_id, example, id=f"{message_id}:{example['name']}")
    for message_id, message in DOC["components"]["messages"].items()
    for example in message["examples"]
]


# ---------------------------------------------------------------------------------------------------
# not stale


def test_committed_json_schemas_are_current(tmp_path):
    written = export(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in JSON_DIR.glob("*.json")), \
        "schemas/json has extra or missing files: run `make schemas`"
    for path in written:
        assert (JSON_DIR / path.name).read_text() == path.read_text(), \
            f"schemas/json/{path.name} is stale: run `make schemas`"


def test_committed_asyncapi_is_current(tmp_path):
    fresh = Path(write_asyncapi(tmp_path / "asyncapi.yaml"))
    assert ASYNCAPI.read_text() == fresh.read_text(), "docs/asyncapi.yaml is stale: run `make schemas`"
    assert DOC == build_asyncapi()


# ---------------------------------------------------------------------------------------------------
# examples


def doc_validator(pointer: str) -> jsonschema.protocols.Validator:
    """A validator for the schema at ``pointer`` inside the AsyncAPI document (refs resolve in the doc)."""
    registry = Registry().with_resource(DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": f"{DOC_URI}#{pointer}"}, registry=registry,
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def file_validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((JSON_DIR / f"{name}.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.mark.parametrize("message_id, example", EXAMPLES)
def test_example_matches_its_message_schemas_and_model(message_id, example):
    base = f"/components/messages/{message_id}"
    doc_validator(f"{base}/payload").validate(example["payload"])
    doc_validator(f"{base}/headers").validate(example.get("headers", {}))
    if message_id == "deadLetter":
        return
    name = MESSAGE_FILES[message_id]
    file_validator(name).validate(example["payload"])
    model = MESSAGES[name].model_validate(example["payload"])
    if message_id in OUTPUTS:  # exactly what a worker writes
        assert json.loads(model.to_json_bytes()) == example["payload"]


@pytest.mark.parametrize("message_id", sorted(MESSAGE_FILES))
def test_every_message_has_examples_and_a_key(message_id):
    message = DOC["components"]["messages"][message_id]
    assert len(message["examples"]) >= 2
    assert message["bindings"]["kafka"]["key"]["type"] == "string"
    assert message["contentType"] == "application/json"


def test_schema_validators_are_not_vacuous():
    seed = next(e for e in DOC["components"]["messages"]["annotationRequest"]["examples"] if e["name"] == "seed")
    bad = copy.deepcopy(seed["payload"])
    bad["top_k"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        doc_validator("/components/messages/annotationRequest/payload").validate(bad)
    with pytest.raises(jsonschema.ValidationError):
        file_validator("annotation-request").validate(bad)
    result = DOC["components"]["messages"]["annotationResult"]["examples"][0]
    with pytest.raises(jsonschema.ValidationError):
        doc_validator("/components/messages/annotationResult/headers").validate(
            {**result["headers"], "content-type": "text/plain"})
    with pytest.raises(jsonschema.ValidationError):
        doc_validator("/components/messages/annotationResult/payload").validate({**result["payload"], "extra": 1})


def test_seed_examples_are_the_backends_shapes():
    """DESIGN.md's seed payloads: the backend's field names, no envelope."""
    messages = DOC["components"]["messages"]
    seeds = {mid: next(e for e in m["examples"] if e["name"] == "seed")["payload"]
             for mid, m in messages.items() if any(e["name"] == "seed" for e in m["examples"])}
    assert set(seeds) == {"annotationRequest", "trainingRequest", "trainingCancel"}
    assert set(seeds["annotationRequest"]) == {"task", "model", "images", "classes", "top_k", "threshold"}
    assert set(seeds["trainingRequest"]) == {"task", "config", "dataset", "output_path"}
    assert set(seeds["trainingRequest"]["config"]) == {"model_name", "num_classes", "epochs", "batch_size",
                                                       "learning_rate", "augmentation"}
    assert set(seeds["trainingRequest"]["dataset"]) == {"train_urls", "val_urls", "class_names"}
    assert seeds["trainingCancel"] == {"task": "cancel", "job_id": "job-42"}
    completed = next(e for e in messages["trainingStatus"]["examples"] if e["name"] == "completed")["payload"]
    assert {"status", "metrics", "model_url"} <= set(completed)
    assert {"train_loss", "val_accuracy", "best_epoch"} <= set(completed["metrics"])


def test_output_examples_carry_the_workers_headers_and_ids():
    from consumers.pipeline import Pipeline
    from handlers.training import status_event

    pipelines = {
        "annotationResult": Pipeline(name="annotation.result", input_topic="", output_topic="", adapter=None,
                                     id_field="request_id", handle=None, failed_event=None),
        "trainingStatus": Pipeline(name="training.status", input_topic="", output_topic="", adapter=None,
                                   id_field="job_id", handle=None, failed_event=None),
    }
    for message_id, pipeline in pipelines.items():
        for example in DOC["components"]["messages"][message_id]["examples"]:
            payload = example["payload"]
            model = MESSAGES[MESSAGE_FILES[message_id]].model_validate(payload)
            entity_id = payload[pipeline.id_field]
            produced = {k: v.decode() for k, v in pipeline.headers_for(model, entity_id)}
            assert example["headers"] == produced, example["name"]
            if isinstance(model, AnnotationResult):
                position = "failed" if model.status == "failed" else model.part
                assert model.message_id == AnnotationResult.message_id_for(model.request_id, position)
            else:
                assert isinstance(model, TrainingStatus)
                progress = model.progress
                real = status_event(model.job_id, model.status, epoch=progress.epoch if progress else 0,
                                    step=progress.step if progress else None, attempt=model.attempt)
                assert (model.message_id, model.seq) == (real.message_id, real.seq), example["name"]


def test_dead_letter_examples_are_records_the_workers_dead_letter():
    examples = {e["name"]: e for e in DOC["components"]["messages"]["deadLetter"]["examples"]}
    not_json = examples["notJson"]
    with pytest.raises(NotAJsonObject, match=re.escape(not_json["headers"]["dlq-error-message"])):
        parse_json_object(not_json["payload"].encode())
    no_id = examples["noId"]
    adapter = {"cls.annotation.requests": (ANNOTATION_ADAPTER, "request_id"),
               "cls.training.requests": (TRAINING_ADAPTER, "job_id")}[no_id["headers"]["dlq-source-topic"]]
    invalid = decode(adapter[0], no_id["payload"], adapter[1], None)
    assert isinstance(invalid, Invalid) and invalid.entity_id is None
    assert invalid.message == no_id["headers"]["dlq-error-message"]


def test_documented_dlq_codes_cover_the_ones_the_workers_write():
    used = set()
    for path in (ROOT / "consumers").glob("*.py"):
        # _dlq(record, "code", ...), _to_dlq(record, "code", ...), dead_letter(producer, record, "code", ...)
        used |= set(re.findall(r'(?:dlq|dead_letter)\(\s*(?:[\w.]+,\s*)?record,\s*"([a-z_]+)"', path.read_text()))
    assert used, "no DLQ call sites found: the pattern is out of date"
    assert used <= set(DLQ_ERROR_CODES), used - set(DLQ_ERROR_CODES)


def test_channels_are_the_provisioned_topics():
    from consumers.settings import Settings
    from consumers.topics_admin import topic_specs

    specs = {spec.name: spec for spec in topic_specs(Settings())}
    channels = {c["address"]: c for c in DOC["channels"].values()}
    assert set(channels) == set(specs)
    for address, channel in channels.items():
        policy = channel["bindings"]["kafka"]["topicConfiguration"]["cleanup.policy"]
        assert policy == [specs[address].configs["cleanup.policy"]], address
    actions = {}
    for operation in DOC["operations"].values():
        channel_id = operation["channel"]["$ref"].rsplit("/", 1)[1]
        actions[DOC["channels"][channel_id]["address"]] = operation["action"]
    assert actions == {
        "cls.annotation.requests": "receive", "cls.annotation.interactive": "receive",
        "cls.training.requests": "receive", "cls.training.control": "receive",
        "cls.annotation.results": "send", "cls.training.status": "send",
        "cls.annotation.requests.dlq": "send", "cls.annotation.interactive.dlq": "send",
        "cls.training.requests.dlq": "send", "cls.training.control.dlq": "send",
    }


# ---------------------------------------------------------------------------------------------------
# the official AsyncAPI parser


def node_validator() -> list[str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are needed to run @asyncapi/parser (tools/asyncapi-validate); install Node.js >= 18")
    if not (VALIDATOR_DIR / "node_modules" / "@asyncapi" / "parser").is_dir():
        result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=VALIDATOR_DIR,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"npm ci failed in {VALIDATOR_DIR}:\n{result.stdout}\n{result.stderr}"
    return [node, str(VALIDATOR_DIR / "validate.mjs")]


@pytest.fixture(scope="module")
def parser_output(tmp_path_factory) -> tuple[int, str]:
    """One parser run (node starts once) over the committed document and a deliberately broken copy."""
    broken = copy.deepcopy(DOC)
    broken["operations"]["sendAnnotationResults"]["messages"] = [
        {"$ref": "#/channels/trainingStatus/messages/trainingStatus"}]
    broken["channels"]["trainingControl"]["bindings"]["kafka"]["topicConfiguration"]["cleanup.policy"] = ["squash"]
    path = tmp_path_factory.mktemp("asyncapi") / "broken.yaml"
    path.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = subprocess.run([*node_validator(), "--strict", str(ASYNCAPI), str(path)],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


def test_asyncapi_parser_accepts_the_document(parser_output):
    _, output = parser_output
    assert f"OK: {ASYNCAPI}: AsyncAPI 3.0.0, 10 channels, 10 operations, 6 messages, 0 warning(s)" in output, output
    assert not [line for line in output.splitlines() if str(ASYNCAPI) in line and line.startswith(("error", "warning"))]


def test_asyncapi_parser_rejects_a_broken_document(parser_output):
    returncode, output = parser_output
    assert returncode == 1, output
    assert re.search(r"^INVALID: .*broken\.yaml: [1-9][0-9]* error\(s\)", output, re.M), output
    assert "asyncapi3-operation-messages-from-referred-channel" in output
    assert "cleanup.policy" in output
