"""Class text embeddings are cached per (model, classes, templates) in a bounded LRU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ml.text_cache import TextEmbeddingCache, text_cache_key
from ml.backbones import load_zero_shot_model
from ml.zeroshot import DEFAULT_TEMPLATES, ModelInfo
from tests.fixtures.zeroshot import _few_threads  # noqa: F401  (fixtures)

CLASSES = ["cat", "dog", "bird"]


def _text_tower(model) -> torch.nn.Module:
    if model.info.family == "clip":
        return model.module.token_embedding  # first module of open_clip's text path
    return model.module.text_model


def _count_text_forwards(model) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    _text_tower(model).register_forward_hook(hook)
    return calls


@pytest.fixture(scope="module", params=[("clip", "cls-tiny-clip"), ("siglip", "cls-tiny-siglip")], ids=["clip", "siglip"])
def family_variant(request):
    return request.param


def test_second_identical_call_does_no_text_forward(family_variant):
    model = load_zero_shot_model(*family_variant, "random", device="cpu")
    calls = _count_text_forwards(model)

    first = model.text_embeddings(CLASSES, ["a photo of a {}."])
    assert calls[0] >= 1
    assert (model.text_cache.hits, model.text_cache.misses) == (0, 1)

    forwards = calls[0]
    second = model.text_embeddings(list(CLASSES), ("a photo of a {}.",))  # any sequence type
    assert calls[0] == forwards
    assert (model.text_cache.hits, model.text_cache.misses) == (1, 1)
    assert torch.equal(first, second)


def test_different_templates_or_classes_miss(family_variant):
    model = load_zero_shot_model(*family_variant, "random", device="cpu")
    calls = _count_text_forwards(model)
    model.text_embeddings(CLASSES, ["a photo of a {}."])
    before = calls[0]
    other_templates = model.text_embeddings(CLASSES, ["a photo of a {}.", "art of a {}."])
    assert calls[0] > before
    model.text_embeddings(["cat", "dog"], ["a photo of a {}."])
    assert model.text_cache.misses == 3 and model.text_cache.hits == 0
    assert other_templates.shape[0] == len(CLASSES)


def test_lru_bound_is_respected():
    model = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu", text_cache_size=2)
    calls = _count_text_forwards(model)
    a, b, c = ["a photo of a {}."], ["art of a {}."], ["a toy {}."]
    model.text_embeddings(CLASSES, a)
    model.text_embeddings(CLASSES, b)
    model.text_embeddings(CLASSES, a)  # hit: a becomes most recent
    model.text_embeddings(CLASSES, c)  # evicts b, the least recently used
    assert len(model.text_cache) == 2 and model.text_cache.evictions == 1

    before = calls[0]
    model.text_embeddings(CLASSES, a)
    assert calls[0] == before  # still cached
    model.text_embeddings(CLASSES, b)
    assert calls[0] > before  # recomputed after eviction
    assert len(model.text_cache) == 2


def test_cache_size_zero_disables_caching():
    model = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu", text_cache_size=0)
    calls = _count_text_forwards(model)
    model.text_embeddings(CLASSES, ["a photo of a {}."])
    before = calls[0]
    model.text_embeddings(CLASSES, ["a photo of a {}."])
    assert calls[0] == 2 * before and len(model.text_cache) == 0


def test_concurrent_identical_requests_compute_once():
    model = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu")
    calls = _count_text_forwards(model)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: model.text_embeddings(CLASSES, DEFAULT_TEMPLATES[:8]), range(8)))
    assert calls[0] == 1  # 24 prompts fit in one text batch; the other threads waited and hit
    assert all(torch.equal(results[0], r) for r in results)
    assert model.text_cache.misses + model.text_cache.hits == 8


def test_large_prompt_sets_are_batched_and_match_single_pass():
    model = load_zero_shot_model("clip", "cls-tiny-clip", "random", device="cpu")
    classes = [f"class {i}" for i in range(7)]
    full = model.text_embeddings(classes, DEFAULT_TEMPLATES)  # 560 prompts, 3 text batches
    model.text_batch_size = 10_000
    model.text_cache.clear()
    single = model.text_embeddings(classes, DEFAULT_TEMPLATES)
    torch.testing.assert_close(full, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(7), atol=1e-5, rtol=0)


def test_cache_keys_include_model_identity():
    cache = TextEmbeddingCache(maxsize=4)
    clip = ModelInfo("clip", "ViT-B-32", "random")
    other = ModelInfo("clip", "ViT-B-32", "openai")
    cache.put(text_cache_key(clip, ["cat"], ["{}"]), torch.zeros(1, 2))
    assert cache.get(text_cache_key(other, ["cat"], ["{}"])) is None
    assert cache.get(text_cache_key(clip, ("cat",), ("{}",))) is not None
    assert (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(ValueError):
        TextEmbeddingCache(maxsize=-1)


# -- bounded in bytes -------------------------------------------------------------------------


def test_cache_is_bounded_in_bytes_whatever_the_entry_count():
    from ml.text_cache import entry_bytes

    info = ModelInfo("clip", "x", "random")
    cache = TextEmbeddingCache(maxsize=1000, max_bytes=1_000_000)
    keys = []
    for i in range(40):  # 40 entries of ~100 KB of embeddings each: only ~10 fit
        key = text_cache_key(info, [f"class {i}-{j}" for j in range(50)], ["a photo of a {}."])
        cache.put(key, torch.zeros(50, 512))
        keys.append(key)
        assert cache.bytes <= 1_000_000
    assert cache.bytes == sum(entry_bytes(k, cache.peek(k)) for k in keys if k in cache)
    assert 5 <= len(cache) <= 10 and cache.evictions == 40 - len(cache)
    assert keys[-1] in cache and keys[0] not in cache  # least recently used out first


def test_key_strings_count_and_an_entry_over_the_bound_is_not_cached():
    info = ModelInfo("clip", "x", "random")
    cache = TextEmbeddingCache(maxsize=10, max_bytes=200_000)
    small = text_cache_key(info, ["cat"], ["{}"])
    cache.put(small, torch.zeros(1, 8))
    long_names = text_cache_key(info, ["x" * 200 + str(i) for i in range(2000)], ["{}"])  # ~400 KB of key strings
    cache.put(long_names, torch.zeros(2000, 1))  # tiny tensor, but the key alone is over the bound
    assert long_names not in cache and small in cache and cache.bytes < 200_000
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_registry_models_share_one_byte_bounded_cache(tmp_path):
    import asyncio

    from handlers.executor import Executors
    from handlers.models import ModelKey, ModelRegistry
    from testkit.configs import model_config

    async def run():
        executors = Executors(cpu_workers=1)
        config = model_config(device="cpu", cache_size=2, model_dir=str(tmp_path), text_cache_bytes=300_000)
        registry = ModelRegistry(config, executors, store=None)
        try:
            clip = await registry.get(ModelKey("clip", "cls-tiny-clip", "random"))
            siglip = await registry.get(ModelKey("siglip", "cls-tiny-siglip", "random"))
            assert clip.model.text_cache is siglip.model.text_cache is registry.text_cache
            for i in range(30):
                for handle in (clip, siglip):
                    await handle.prepare([f"c{i}-{j}" for j in range(100)], ["a {}."], executors)
                    assert registry.text_cache.bytes <= 300_000
            assert registry.text_cache.evictions > 0
        finally:
            executors.shutdown()

    asyncio.run(run())
