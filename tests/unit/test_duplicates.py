"""ml.duplicates: exact groups by content hash, near groups by cosine (exact blocked search and the faiss index
give the same groups), against earlier embeddings, bounded work/memory/output, and bad input rejected clearly."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from ml.duplicates import (
    BLOCK_COLS,
    BLOCK_ROWS,
    DuplicateInputError,
    EmbeddingSet,
    find_duplicates,
)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def random_set(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def near_copy(v: np.ndarray, similarity: float, seed: int) -> np.ndarray:
    """A unit vector at exactly ``similarity`` cosine from the unit vector ``v``."""
    noise = np.random.default_rng(10_000 + seed).standard_normal(v.shape[0])
    noise -= noise @ v * v
    noise /= np.linalg.norm(noise)
    return (similarity * v + np.sqrt(1 - similarity**2) * noise).astype(np.float32)


def planted(n: int = 3000, d: int = 64, pairs: int = 40) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    x = random_set(n, d)
    expected = []
    for p in range(pairs):
        a, b = 2 * p, n - 1 - 2 * p
        x[b] = near_copy(x[a], 0.96 + 0.03 * p / pairs, seed=p)
        expected.append((f"id-{a}", f"id-{b}"))
    return [f"id-{i}" for i in range(n)], x, expected


def as_pairs(report) -> list[tuple[str, ...]]:
    return [g.ids for g in report.groups]


def test_exact_by_hash_and_near_by_cosine_in_a_deterministic_order():
    ids, x, expected = planted(n=500, pairs=3)
    hashes = [None] * len(ids)
    for i in (100, 7, 300):  # byte-identical uploads: same hash (their vectors may be anything)
        hashes[i] = "sha256:aa"
    report = find_duplicates(ids, x, hashes=hashes, threshold=0.95)
    assert report.method == "exact" and report.groups_total == 4 and not report.notes
    groups = {g.ids: g for g in report.groups}
    assert [g.ids for g in report.groups] == [("id-0", "id-499"), ("id-2", "id-497"), ("id-4", "id-495"),
                                              ("id-7", "id-100", "id-300")]  # by first position, ids in input order
    exact = groups[("id-7", "id-100", "id-300")]
    assert exact.kind == "exact" and exact.max_similarity == exact.min_similarity == 1.0 and exact.size == 3
    near = groups[("id-0", "id-499")]
    assert near.kind == "near" and near.min_similarity == pytest.approx(0.96, abs=1e-5)
    assert near.max_similarity == near.min_similarity and near.earlier_ids == ()
    assert find_duplicates(ids, x, hashes=hashes, threshold=0.95) == report  # same input, same report
    # a higher threshold drops the pairs below it; 1.0 keeps only the identical
    assert as_pairs(find_duplicates(ids, x, threshold=0.965)) == [("id-2", "id-497"), ("id-4", "id-495")]
    y = x.copy()
    y[1] = y[0]
    assert as_pairs(find_duplicates(ids, y, threshold=1.0)) == [("id-0", "id-1")]


def test_a_chain_is_one_group_and_its_similarities_are_the_linking_pairs():
    x = random_set(6, d=32)
    x[1] = near_copy(x[0], 0.97, 1)
    x[2] = near_copy(x[1], 0.97, 2)  # 0 ~ 2 only through 1
    ids = list("abcdef")
    (group,) = find_duplicates(ids, x, threshold=0.96).groups
    assert group.ids == ("a", "b", "c") and group.kind == "near"
    assert float(x[0] @ x[2]) < 0.96 <= group.min_similarity


def test_index_search_finds_the_same_groups_as_the_exact_search():
    ids, x, expected = planted(n=3000, pairs=40)
    exact = find_duplicates(ids, x, threshold=0.95, method="exact")
    index = find_duplicates(ids, x, threshold=0.95, method="index", threads=2)
    assert exact.method == "exact" and index.method == "index"
    assert as_pairs(exact) == expected
    assert as_pairs(index) == expected  # every planted pair (0.96-0.99) found by the IVF index at this size
    for a, b in zip(exact.groups, index.groups, strict=True):
        assert a.min_similarity == pytest.approx(b.min_similarity, abs=1e-5)
    # auto picks the index above exact_max
    assert find_duplicates(ids, x, threshold=0.95, exact_max=1000).method == "index"


def test_against_earlier_embeddings():
    ids, x, _ = planted(n=200, pairs=0)
    old = random_set(300, seed=9)
    old[5] = near_copy(x[10], 0.97, 3)  # a new image near an earlier one
    old[6] = old[7] = x[20]  # earlier duplicates of each other (and of a new one)
    old[100] = near_copy(old[101], 0.99, 4)  # earlier vs earlier: not this request's business
    earlier = EmbeddingSet(ids=[f"old-{j}" for j in range(300)], vectors=old,
                           hashes=[f"h{j}" if j != 50 else "h-new" for j in range(300)])
    hashes = [None] * 200
    hashes[30] = "h-new"  # byte-identical to an earlier upload
    report = find_duplicates(ids, x, hashes=hashes, earlier=earlier, threshold=0.95)
    got = {(g.ids, g.earlier_ids, g.kind) for g in report.groups}
    assert got == {(("id-10",), ("old-5",), "near"), (("id-20",), ("old-6", "old-7"), "near"),
                   (("id-30",), ("old-50",), "exact")}
    # the same id in both sets is fine: earlier ids are reported apart
    same = find_duplicates(["x"], x[:1], earlier=EmbeddingSet(["x"], x[:1]))
    assert [(g.ids, g.earlier_ids) for g in same.groups] == [(("x",), ("x",))]


def test_all_identical_vectors_are_one_group_with_bounded_work():
    n = 4000
    x = np.tile(unit(np.ones((1, 64))), (n, 1))
    ids = [str(i) for i in range(n)]
    start = time.perf_counter()
    report = find_duplicates(ids, x, threshold=0.9, max_group_size=10)
    elapsed = time.perf_counter() - start
    (group,) = report.groups
    assert group.size == n and group.ids == tuple(ids[:10]) and group.ids_omitted == n - 10
    assert report.ids_omitted == n - 10 and report.notes and "left out" in report.notes[0]
    assert elapsed < 20, elapsed  # n * neighbors links, not n^2 pairs (4000 x 4000 in blocks: ~1 s here)
    # with content hashes, identical uploads collapse before any similarity search
    hashed = find_duplicates(ids, x, hashes=["same"] * n)
    assert hashed.searched == 1 and hashed.groups[0].kind == "exact" and hashed.groups[0].size == n


def test_exact_search_memory_is_bounded_by_its_blocks():
    n = 6000  # an n x n float32 matrix would be 144 MB
    x = random_set(n, d=16)
    tracemalloc.start()
    try:
        find_duplicates([str(i) for i in range(n)], x, threshold=0.99, method="exact")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    block_bytes = BLOCK_ROWS * BLOCK_COLS * 4
    assert peak < 6 * block_bytes + 8 * n * 16 * 8, peak  # a few blocks and per-item arrays, not n^2
    assert peak < n * n * 4 / 4


def test_bounded_group_count():
    ids, x, expected = planted(n=1000, pairs=50)
    report = find_duplicates(ids, x, threshold=0.95, max_groups=10)
    assert as_pairs(report) == expected[:10]
    assert report.groups_total == 50 and report.groups_omitted == 40 and "40 of 50 groups" in report.notes[0]


def test_small_and_empty_inputs():
    empty = find_duplicates([], np.zeros((0, 8), np.float32))
    assert empty.groups == () and empty.method == "none"
    assert find_duplicates(["a"], random_set(1)).groups == ()
    assert find_duplicates(["a"], random_set(1), hashes=["h"]).groups == ()
    assert find_duplicates(["a", "b"], random_set(2)).groups == ()
    half = np.tile(unit(np.ones((1, 8))), (2, 1)).astype(np.float16)  # float16 storage is accepted
    assert as_pairs(find_duplicates(["a", "b"], half)) == [("a", "b")]


@pytest.mark.parametrize(("change", "message"), [
    (lambda ids, x: (ids, np.where(np.arange(len(x))[:, None] == 2, np.nan, x)), "'c' is not finite"),
    (lambda ids, x: (ids, np.where(np.arange(len(x))[:, None] == 1, np.inf, x)), "'b' is not finite"),
    (lambda ids, x: (ids, np.where(np.arange(len(x))[:, None] == 3, 0.0, x)), "'d' is zero"),
    (lambda ids, x: (ids, x * 2), "'a' is not L2-normalised"),
    (lambda ids, x: (ids[:-1], x), "shape (3, d)"),
    (lambda ids, x: (ids, x[:, :, None]), "shape"),
    (lambda ids, x: (ids, (x * 100).astype(np.int64)), "floating point"),
    (lambda ids, x: (["a", "b", "a", "d"], x), "repeat 'a'"),
    (lambda ids, x: ([1, 2, 3, 4], x), "must be strings"),
])
def test_bad_vectors_and_ids_are_rejected_clearly(change, message):
    ids, x = change(list("abcd"), random_set(4))
    with pytest.raises(DuplicateInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        find_duplicates(ids, x)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"threshold": "0.9"}, "threshold"), ({"neighbors": 0}, "neighbors"), ({"max_groups": -1}, "max_groups"),
    ({"hashes": ["a"]}, "1 given for 4 ids"), ({"hashes": ["", None, None, None]}, "non-empty"),
    ({"earlier": EmbeddingSet(["e"], random_set(1, d=8))}, "dimension 8"), ({"method": "magic"}, "method"),
])
def test_bad_settings_are_rejected_clearly(kwargs, message):
    with pytest.raises(DuplicateInputError, match=message):
        find_duplicates(list("abcd"), random_set(4), **kwargs)
