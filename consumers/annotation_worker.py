"""``cls-worker annotation``: build the annotation context once, preload models, consume requests."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from consumers import metrics
from consumers.health import HealthServer
from consumers.lanes import annotation_lanes
from consumers.pipeline import Pipeline
from consumers.runtime import ConsumerRuntime
from consumers.settings import Settings
from consumers.worker import configure_torch_threads, decode_limits, manifest_limits, serve, storage_and_fetcher
from handlers.annotation import AnnotationHandler, failed_result
from handlers.batcher import MicroBatcher
from handlers.context import AnnotationConfig, AnnotationContext, AuditConfig, EmbedConfig, FewShotConfig
from handlers.executor import Executors
from handlers.model_config import ModelConfig, parse_allowed_variants, parse_variant_weights
from handlers.models import ModelRegistry
from handlers.parts import PART_BUDGET_BYTES
from ml.embedding_cache import EmbeddingCache
from schemas.codec import ANNOTATION_ADAPTER

log = structlog.get_logger("cls.annotation_worker")


def model_config(settings: Settings) -> ModelConfig:
    w = settings.worker
    return ModelConfig(
        clip_variant=w.clip_variant, clip_weights=w.clip_weights, siglip_variant=w.siglip_variant,
        siglip_weights=w.siglip_weights, device=w.device, seed=w.seed, text_cache_size=w.text_cache_size,
        text_cache_bytes=w.text_cache_mb * 1024 * 1024,
        text_cache_dir=w.text_cache_dir or None, text_cache_disk_bytes=w.text_cache_disk_mb * 1024 * 1024,
        cache_size=w.model_cache_size, model_dir=w.model_dir,
        clip_variant_weights=parse_variant_weights(w.clip_variant_weights),
        allowed_variants=parse_allowed_variants(w.allowed_model_variants),
        timm_weights=w.timm_weights,
    )


def default_templates(settings: Settings) -> list[str]:
    if settings.worker.default_prompt_templates:
        return [t for t in settings.worker.default_prompt_templates.split("|") if t.strip()]
    from ml.zeroshot import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES)


def quick_templates(settings: Settings) -> list[str]:
    return [t for t in settings.worker.quick_prompt_templates.split("|") if t.strip()]


def preload_keys(settings: Settings, config: ModelConfig) -> list:
    keys = []
    for item in (settings.worker.preload_models or "").split(","):
        item = item.strip()
        if not item:
            continue
        family, _, variant = item.partition(":")
        keys.append(config.key_for(family.strip(), variant.strip() or None))
    return keys


@contextlib.asynccontextmanager
async def annotation_context(settings: Settings):
    """The handler's dependencies, built once; closed on exit."""
    w = settings.worker
    executors = Executors(fit_workers=w.fewshot_fit_threads)
    async with storage_and_fetcher(settings) as (store, fetcher):
        config = model_config(settings)
        batcher = MicroBatcher(executors, max_batch=w.batch_size, max_wait_ms=w.batch_wait_ms,
                               observe=metrics.observe_batch, observe_forward=metrics.observe_forward,
                               active_batch=w.batch_size_while_interactive, active_s=w.interactive_active_s)
        ctx = AnnotationContext(
            config=AnnotationConfig(part_size=w.result_part_size, max_images_per_request=w.max_images_per_request,
                                    default_templates=default_templates(settings), preprocess=w.preprocess,
                                    quick_templates=quick_templates(settings),
                                    gpu_decode=w.gpu_decode,
                                    request_window=2 * w.batch_size, images_in_flight=max(128, 4 * w.batch_size),
                                    interactive_images_in_flight=64,
                                    part_budget_bytes=min(PART_BUDGET_BYTES, w.max_record_bytes // 2)),
            model_config=config,
            models=ModelRegistry(config, executors, store, on_loaded=metrics.observe_model_load),
            fetcher=fetcher,
            decode_limits=decode_limits(settings),
            batcher=batcher,
            executors=executors,
            on_text_cache=metrics.observe_text_cache,
            store=store,
            embed_config=EmbedConfig(output_path=w.embed_output_path, inline_max_images=w.embed_inline_max_images,
                                     against_max_bytes=w.embed_against_max_mb * 1024 * 1024),
            embedding_cache=EmbeddingCache(w.embedding_cache_mb * 1024 * 1024) if w.embedding_cache_mb else None,
            fewshot=FewShotConfig(max_examples=w.fewshot_max_examples,
                                  head_cache_bytes=w.fewshot_head_cache_mb * 1024 * 1024,
                                  max_fit_cost=w.fewshot_max_fit_cost),
            audit_config=AuditConfig(max_images=w.audit_max_images, max_cells=w.audit_max_cells,
                                     max_select_work=w.select_max_work),
            manifest_limits=manifest_limits(w),
        )
        ctx.fewshot_heads.on_head = metrics.observe_few_shot_head
        ctx.fewshot_heads.on_fit = metrics.observe_few_shot_fit
        try:
            yield ctx
        finally:
            await ctx.models.close()  # background text ensembles cancelled
            await ctx.preprocessor.close()
            await batcher.close()
            await asyncio.to_thread(executors.shutdown)


def annotation_pipeline(settings: Settings, ctx: AnnotationContext) -> Pipeline:
    handler = AnnotationHandler(ctx)
    return Pipeline(
        name="annotation.result",
        adapter=ANNOTATION_ADAPTER,
        id_field="request_id",
        handle=handler.handle,
        failed_event=failed_result,
        handler_timeout_s=settings.worker.handler_timeout_s,
        **annotation_lanes(settings),
    )


async def run_annotation_worker(settings: Settings, max_requests: int | None = None) -> int:
    configure_torch_threads(settings.worker.torch_threads)
    async with annotation_context(settings) as ctx:
        failed_preloads: list[str] = []
        for key in preload_keys(settings, ctx.model_config):
            try:
                model = await ctx.models.get(key)
            except Exception as exc:  # the worker still answers (failed events), but is never ready
                log.error("preload_failed", family=key.family, variant=key.variant, error=str(exc))
                failed_preloads.append(f"{key.family}:{key.variant}")
                continue
            if model.descriptor.weights == "random":
                log.warning("random_weights", family=key.family, variant=key.variant,
                            hint="zero-shot predictions are meaningless; set CLS_CLIP_WEIGHTS / CLS_SIGLIP_WEIGHTS")
        runtime = ConsumerRuntime(settings, annotation_pipeline(settings, ctx), group_id=settings.worker.annotation_group_id,
                                  max_records=max_requests)
        # /readyz (and the image's HEALTHCHECK) only once every preloaded model is loaded: a worker whose
        # configured model cannot load is not ready, so a rollout of a bad weights setting stalls.
        health = HealthServer(settings, runtime, models_ready=lambda: not failed_preloads)
        await health.start()
        try:
            return await serve(runtime)
        finally:
            await health.stop()


def prefetch(settings: Settings, classes: list[str] | None = None) -> int:
    """Download the configured pretrained weights into the cache (build time / init container); with ``classes``,
    also compute their text embeddings with the default templates into CLS_TEXT_CACHE_DIR (the disk cache a
    worker on this node reads at its first request)."""
    from ml.backbones import load_zero_shot_model
    from ml.text_disk_cache import DiskTextCache

    config = model_config(settings)
    disk = None
    if classes:
        if not config.text_cache_dir or config.text_cache_disk_bytes <= 0:
            print("prefetch --classes needs CLS_TEXT_CACHE_DIR (and CLS_TEXT_CACHE_DISK_MB > 0)")
            return 2
        disk = DiskTextCache(config.text_cache_dir, config.text_cache_disk_bytes)
    templates = default_templates(settings)
    status = 0
    for key in preload_keys(settings, config) or [config.key_for("clip", None), config.key_for("siglip", None)]:
        if key.family not in ("clip", "siglip") or (key.weights == "random" and not classes):
            continue
        try:
            # the worker's device when classes are warmed: the entries' identity names the device type
            model = load_zero_shot_model(key.family, key.variant, key.weights,  # type: ignore[arg-type]
                                         device=config.device if classes else "cpu", seed=config.seed)
            print(f"prefetched {key.family} {key.variant} {key.weights}")
            if classes:
                model.disk_cache = disk
                started = time.monotonic()
                model.text_embeddings(classes, templates)
                print(f"text embeddings of {len(classes)} classes x {len(templates)} templates for {key.family} "
                      f"{key.variant} in {config.text_cache_dir} ({time.monotonic() - started:.1f} s)")
        except Exception as exc:
            print(f"prefetch failed for {key.family} {key.variant} {key.weights}: {exc}")
            status = 1
    return status
