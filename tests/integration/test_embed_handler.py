"""The embed task in-process: real HTTP fetching, real decoding, real tiny models (random weights), vectors
written to the real S3 API (moto on loopback) and read back with numpy; duplicates, the embedding cache
shared with classify, and hostile requests that must end in typed errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from consumers.annotation_worker import annotation_context
from consumers.settings import KafkaSettings, Settings, WorkerSettings
from handlers.annotation import AnnotationHandler
from handlers.errors import PermanentError
from ml.backbones import load_image_embedder
from schemas.annotation import AnnotationRequest, EmbedRequest
from schemas.codec import ANNOTATION_ADAPTER

TINY = {"clip_variant": "cls-tiny-clip", "clip_weights": "random", "default_prompt_templates": "a photo of a {}.",
        "timm_weights": "random"}
PHOTOS = ["astronaut_jpg", "coffee_jpg", "chelsea_png"]


def settings(**overrides) -> Settings:
    values = {**TINY, "allow_private_networks": True, "fetch_read_timeout_s": 1.0, "fetch_total_timeout_s": 8.0,
              "fetch_connect_timeout_s": 2.0, "fetch_max_bytes": 4 * 1024 * 1024, "batch_wait_ms": 5.0,
              "embed_inline_max_images": 8, **overrides}
    return Settings(kafka=KafkaSettings(), worker=WorkerSettings(**values))


def embed(images: list[tuple[str, str]], request_id: str = "e1", **extra) -> EmbedRequest:
    body = {"task": "embed", "model": "clip", "request_id": request_id,
            "images": [{"id": i, "url": u} for i, u in images], **extra}
    return EmbedRequest.model_validate(body)


async def collect(handler: AnnotationHandler, req):
    return [part async for part in handler.handle(req)]


async def read_npz(s3_server, url: str) -> tuple[list[str], np.ndarray]:
    bucket, key = url[len("s3://"):].split("/", 1)
    async with s3_server.client() as client:
        body = await (await client.get_object(Bucket=bucket, Key=key))["Body"].read()
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:  # numpy alone, no project code
        return npz["ids"].tolist(), npz["embeddings"]


@pytest.fixture(scope="module")
async def ctx(s3_server):
    async with annotation_context(settings(result_part_size=2, embedding_cache_mb=16)) as context:
        yield context


async def test_embed_writes_parts_to_s3_that_numpy_reads_back(ctx, http_server, s3_server, s3_bucket):
    names = PHOTOS + ["not_found", "truncated_jpg"]
    req = embed([(n, http_server.urls[n]) for n in names], "emb-parts", output_path=f"s3://{s3_bucket}/vectors",
                inline=True)
    parts = await collect(AnnotationHandler(ctx), req)
    assert [p.part for p in parts] == [0, 1, 2] and {p.parts for p in parts} == {3}
    assert all(p.task == "embed" and p.status == "completed" and p.dim == 32 for p in parts), parts[0]
    results = [r for p in parts for r in p.results]
    assert [r.id for r in results] == names
    assert [r.error.code for r in results[3:]] == ["http_status", "decode_failed"]
    # the reference: the same model, loaded directly, on the same bytes
    reference = load_image_embedder("clip", "cls-tiny-clip", "random", device="cpu")
    photos = [Image.open(io.BytesIO(http_server.body(n))).convert("RGB") for n in PHOTOS]
    expected = reference.embed_images(photos).numpy()
    stored_ids, stored = [], []
    for p in parts:
        if p.embeddings_url is None:
            assert all(r.error for r in p.results)  # a part with no vector has no file
            continue
        assert p.embeddings_url == f"s3://{s3_bucket}/vectors/emb-parts/part-{p.part:05d}.npz"
        ids, vectors = await read_npz(s3_server, p.embeddings_url)
        stored_ids += ids
        stored.append(vectors)
    assert stored_ids == PHOTOS
    matrix = np.concatenate(stored)
    assert matrix.dtype == np.float16
    np.testing.assert_allclose(matrix.astype(np.float32), expected, atol=2e-3, rtol=0)
    inline = np.array([r.embedding for r in results[:3]], dtype=np.float32)
    np.testing.assert_allclose(inline, matrix.astype(np.float32), atol=1e-4, rtol=0)


async def test_cache_is_shared_by_embed_and_classify(ctx, http_server, s3_bucket):
    cache = ctx.embedding_cache
    handler = AnnotationHandler(ctx)
    images = [(f"c-{n}", http_server.urls[n]) for n in PHOTOS]
    await collect(handler, embed(images, "cache-1", output_path=f"s3://{s3_bucket}/c"))
    hits, size = cache.hits, len(cache)
    assert size >= 3 and cache.bytes <= cache.max_bytes
    await collect(handler, embed(images, "cache-2", output_path=f"s3://{s3_bucket}/c"))
    assert cache.hits == hits + 3 and len(cache) == size  # the same bytes are not embedded twice
    classify = AnnotationRequest.model_validate({"task": "classify", "model": "clip", "request_id": "cache-3",
                                                 "images": [{"id": i, "url": u} for i, u in images],
                                                 "classes": ["cat", "dog"], "top_k": 2, "threshold": 0.0})
    parts = await collect(handler, classify)
    assert cache.hits == hits + 6 and all(r.predictions for r in parts[0].results)


async def test_duplicates_exact_near_and_against_earlier_files(ctx, http_server, s3_server, s3_bucket):
    photo = http_server.body("astronaut_jpg")
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, "PNG")  # the same pixels, other bytes: a near-duplicate
    copy_url = http_server.add("dup/copy.jpg", photo, content_type="image/jpeg")
    png_url = http_server.add("dup/copy.png", png.getvalue(), content_type="image/png")
    images = [("orig", http_server.urls["astronaut_jpg"]), ("copy", copy_url), ("png", png_url),
              ("cat", http_server.urls["chelsea_png"])]
    handler = AnnotationHandler(ctx)
    parts = await collect(handler, embed(images, "dup-1", output_path=f"s3://{s3_bucket}/d",
                                         duplicates={"threshold": 0.995}))
    assert all(p.duplicates is None for p in parts[:-1])
    groups = {(g.kind, tuple(g.ids)) for g in parts[-1].duplicates}
    assert ("exact", ("orig", "copy")) in groups
    near = [g for g in parts[-1].duplicates if g.kind == "near"]
    assert len(near) == 1 and set(near[0].ids) == {"orig", "copy", "png"} or set(near[0].ids) == {"orig", "png"} \
        or set(near[0].ids) == {"copy", "png"}, parts[-1].duplicates
    assert "cat" not in {i for g in parts[-1].duplicates for i in g.ids}
    earlier = [p.embeddings_url for p in parts if p.embeddings_url]
    again = await collect(handler, embed([("new", png_url), ("other", http_server.urls["coffee_jpg"])], "dup-2",
                                         output_path=f"s3://{s3_bucket}/d", duplicates={"threshold": 0.995},
                                         against=earlier))
    found = {i for g in again[-1].duplicates for i in g.ids}
    assert "new" in found and any(i.startswith(earlier[0] + "#") for i in found) and "other" not in found


async def test_timm_backbone_by_name(ctx, http_server, s3_server, s3_bucket):
    parts = await collect(AnnotationHandler(ctx), embed([("a", http_server.urls["astronaut_jpg"])], "timm-1",
                                                        model="timm", model_variant="resnet10t",
                                                        output_path=f"s3://{s3_bucket}/t"))
    assert parts[0].model.family == "timm" and parts[0].dim == 512
    ids, vectors = await read_npz(s3_server, parts[0].embeddings_url)
    assert ids == ["a"] and abs(float(np.linalg.norm(vectors[0].astype(np.float32))) - 1) < 1e-2


async def test_hostile_requests_end_in_typed_errors(ctx, http_server, s3_bucket, tmp_path):
    handler = AnnotationHandler(ctx)
    url = http_server.urls["astronaut_jpg"]

    async def code_of(req) -> str:
        with pytest.raises(PermanentError) as err:
            await collect(handler, req)
        return err.value.code

    many = [(f"i{k}", url) for k in range(9)]
    assert await code_of(embed(many, "inline-big", inline=True, output_path=f"s3://{s3_bucket}/x")) == "invalid_request"
    assert await code_of(embed([("a", url)], "no-output")) == "invalid_request"  # no default configured here
    assert await code_of(embed([("a", url)], "fence", output_path=f"file://{tmp_path}/x")) == "blocked_url"
    assert await code_of(embed([("a", url)], "timm-unknown", model="timm", model_variant="no_such_net_42",
                               output_path=f"s3://{s3_bucket}/x")) == "model_unavailable"
    assert await code_of(embed([("a", url)], "timm-big", model="timm", model_variant="vit_giant_patch14_224",
                               output_path=f"s3://{s3_bucket}/x")) == "model_unavailable"  # not on the allow-list
    assert await code_of(embed([("a", url)], "against-bad", output_path=f"s3://{s3_bucket}/x",
                               duplicates={}, against=[http_server.urls["astronaut_jpg"].replace("http", "s3", 1)])
                         ) in ("storage_not_found", "blocked_url", "storage_forbidden")
    for body in (
        {"output_path": "http://example.com/x"},  # not a storage scheme
        {"output_path": "ftp://example.com/x"},
        {"images": [{"id": f"i{k}", "url": url} for k in range(10_001)]},  # the contract's own bound
        {"against": ["s3://b/x.npz"]},  # against without duplicates
        {"duplicates": {"threshold": 1.5}},
        {"model": "timm"},  # no model name
        {"model": "custom"},  # no package
    ):
        base = {"task": "embed", "request_id": "h", "images": [{"id": "a", "url": url}]}
        with pytest.raises(ValidationError):
            ANNOTATION_ADAPTER.validate_python({**base, **body})


async def test_against_file_that_is_not_an_embedding_file(ctx, http_server, s3_server, s3_bucket):
    async with s3_server.client() as client:
        await client.put_object(Bucket=s3_bucket, Key="junk.npz", Body=b"PK\x03\x04 not really")
    req = embed([("a", http_server.urls["astronaut_jpg"])], "against-junk", output_path=f"s3://{s3_bucket}/x",
                duplicates={}, against=[f"s3://{s3_bucket}/junk.npz"])
    with pytest.raises(PermanentError) as err:
        await collect(AnnotationHandler(ctx), req)
    assert err.value.code == "invalid_request" and "junk.npz" in err.value.message


def test_embed_cache_bound_in_bytes():
    from ml.embedding_cache import ENTRY_OVERHEAD_BYTES, EmbeddingCache

    row = torch.ones(100)
    cache = EmbeddingCache(max_bytes=3 * (400 + ENTRY_OVERHEAD_BYTES))
    for k in range(10):
        cache.put(f"h{k}", "m", row)
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert cache.get("h0", "m") is None and cache.get("h9", "m") is not None
    EmbeddingCache(0).put("h", "m", row)  # disabled: nothing stored, nothing raised
    huge = EmbeddingCache(100)
    huge.put("h", "m", torch.ones(10_000))
    assert len(huge) == 0


async def test_against_file_with_unusable_vectors_is_refused_before_any_part(ctx, http_server, s3_server, s3_bucket):
    from ml.embedding_files import write_embeddings

    url = http_server.urls["astronaut_jpg"]
    handler = AnnotationHandler(ctx)
    dim = (await collect(handler, embed([("a", url)], "dim", output_path=f"s3://{s3_bucket}/x")))[-1].dim
    good = np.zeros((2, dim), np.float32)
    good[:, 0] = 1.0
    files = {"nan": (["p", "q"], np.where(np.arange(2)[:, None] == 1, np.nan, good), "'q' is not finite"),
             "zero": (["p", "q"], good * np.array([[1.0], [0.0]], np.float32), "'q' is zero"),
             "scaled": (["p", "q"], good * 3, "'p' is not L2-normalised"),
             "repeated": (["p", "p"], good, "repeat")}
    for name, (ids, vectors, message) in files.items():
        async with s3_server.client() as client:
            await client.put_object(Bucket=s3_bucket, Key=f"{name}.npz", Body=write_embeddings(ids, vectors))
        req = embed([("a", url)], f"against-{name}", output_path=f"s3://{s3_bucket}/x", duplicates={},
                    against=[f"s3://{s3_bucket}/{name}.npz"])
        with pytest.raises(PermanentError) as err:
            await collect(handler, req)
        assert err.value.code == "invalid_request" and f"{name}.npz" in err.value.message, err.value.message
        assert message in err.value.message, err.value.message


async def test_a_compressed_against_file_is_bounded_by_its_declared_arrays(s3_server, http_server, s3_bucket):
    """A savez_compressed file of valid vectors (all alike: ~1000:1) is tiny as stored and large once read: its
    .npy headers declare the size, which is checked against CLS_EMBED_AGAINST_MAX_MB before anything is read."""
    from handlers.admission import REFUSED

    async with annotation_context(settings(embed_against_max_mb=4)) as context:
        handler = AnnotationHandler(context)
        url = http_server.urls["astronaut_jpg"]
        dim = (await collect(handler, embed([("a", url)], "dim-c", output_path=f"s3://{s3_bucket}/x")))[-1].dim
        rows = 2 * 1024 * 1024 // dim * 4  # 8 MiB of float16 vectors
        vectors = np.zeros((rows, dim), np.float16)
        vectors[:, 0] = 1.0
        buffer = io.BytesIO()
        np.savez_compressed(buffer, ids=np.array([f"{i:07d}" for i in range(rows)]), embeddings=vectors)
        assert len(buffer.getvalue()) < 1024 * 1024  # well within 4 MB as stored
        async with s3_server.client() as client:
            await client.put_object(Bucket=s3_bucket, Key="compressed.npz", Body=buffer.getvalue())
        refused_before = REFUSED.labels("embed_against")._value.get()
        req = embed([("a", url)], "against-compressed", output_path=f"s3://{s3_bucket}/x", duplicates={},
                    against=[f"s3://{s3_bucket}/compressed.npz"])
        with pytest.raises(PermanentError) as err:
            await collect(handler, req)
    assert err.value.code == "invalid_request", err.value
    assert "> budget 4 MiB (CLS_EMBED_AGAINST_MAX_MB)" in err.value.message and "compressed.npz" in err.value.message
    assert REFUSED.labels("embed_against")._value.get() == refused_before + 1
