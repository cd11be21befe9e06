"""The annotation handler in-process (real HTTP fetching, real decoding, real open_clip model with
random weights): bad images, private networks, parts, batching, text cache."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import pytest
import torch
from PIL import Image

from consumers.annotation_worker import annotation_context, decode_limits
from consumers.settings import KafkaSettings, Settings, WorkerSettings
from handlers.annotation import AnnotationHandler, rank
from handlers.errors import ImageError, PermanentError
from handlers.images import batched_jpeg_size
from handlers.preprocessing import Preprocessor
from schemas.annotation import AnnotationRequest, EmbedRequest

TINY = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}."}


def settings(**overrides) -> Settings:
    # embedding cache off: these tests count forwards and shared batches (tests/integration/test_embed_handler.py
    # covers the cache)
    values = {**TINY, "embedding_cache_mb": 0, "allow_private_networks": True, "fetch_read_timeout_s": 1.0, "fetch_total_timeout_s": 8.0,
              "fetch_connect_timeout_s": 2.0, "fetch_max_bytes": 4 * 1024 * 1024, "batch_wait_ms": 20.0, **overrides}
    return Settings(kafka=KafkaSettings(), worker=WorkerSettings(**values))


def request(images: list[tuple[str, str]], request_id: str = "r1", **extra) -> AnnotationRequest:
    body = {"task": "classify", "model": "clip", "request_id": request_id,
            "images": [{"id": i, "url": u} for i, u in images], "classes": ["cat", "dog", "bird", "person"],
            "top_k": 3, "threshold": 0.0, **extra}
    return AnnotationRequest.model_validate(body)


async def collect(handler: AnnotationHandler, req: AnnotationRequest):
    return [part async for part in handler.handle(req)]


@pytest.fixture(scope="module")
async def tiny_ctx():
    async with annotation_context(settings()) as ctx:
        yield ctx


async def test_every_bad_image_gets_its_own_error_entry(tiny_ctx, http_server):
    good = ["astronaut_jpg", "chelsea_png", "coffee_jpg", "cmyk_jpg", "gray16_png", "animated_gif",
            "palette_transparent_png", "exif_rotated_jpg"]
    bad = ["not_found", "slow_body", "not_an_image", "truncated_jpg", "bomb_png", "oversized_chunked"]
    images = [(name, http_server.urls[name]) for name in good + bad]
    parts = await collect(AnnotationHandler(tiny_ctx), request(images))
    assert len(parts) == 1
    results = {r.id: r for r in parts[0].results}
    assert [r.id for r in parts[0].results] == good + bad  # request order, one entry per image
    for name in good:
        assert results[name].error is None, results[name]
        assert len(results[name].predictions) == 3
        confidences = [p.confidence for p in results[name].predictions]
        assert confidences == sorted(confidences, reverse=True)
        assert results[name].margin is not None and results[name].margin >= 0
    for name in bad:
        assert results[name].predictions == []
        assert results[name].error.code == http_server.expected_errors[name], (name, results[name].error)
    assert parts[0].model.family == "clip" and parts[0].model.weights == "random"


async def test_private_addresses_blocked_by_default(http_server):
    async with annotation_context(settings(allow_private_networks=False)) as ctx:
        images = [("loopback", http_server.urls["astronaut_jpg"]), ("metadata", "http://169.254.169.254/latest/x.jpg"),
                  ("localhost", "http://localhost:1/x.png"), ("ten", "http://10.1.2.3/x.png"),
                  ("file", "file:///etc/passwd")]
        parts = await collect(AnnotationHandler(ctx), request(images))
        for result in parts[0].results:
            assert result.error is not None and result.error.code == "blocked_url", result


async def test_large_request_answered_in_parts_in_order(http_server):
    small = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(small, "PNG")
    urls = [http_server.add(f"parts/{i}.png", small.getvalue(), content_type="image/png") for i in range(4)]
    n = 2000
    images = [(f"image-{i:05d}", urls[i % 4]) for i in range(n)]
    async with annotation_context(settings(result_part_size=300, batch_size=64)) as ctx:
        parts = await asyncio.wait_for(collect(AnnotationHandler(ctx), request(images, "big")), timeout=240)
    assert [p.part for p in parts] == list(range(7))
    assert {p.parts for p in parts} == {7}
    ids = [r.id for p in parts for r in p.results]
    assert ids == [i for i, _ in images]  # every image exactly once, in request order
    for k, p in enumerate(parts):
        assert [r.id for r in p.results] == [i for i, _ in images[k * 300:(k + 1) * 300]]
        assert len(p.to_json_bytes()) < 1_000_000
        assert all(r.error is None for r in p.results)
    assert len({p.message_id for p in parts}) == 7


async def test_part_size_shrinks_for_long_ids_and_classes(tiny_ctx, http_server):
    from handlers.parts import part_size_for

    long = request([("x" * 250, http_server.urls["astronaut_jpg"])], classes=[f"{'c' * 190}{i}" for i in range(50)], top_k=50)
    n = part_size_for(long, 500, long.classes)
    assert n < 500
    worst = n * (250 * 2 + 50 * (200 * 2 + 60) + 200)
    assert worst < 1_000_000


async def test_concurrent_requests_share_batches_and_text_cache_hits(tiny_ctx, http_server):
    handler = AnnotationHandler(tiny_ctx)
    model = await tiny_ctx.models.get(tiny_ctx.model_config.key_for("clip", None))
    cache = model.model.text_cache
    names = ["astronaut_jpg", "coffee_jpg", "chelsea_png", "camera_png"]
    classes = ["zebra", "lighthouse", "teapot"]
    before_misses, before_hits = cache.misses, cache.hits
    shared_before = tiny_ctx.batcher.stats.multi_request_batches
    a = request([(f"a{i}", http_server.urls[n]) for i, n in enumerate(names)], "conc-a", classes=classes)
    b = request([(f"b{i}", http_server.urls[n]) for i, n in enumerate(names)], "conc-b", classes=classes)
    parts_a, parts_b = await asyncio.gather(collect(handler, a), collect(handler, b))
    assert tiny_ctx.batcher.stats.multi_request_batches > shared_before  # images of both in one forward
    assert cache.misses == before_misses + 1  # the class list was embedded once ...
    assert cache.hits >= before_hits + 1  # ... and the other request hit the cache
    # same images, same classes: same confidences whichever batch they were in
    for ra, rb in zip(parts_a[0].results, parts_b[0].results, strict=True):
        assert [p.class_name for p in ra.predictions] == [p.class_name for p in rb.predictions]
        for pa, pb in zip(ra.predictions, rb.predictions, strict=True):
            assert pa.confidence == pytest.approx(pb.confidence, abs=1e-5)


async def test_redelivered_request_yields_identical_ids_and_results(tiny_ctx, http_server):
    handler = AnnotationHandler(tiny_ctx)
    req = request([(n, http_server.urls[n]) for n in ("astronaut_jpg", "not_found")], "same")
    first = await collect(handler, req)
    second = await collect(handler, req)
    assert [p.message_id for p in first] == [p.message_id for p in second]
    strip = lambda parts: [json.loads(p.to_json_bytes()) | {"created_at": None} for p in parts]  # noqa: E731
    assert strip(first) == strip(second)


async def test_unknown_variant_is_model_unavailable(tiny_ctx, http_server):
    req = request([("a", http_server.urls["astronaut_jpg"])], model_variant="no-such-arch")
    with pytest.raises(PermanentError) as err:
        await collect(AnnotationHandler(tiny_ctx), req)
    assert err.value.code == "model_unavailable"


def test_rank_applies_top_k_then_threshold_and_margin():
    conf = torch.tensor([0.1, 0.5, 0.15, 0.25])
    preds, margin = rank(conf, ["a", "b", "c", "d"], top_k=3, threshold=0.2)
    assert [(p.class_name, p.confidence) for p in preds] == [("b", 0.5), ("d", 0.25)]
    assert margin == pytest.approx(0.25)


async def test_siglip_family_gives_independent_sigmoids(http_server):
    async with annotation_context(settings(siglip_variant="cls-tiny-siglip", siglip_weights="random")) as ctx:
        req = request([(n, http_server.urls[n]) for n in ("astronaut_jpg", "coffee_jpg")], "sig", model="siglip",
                      top_k=4)
        parts = await collect(AnnotationHandler(ctx), req)
    assert parts[0].model.family == "siglip" and parts[0].model.variant == "cls-tiny-siglip"
    for result in parts[0].results:
        assert len(result.predictions) == 4
        assert all(0.0 <= p.confidence <= 1.0 for p in result.predictions)
        assert abs(sum(p.confidence for p in result.predictions) - 1.0) > 1e-3  # not a softmax


# -- prompt volume -------------------------------------------------------------------------------


async def test_default_templates_count_towards_the_prompt_limit(http_server):
    templates = "|".join(f"photo {i} of a {{}}." for i in range(81))  # 2,000 classes x 81 > MAX_PROMPTS
    async with annotation_context(settings(default_prompt_templates=templates)) as ctx:
        req = request([("a", http_server.urls["astronaut_jpg"])], classes=[f"class {i}" for i in range(2000)])
        with pytest.raises(PermanentError) as err:
            await collect(AnnotationHandler(ctx), req)
    assert err.value.code == "invalid_request"
    assert "MAX_PROMPTS" in err.value.message and "default templates" in err.value.message, err.value.message


async def test_prompts_rendered_and_tokenised_after_the_cache_lookup_off_the_gpu_thread(tiny_ctx):
    model = await tiny_ctx.models.get(tiny_ctx.model_config.key_for("clip", None))
    threads: list[str] = []
    original = model.model.tokenize_prompts

    def recording(*args):
        threads.append(threading.current_thread().name)
        return original(*args)

    model.model.tokenize_prompts = recording
    try:
        classes = [f"thing {i}" for i in range(150)]  # 150 prompts: 3 chunks of 64
        text, hit = await model.prepare(classes, ["a photo of a {}."], tiny_ctx.executors)
        assert not hit and len(threads) == 3
        assert all(name.startswith("cls-cpu") for name in threads), threads
        same = model.model.text_embeddings(classes, ["a photo of a {}."])  # the sync path agrees (cache hit)
        assert same is text
        model.model.text_cache.clear()
        reference = model.model.text_embeddings(classes, ["a photo of a {}."])  # computed in one thread
        assert torch.allclose(reference, text, atol=1e-5)
        threads.clear()
        again, hit = await model.prepare(classes, ["a photo of a {}."], tiny_ctx.executors)
        assert hit and threads == []  # a cache hit renders and tokenises nothing
    finally:
        del model.model.tokenize_prompts


async def test_batched_jpeg_decode_gives_the_per_image_results_and_errors(http_server):
    """CLS_GPU_DECODE's path with the CPU standing in for CUDA (tests/cuda runs it on a GPU): baseline JPEGs of
    concurrent requests are decoded in shared batches; every other image, and any the batched decoder refuses,
    takes the per-image CPU path with its errors; classify and embed give the per-image path's results."""
    names = ["astronaut_jpg", "coffee_jpg", "exif_rotated_jpg", "china_jpg", "flower_jpg", "cmyk_jpg", "chelsea_png",
             "truncated_jpg", "not_an_image", "bomb_png"]
    images = [(name, http_server.urls[name]) for name in names]
    taken, refused = set(), set()
    for name in names:
        try:
            (taken if batched_jpeg_size(http_server.body(name), decode_limits(settings())) else refused).add(name)
        except ImageError:
            pass  # refused by the header checks: the same error entry on both paths
    assert {"astronaut_jpg", "coffee_jpg", "exif_rotated_jpg"} <= taken and {"cmyk_jpg", "chelsea_png", "truncated_jpg"} <= refused

    def embed(request_id: str) -> EmbedRequest:
        return EmbedRequest.model_validate({"task": "embed", "model": "clip", "request_id": request_id, "inline": True,
                                            "images": [{"id": i, "url": u} for i, u in images]})

    async with annotation_context(settings()) as ctx:
        handler = AnnotationHandler(ctx)
        model = await ctx.models.get(ctx.model_config.key_for("clip", None))
        assert ctx.preprocessor.batched_device(model) is None  # a model on the CPU: per-image decoding
        reference = (await collect(handler, request(images, "per-image")))[0].results
        reference_embed = (await collect(handler, embed("per-image-embed")))[0].results
        batched = Preprocessor("tensor", ctx.decode_limits, ctx.executors, gpu_decode=True, max_batch=16,
                               max_wait_ms=100, batched_device_types=frozenset({"cpu"}))
        ctx.preprocessor = batched
        try:
            assert batched.batched_device(model) == torch.device("cpu")
            parts_a, parts_b, parts_embed = await asyncio.gather(
                collect(handler, request(images, "batched-a")), collect(handler, request(images, "batched-b")),
                collect(handler, embed("batched-embed")))
        finally:
            await batched.close()
    stats = batched.decode_batcher.stats
    assert stats.images == 3 * len(taken) and stats.batches < stats.images  # decoded together, across requests
    assert stats.multi_request_batches >= 1
    assert batched.fallbacks == 3 * len(refused)  # embed's images took the same Preprocessor as classify's
    for results in (parts_a[0].results, parts_b[0].results):
        for got, expected in zip(results, reference, strict=True):
            assert got.id == expected.id
            assert (got.error and got.error.code) == (expected.error and expected.error.code), got.id
            assert [p.class_name for p in got.predictions] == [p.class_name for p in expected.predictions], got.id
            for p, q in zip(got.predictions, expected.predictions, strict=True):
                assert abs(p.confidence - q.confidence) < 1e-5, got.id
    for got, expected in zip(parts_embed[0].results, reference_embed, strict=True):
        assert (got.error and got.error.code) == (expected.error and expected.error.code), got.id
        if expected.embedding is not None:
            assert got.embedding is not None
            assert max(abs(a - b) for a, b in zip(got.embedding, expected.embedding, strict=True)) < 2e-3, got.id


