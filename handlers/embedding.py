"""The embed task: embed a request's images, store the vectors per part, report duplicates.

Per request: check the output location's fence and the inline bound, pick the model (loading it on first
use), read the ``against`` files, then fetch -> content hash -> embedding cache -> decode+preprocess (the same
path as classify, ``handlers.preprocessing``) -> micro-batched forward (GPU thread) for every image, with the same bounded concurrency and lanes
as classify. Part ``k`` (images ``[k*N, (k+1)*N)``) is written to ``<output>/<request id>/part-<k>.npz``
(``ml.embedding_files``) and its result yielded as soon as its images are done; with ``duplicates`` the
last part carries the duplicate groups (or points to ``duplicates.json`` beside the vectors when they do
not fit). One bad image is an error entry; a bad output location, model or ``against`` file fails the request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

import numpy as np
import structlog
import torch

from handlers.admission import Budget, admit
from handlers.parts import parts_in_order
from handlers.errors import ImageError, InvalidRequest, PermanentError
from handlers.images import DecodeLimits, decoded
from handlers.keys import key_segment
from handlers.storage import ObjectStore
from ml.duplicates import DuplicateInputError, EmbeddingSet, check_embeddings, find_duplicates
from ml.embedding_files import (
    EMBEDDINGS_CONTENT_TYPE,
    EMBEDDINGS_SUFFIX,
    EmbeddingFileError,
    declared_array_bytes,
    read_embeddings,
    write_embeddings,
)
from schemas.annotation import (
    MAX_IMAGE_ERROR_CHARS,
    AnnotationResult,
    DuplicateGroup,
    DuplicateSignals,
    EmbedRequest,
    ImageRef,
    ImageResult,
)
from schemas.common import ErrorInfo

if TYPE_CHECKING:
    from handlers.context import AnnotationContext
    from handlers.model_handles import EmbeddingHandle, LoadedModel

log = structlog.get_logger("cls.embedding")

DUPLICATES_FILE = "duplicates.json"
INLINE_CHARS_PER_VALUE = 10
"""Upper bound of one inline vector component's JSON: ``-0.12345,`` (values are rounded to 5 decimals)."""


