"""Zero-shot text embeddings for a person waiting: the quick set at once, the ensemble in the background, the
disk cache across restarts and ``cls-worker prefetch --classes`` (in-process handler, real HTTP fetching, tiny
open_clip model with random weights)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import torch

from consumers.annotation_worker import annotation_context
from handlers.annotation import AnnotationHandler
from ml.text_cache import text_cache_key
from ml.zeroshot import DEFAULT_TEMPLATES
from schemas.annotation import AnnotationRequest
from testkit.handler_calls import collect, tiny_settings

REPO = Path(__file__).resolve().parents[2]
FULL = DEFAULT_TEMPLATES[:8]  # the worker's "full" ensemble here: 8 templates keep the tiny model's pass short
QUICK = "a photo of a {}."


def request(images: list[tuple[str, str]], request_id: str, **extra) -> AnnotationRequest:
    return AnnotationRequest.model_validate({"task": "classify", "model": "clip", "request_id": request_id,
                                             "images": [{"id": i, "url": u} for i, u in images], "top_k": 1,
                                             "threshold": 0.0, **extra})


def text_settings(cache_dir: Path | None, **overrides):
    return tiny_settings(embedding_cache_mb=0, batch_wait_ms=20.0, default_prompt_templates="|".join(FULL), quick_prompt_templates=QUICK,
                    text_cache_dir=str(cache_dir) if cache_dir else None, **overrides)


def count_prompts(ctx) -> list[int]:
    """Prompts through the tiny CLIP's text tower from now on (a forward hook on its first text module)."""
    seen = [0]
    clip = ctx.models.peek(next(iter(ctx.models._loaded)))
    clip.model.module.token_embedding.register_forward_hook(lambda _m, args, _o: seen.__setitem__(0, seen[0] + args[0].shape[0]))
    return seen


async def wait_background(ctx, timeout_s: float = 30.0) -> None:
    passes = ctx.models.text_passes
    deadline = asyncio.get_running_loop().time() + timeout_s
    while passes.background_jobs and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert passes.background_jobs == 0, "the background ensemble did not finish"


def reference(clip, classes: list[str], templates: list[str]) -> torch.Tensor:
    """The ensemble computed the plain way (no caches) on the same model."""
    disk, clip.disk_cache = clip.disk_cache, None
    try:
        clip.text_cache.clear()
        return clip.text_embeddings(classes, templates)
    finally:
        clip.disk_cache = disk


async def test_interactive_gets_quick_then_full_bulk_gets_full(http_server, tmp_path):
    url = http_server.urls["astronaut_jpg"]
    async with annotation_context(text_settings(None)) as ctx:
        handler = AnnotationHandler(ctx)
        await collect(handler, request([("warm", url)], "warm", classes=["x", "y"], priority="bulk"))
        prompts = count_prompts(ctx)
        handle = ctx.models.peek(next(iter(ctx.models._loaded)))
        clip = handle.model
        classes = ["cat", "dog", "bird", "person", "tree"]

        first = await collect(handler, request([("a", url)], "i1", classes=classes, priority="interactive"))
        assert first[0].model.prompt_set == "quick"
        assert prompts[0] == len(classes)  # only the quick set before the answer
        assert ctx.models.text_passes.background_started == 1
        await wait_background(ctx)
        assert prompts[0] == len(classes) * (1 + len(FULL))

        second = await collect(handler, request([("a", url)], "i2", classes=classes, priority="interactive"))
        assert second[0].model.prompt_set == "full" and prompts[0] == len(classes) * (1 + len(FULL))
        full = clip.text_cache.peek(text_cache_key(clip.info, classes, FULL))
        torch.testing.assert_close(full, reference(clip, classes, FULL), atol=1e-5, rtol=0)
        quick = reference(clip, classes, [QUICK])
        assert not torch.allclose(full, quick, atol=1e-3)  # two different answers, told apart by prompt_set
        # the confidences the second answer carries are the full ensemble's
        image = await ctx.preprocessor.pixels(await ctx.fetcher.fetch(url), handle, "check", "bulk")
        expected = clip.scores(handle.forward(image.unsqueeze(0)), full)[0]
        top = second[0].results[0].predictions[0]
        assert abs(top.confidence - expected.max().item()) < 1e-4 and top.class_name == classes[int(expected.argmax())]

        # bulk requests never take the quick set; the request's own templates are the request's
        bulk = await collect(handler, request([("a", url)], "b1", classes=["car", "boat"], priority="bulk"))
        assert bulk[0].model.prompt_set == "full" and ctx.models.text_passes.background_started == 1
        own = await collect(handler, request([("a", url)], "o1", classes=["kite", "owl"], priority="interactive",
                                             prompt_templates=["art of a {}.", "a toy {}."]))
        assert own[0].model.prompt_set == "request" and ctx.models.text_passes.background_started == 1