async def test_interactive_images_decode_while_bulk_decodes_fill_the_cpu_pool(tiny_ctx, http_server):
    """Every CPU-pool thread busy (bulk decodes) and more work queued behind them: an interactive request is
    still decoded, classified and answered; a bulk one waits for the pool (its parts arrive after)."""
    handler = AnnotationHandler(tiny_ctx)
    images = [("i0", http_server.urls["astronaut_jpg"])]
    await collect(handler, request(images, "warm-classes"))  # the class embeddings cached: no CPU-pool work left
    release = threading.Event()
    workers = tiny_ctx.executors.cpu._max_workers
    blockers = [tiny_ctx.executors.cpu.submit(release.wait, 30) for _ in range(workers + 4)]  # bounded waits
    try:
        bulk = asyncio.create_task(collect(handler, request(images, "bulk-behind", priority="bulk")))
        parts = await asyncio.wait_for(collect(handler, request(images, "ui", priority="interactive")), timeout=20)
        assert parts[0].results[0].error is None and parts[0].results[0].predictions
        assert not bulk.done()  # the bulk image is still queued behind the busy pool
    finally:
        release.set()
    assert (await asyncio.wait_for(bulk, timeout=30))[0].results[0].error is None
    assert all(b.result(timeout=5) for b in blockers)


@pytest.mark.parametrize("top_k, expected", [(None, 2), (2, 2), (10, 2), (1, 1)])
async def test_top_k_unset_equal_larger_smaller_than_the_classes(tiny_ctx, http_server, top_k, expected):
    """Unset: min(3, classes); above the class count: all the classes; never an invalid request."""
    body = {"task": "classify", "model": "clip", "request_id": f"topk-{top_k}", "classes": ["cat", "dog"],
            "images": [{"id": "a", "url": http_server.urls["astronaut_jpg"]}], "threshold": 0.0}
    if top_k is not None:
        body["top_k"] = top_k
    parts = await collect(AnnotationHandler(tiny_ctx), AnnotationRequest.model_validate(body))
    (result,) = parts[0].results
    assert len(result.predictions) == expected
    names = [p.class_name for p in result.predictions]
    assert len(set(names)) == len(names) and set(names) <= {"cat", "dog"}