def embed_part_size(request: EmbedRequest, configured: int, dim: int, budget_bytes: int) -> int:
    """N for an embed request: the configured part size, lowered so a part's JSON (ids, error entries, inline
    vectors) stays within ``budget_bytes``; depends only on the request and the model, so redeliveries agree."""
    longest_id = max(len(json.dumps(img.id, ensure_ascii=False).encode()) for img in request.images)
    error = len('"error":{"code":"","message":""}') + 64 + 2 * MAX_IMAGE_ERROR_CHARS
    inline = len('"embedding":[],') + dim * INLINE_CHARS_PER_VALUE if request.inline else 0
    per_image = len('{"id":,"predictions":[]},') + longest_id + max(error, inline)
    envelope = 2048 + 2 * 4096  # request id, model descriptor, part fields, embeddings_url (a URL is <= 4096)
    return max(1, min(configured, (budget_bytes - envelope) // per_image))


def part_url(prefix: str, request_id: str, part: int) -> str:
    """Where part ``part`` of ``request_id`` is stored under ``prefix`` (the id as one key segment,
    ``handlers.keys.key_segment``: percent-encoded, never ``..``)."""
    return f"{prefix.rstrip('/')}/{key_segment(request_id)}/part-{part:05d}{EMBEDDINGS_SUFFIX}"


class EmbedHandler:
    """``handle(request) -> async iterator of AnnotationResult parts`` for ``"task": "embed"``."""

    def __init__(self, ctx: AnnotationContext, store: ObjectStore | None) -> None:
        self.ctx = ctx
        self.store = store

    async def handle(self, request: EmbedRequest) -> AsyncIterator[AnnotationResult]:
        ctx = self.ctx
        config = ctx.embed_config
        started = time.monotonic()
        request_id = request.request_id or ""
        images = request.images
        if len(images) > ctx.config.max_images_per_request:
            raise InvalidRequest(f"{len(images)} images; this worker accepts at most "
                                 f"{ctx.config.max_images_per_request} per request")
        if request.inline and len(images) > config.inline_max_images:
            raise InvalidRequest(f"inline vectors for {len(images)} images; inline is limited to "
                                 f"CLS_EMBED_INLINE_MAX_IMAGES={config.inline_max_images} (read the stored files instead)")
        output = request.output_path or config.output_path
        if output is None and not request.inline:
            raise InvalidRequest("no output_path and no default (CLS_EMBED_OUTPUT_PATH): nowhere to store the vectors")
        if output is not None:
            if self.store is None:
                raise PermanentError("storage_unwritable", "this worker has no object storage to write vectors to")
            self.store.check(output)  # blocked_url / unsupported_url before any work
        key = ctx.model_config.key_for(request.model, request.model_variant, request.model_url)
        model: EmbeddingHandle = await ctx.models.get(key)
        against = await self._read_against(request, model.dim)

        budget = ctx.config.part_budget_bytes // (2 if request.duplicates else 1)
        size = embed_part_size(request, ctx.config.part_size, model.dim, budget)
        parts = [images[i:i + size] for i in range(0, len(images), size)]
        priority = request.priority or "bulk"
        window = asyncio.Semaphore(ctx.config.request_window if priority == "bulk" else len(images))

        perceptual: dict[str, int] | None = {} if request.duplicates is not None else None  # content hash -> pHash

        def handle(image: ImageRef) -> Awaitable[tuple[str, torch.Tensor] | ImageResult]:
            return self.embed_image(model, image, request_id, priority, window, perceptual=perceptual)

        all_ids: list[str] = []
        all_hashes: list[str] = []
        all_vectors: list[torch.Tensor] = []
        failed_images = 0
        async with aclosing(parts_in_order(parts, handle)) as stream:
            async for k, part_images, outputs in stream:
                results, ids, hashes, vectors = _part_entries(part_images, outputs, request.inline)
                failed_images += len(part_images) - len(ids)
                url = None
                if output is not None and ids:
                    url = part_url(output, request_id, k)
                    data = await ctx.executors.on_cpu(write_embeddings, ids, torch.stack(vectors).numpy())
                    await self.store.put_bytes(url, data, EMBEDDINGS_CONTENT_TYPE)  # type: ignore[union-attr]
                all_ids += ids
                all_hashes += hashes
                all_vectors += vectors
                duplicates = duplicates_url = None
                if request.duplicates is not None and k == len(parts) - 1:
                    groups = await ctx.executors.on_cpu(
                        duplicate_groups, all_ids, all_hashes, all_vectors, against, request.duplicates.threshold,
                        perceptual)
                    duplicates, duplicates_url = await self._fit_groups(groups, output, request_id, budget)
                yield AnnotationResult.completed_part(
                    request_id, k, len(parts),
                    task="embed",
                    model=model.descriptor,
                    results=results,
                    embeddings_url=url,
                    dim=model.dim,
                    duplicates=duplicates,
                    duplicates_url=duplicates_url,
                )
        log.info("embed_summary", model=model.descriptor.variant, family=model.descriptor.family,
                 images=len(images), failed_images=failed_images, parts=len(parts), part_size=size,
                 batches_shared=ctx.batcher.forget(request_id), seconds=round(time.monotonic() - started, 3))

    async def forward_image(self, model: LoadedModel, image: ImageRef, request_id: str, priority: str,
                            window: asyncio.Semaphore) -> torch.Tensor | ImageResult:
        """One image -> its model output row (the classify forward), or an error entry. The same path as
        ``embed_image`` on the model's classify lane; where the forward is the embedding, the embedding cache
        (by content hash) is shared with embed requests."""
        ctx = self.ctx
        budget = ctx.interactive_semaphore if priority == "interactive" else ctx.images_semaphore
        on_cpu = ctx.executors.on_cpu_first if priority == "interactive" else ctx.executors.on_cpu
        async with window, budget:
            cache = ctx.embedding_cache if model.forward_is_embedding else None
            digest = None
            try:
                data = await ctx.fetcher.fetch(image.url)
                if cache is not None:  # the same bytes, the same model: the embedding an embed request stored
                    digest = await on_cpu(content_hash, data)
                    cached = cache.get(digest, model.key)
                    if cached is not None:
                        return cached
                pixels = await ctx.preprocessor.pixels(data, model, request_id, priority)
            except ImageError as exc:
                return ImageResult(id=image.id, error=ErrorInfo(code=exc.code, message=exc.message))
            # the key's model loaded now: after an eviction and reload, queued images go to the new instance
            current = ctx.models.peek(model.key) or model
            output = await ctx.batcher.submit(model.key, current.forward, pixels, request_id, priority,
                                              stage=current.stage)
            if cache is not None and digest is not None:
                cache.put(digest, model.key, output)
            return output

    async def embed_image(self, model: EmbeddingHandle, image: ImageRef, request_id: str, priority: str,
                          window: asyncio.Semaphore, *, perceptual: dict[str, int] | None = None,
                          ) -> tuple[str, torch.Tensor] | ImageResult:
        """One image -> (content hash, its normalised embedding), or an error entry. The whole path (fenced
        fetch, embedding cache, decode, micro-batched forward) under the lane's budget and the request's
        ``window``; the embed task, few-shot support sets and the audit all embed through here. With
        ``perceptual``, the image's perceptual hash is stored there under its content hash (duplicates)."""
        ctx = self.ctx
        budget = ctx.interactive_semaphore if priority == "interactive" else ctx.images_semaphore
        async with window, budget:
            try:
                data = await ctx.fetcher.fetch(image.url)
                digest = await ctx.executors.on_cpu(content_hash, data)
                if perceptual is not None and digest not in perceptual:
                    perceptual[digest] = await ctx.executors.on_cpu(perceptual_hash_of, data, ctx.preprocessor.limits)
                cached = ctx.embedding_cache.get(digest, model.key) if ctx.embedding_cache else None
                if cached is not None:
                    return digest, cached
                pixels = await ctx.preprocessor.pixels(data, model, request_id, priority)
            except ImageError as exc:
                return ImageResult(id=image.id, error=ErrorInfo(code=exc.code, message=exc.message))
            current = ctx.models.peek(model.key) or model
            vector = await ctx.batcher.submit(current.embed_lane, current.embed, pixels, request_id, priority)
            if ctx.embedding_cache is not None:
                ctx.embedding_cache.put(digest, model.key, vector)
            return digest, vector

    async def _read_against(self, request: EmbedRequest, dim: int) -> list[tuple[str, list[str], np.ndarray]]:
        """(url, ids, vectors) of each 'against' file; invalid_request when one is not an embedding file of ``dim``."""
        if not request.against:
            return []
        if self.store is None:
            raise PermanentError("storage_unwritable", "'against' needs object storage settings")
        limit = self.ctx.embed_config.against_max_bytes
        remaining = limit
        budget = Budget("embed_against", limit, "CLS_EMBED_AGAINST_MAX_MB")
        arrays = 0  # bytes of the arrays read so far, as declared by their headers
        out = []
        for url in request.against:
            data = await self.store.get_bytes(url, max_bytes=remaining)
            remaining -= len(data)
            try:
                declared = await self.ctx.executors.on_cpu(declared_array_bytes, data)
                # a compressed file is bounded by what it holds once read, before it is read
                admit(budget, arrays + declared, f"the arrays of the 'against' files up to {url} once decompressed")
                arrays += declared
                ids, vectors = await self.ctx.executors.on_cpu(read_embeddings, data)
            except EmbeddingFileError as exc:
                raise InvalidRequest(f"against file {url}: {exc}") from exc
            if len(ids) and vectors.shape[1] != dim:
                raise InvalidRequest(f"against file {url} holds {vectors.shape[1]}-d vectors; this model's are {dim}-d "
                                     "(compare embeddings of the same model only)")
            try:  # NaN, zero or unnormalised vectors, repeated ids: refused now, not after the request's parts
                await self.ctx.executors.on_cpu(check_embeddings, list(ids), vectors)
            except DuplicateInputError as exc:
                raise InvalidRequest(f"against file {url}: {exc}") from exc
            out.append((url, ids, vectors))
        return out

    async def _fit_groups(self, groups: list[DuplicateGroup], output: str | None, request_id: str,
                          budget: int) -> tuple[list[DuplicateGroup], str | None]:
        """The groups that fit the last part's budget; all of them in ``duplicates.json`` when some do not."""
        kept: list[DuplicateGroup] = []
        used = 0
        for group in groups:
            used += len(group.model_dump_json().encode()) + 1  # bytes: ids may be any Unicode
            if used > budget // 2:
                break
            kept.append(group)
        if len(kept) == len(groups):
            return kept, None
        if output is None or self.store is None:
            log.warning("duplicates_truncated", request_id=request_id, groups=len(groups), reported=len(kept))
            return kept, None
        url = part_url(output, request_id, 0).rsplit("/", 1)[0] + "/" + DUPLICATES_FILE
        body = json.dumps([g.model_dump() for g in groups]).encode()
        await self.store.put_bytes(url, body, "application/json")
        return kept, url


def perceptual_hash_of(data: bytes, limits: DecodeLimits) -> int:
    """The 64-bit DCT perceptual hash (``ml.perceptual_hash``) of the image ``data``, decoded under ``limits``."""
    from ml.perceptual_hash import perceptual_hash

    with decoded(data, limits) as image:
        return perceptual_hash(image)


def content_hash(data: bytes) -> str:
    """The image's identity for the embedding cache and exact duplicates: SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def _part_entries(images: Sequence[ImageRef], outputs: list, inline: bool
                  ) -> tuple[list[ImageResult], list[str], list[str], list[torch.Tensor]]:
    results: list[ImageResult] = []
    ids: list[str] = []
    hashes: list[str] = []
    vectors: list[torch.Tensor] = []
    for image, out in zip(images, outputs, strict=True):
        if isinstance(out, ImageResult):
            results.append(out)
            continue
        digest, vector = out
        ids.append(image.id)
        hashes.append(digest)
        vectors.append(vector.float())
        embedding = None
        if inline:  # float16 precision, as stored: the same numbers the file holds
            embedding = [round(v, 5) for v in vector.to(torch.float16).float().tolist()]
        results.append(ImageResult(id=image.id, embedding=embedding))
    return results, ids, hashes, vectors


def duplicate_groups(ids: list[str], hashes: list[str], vectors: list[torch.Tensor],
                     against: list[tuple[str, list[str], np.ndarray]], threshold: float,
                     perceptual: dict[str, int] | None = None) -> list[DuplicateGroup]:
    """Exact groups (same content hash) and near groups among the request's images and the 'against' files
    (their ids as ``<url>#<id>``), by :func:`ml.duplicates.find_duplicates`: cosine >= threshold, or a
    perceptual hash within its default distance (``perceptual``: content hash -> pHash; the 'against' files
    hold vectors only, so they match by cosine). ``signals``: the lowest cosine and the largest hash distance
    among the links that joined a group.

    A near group lists every image linked to it; byte-identical images inside it are also listed as an exact
    group (so an id may be in one exact and one near group). ``similarity``: the lowest similarity among the
    pairs that joined the group. Not truncated here (the caller moves groups that do not fit the record to a
    file): the request's size bounds them."""
    if not ids:
        return []
    earlier = None
    if against:
        seen: set[str] = set()
        earlier_ids, rows = [], []
        for url, file_ids, file_vectors in against:
            for row, file_id in enumerate(file_ids):
                name = f"{url}#{file_id}"
                if name not in seen:  # the same file named twice: compare it once
                    seen.add(name)
                    earlier_ids.append(name)
                    rows.append(file_vectors[row])
        if earlier_ids:
            earlier = EmbeddingSet(ids=earlier_ids, vectors=np.stack(rows).astype(np.float32))
    total = len(ids) + (len(earlier.ids) if earlier else 0)
    phashes = None
    if perceptual is not None and all(h in perceptual for h in hashes):
        phashes = np.array([perceptual[h] for h in hashes], dtype=np.uint64)
    report = find_duplicates(ids, torch.stack(vectors).float().numpy(), hashes=hashes, threshold=threshold,
                             earlier=earlier, max_groups=total, max_group_size=total, perceptual_hashes=phashes)
    hash_of = dict(zip(ids, hashes, strict=True))
    groups: list[DuplicateGroup] = []
    for group in report.groups:
        if group.kind == "near":
            same_bytes: dict[str, list[str]] = {}
            for image_id in group.ids:
                same_bytes.setdefault(hash_of[image_id], []).append(image_id)
            groups += [DuplicateGroup(ids=members, kind="exact", similarity=1.0)
                       for members in same_bytes.values() if len(members) > 1]
        similarity = round(max(-1.0, min(1.0, group.min_similarity)), 6)
        signals = DuplicateSignals(cosine=similarity, hash_distance=group.hash_distance) if group.kind == "near" else None
        groups.append(DuplicateGroup(ids=[*group.ids, *group.earlier_ids], kind=group.kind, similarity=similarity,
                                     signals=signals))
    return groups
