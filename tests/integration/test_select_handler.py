"""``"task": "select"`` in-process: real HTTP fetching and decoding, a real tiny model (random weights: noisy
images of one colour embed close together, colours apart), the CSV on the real S3 API (moto on loopback) read
back with the csv module. A cold start picks one image of every colour; with labels the images between two
labeled colours come first; copies are never both selected; redelivery gives identical parts; bad requests are
refused before any image is fetched."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import numpy as np
import pytest

from consumers.annotation_worker import annotation_context
from handlers.annotation import AnnotationHandler
from handlers.context import AuditConfig
from handlers.errors import PermanentError
from handlers.select import CSV_COLUMNS
from schemas.annotation import AnnotationRequest, AnnotationResult, SelectRequest
from testkit.handler_calls import put_object, read_object, tiny_settings
from testkit.pictures import noisy_png

pytestmark = pytest.mark.s3

COLORS = {"red": (210, 40, 40), "blue": (40, 40, 210), "green": (40, 200, 40), "yellow": (220, 210, 40)}
MAX_IMAGES = 60
PNG: dict[str, bytes] = {}
EXACT_ONLY = {"duplicate_threshold": 0.9999}  # the random model puts noisy images of one colour within 0.95


@pytest.fixture(scope="module")
async def ctx(s3_server):
    async with annotation_context(tiny_settings(result_part_size=3, embedding_cache_mb=16,
                                           audit_max_images=MAX_IMAGES)) as context:
        yield context


@pytest.fixture(scope="module")
def pool(http_server) -> dict[str, list[dict[str, str]]]:
    """6 noisy images of each colour, by colour (``{"id", "url"}``)."""
    out: dict[str, list[dict[str, str]]] = {}
    for c, (name, color) in enumerate(COLORS.items()):
        out[name] = []
        for k in range(6):
            PNG[f"{name}-{k}"] = noisy_png(color, 100 * c + k)
            url = http_server.add(f"select/{name}-{k}.png", PNG[f"{name}-{k}"], content_type="image/png")
            out[name].append({"id": f"{name}-{k}", "url": url})
    return out


def select_request(request_id: str, images: list[dict], bucket: str, **extra) -> SelectRequest:
    return SelectRequest.model_validate({"task": "select", "model": "clip", "request_id": request_id, "images": images,
                                         "output_path": f"s3://{bucket}/selections", "options": EXACT_ONLY, **extra})


async def collect(handler: AnnotationHandler, request) -> list[AnnotationResult]:
    return [part async for part in handler.handle(request)]


def colour_of(image_id: str) -> str:
    return image_id.split("-")[0]


async def test_cold_start_one_of_every_colour_csv_and_redelivery(ctx, pool, s3_server, s3_bucket):
    images = [image for k in range(6) for name in COLORS for image in pool[name][k:k + 1]]
    request = select_request("cold", images, s3_bucket, budget=8)
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, request)

    assert [p.part for p in parts] == [0, 1, 2] and {p.parts for p in parts} == {3}  # 8 entries, 3 per part
    assert [p.message_id for p in parts] == [AnnotationResult.message_id_for("cold", k) for k in range(3)]
    assert all(p.task == "select" and p.status == "completed" and p.results == [] for p in parts)
    entries = [e for p in parts for e in p.selection]
    assert [e.rank for e in entries] == list(range(8))
    assert all(e.reason == "typical" and e.predicted is None for e in entries)
    assert {colour_of(e.id) for e in entries} == set(COLORS)  # every class, without labels
    summary = parts[0].select_summary
    assert all(p.select_summary == summary for p in parts)
    assert (summary.strategy, summary.requested_strategy) == ("typiclust", "auto")
    assert (summary.pool, summary.embedded, summary.candidates, summary.labeled, summary.selected) == (24, 24, 24, 0, 8)
    assert summary.classes == 0 and summary.cv_accuracy is None

    assert {p.selection_url for p in parts} == {f"s3://{s3_bucket}/selections/cold/selection.csv"}
    table = await read_object(s3_server, parts[0].selection_url)
    rows = list(csv.reader(io.StringIO(table.decode("utf-8"), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1:9] == [[e.id, str(e.rank), repr(e.score), e.reason, "", "", ""] for e in entries]
    # then the whole pool's ranking: every other image once, ranks going on, typicality round robin
    assert [row[1] for row in rows[9:]] == [str(k) for k in range(8, 24)]
    assert sorted(row[0] for row in rows[1:]) == sorted(image["id"] for image in images)
    assert all(row[3] == "typical" and float(row[2]) > 0 for row in rows[9:])

    again = await collect(handler, request)  # a redelivery: the same parts, ids and file
    assert [p.model_dump(exclude={"created_at"}) for p in again] == [p.model_dump(exclude={"created_at"}) for p in parts]
    assert await read_object(s3_server, parts[0].selection_url) == table

    one_each = await collect(handler, select_request("cold-4", images, s3_bucket, budget=len(COLORS)))
    assert Counter(colour_of(e.id) for p in one_each for e in p.selection) == Counter(list(COLORS))  # one of each class


async def test_with_labels_the_uncertain_images_come_first(ctx, pool, http_server, s3_bucket):
    labeled = [{**image, "label": name} for name in ("red", "blue") for image in pool[name][:3]]
    blends = [{"id": f"purple-{k}", "url": http_server.add(f"select/purple-{k}.png", noisy_png((125, 40, 125), 900 + k),
                                                            content_type="image/png")} for k in range(3)]
    images = [*pool["red"][3:], *blends, *pool["blue"][3:]]
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, select_request("uncertain", images, s3_bucket, budget=5, strategy="margin",
                                                  labeled=labeled))
    entries = [e for p in parts for e in p.selection]
    assert {e.id for e in entries[:3]} == {"purple-0", "purple-1", "purple-2"}, [(e.id, e.score) for e in entries]
    assert all(e.reason == "uncertain" for e in entries)
    scores = [e.score for e in entries]
    assert scores == sorted(scores, reverse=True)  # 1 - margin: the most uncertain first
    assert all(e.predicted is not None and e.predicted.class_name in ("red", "blue") for e in entries)
    summary = parts[0].select_summary
    assert (summary.strategy, summary.labeled, summary.classes, summary.pool) == ("margin", 6, 2, 9)
    assert summary.cv_accuracy == 1.0


async def test_copies_never_both_selected_nor_copies_of_labeled_images(ctx, pool, http_server, s3_bucket):
    def copy(image: dict, name: str) -> dict:  # the same bytes under another URL and id
        data = PNG[image["id"]]
        return {"id": name, "url": http_server.add(f"select/{name}.png", data, content_type="image/png")}

    labeled = [{**pool["red"][0], "label": "red"}, {**pool["blue"][0], "label": "blue"}]
    images = [*pool["green"], copy(pool["green"][0], "green-0-copy"), copy(pool["green"][1], "green-1-copy"),
              copy(pool["red"][0], "red-0-copy"), *pool["yellow"][:2],
              {"id": "gone", "url": http_server.urls["not_found"]}]
    handler = AnnotationHandler(ctx)
    for strategy in ("random", "typiclust", "kcenter", "margin", "auto"):
        parts = await collect(handler, select_request(f"copies-{strategy}", images, s3_bucket, budget=len(images),
                                                      strategy=strategy, labeled=labeled))
        chosen = [e.id for p in parts for e in p.selection]
        assert len(chosen) == len(set(chosen)) == 8, (strategy, chosen)  # 12 pool images, 1 failed, 3 copies out
        assert "red-0-copy" not in chosen, strategy
        assert not {"green-0", "green-0-copy"} <= set(chosen) and not {"green-1", "green-1-copy"} <= set(chosen)
        assert parts[-1].results[-1].id == "gone" and parts[-1].results[-1].error.code == "http_status"
        summary = parts[0].select_summary
        assert (summary.pool, summary.embedded, summary.candidates, summary.selected) == (12, 11, 8, 8), strategy


async def test_refused_before_any_image_is_fetched(ctx, http_server, s3_server, s3_bucket, tmp_path):
    handler = AnnotationHandler(ctx)
    output = f"s3://{s3_bucket}/selections"

    def image(k: int) -> dict:
        return {"id": f"p{k}", "url": http_server.url(f"/custom/select-refused/{k}.png")}

    async def refusal(request_id: str, **body) -> PermanentError:
        for field in ("manifest_url", "labeled_url"):
            if isinstance(body.get(field), list):
                body[field] = await put_object(s3_server, s3_bucket, f"manifests/{request_id}-{field}.jsonl",
                                               "\n".join(body[field]).encode())
        request = SelectRequest.model_validate({"task": "select", "request_id": request_id, "output_path": output,
                                                "budget": 2, **body})
        with pytest.raises(PermanentError) as err:
            await collect(handler, request)
        return err.value

    pool_lines = [json.dumps(image(k)) for k in range(6)]
    cases = {
        "pool-over": ({"manifest_url": [json.dumps(image(k)) for k in range(MAX_IMAGES + 1)]}, "CLS_AUDIT_MAX_IMAGES"),
        "pool-and-labeled-over": ({"images": [image(k) for k in range(40)],
                                   "labeled_url": [json.dumps({**image(100 + k), "label": "a"}) for k in range(30)]},
                                  "CLS_AUDIT_MAX_IMAGES"),
        "budget-over-pool": ({"manifest_url": pool_lines, "budget": 7}, "budget 7 is more than the 6 pool images"),
        "outside-classes": ({"manifest_url": pool_lines, "classes": ["a"],
                             "labeled_url": [json.dumps({**image(9), "label": "z"})]}, "not in classes"),
        "in-both": ({"manifest_url": pool_lines, "labeled_url": [json.dumps({**image(1), "label": "a"})]},
                    "both in the pool and labeled"),
        "repeated-id": ({"manifest_url": [*pool_lines, pool_lines[0]]}, "unique"),
        "bad-line": ({"manifest_url": [pool_lines[0], "{not json", *pool_lines[1:]]}, "line 2"),
        "labeled-without-label": ({"manifest_url": pool_lines, "labeled_url": [json.dumps(image(9))]}, "label"),
        "empty": ({"manifest_url": [""]}, "no entries"),
        "missing-manifest": ({"manifest_url": f"s3://{s3_bucket}/manifests/none.jsonl"}, "none.jsonl"),
        "file-output": ({"manifest_url": pool_lines, "output_path": f"file://{tmp_path}/x"}, ""),
    }
    for request_id, (body, reason) in cases.items():
        error = await refusal(request_id, **body)
        assert error.code == ("blocked_url" if request_id == "file-output" else "invalid_request"), (request_id, error)
        assert reason in error.message, (request_id, error.message)
    configured = ctx.audit_config
    ctx.audit_config = AuditConfig(max_images=MAX_IMAGES, max_cells=11, max_select_work=10**8)
    try:
        cells = await refusal("cells", images=[image(k) for k in range(4)],
                              labeled=[{**image(10 + k), "label": "ab"[k % 2]} for k in range(2)])
    finally:
        ctx.audit_config = configured
    assert cells.code == "invalid_request" and "6 images x 2 classes = 12" in cells.message
    assert "CLS_AUDIT_MAX_CELLS=11" in cells.message
    ctx.audit_config = AuditConfig(max_images=MAX_IMAGES, max_cells=10**7, max_select_work=5 * 4 - 1)
    try:  # pool x budget: the greedy strategies' time grows with both
        work = await refusal("work", manifest_url=pool_lines[:5], budget=4)
    finally:
        ctx.audit_config = configured
    assert work.code == "invalid_request" and "CLS_SELECT_MAX_WORK" in work.message, work.message
    assert "estimated 20 > budget 19" in work.message and "5 pool images x budget 4" in work.message
    assert http_server.hits("select-refused/") == 0  # every refusal came before any image fetch


def test_the_schema_refuses_what_cannot_run():
    base = {"task": "select", "images": [{"id": "a", "url": "https://e.com/a.png"}], "budget": 1}
    SelectRequest.model_validate(base)
    bad = [
        ({"budget": 0}, "budget"), ({"budget": 10_001}, "budget"), ({"budget": 2}, "more than the 1 pool images"),
        ({"strategy": "entropy"}, "strategy"), ({"manifest_url": "s3://b/p.jsonl"}, "either images or manifest_url"),
        ({"labeled": [{"id": "a", "url": "https://e.com/a.png", "label": "x"}]}, "both in the pool and labeled"),
        ({"labeled": [], "labeled_url": "s3://b/l.jsonl"}, "either labeled or labeled_url"),
        ({"classes": ["x", "x"]}, "unique"), ({"options": {"duplicate_threshold": 0}}, "duplicate_threshold"),
        ({"options": {"seed": -1}}, "seed"),
    ]
    for extra, reason in bad:
        with pytest.raises(ValueError) as err:
            SelectRequest.model_validate({**base, **extra})
        assert reason in str(err.value), (extra, str(err.value))
    assert np.isfinite(SelectRequest.model_validate({**base, "labeled": []}).options.duplicate_threshold)


async def test_zero_shot_margin_and_predictions_with_classes_and_no_labels(ctx, pool, s3_server, s3_bucket):
    images = [image for name in COLORS for image in pool[name][:3]]
    classes = list(COLORS)
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, select_request("zero-shot", images, s3_bucket, budget=4, strategy="margin",
                                                  classes=classes))
    entries = [e for p in parts for e in p.selection]
    summary = parts[0].select_summary
    assert (summary.strategy, summary.predicted_by, summary.labeled) == ("margin", "zero_shot", 0)
    assert all(e.reason == "uncertain" and e.predicted is not None for e in entries)
    classify = AnnotationRequest.model_validate({"task": "classify", "model": "clip", "request_id": "zero-shot-classify",
                                                 "images": images, "classes": classes, "top_k": len(classes)})
    top = {r.id: r.predictions for p in await collect(handler, classify) for r in p.results}
    for e in entries:  # the classify task's top-1 (same text embeddings and templates)
        assert e.predicted.class_name == top[e.id][0].class_name
        assert abs(e.predicted.confidence - top[e.id][0].confidence) < 0.01
    margins = {i: p[0].confidence - p[1].confidence for i, p in top.items()}
    assert sorted(margins[e.id] for e in entries) == pytest.approx(sorted(margins.values())[:4], abs=0.01)
    table = await read_object(s3_server, parts[0].selection_url)
    rows = list(csv.reader(io.StringIO(table.decode("utf-8"), newline="")))
    assert len(rows) == 1 + len(images) and all(row[4] == top[row[0]][0].class_name for row in rows[1:])
    cold = await collect(handler, select_request("zero-shot-auto", images, s3_bucket, budget=4, classes=classes))
    assert (cold[0].select_summary.strategy, cold[0].select_summary.predicted_by) == ("diverse_margin", "zero_shot")
