"""Every code block of the README and docs/*.md that can run is run; the others say why not.

A block is one of:
- ``json``: parsed and validated against the contract's models (a request by its ``task``, a result or
  status event by its ``event_type``), so an example in the docs is a message the workers accept or write;
- ``python``: executed as written, in a fresh namespace;
- run elsewhere: the line before the fence says ``<!-- snippet: run by tests/...py (...) -->`` and that test
  file names the page; or by a page rule below (every ``sh`` block of docs/operations.md is the runbook that
  tests/integration/test_operations.py runs against a live broker);
- not runnable here: ``<!-- snippet: not run (reason) -->`` before the fence (e.g. needs a broker, Docker, a GPU),
  or a page rule below.
Blocks of data listings (``text``, ``properties``, ``yaml``, a bare fence) are not code and need no marker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from schemas.annotation import AnnotationResult
from schemas.codec import ANNOTATION_ADAPTER, CANCEL_ADAPTER, TRAINING_ADAPTER
from schemas.training import TrainingStatus

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE = {"json", "python", "sh", "bash", "shell"}
MARKER = re.compile(r"^<!-- snippet: (run by (?P<test>tests/\S+\.py)|not run) \((?P<why>[^)]+(?:\([^)]*\)[^)]*)*)\) -->$")
PAGE_RULES = {
    ("docs/operations.md", "sh"): "run by tests/integration/test_operations.py",
    ("docs/deploy.md", "sh"): "not run: needs a Docker engine, a registry or a cluster (tests/containers runs the image)",
}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> list[tuple[str, int, str, str, str | None]]:
    """(page, line, language, code, the marker line before it or None) of every fenced block."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = before if before.startswith("<!-- snippet:") else None
            found.append((str(page.relative_to(REPO)), line, match.group(1), match.group(2), marker))
    return found


def _id(block: tuple) -> str:
    return f"{block[0]}:{block[1]}"


def validate_message(code: str) -> object:
    body = json.loads(code)
    if "event_type" in body:
        model = AnnotationResult if body["event_type"] == "annotation.result" else TrainingStatus
        return model.model_validate_json(code)
    adapter = {"cancel": CANCEL_ADAPTER, "train": TRAINING_ADAPTER}.get(body.get("task"), ANNOTATION_ADAPTER)
    return adapter.validate_json(code)


def test_the_scan_finds_the_pages_blocks():
    found = blocks()
    assert {"README.md", "docs/contract.md", "docs/operations.md"} <= {b[0] for b in found}
    assert sum(1 for b in found if b[0] == "README.md" and b[2] == "json") >= 12  # one request and result per task


def test_every_marker_is_well_formed_and_every_test_it_names_reads_the_page():
    for page, line, _, _, marker in blocks():
        if marker is None:
            continue
        match = MARKER.match(marker)
        assert match, f"{page}:{line}: malformed marker {marker!r}"
        if match.group("test"):
            test = REPO / match.group("test")
            assert test.is_file(), f"{page}:{line}: {test} does not exist"
            assert Path(page).name in test.read_text(), f"{page}:{line}: {match.group('test')} does not read {page}"


def test_every_code_block_runs_or_says_why_not():
    unaccounted = [f"{page}:{line} ({lang})" for page, line, lang, _, marker in blocks()
                   if lang in CODE - {"json", "python"} and marker is None and (page, lang) not in PAGE_RULES]
    assert unaccounted == [], "mark these blocks <!-- snippet: not run (why) --> or run them: " + ", ".join(unaccounted)


@pytest.mark.parametrize("block", [b for b in blocks() if b[2] == "json" and b[4] is None], ids=_id)
def test_json_examples_are_valid_messages(block):
    validate_message(block[3])


def test_unmarked_python_blocks_run():
    """Executed as written (today every python block of the docs is run by a test of its own, see its marker)."""
    for page, line, lang, code, marker in blocks():
        if lang == "python" and marker is None:
            exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__doc_snippet__"})  # noqa: S102


def test_the_validator_refuses_a_bad_example():
    with pytest.raises(ValueError):
        validate_message('{"task": "classify", "model": "clip", "images": []}')
    with pytest.raises(ValueError):
        validate_message('{"task": "train", "job_id": "job-1", "output_path": "s3://models/x"}')