async def test_background_jobs_are_deduplicated_shared_and_cancelled(http_server):
    url = http_server.urls["astronaut_jpg"]
    async with annotation_context(text_settings(None)) as ctx:
        handler = AnnotationHandler(ctx)
        await collect(handler, request([("warm", url)], "warm", classes=["x", "y"], priority="bulk"))
        prompts = count_prompts(ctx)
        classes = ["owl", "fox", "elk"]
        firsts = await asyncio.gather(*(collect(handler, request([("a", url)], f"i{i}", classes=classes,
                                                                 priority="interactive")) for i in range(3)))
        assert {parts[0].model.prompt_set for parts in firsts} == {"quick"}
        assert ctx.models.text_passes.background_started == 1  # one job for the three requests
        # a bulk request while the job runs waits for it instead of computing again
        bulk = await collect(handler, request([("a", url)], "b", classes=classes, priority="bulk"))
        assert bulk[0].model.prompt_set == "full"
        await wait_background(ctx)
        assert prompts[0] == len(classes) * (1 + len(FULL))  # quick once, the ensemble once

        # shutdown: a running job is cancelled, leaves nothing half-done, and the worker closes promptly
        handle = ctx.models.peek(next(iter(ctx.models._loaded)))
        many = [f"class {i}" for i in range(400)]
        assert handle.start_background(many, FULL)
        assert not handle.start_background(many, FULL)  # deduplicated
        task = next(iter(ctx.models.text_passes._background.values()))
        await asyncio.sleep(0.05)
        await ctx.models.close()
        assert task.cancelled() and ctx.models.text_passes.background_jobs == 0
        assert handle.model.text_cache.peek(text_cache_key(handle.model.info, many, FULL)) is None
        assert not ctx.models.text_passes._pending


async def test_restarted_worker_reads_the_disk_cache_and_computes_only_new_classes(http_server, tmp_path):
    url = http_server.urls["astronaut_jpg"]
    cache_dir = tmp_path / "text"
    classes = ["cat", "dog", "bird"]
    async with annotation_context(text_settings(cache_dir)) as ctx:
        parts = await collect(AnnotationHandler(ctx), request([("a", url)], "b1", classes=classes, priority="bulk"))
        assert parts[0].model.prompt_set == "full"
        before = parts[0].results[0].predictions
    assert len(list(cache_dir.rglob("*.emb"))) == len(classes)

    async with annotation_context(text_settings(cache_dir)) as ctx:  # a restart: memory cache empty
        handler = AnnotationHandler(ctx)
        await collect(handler, request([("warm", url)], "warm", classes=["x"], priority="bulk"))
        prompts = count_prompts(ctx)
        again = await collect(handler, request([("a", url)], "i1", classes=classes, priority="interactive"))
        assert again[0].model.prompt_set == "full" and prompts[0] == 0  # no text pass at all
        assert again[0].results[0].predictions == before
        more = await collect(handler, request([("a", url)], "b2", classes=classes + ["tree"], priority="bulk"))
        assert more[0].model.prompt_set == "full" and prompts[0] == len(FULL)  # only the new class


def test_prefetch_classes_warms_the_disk_cache(tmp_path, capsys):
    from consumers.annotation_worker import prefetch

    cache_dir = tmp_path / "text"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    missing = subprocess.run([sys.executable, "-m", "consumers.cli", "prefetch", "--classes", "cat,dog"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "needs CLS_TEXT_CACHE_DIR" in missing.stderr, missing.stderr

    warm = text_settings(cache_dir, device="cpu", preload_models="clip")
    assert prefetch(warm, ["cat", "dog", "snow leopard"]) == 0
    assert "text embeddings of 3 classes x 8 templates" in capsys.readouterr().out
    assert len(list(cache_dir.rglob("*.emb"))) == 3

    async def read_back():
        async with annotation_context(warm) as ctx:
            handle = await ctx.models.get(ctx.model_config.key_for("clip", None))
            prompts = count_prompts(ctx)
            text, hit = await handle.prepare(["snow leopard", "cat"], FULL, ctx.executors)
            assert hit and prompts[0] == 0 and text.shape[0] == 2

    asyncio.run(read_back())


def test_template_settings_must_name_the_class():
    import pytest
    from pydantic import ValidationError

    from consumers.settings import WorkerSettings

    for name in ("quick_prompt_templates", "default_prompt_templates"):
        with pytest.raises(ValidationError, match="no class placeholder"):
            WorkerSettings(**{name: "a photo of a {}.|a photo"})
    assert WorkerSettings(quick_prompt_templates="").quick_prompt_templates == ""  # empty: no quick answers
