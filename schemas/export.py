"""JSON Schema export of every message (``cls-worker schemas export DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.annotation import AnnotationRequestMessage, AnnotationResult
from schemas.training import CancelRequest, TrainingRequest, TrainingStatus

MESSAGES: dict[str, type[BaseModel]] = {
    "annotation-request": AnnotationRequestMessage,
    "annotation-result": AnnotationResult,
    "training-request": TrainingRequest,
    "training-status": TrainingStatus,
    "training-cancel": CancelRequest,
}


def json_schemas() -> dict[str, dict]:
    """name -> JSON Schema (validation mode for inputs, serialization mode for outputs)."""
    out = {}
    for name, model in MESSAGES.items():
        mode = "serialization" if name in ("annotation-result", "training-status") else "validation"
        schema = model.model_json_schema(by_alias=True, mode=mode)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://cls-workers/schemas/{name}.json"
        out[name] = schema
    return out


def export(directory: str | Path) -> list[Path]:
    """Write one ``<name>.json`` per message into ``directory``; returns the paths written."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = target / f"{name}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
