"""``"task": "audit"`` in-process: real HTTP fetching and decoding, a real tiny model (random weights: the
mechanics), files on the real S3 API (moto on loopback) read back with numpy and the csv module; the review
order, label conflicts, a failed image ranked last, redelivery, requests refused before any image is fetched;
and, with the digits model trained here (a real embedding), the audit's quality bar through the handler."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from consumers.annotation_worker import annotation_context
from handlers.annotation import AnnotationHandler
from handlers.audit import CSV_COLUMNS
from handlers.context import AuditConfig
from handlers.errors import PermanentError
from schemas.annotation import AnnotationResult, AuditRequest
from testkit.handler_calls import collect, put_object, read_object, tiny_settings
from testkit.pictures import noisy_png

pytestmark = pytest.mark.s3

TINY = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}.",
        "timm_weights": "random"}
COLORS = {"red": (210, 40, 40), "blue": (40, 40, 210), "green": (40, 200, 40)}
MAX_IMAGES = 40


@pytest.fixture(scope="module")
async def ctx(s3_server):
    async with annotation_context(tiny_settings(result_part_size=4, embedding_cache_mb=16,
                                           audit_max_images=MAX_IMAGES)) as context:
        yield context


@pytest.fixture(scope="module")
def colored(http_server) -> list[dict[str, str]]:
    """8 noisy images of each colour, labeled with it, except red-3, labeled blue (the planted label error)."""
    images = []
    for c, (name, color) in enumerate(COLORS.items()):
        for k in range(8):
            url = http_server.add(f"audit/{name}-{k}.png", noisy_png(color, 10 * c + k), content_type="image/png")
            images.append({"id": f"{name}-{k}", "url": url, "label": "blue" if f"{name}-{k}" == "red-3" else name})
    return images


def audit_request(images: list[dict], request_id: str, **extra) -> AuditRequest:
    return AuditRequest.model_validate({"task": "audit", "model": "clip", "request_id": request_id,
                                        "images": images, **extra})


async def test_parts_in_review_order_csv_conflicts_and_redelivery(ctx, colored, http_server, s3_server, s3_bucket):
    copy_url = http_server.add("audit/blue-0-copy.png", noisy_png(COLORS["blue"], 10), content_type="image/png")
    images = [*colored, {"id": "missing", "url": http_server.urls["not_found"], "label": "red"},
              {"id": "blue-0-copy", "url": copy_url, "label": "green"}]  # blue-0's bytes, labeled green
    request = audit_request(images, "audit-1", output_path=f"s3://{s3_bucket}/audits", options={"folds": 3})
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, request)

    assert [p.part for p in parts] == list(range(7)) and {p.parts for p in parts} == {7}  # 26 entries, 4 per part
    assert [p.message_id for p in parts] == [AnnotationResult.message_id_for("audit-1", k) for k in range(7)]
    assert all(p.task == "audit" and p.status == "completed" and p.dim == 32 for p in parts)
    results = [r for p in parts for r in p.results]
    position = {image["id"]: k for k, image in enumerate(images)}
    assert sorted(r.id for r in results) == sorted(position)
    assert results[-1].id == "missing" and results[-1].error.code == "http_status" and results[-1].audit is None
    audited = results[:-1]
    assert [r.audit.rank for r in audited] == list(range(25))
    keys = [(-r.audit.issue_score, position[r.id]) for r in audited]
    assert keys == sorted(keys)  # highest issue score first, ties in request order
    by_id = {r.id: r.audit for r in audited}
    assert all(a.label == images[position[i]]["label"] for i, a in by_id.items())
    assert all(abs(a.issue_score - (1 - a.label_probability)) < 2e-6 for a in by_id.values())
    planted = by_id["red-3"]
    assert planted.label == "blue" and planted.label_issue and planted.suggested_label == "red"
    assert planted.suggested_probability > planted.label_probability
    summary = parts[0].audit_summary
    assert all(p.audit_summary == summary for p in parts)
    assert (summary.images, summary.audited, summary.classes, summary.folds) == (26, 25, 3, 3)
    assert summary.label_issues == sum(a.label_issue for a in by_id.values())

    assert all(p.label_conflicts is None for p in parts[:-1]) and parts[-1].label_conflicts_url is None
    conflicts = parts[-1].label_conflicts
    assert (conflicts[0].ids, conflicts[0].labels) == (["blue-0", "blue-0-copy"], ["blue", "green"])  # the same bytes
    assert conflicts[0].similarity >= 0.9999 and summary.label_conflicts == len(conflicts)
    assert all(by_id[a].label == la != lb == by_id[b].label for (a, b), (la, lb) in ((c.ids, c.labels) for c in conflicts))
    similarities = [c.similarity for c in conflicts]
    assert similarities == sorted(similarities, reverse=True) and similarities[-1] >= 0.95
    # (the random tiny model puts all same-coloured images within 0.95: red-3, labeled blue, conflicts with the reds)
    assert {tuple(sorted(c.ids)) for c in conflicts if "red-3" in c.ids} == {
        tuple(sorted(("red-3", f"red-{k}"))) for k in (0, 1, 2, 4, 5, 6, 7)}

    folder = f"s3://{s3_bucket}/audits/audit-1"
    assert {p.audit_url for p in parts} == {f"{folder}/audit.csv"}
    assert {p.embeddings_url for p in parts} == {f"{folder}/embeddings.npz"}
    table = await read_object(s3_server, parts[0].audit_url)
    rows = list(csv.reader(io.StringIO(table.decode("utf-8"), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row[0] for row in rows[1:]] == [r.id for r in results]  # the CSV is the parts, in the same order
    for row, result in zip(rows[1:-1], audited, strict=True):
        a = result.audit
        assert row[1:] == [a.label, repr(a.label_probability), "true" if a.label_issue else "false", a.suggested_label,
                           repr(a.suggested_probability), repr(a.issue_score), repr(a.outlier_score), ""]
    assert rows[-1] == ["missing", "red", "", "", "", "", "", "", "http_status"]
    data = await read_object(s3_server, parts[0].embeddings_url)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # numpy alone
        ids, vectors = npz["ids"].tolist(), npz["embeddings"].astype(np.float32)
    assert ids == [i["id"] for i in images if i["id"] != "missing"]  # request order
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)

    again = await collect(handler, request)  # a redelivery: the same parts, ids and files
    assert [p.model_dump(exclude={"created_at"}) for p in again] == [p.model_dump(exclude={"created_at"}) for p in parts]
    assert await read_object(s3_server, parts[0].audit_url) == table

    budget = ctx.config.part_budget_bytes
    ctx.config.part_budget_bytes = 4 * 1024  # conflicts get a quarter: not all of them fit the last part now
    try:
        small = await collect(handler, request.model_copy(update={"request_id": "audit-small"}))
    finally:
        ctx.config.part_budget_bytes = budget
    assert len(small) > len(parts) and all(len(p.to_json_bytes()) <= 4 * 1024 for p in small[:-1])
    kept = small[-1].label_conflicts
    assert small[-1].label_conflicts_url == f"s3://{s3_bucket}/audits/audit-small/label_conflicts.json"
    assert 0 < len(kept) < len(conflicts) and sum(len(c.model_dump_json()) + 1 for c in kept) <= 1024
    stored = json.loads(await read_object(s3_server, small[-1].label_conflicts_url))
    assert stored == [c.model_dump() for c in conflicts] and stored[:len(kept)] == [c.model_dump() for c in kept]


async def test_manifest_on_s3_audits_like_the_inline_images(ctx, colored, s3_server, s3_bucket):
    lines = [json.dumps(image) for image in colored]
    manifest = await put_object(s3_server, s3_bucket, "manifests/colors.jsonl",
                                ("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n").encode())  # a blank line
    handler = AnnotationHandler(ctx)
    output = f"s3://{s3_bucket}/audits"
    by_manifest = await collect(handler, AuditRequest.model_validate(
        {"task": "audit", "request_id": "audit-m", "manifest_url": manifest, "output_path": output}))
    inline = await collect(handler, audit_request(colored, "audit-i", output_path=output))
    assert [(r.id, r.audit) for p in by_manifest for r in p.results] == [(r.id, r.audit) for p in inline for r in p.results]
    assert by_manifest[0].audit_url == f"{output}/audit-m/audit.csv"


async def test_refused_before_any_image_is_fetched(ctx, http_server, s3_server, s3_bucket, tmp_path):
    handler = AnnotationHandler(ctx)
    output = f"s3://{s3_bucket}/audits"

    def entry(k: int, label: str) -> dict:
        return {"id": f"r{k}", "url": http_server.url(f"/custom/audit-refused/{k}.png"), "label": label}

    async def refusal(request_id: str, lines: list[str] | None = None, images: list[dict] | None = None,
                      **extra) -> PermanentError:
        body = {"task": "audit", "request_id": request_id, "output_path": output, **extra}
        if lines is not None:
            body["manifest_url"] = await put_object(s3_server, s3_bucket, f"manifests/{request_id}.jsonl",
                                                    "\n".join(lines).encode())
        if images is not None:
            body["images"] = images
        with pytest.raises(PermanentError) as err:
            await collect(handler, AuditRequest.model_validate(body))
        return err.value

    two_labels = [json.dumps(entry(k, "ab"[k % 2])) for k in range(6)]
    over = await refusal("over", [json.dumps(entry(k, "ab"[k % 2])) for k in range(MAX_IMAGES + 1)])
    assert over.code == "invalid_request" and "CLS_AUDIT_MAX_IMAGES" in over.message
    inline_over = await refusal("inline-over", None, images=[entry(k, "ab"[k % 2]) for k in range(MAX_IMAGES + 1)])
    assert inline_over.code == "invalid_request" and f"CLS_AUDIT_MAX_IMAGES={MAX_IMAGES}" in inline_over.message
    cases = {
        "one-label": ([json.dumps(entry(k, "a")) for k in range(6)], {}, "at least 2 labels"),
        "single-image-label": ([*two_labels, json.dumps(entry(9, "c"))], {}, "at least 2 images"),
        "outside-classes": (two_labels, {"classes": ["a", "z"]}, "not in classes"),
        "repeated-id": ([*two_labels, two_labels[0]], {}, "unique"),
        "bad-line": ([two_labels[0], "{not json", *two_labels[1:]], {}, "line 2"),
        "no-label": ([*two_labels, json.dumps({"id": "x", "url": "https://e.com/x"})], {}, "label"),
        "empty": ([""], {}, "no entries"),
        "file-output": (two_labels, {"output_path": f"file://{tmp_path}/x"}, ""),
    }
    for request_id, (lines, extra, reason) in cases.items():
        error = await refusal(request_id, lines, **extra)
        assert error.code == ("blocked_url" if request_id == "file-output" else "invalid_request"), (request_id, error)
        assert reason in error.message, (request_id, error.message)
    missing = await refusal("no-manifest", None, manifest_url=f"s3://{s3_bucket}/manifests/none.jsonl")
    assert missing.code == "invalid_request" and "none.jsonl" in missing.message
    no_output = AuditRequest.model_validate({"task": "audit", "request_id": "no-output",
                                             "images": [entry(k, "ab"[k % 2]) for k in range(4)]})
    with pytest.raises(PermanentError) as err:
        await collect(handler, no_output)  # no output_path and no CLS_EMBED_OUTPUT_PATH here
    assert err.value.code == "invalid_request" and "CLS_EMBED_OUTPUT_PATH" in err.value.message
    configured = ctx.audit_config
    ctx.audit_config = AuditConfig(max_images=MAX_IMAGES, max_cells=11, max_select_work=10**8)
    try:
        cells = await refusal("cells", None, images=[entry(k, "ab"[k % 2]) for k in range(6)])
    finally:
        ctx.audit_config = configured
    assert cells.code == "invalid_request" and "6 images x 2 classes" in cells.message
    assert "estimated 12 > budget 11 (CLS_AUDIT_MAX_CELLS)" in cells.message
    assert http_server.hits("audit-refused/") == 0  # every refusal came before any image fetch

    # the images of one label all fail: what is left is one label, and the message says why
    good = [{"id": f"ok{k}", "url": http_server.add(f"audit-half/{k}.png", noisy_png(COLORS["red"], 90 + k),
                                                    content_type="image/png"), "label": "a"} for k in range(2)]
    failing = [{"id": f"gone{k}", "url": http_server.urls["not_found"], "label": "b"} for k in range(2)]
    half = await refusal("half", None, images=good + failing)
    assert half.code == "invalid_request" and "2 of 4 images failed (first: http_status)" in half.message, half.message


async def upload_package(s3_server, bucket: str, package_dir: Path, prefix: str) -> str:
    for name in ("model.safetensors", "config.json", "metrics.json"):
        await put_object(s3_server, bucket, f"{prefix}/{name}", (package_dir / name).read_bytes())
    return f"s3://{bucket}/{prefix}"


async def test_digits_flipped_labels_found_through_the_handler(trained_digits, http_server, s3_server, s3_bucket,
                                                                tmp_path):
    """The issue's bar on a real embedding (the digits model trained here, on images it never trained on):
    10% of labels flipped -> precision and recall of label_issue >= 0.8; clean labels -> < 1% flagged."""
    model_url = await upload_package(s3_server, s3_bucket, trained_digits.package_dir, "models/audit-digits")
    names = trained_digits.class_names
    pool = trained_digits.val + trained_digits.test
    rng = np.random.default_rng(0)
    truth = np.array([label for _, label in pool])
    given = truth.copy()
    flipped = rng.choice(len(pool), len(pool) // 10, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, 10, flipped.size)) % 10
    urls = [http_server.add(f"audit-digits/{k}.png", Path(path).read_bytes(), content_type="image/png")
            for k, (path, _) in enumerate(pool)]

    def request(request_id: str, labels: np.ndarray) -> AuditRequest:
        return AuditRequest.model_validate({
            "task": "audit", "model": "custom", "model_url": model_url, "request_id": request_id,
            "output_path": f"s3://{s3_bucket}/audits", "classes": names,
            "images": [{"id": f"d{k}", "url": u, "label": names[labels[k]]} for k, u in enumerate(urls)]})

    async with annotation_context(tiny_settings(model_dir=str(tmp_path / "models"), s3_endpoint_url=s3_server.endpoint_url,
                                           embedding_cache_mb=16)) as context:
        handler = AnnotationHandler(context)
        noisy = [r for p in await collect(handler, request("digits-noisy", given)) for r in p.results]
        clean = [r for p in await collect(handler, request("digits-clean", truth)) for r in p.results]
    assert all(r.error is None for r in noisy + clean)
    found = {int(r.id[1:]) for r in noisy if r.audit.label_issue}
    planted = set(flipped.tolist())
    precision, recall = len(found & planted) / max(1, len(found)), len(found & planted) / len(planted)
    print(f"digits audit through the handler: {len(pool)} images, {len(planted)} flipped, {len(found)} flagged;"
          f" precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    right = [r.audit.suggested_label == names[truth[int(r.id[1:])]] for r in noisy if int(r.id[1:]) in found & planted]
    assert sum(right) / len(right) >= 0.9
    top = [int(r.id[1:]) for r in noisy[:len(planted) // 2]]  # the head of the review queue: flipped labels
    assert np.isin(top, flipped).mean() >= 0.9
    flagged_clean = sum(r.audit.label_issue for r in clean)
    print(f"clean labels: {flagged_clean} of {len(pool)} flagged; head of the queue flipped: {np.isin(top, flipped).mean():.3f}")
    assert flagged_clean < 0.01 * len(pool)
