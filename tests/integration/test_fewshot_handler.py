"""Few-shot classify in-process: real HTTP fetching, real decoding, real tiny models (random weights), manifests
on the real S3 API (moto on loopback); and the gain on features that mean something: the digits model trained
here, loaded from its package in S3 as ``"model": "custom"``, few-shot on digits it never trained on."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from consumers.annotation_worker import annotation_context
from consumers.settings import KafkaSettings, Settings, WorkerSettings
from handlers.annotation import AnnotationHandler
from handlers.errors import PermanentError
from schemas.annotation import MAX_FEW_SHOT_EXAMPLES, AnnotationRequest
from schemas.codec import ANNOTATION_ADAPTER
from testkit.handler_calls import upload_package
from testkit.pictures import noisy_png

pytestmark = pytest.mark.s3

TINY = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}.",
        "timm_weights": "random", "siglip_variant": "cls-tiny-siglip", "siglip_weights": "random"}
LIMIT = WorkerSettings().fewshot_max_examples  # CLS_FEWSHOT_MAX_EXAMPLES: the default, 2000
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def settings(**overrides) -> Settings:
    values = {**TINY, "allow_private_networks": True, "fetch_read_timeout_s": 1.0, "fetch_total_timeout_s": 8.0,
              "fetch_connect_timeout_s": 2.0, "fetch_max_bytes": 4 * 1024 * 1024, "batch_wait_ms": 5.0,
              "fewshot_max_examples": LIMIT, "embedding_cache_mb": 16, "torch_threads": 1, **overrides}
    return Settings(kafka=KafkaSettings(), worker=WorkerSettings(**values))


def png(colour: tuple[int, int, int], seed: int, size: int = 24) -> bytes:
    return noisy_png(colour, seed, size)


@pytest.fixture(scope="module")
def colour_urls(http_server) -> dict[str, list[str]]:
    """Six images per colour on the image server: four for the support sets, two to classify."""
    return {name: [http_server.add(f"fewshot/{name}-{k}.png", png(rgb, 10 * k + i), content_type="image/png")
                   for k in range(6)]
            for i, (name, rgb) in enumerate(COLOURS.items())}


def request(images: list[tuple[str, str]], request_id: str, **extra) -> AnnotationRequest:
    body = {"task": "classify", "model": "clip", "request_id": request_id, "top_k": 3, "threshold": 0.0,
            "images": [{"id": i, "url": u} for i, u in images], **extra}
    return AnnotationRequest.model_validate(body)


def examples(colour_urls, per_class: int, classes=COLOURS) -> list[dict[str, str]]:
    return [{"url": url, "label": name} for name in classes for url in colour_urls[name][:per_class]]


def queries(colour_urls) -> list[tuple[str, str]]:
    return [(f"{name}-{k}", colour_urls[name][k]) for name in COLOURS for k in (4, 5)]


async def collect(handler: AnnotationHandler, req):
    return [part async for part in handler.handle(req)]


async def error_of(handler: AnnotationHandler, req) -> PermanentError:
    with pytest.raises(PermanentError) as err:
        await collect(handler, req)
    return err.value


@pytest.fixture(scope="module")
async def ctx(s3_server):
    async with annotation_context(settings(result_part_size=4, s3_endpoint_url=s3_server.endpoint_url)) as context:
        yield context


async def put(s3_server, bucket: str, key: str, body: bytes) -> str:
    async with s3_server.client() as client:
        await client.put_object(Bucket=bucket, Key=key, Body=body)
    return f"s3://{bucket}/{key}"


async def test_clip_few_shot_result_then_head_cache_hit(ctx, colour_urls):
    from prometheus_client import REGISTRY

    def heads(result: str) -> float:
        return REGISTRY.get_sample_value("cls_fewshot_heads_total", {"result": result}) or 0.0

    handler = AnnotationHandler(ctx)
    support = examples(colour_urls, 3)
    fits, cache = ctx.fewshot_heads.fits, ctx.embedding_cache
    fitted_before, cached_before = heads("fitted"), heads("cached")
    parts = await collect(handler, request(queries(colour_urls), "fs-1", classes=list(COLOURS), examples=support))
    assert [p.part for p in parts] == [0, 1] and all(p.status == "completed" for p in parts)
    summary = parts[0].few_shot
    assert summary is not None and all(p.few_shot == summary for p in parts)
    assert summary.method in ("linear_probe", "tip_adapter") and summary.fitted
    assert summary.examples_per_class == dict.fromkeys(COLOURS, 3) and summary.examples_failed == 0
    assert summary.cv_accuracy is not None and 0.0 <= summary.cv_accuracy <= 1.0  # 3 folds of 3 per class
    results = [r for p in parts for r in p.results]
    assert [r.id for r in results] == [i for i, _ in queries(colour_urls)]
    for r in results:
        assert [p.class_name for p in r.predictions][0] in COLOURS and len(r.predictions) == 3
        assert sum(p.confidence for p in r.predictions) == pytest.approx(1.0, abs=1e-4)  # a softmax over the classes
    assert ctx.fewshot_heads.fits == fits + 1

    # the same support set again: no second embedding of any example, no second fit, the same predictions
    hits = cache.hits
    again = await collect(handler, request(queries(colour_urls), "fs-2", classes=list(COLOURS), examples=support))
    assert again[0].few_shot == summary.model_copy(update={"fitted": False})
    assert ctx.fewshot_heads.fits == fits + 1
    assert cache.hits >= hits + len(support) + len(results)  # every example and query came from the cache
    assert [r.predictions for p in again for r in p.results] == [r.predictions for r in results]

    # a fixed method is another head; concurrent identical requests fit it once (single flight)
    tip = [request(queries(colour_urls), f"fs-tip-{k}", classes=list(COLOURS), examples=support,
                   few_shot={"method": "tip_adapter"}) for k in range(3)]
    answers = await asyncio.gather(*(collect(handler, r) for r in tip))
    assert {a[0].few_shot.method for a in answers} == {"tip_adapter"}
    assert sorted(a[0].few_shot.fitted for a in answers) == [False, False, True]
    assert ctx.fewshot_heads.fits == fits + 2
    assert (heads("fitted"), heads("cached")) == (fitted_before + 2, cached_before + 3)  # the worker's metrics


async def test_clip_classes_without_examples_fall_back_to_zero_shot(ctx, colour_urls):
    parts = await collect(AnnotationHandler(ctx), request(
        queries(colour_urls), "fs-fallback", classes=[*COLOURS, "purple"], top_k=4,
        examples=examples(colour_urls, 2)))
    summary = parts[0].few_shot
    assert summary.examples_per_class == dict.fromkeys(COLOURS, 2)  # purple: none, its zero-shot weights
    assert all({p.class_name for p in r.predictions} == {*COLOURS, "purple"} for p in parts for r in p.results)


async def test_siglip_few_shot_confidences_are_a_softmax(ctx, colour_urls):
    parts = await collect(AnnotationHandler(ctx), request(queries(colour_urls), "fs-siglip", model="siglip",
                                                          classes=list(COLOURS), examples=examples(colour_urls, 2),
                                                          few_shot={"method": "linear_probe"}))
    assert parts[0].model.family == "siglip" and parts[0].few_shot.method == "linear_probe"
    for r in (r for p in parts for r in p.results):  # zero-shot SigLIP is a sigmoid per class; the few-shot head is not
        assert sum(p.confidence for p in r.predictions) == pytest.approx(1.0, abs=1e-4)


async def test_failing_examples_are_counted_and_skipped(ctx, colour_urls, http_server):
    support = examples(colour_urls, 2) + [{"url": http_server.urls["not_found"], "label": "red"},
                                          {"url": http_server.urls["truncated_jpg"], "label": "blue"}]
    parts = await collect(AnnotationHandler(ctx), request(queries(colour_urls)[:2], "fs-failing",
                                                          classes=list(COLOURS), examples=support))
    assert parts[0].few_shot.examples_failed == 2
    assert parts[0].few_shot.examples_per_class == dict.fromkeys(COLOURS, 2)
    # every example failing is the request's error, not a silent zero-shot answer
    err = await error_of(AnnotationHandler(ctx), request(queries(colour_urls)[:1], "fs-none", classes=["red"], top_k=1,
                                                         examples=[{"url": http_server.urls["not_found"], "label": "red"}]))
    assert err.code == "invalid_request" and "none of the 1 examples" in err.message and "http_status" in err.message


async def test_timm_few_shot_classes_from_labels_and_missing_classes(ctx, colour_urls):
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, request(queries(colour_urls), "fs-timm", model="timm", model_variant="test_resnet",
                                           examples=examples(colour_urls, 2), top_k=2))
    assert parts[0].model.family == "timm" and parts[0].few_shot.method in ("prototype", "knn", "logistic_regression")
    assert parts[0].few_shot.examples_per_class == dict.fromkeys(COLOURS, 2)
    assert all(len(r.predictions) == 2 and r.predictions[0].class_name in COLOURS for p in parts for r in p.results)
    # a class without examples and no text tower: refused, naming the class
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-timm-missing", model="timm",
                                          model_variant="test_resnet", classes=[*COLOURS, "purple"],
                                          examples=examples(colour_urls, 2)))
    assert err.code == "invalid_request" and "purple" in err.message and "red" not in err.message
    # ... also when its only examples failed (known after embedding them)
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-timm-failed", model="timm",
                                          model_variant="test_resnet",
                                          examples=examples(colour_urls, 2, ["red", "green"])
                                          + [{"url": colour_urls["blue"][0] + "-missing", "label": "blue"}]))
    assert err.code == "invalid_request" and "'blue'" in err.message
    # a method of the other family
    with pytest.raises(ValidationError, match="not available for model 'timm'"):
        request(queries(colour_urls)[:1], "x", model="timm", model_variant="test_resnet",
                examples=examples(colour_urls, 2), few_shot={"method": "tip_adapter"})


async def test_manifest_examples_limits_and_bad_lines(ctx, colour_urls, s3_server, s3_bucket):
    handler = AnnotationHandler(ctx)
    # the largest support set: LIMIT examples (the 12 support images named over and over: each fetched once)
    at_limit = [{"url": colour_urls[name][k % 4], "label": name} for k in range(LIMIT // 3 + 1) for name in COLOURS]
    at_limit = at_limit[:LIMIT]
    assert len(at_limit) == LIMIT == 2000
    counts = {name: sum(e["label"] == name for e in at_limit) for name in COLOURS}
    manifest = "\n".join(json.dumps(e) for e in at_limit).encode() + b"\n\n"
    url = await put(s3_server, s3_bucket, "fewshot/support.jsonl", manifest)
    started = time.monotonic()
    parts = await collect(handler, request(queries(colour_urls)[:2], "fs-manifest", classes=list(COLOURS),
                                           examples_url=url))
    print(f"\n{LIMIT} examples (12 distinct images) fetched, embedded and fitted in {time.monotonic() - started:.2f} s")
    assert parts[0].few_shot.examples_per_class == counts and parts[0].few_shot.fitted
    inline = await collect(handler, request(queries(colour_urls)[:2], "fs-inline-limit", classes=list(COLOURS),
                                            examples=at_limit))
    assert inline[0].few_shot == parts[0].few_shot.model_copy(update={"fitted": False})  # the same support set

    over = at_limit + [at_limit[0]]
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-inline-over", classes=list(COLOURS),
                                          examples=over))
    assert err.code == "invalid_request" and "CLS_FEWSHOT_MAX_EXAMPLES" in err.message and str(LIMIT) in err.message
    url = await put(s3_server, s3_bucket, "fewshot/over.jsonl", "\n".join(json.dumps(e) for e in over).encode())
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-manifest-over", classes=list(COLOURS),
                                          examples_url=url))
    assert err.code == "invalid_request" and "CLS_FEWSHOT_MAX_EXAMPLES" in err.message

    secret = "s3cr3t-token-in-a-bad-line"
    for body, problem in ((b'{"url": "http://x/a.png", "label": "red"}\n{"url": "' + secret.encode() + b'"\n', "line 2"),
                          (b'{"url": "ftp://' + secret.encode() + b'", "label": "red"}\n', "line 1"),
                          (b'{"url": "http://x/a.png", "label": "' + b"x" * 201 + b'"}\n', "line 1")):
        url = await put(s3_server, s3_bucket, "fewshot/bad.jsonl", body)
        err = await error_of(handler, request(queries(colour_urls)[:1], "fs-bad-line", classes=list(COLOURS),
                                              examples_url=url))
        assert err.code == "invalid_request" and problem in err.message and secret not in err.message, err.message
    # labels outside the classes (known only once the manifest is read)
    url = await put(s3_server, s3_bucket, "fewshot/other.jsonl", json.dumps({"url": colour_urls["red"][0],
                                                                            "label": "mauve"}).encode())
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-other", classes=list(COLOURS), examples_url=url))
    assert err.code == "invalid_request" and "mauve" in err.message
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-missing", classes=list(COLOURS),
                                          examples_url=f"s3://{s3_bucket}/fewshot/no-such.jsonl"))
    assert err.code == "invalid_request" and "storage_not_found" in err.message


def test_contract_bounds_of_the_few_shot_fields():
    base = {"task": "classify", "request_id": "c", "images": [{"id": "a", "url": "http://x/a.png"}], "classes": ["a"],
            "top_k": 1}
    example = {"url": "http://x/e.png", "label": "a"}
    ANNOTATION_ADAPTER.validate_python({**base, "examples": [example] * MAX_FEW_SHOT_EXAMPLES})
    for extra in ({"examples": [example] * (MAX_FEW_SHOT_EXAMPLES + 1)},
                  {"examples": []},
                  {"examples": [{**example, "label": "a" * 201}]},
                  {"examples": [{**example, "url": "gopher://x/e"}]},
                  {"examples": [example], "examples_url": "s3://b/m.jsonl"},
                  {"few_shot": {"method": "auto"}},
                  {"examples": [example], "few_shot": {"method": "svm"}},
                  {"examples": [example], "few_shot": {"method": "knn"}},  # clip: text-tower methods only
                  {"model": "timm", "model_variant": "resnet18"},  # timm classifies only with examples
                  {"model": "timm", "examples": [example]},  # timm without a model name
                  {"examples": [example], "model": "custom", "model_url": "s3://b/m", "auto_accept_precision": 0.9}):
        with pytest.raises(ValidationError):
            ANNOTATION_ADAPTER.validate_python({**base, **extra})
    labels = [{"url": "http://x/e.png", "label": f"c{i}"} for i in range(2001)]
    with pytest.raises(ValidationError, match="distinct example labels"):
        ANNOTATION_ADAPTER.validate_python({**base, "classes": None, "model": "custom", "model_url": "s3://b/m",
                                            "examples": labels})


def test_methods_named_by_the_contract_are_the_library_s():
    from ml.fewshot import TEXT_METHODS, VISION_METHODS
    from ml.fewshot_multilabel import METHOD
    from schemas.annotation import (
        FEW_SHOT_MULTI_LABEL_METHODS,
        FEW_SHOT_TEXT_METHODS,
        FEW_SHOT_VISION_METHODS,
        FewShotMethod,
    )

    assert (FEW_SHOT_TEXT_METHODS, FEW_SHOT_VISION_METHODS) == (TEXT_METHODS, VISION_METHODS)
    assert FEW_SHOT_MULTI_LABEL_METHODS == (METHOD,)
    assert set(FewShotMethod.__args__) == {"auto", *TEXT_METHODS, *VISION_METHODS, METHOD}


async def test_few_shot_on_digits_with_the_model_trained_here(trained_digits, s3_server, s3_bucket, http_server,
                                                              tmp_path):
    """The custom model's embedding (pooled pre-logits) of digits it never trained on: 3 examples per class from the
    validation split, 60 test digits classified; chance is 0.1."""
    model_url = await upload_package(s3_server, s3_bucket, trained_digits.package_dir, "models/fewshot-digits")
    names = trained_digits.class_names

    def serve(split: str, samples) -> list[tuple[str, str, int]]:
        return [(f"{split}{i}", http_server.add(f"fewshot-digits/{split}{i}.png", Path(p).read_bytes(),
                                                content_type="image/png"), label)
                for i, (p, label) in enumerate(samples)]

    by_class: dict[int, list] = {}
    for sample in trained_digits.val:
        by_class.setdefault(sample[1], []).append(sample)
    support = serve("s", [s for c in sorted(by_class) for s in by_class[c][:3]])
    test = serve("q", trained_digits.test[:60])
    async with annotation_context(settings(model_dir=str(tmp_path / "models"), s3_endpoint_url=s3_server.endpoint_url,
                                           result_part_size=100)) as context:
        parts = await collect(AnnotationHandler(context), AnnotationRequest.model_validate({
            "task": "classify", "model": "custom", "model_url": model_url, "request_id": "fs-digits", "top_k": 1,
            "threshold": 0.0, "images": [{"id": i, "url": u} for i, u, _ in test],
            "examples": [{"url": u, "label": names[label]} for _, u, label in support]}))
    summary = parts[0].few_shot
    assert summary.examples_per_class == dict.fromkeys(names, 3) and summary.cv_accuracy is not None
    results = parts[0].results
    accuracy = np.mean([r.predictions[0].class_name == names[label] for r, (_, _, label) in zip(results, test, strict=True)])
    print(f"\nfew-shot on digits (custom, 3 shots, {summary.method}, cv {summary.cv_accuracy}): accuracy {accuracy:.3f}")
    assert accuracy >= 0.8  # chance: 0.1


async def test_a_fit_over_the_cost_budget_is_refused_before_any_example_is_fetched(ctx, http_server):
    """classes x examples x dim is checked at admission (CLS_FEWSHOT_MAX_FIT_COST), before the support set is
    fetched or embedded."""
    from handlers.admission import REFUSED

    configured = ctx.fewshot
    ctx.fewshot = dataclasses.replace(configured, max_fit_cost=100)
    urls = [http_server.add(f"fit-cost/{k}.png", png((200, 20, 20), k), content_type="image/png") for k in range(6)]
    before = REFUSED.labels("fewshot_fit")._value.get()
    try:
        error = await error_of(AnnotationHandler(ctx), request(
            [("q", urls[5])], "fit-cost", classes=["a", "b"], top_k=2,
            examples=[{"url": u, "label": "ab"[k % 2]} for k, u in enumerate(urls[:4])]))
    finally:
        ctx.fewshot = configured
    assert error.code == "invalid_request", error
    assert "2 classes x 4 examples x" in error.message and "> budget 100 (CLS_FEWSHOT_MAX_FIT_COST)" in error.message
    assert REFUSED.labels("fewshot_fit")._value.get() == before + 1
    assert http_server.hits("fit-cost/") == 0


async def test_few_shot_top_k_unset_equal_larger_smaller_than_the_classes(ctx, colour_urls):
    """Few-shot answers as classify does: unset -> min(3, classes); above the class count -> every class."""
    handler = AnnotationHandler(ctx)
    two = ["red", "green"]
    support = examples(colour_urls, 2, classes=two)
    for top_k, expected in ((None, 2), (2, 2), (7, 2), (1, 1)):
        body = {"task": "classify", "model": "clip", "request_id": f"fs-topk-{top_k}", "threshold": 0.0,
                "classes": two, "examples": support, "images": [{"id": "q", "url": colour_urls["red"][4]}]}
        if top_k is not None:
            body["top_k"] = top_k
        parts = await collect(handler, AnnotationRequest.model_validate(body))
        (result,) = parts[0].results
        assert parts[0].few_shot is not None and len(result.predictions) == expected, (top_k, result)
        assert {p.class_name for p in result.predictions} <= set(two)


# -- multi-label few-shot: examples with tag sets ------------------------------------------------------------------

def tag_examples(colour_urls, per_class: int, classes=COLOURS) -> list[dict]:
    """Each support image tagged with its colour, plus two untagged images of a colour outside ``classes``."""
    tagged = [{"url": url, "labels": [name]} for name in classes for url in colour_urls[name][:per_class]]
    others = [name for name in COLOURS if name not in classes]
    return tagged + [{"url": url, "labels": []} for name in others for url in colour_urls[name][:2]]


async def test_multi_label_few_shot_heads_and_the_zero_shot_rule_for_classes_without_positives(ctx, colour_urls):
    handler = AnnotationHandler(ctx)
    classes = ["red", "green", "purple"]  # purple: no positive example, keeps CLIP's class-vs-neutral-prompt rule
    support = tag_examples(colour_urls, 4, ["red", "green"])  # blue images are the untagged negatives
    fits = ctx.fewshot_heads.fits
    parts = await collect(handler, request(queries(colour_urls), "fs-ml", classes=classes, multi_label=True,
                                           examples=support))
    summary = parts[0].few_shot
    assert summary.method == "one_vs_rest" and summary.examples_per_class == {"red": 4, "green": 4}
    assert summary.examples_failed == 0 and summary.cv_accuracy is None and summary.fitted
    assert ctx.fewshot_heads.fits == fits + 1
    results = {r.id: r for p in parts for r in p.results}
    zero_shot = await collect(handler, request(queries(colour_urls), "fs-ml-zero", classes=classes, multi_label=True))
    zero = {r.id: {p.class_name: p.confidence for p in r.predictions} for p in zero_shot for r in p.results}
    for image_id, r in results.items():
        confidence = {p.class_name: p.confidence for p in r.predictions}
        assert r.margin is None and r.labels == [p.class_name for p in r.predictions]  # threshold 0: all, top_k 3
        assert set(confidence) == set(classes)
        assert confidence["purple"] == pytest.approx(zero[image_id]["purple"], abs=1e-5)  # its zero-shot rule, unchanged
        colour = image_id.split("-")[0]
        if colour in ("red", "green"):  # learned: its own tag is likely, the other one is not
            other = "green" if colour == "red" else "red"
            assert confidence[colour] > 0.5 > confidence[other], (image_id, confidence)
        else:  # blue was only ever a negative
            assert confidence["red"] < 0.5 and confidence["green"] < 0.5, (image_id, confidence)
    # independent probabilities: a blue image can have none, a red one several classes above the threshold
    assert any(sum(p.confidence for p in r.predictions) > 1.05 or sum(p.confidence for p in r.predictions) < 0.95
               for r in results.values())

    # threshold per class, top_k caps; the same support set: the cached head
    again = await collect(handler, request(queries(colour_urls), "fs-ml-2", classes=classes, multi_label=True,
                                           examples=support, threshold=0.5, top_k=1))
    assert not again[0].few_shot.fitted and ctx.fewshot_heads.fits == fits + 1
    for r in (r for p in again for r in p.results):
        full = {p.class_name: p.confidence for p in results[r.id].predictions}
        best = max(full, key=full.get)
        expected = [best] if full[best] >= 0.5 else []
        assert [p.class_name for p in r.predictions] == r.labels == expected


async def test_multi_label_few_shot_siglip_and_timm(ctx, colour_urls):
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, request(queries(colour_urls), "fs-ml-siglip", model="siglip", classes=list(COLOURS),
                                           multi_label=True, examples=tag_examples(colour_urls, 3),
                                           few_shot={"method": "one_vs_rest"}))
    assert parts[0].few_shot.method == "one_vs_rest" and parts[0].model.family == "siglip"
    for r in (r for p in parts for r in p.results):
        assert r.predictions[0].class_name == r.id.split("-")[0] and r.margin is None
    # timm: no text tower; classes from the labels, and a class without positives is refused, naming it
    parts = await collect(handler, request(queries(colour_urls), "fs-ml-timm", model="timm",
                                           model_variant="test_resnet", multi_label=True,
                                           examples=tag_examples(colour_urls, 3, ["red", "blue"])))
    assert parts[0].few_shot.examples_per_class == {"red": 3, "blue": 3}
    assert all({p.class_name for p in r.predictions} <= {"red", "blue"} for p in parts for r in p.results)
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-ml-timm-missing", model="timm",
                                          model_variant="test_resnet", multi_label=True, classes=list(COLOURS),
                                          examples=tag_examples(colour_urls, 2, ["red", "blue"])))
    assert err.code == "invalid_request" and "'green'" in err.message and "'red'" not in err.message


def test_multi_label_few_shot_validation_names_the_entry():
    base = {"task": "classify", "request_id": "v", "images": [{"id": "a", "url": "http://x/a.png"}],
            "classes": ["red", "green"]}
    good = {"url": "http://x/e.png", "labels": ["red"]}
    ANNOTATION_ADAPTER.validate_python({**base, "multi_label": True, "examples": [good, {**good, "labels": []}]})
    for extra, examples_, message in (
            ({}, [{"url": "http://x/e.png", "label": "red"}, good], "examples[1] has 'labels' but the request is single-label"),
            ({"multi_label": True}, [good, {"url": "http://x/e.png", "label": "red"}], "examples[1] has 'label' but the request has multi_label"),
            ({"multi_label": True}, [good, {**good, "labels": ["red", "mauve"]}], "examples[1] has labels that are not among the classes: ['mauve']"),
            ({"multi_label": True}, [{**good, "labels": ["red", "green", "red"]}], "examples[0] repeats labels ['red']"),
            ({"multi_label": True}, [good, {**good, "label": "red"}], "either 'label'"),
            ({"multi_label": True, "few_shot": {"method": "linear_probe"}}, [good], "not available for model 'clip' with multi_label"),
            ({"few_shot": {"method": "one_vs_rest"}}, [{"url": "http://x/e.png", "label": "red"}], "not available for model 'clip'")):
        with pytest.raises(ValidationError, match=re.escape(message)):
            ANNOTATION_ADAPTER.validate_python({**base, **extra, "examples": examples_})
    many = [{**good, "labels": ["mauve"]}] * 5
    with pytest.raises(ValidationError, match=re.escape("5 bad examples: examples[0] has labels")):
        ANNOTATION_ADAPTER.validate_python({**base, "multi_label": True, "examples": many})
    with pytest.raises(ValidationError):  # the largest tag set: at most MAX_CLASSES names
        ANNOTATION_ADAPTER.validate_python({**base, "multi_label": True,
                                            "examples": [{**good, "labels": [f"c{i}" for i in range(2001)]}]})


async def test_multi_label_manifest_entries_are_checked_by_name(ctx, colour_urls, s3_server, s3_bucket):
    handler = AnnotationHandler(ctx)
    lines = [{"url": colour_urls["red"][0], "labels": ["red"]}, {"url": colour_urls["green"][0], "labels": ["green"]},
             {"url": colour_urls["blue"][0], "labels": ["green", "green"]}]
    url = await put(s3_server, s3_bucket, "fewshot/tags.jsonl", "\n".join(json.dumps(e) for e in lines).encode())
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-ml-manifest", classes=["red", "green"],
                                          multi_label=True, examples_url=url))
    assert err.code == "invalid_request" and f"manifest {url} entry 2 repeats labels ['green']" in err.message
    err = await error_of(handler, request(queries(colour_urls)[:1], "fs-ml-manifest-single", classes=["red", "green"],
                                          examples_url=url))
    assert err.code == "invalid_request" and f"3 bad examples: manifest {url} entry 0 has 'labels'" in err.message
    url = await put(s3_server, s3_bucket, "fewshot/tags-ok.jsonl", "\n".join(json.dumps(e) for e in lines[:2]).encode())
    parts = await collect(handler, request(queries(colour_urls)[:2], "fs-ml-manifest-ok", classes=["red", "green"],
                                           multi_label=True, examples_url=url))
    assert parts[0].few_shot.examples_per_class == {"red": 1, "green": 1} and parts[0].results[0].labels is not None


def test_largest_tag_sets_validate_quickly():
    """Every example with the most labels it may carry (all distinct, then all one name repeated): linear checks."""
    classes = [f"c{i}" for i in range(2000)]
    base = {"task": "classify", "request_id": "big", "images": [{"id": "a", "url": "http://x/a.png"}],
            "classes": classes, "multi_label": True}
    started = time.process_time()
    ANNOTATION_ADAPTER.validate_python({**base, "examples": [{"url": "http://x/e.png", "labels": classes}] * 200})
    with pytest.raises(ValidationError, match=re.escape("200 bad examples: examples[0] repeats labels ['c0']")):
        ANNOTATION_ADAPTER.validate_python({**base, "examples": [{"url": "http://x/e.png", "labels": ["c0"] * 2000}] * 200})
    assert time.process_time() - started < 10  # quadratic checks would take minutes
