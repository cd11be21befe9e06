"""Duplicate groups among images: exact duplicates by content hash, near-duplicates by cosine and perceptual hash.

Pure numpy (plus scipy's connected components and, above a size, faiss): no Kafka, no torch. Given ids,
L2-normalised vectors ``(n, d)``, optional content hashes and optionally earlier embeddings to compare
against, :func:`find_duplicates` returns groups of ids:

- **exact**: the same content hash (byte-identical uploads), similarity 1.0;
- **near**: connected components of the graph linking two items that are copies by either signal: their
  cosine similarity is at least ``threshold`` (robust to crops and borders), or, when both have a
  perceptual hash (``ml.perceptual_hash``, robust to re-encoding, resizing, brightness and contrast), the
  hashes differ in at most ``hash_distance`` of 64 bits and the cosine is at least ``hash_min_cosine`` (the
  embedding vetoes a hash collision between different pictures). An exact group that also has near
  neighbours is part of a near group, so every id is in at most one group. Each group reports the signals of
  the links that joined it: the lowest cosine and the largest hash distance among them.

Why two signals: at JPEG quality 40 a copy's cosine falls to ~0.85, while distinct look-alikes (two crops of
one texture) reach 0.92, so no cosine threshold catches the one without the other; the perceptual hash of a
re-encoded copy stays within a few bits while look-alikes differ in ~30 (measured by ``bench/learned.py``).
Hash candidates are the pairs the embedding search finds at ``hash_min_cosine`` or more (each item's
``neighbors`` most similar), so the hash never needs a search of its own.

What is compared: the request's items with each other and with the earlier items (never earlier items
with each other: they were compared when they were new). Items with the same hash are collapsed to one
before the similarity search, so a request of n identical uploads costs one search row, not n^2 pairs.

**Bounded work and memory.** Each item keeps at most ``neighbors`` most-similar items above the threshold
(both directions of a pair count), so a set of n near-identical vectors yields at most n * neighbors
links, never n^2: the groups are the components of that graph, which equal the threshold graph's
components unless two items both have more than ``neighbors`` closer items above the threshold and no
path through them (in a cluster that dense, there is one). Below ``exact_max`` items (request plus
earlier) the search is exact: blocked matrix products of at most ``BLOCK_ROWS x BLOCK_COLS`` similarities
at a time, never an n x n matrix. Above it, a faiss index chooses candidates (PCA to 64 dimensions, an
inverted file of ``2 sqrt(n)`` cells, ``IVF_NPROBE`` scanned per query) and re-ranks them by their exact
similarity: approximate in what it finds, exact in the similarities it reports, deterministic (seeded
k-means and sample); its recall and speed are measured by ``bench/duplicates.py``.

**Bounded output.** At most ``max_groups`` groups (in order of their first request position) and
``max_group_size`` ids per group are returned; the report says how many groups and ids were left out.

Bad input raises :class:`DuplicateInputError` (a ``ValueError``) naming the first offending id: vectors
that are not finite, zero, or not L2-normalised; ids that repeat; shapes that do not match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = [
    "DEFAULT_HASH_DISTANCE",
    "DEFAULT_HASH_MIN_COSINE",
    "DEFAULT_THRESHOLD",
    "DuplicateGroup",
    "DuplicateInputError",
    "DuplicateReport",
    "EmbeddingSet",
    "check_embeddings",
    "find_duplicates",
]

DEFAULT_THRESHOLD = 0.96
"""Cosine similarity at or above which two images are near-duplicates whatever their hashes (docs/learned-features.md: chosen by measurement)."""
DEFAULT_HASH_DISTANCE = 10
"""Perceptual-hash bits (of 64) at or below which two images with cosine >= ``DEFAULT_HASH_MIN_COSINE`` are copies."""
DEFAULT_HASH_MIN_COSINE = 0.6
"""The cosine a hash match needs as well (and the floor of the candidate search when hashes are given)."""
DEFAULT_NEIGHBORS = 16
DEFAULT_MAX_GROUPS = 1000
DEFAULT_MAX_GROUP_SIZE = 1000
EXACT_MAX = 20_000
"""Above this many items (request + earlier, after collapsing exact duplicates) the index search is used."""
BLOCK_ROWS = 512
BLOCK_COLS = 4096  # 512 x 4096 float32 similarities = 8 MiB per block
TIE_BREAK = 1e-13
FLOAT32_SLACK = 1e-6
NORM_TOLERANCE = 1e-2  # float16 storage keeps norms within ~1e-3 of 1

Kind = Literal["exact", "near"]


class DuplicateInputError(ValueError):
    """The ids, vectors, hashes or settings given to :func:`find_duplicates` cannot be used."""


@dataclass(frozen=True)
class EmbeddingSet:
    """Earlier embeddings to compare against: ids, L2-normalised vectors ``(m, d)``, optional content hashes and
    perceptual hashes (uint64; without them, earlier items are matched by cosine only)."""

    ids: Sequence[str]
    vectors: np.ndarray
    hashes: Sequence[str | None] | None = None
    perceptual_hashes: np.ndarray | None = None


@dataclass(frozen=True)
class DuplicateGroup:
    """One group: the request's ids (input order) and the earlier ids it matched (their order).

    ``max_similarity`` / ``min_similarity``: over the pairs that linked the group (1.0 for an exact pair);
    every such pair is a copy by one of the two signals, while two members linked through a third may be less
    similar to each other. ``hash_distance``: the largest perceptual-hash distance among the linking pairs
    that both have one (None when none has). ``size``: all members; ``ids_omitted``: members left out of
    ``ids`` and ``earlier_ids`` by ``max_group_size``."""

    ids: tuple[str, ...]
    kind: Kind
    max_similarity: float
    min_similarity: float
    earlier_ids: tuple[str, ...] = ()
    size: int = 0
    ids_omitted: int = 0
    hash_distance: int | None = None


@dataclass(frozen=True)
class DuplicateReport:
    """The groups found, and what was left out of them."""

    groups: tuple[DuplicateGroup, ...]
    threshold: float
    method: Literal["none", "exact", "index"]
    groups_total: int = 0
    groups_omitted: int = 0
    ids_omitted: int = 0
    searched: int = 0  # vectors searched after collapsing exact duplicates (request + earlier)
    notes: tuple[str, ...] = field(default_factory=tuple)


def find_duplicates(
    ids: Sequence[str],
    vectors: np.ndarray,
    *,
    hashes: Sequence[str | None] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    earlier: EmbeddingSet | None = None,
    neighbors: int = DEFAULT_NEIGHBORS,
    max_groups: int = DEFAULT_MAX_GROUPS,
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
    method: Literal["auto", "exact", "index"] = "auto",
    exact_max: int = EXACT_MAX,
    threads: int | None = None,
    perceptual_hashes: np.ndarray | None = None,
    hash_distance: int = DEFAULT_HASH_DISTANCE,
    hash_min_cosine: float = DEFAULT_HASH_MIN_COSINE,
) -> DuplicateReport:
    """Duplicate groups among ``ids`` (and against ``earlier``); see the module docstring. ``perceptual_hashes``:
    ``[n]`` uint64 (``ml.perceptual_hash``), or None for cosine only; ``hash_distance`` -1 turns the hash off."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise DuplicateInputError(f"threshold must be in (0, 1], got {threshold!r}")
    if not (isinstance(hash_min_cosine, (int, float)) and math.isfinite(hash_min_cosine) and -1.0 <= hash_min_cosine <= 1.0):
        raise DuplicateInputError(f"hash_min_cosine must be in [-1, 1], got {hash_min_cosine!r}")
    if not isinstance(hash_distance, int) or not -1 <= hash_distance <= 64:
        raise DuplicateInputError(f"hash_distance must be an integer in [-1, 64], got {hash_distance!r}")
    for name, value in (("neighbors", neighbors), ("max_groups", max_groups), ("max_group_size", max_group_size)):
        if not isinstance(value, int) or value < 1:
            raise DuplicateInputError(f"{name} must be a positive integer, got {value!r}")
    if method not in ("auto", "exact", "index"):
        raise DuplicateInputError(f"unknown method {method!r}")
    ids = _check_ids(ids, "ids")
    x = _check_vectors(vectors, ids, "vectors")
    hashes = _check_hashes(hashes, len(ids), "hashes")
    if earlier is not None:
        earlier_ids = _check_ids(earlier.ids, "earlier ids")
        y = _check_vectors(earlier.vectors, earlier_ids, "earlier vectors")
        earlier_hashes = _check_hashes(earlier.hashes, len(earlier_ids), "earlier hashes")
        earlier_phashes = _check_perceptual(earlier.perceptual_hashes, len(earlier_ids), "earlier perceptual hashes")
        if len(earlier_ids) and len(ids) and y.shape[1] != x.shape[1]:
            raise DuplicateInputError(f"earlier vectors have dimension {y.shape[1]}, these have {x.shape[1]}")
    else:
        earlier_ids, y, earlier_hashes = [], np.zeros((0, x.shape[1]), np.float32), [None] * 0
        earlier_phashes = None
    phashes = _check_perceptual(perceptual_hashes, len(ids), "perceptual hashes")
    n, m = len(ids), len(earlier_ids)
    if n == 0:
        return DuplicateReport(groups=(), threshold=float(threshold), method="none")
    cutoff = float(threshold) - FLOAT32_SLACK  # identical vectors may score 0.99999994 in float32
    # perceptual hash of every node (request, then earlier); has_hash marks the ones known
    node_hash = np.zeros(n + m, np.uint64)
    has_hash = np.zeros(n + m, bool)
    if phashes is not None:
        node_hash[:n], has_hash[:n] = phashes, True
    if earlier_phashes is not None:
        node_hash[n:], has_hash[n:] = earlier_phashes, True
    use_hash = hash_distance >= 0 and bool(has_hash[:n].any())
    search_cutoff = min(cutoff, float(hash_min_cosine) - FLOAT32_SLACK) if use_hash else cutoff

    # 1. exact duplicates by content hash: every item with a hash seen before links to its first holder
    edges_u: list[np.ndarray] = []
    edges_v: list[np.ndarray] = []
    edges_s: list[np.ndarray] = []
    edges_near: list[np.ndarray] = []
    edges_h: list[np.ndarray] = []  # perceptual-hash distance of each link, -1 where unknown
    first_by_hash: dict[str, int] = {}
    for j, h in enumerate(earlier_hashes):
        if h is not None:
            first_by_hash.setdefault(h, n + j)
    representative = np.ones(n, dtype=bool)
    exact_u, exact_v = [], []
    for i, h in enumerate(hashes):
        if h is None:
            continue
        holder = first_by_hash.setdefault(h, i)
        if holder != i:
            exact_u.append(i)
            exact_v.append(holder)
            representative[i] = False
    if exact_u:
        edges_u.append(np.asarray(exact_u, np.int64))
        edges_v.append(np.asarray(exact_v, np.int64))
        edges_s.append(np.ones(len(exact_u), np.float32))
        edges_near.append(np.zeros(len(exact_u), bool))
        edges_h.append(np.full(len(exact_u), -1, np.int64))

    # 2. near duplicates among the representatives (and against every earlier item)
    queries = np.flatnonzero(representative)
    base = np.concatenate([queries, n + np.arange(m)])  # global node of each searchable vector
    searchable = np.concatenate([x[queries], y]) if m else x[queries]
    chosen = method
    if len(base) <= 1:
        chosen = "exact"
    elif method == "auto":
        chosen = "exact" if len(base) <= exact_max else "index"
    k = min(neighbors, len(base) - 1)
    if k >= 1:
        if chosen == "exact":
            local, sims = _exact_neighbors(searchable, len(queries), k, search_cutoff)
        else:
            local, sims = _index_neighbors(searchable, len(queries), k, search_cutoff, threads)
        rows, cols = np.nonzero(local >= 0)
        u, v, sim = base[rows], base[local[rows, cols]], sims[rows, cols]
        both = has_hash[u] & has_hash[v]
        distance = np.where(both, _hamming(node_hash[u], node_hash[v]), -1)
        keep = sim >= cutoff
        if use_hash:
            keep |= both & (distance <= hash_distance)
        edges_u.append(u[keep])
        edges_v.append(v[keep])
        edges_s.append(sim[keep])
        edges_near.append(np.ones(int(keep.sum()), bool))
        edges_h.append(distance[keep])
    return _groups(ids, earlier_ids, edges_u, edges_v, edges_s, edges_near, edges_h, threshold, chosen, len(base),
                   max_groups, max_group_size)


# ---------------------------------------------------------------------------------------------- checks
def check_embeddings(ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as contiguous float32 after the checks :func:`find_duplicates` applies (unique string ids;
    finite, non-zero, L2-normalised rows); raises :class:`DuplicateInputError` naming the first bad id. For
    validating stored embeddings (an earlier file) before a request relies on them."""
    return _check_vectors(vectors, _check_ids(ids, "ids"), "vectors")


def _check_ids(ids: Sequence[str], what: str) -> list[str]:
    ids = list(ids)
    seen: set[str] = set()
    for value in ids:
        if not isinstance(value, str):
            raise DuplicateInputError(f"{what} must be strings, got {type(value).__name__}")
        if value in seen:
            raise DuplicateInputError(f"{what} repeat {value[:200]!r}: each id must be unique")
        seen.add(value)
    return ids


def _check_vectors(vectors: np.ndarray, ids: list[str], what: str) -> np.ndarray:
    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[0] != len(ids) or (len(ids) and array.shape[1] < 1):
        raise DuplicateInputError(f"{what} must have shape ({len(ids)}, d), got {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DuplicateInputError(f"{what} must be floating point, got {array.dtype}")
    x = np.ascontiguousarray(array, dtype=np.float32)
    if not len(ids):
        return x
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise DuplicateInputError(f"{what}: the vector of {ids[int(np.argmin(finite))][:200]!r} is not finite (NaN/inf)")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    bad = np.abs(norms - 1.0) > NORM_TOLERANCE
    if bad.any():
        i = int(np.argmax(bad))
        kind = "zero" if norms[i] == 0 else f"not L2-normalised (norm {norms[i]:.4g})"
        raise DuplicateInputError(f"{what}: the vector of {ids[i][:200]!r} is {kind}")
    return x


def _check_perceptual(values: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray(values)
    if array.shape != (n,) or not (np.issubdtype(array.dtype, np.unsignedinteger) or array.dtype == object
                                   or np.issubdtype(array.dtype, np.integer)):
        raise DuplicateInputError(f"{what} must be {n} unsigned 64-bit integers, got shape {array.shape} {array.dtype}")
    try:
        return np.array([int(v) for v in array], dtype=np.uint64) if array.dtype == object else array.astype(np.uint64)
    except (OverflowError, TypeError, ValueError) as exc:
        raise DuplicateInputError(f"{what} must be unsigned 64-bit integers: {exc}") from exc


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from ml.perceptual_hash import hamming_distances

    return hamming_distances(a, b)


def _check_hashes(hashes: Sequence[str | None] | None, n: int, what: str) -> list[str | None]:
    if hashes is None:
        return [None] * n
    hashes = list(hashes)
    if len(hashes) != n:
        raise DuplicateInputError(f"{what}: {len(hashes)} given for {n} ids")
    for h in hashes:
        if h is not None and (not isinstance(h, str) or not h):
            raise DuplicateInputError(f"{what} must be non-empty strings or None, got {h!r}")
    return hashes


# ---------------------------------------------------------------------------------------------- search
def _merge_top(best_idx: np.ndarray, best_sim: np.ndarray, idx: np.ndarray, sim: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of both candidate sets: higher similarity first, then lower index."""
    all_idx = np.concatenate([best_idx, idx], axis=1)
    all_sim = np.concatenate([best_sim, sim], axis=1)
    order = np.lexsort((np.where(all_idx < 0, np.iinfo(np.int64).max, all_idx), -all_sim), axis=-1)[:, :k]
    return np.take_along_axis(all_idx, order, 1), np.take_along_axis(all_sim, order, 1)


def _exact_neighbors(vectors: np.ndarray, n_queries: int, k: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each of the first ``n_queries`` vectors, up to k others with similarity >= threshold (exact,
    blocked: BLOCK_ROWS x BLOCK_COLS similarities at a time). Returns (indices, sims); -1 pads."""
    total = len(vectors)
    out_idx = np.full((n_queries, k), -1, np.int64)
    out_sim = np.full((n_queries, k), -np.inf, np.float32)
    for r0 in range(0, n_queries, BLOCK_ROWS):
        r1 = min(n_queries, r0 + BLOCK_ROWS)
        best_idx, best_sim = out_idx[r0:r1], out_sim[r0:r1]
        for c0 in range(0, total, BLOCK_COLS):
            c1 = min(total, c0 + BLOCK_COLS)
            block = vectors[r0:r1] @ vectors[c0:c1].T
            if c0 < r1 and r0 < c1:  # the diagonal: an item is not its own duplicate
                d0, d1 = max(r0, c0), min(r1, c1)
                diag = np.arange(d0, d1)
                block[diag - r0, diag - c0] = -np.inf
            hit_rows = np.flatnonzero((block >= threshold).any(axis=1))
            if not len(hit_rows):
                continue
            sub = block[hit_rows]
            kk = min(k, sub.shape[1])
            # Select on distinct keys: ties (near-identical vectors) go to the lower index, and numpy's
            # introselect never meets its slow case (many equal values and an outlier). The shift is at most
            # 1e-7 for 1M columns, below what a similarity threshold can mean.
            keys = TIE_BREAK * np.arange(c0, c1, dtype=np.float64) - sub
            part = np.argpartition(keys, kk - 1, axis=1)[:, :kk]
            sims = np.take_along_axis(sub, part, 1)
            idx = np.where(sims >= threshold, part + c0, -1)
            sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
            merged_idx, merged_sim = _merge_top(best_idx[hit_rows], best_sim[hit_rows], idx, sims, k)
            best_idx[hit_rows], best_sim[hit_rows] = merged_idx, merged_sim
    return out_idx, out_sim


def _index_neighbors(vectors: np.ndarray, n_queries: int, k: int, threshold: float,
                     threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate neighbours from a faiss index over all vectors: PCA to ``IVF_PCA_DIM`` dimensions, an
    inverted file of ``2 sqrt(n)`` cells (each query scans its ``IVF_NPROBE`` nearest), then the candidates
    re-ranked by their exact inner product on the full vectors (faiss ``PCA64,IVFn,Flat,RFlat``).

    The reduced vectors only choose candidates; every similarity returned is exact, so the threshold means the
    same as in the exact search. PCA and k-means train on a seeded sample: the same input gives the same index."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    total, dim = vectors.shape
    nlist = int(min(IVF_MAX_LISTS, max(1, round(2 * math.sqrt(total)))))
    pca = f"PCA{IVF_PCA_DIM}," if dim > IVF_PCA_DIM else ""
    index = faiss.index_factory(dim, f"{pca}IVF{nlist},Flat,RFlat", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = 0
    ivf.cp.niter = 10
    ivf.cp.min_points_per_centroid = 1
    ivf.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
    train_size = min(total, IVF_TRAIN_PER_LIST * nlist)
    rng = np.random.default_rng(0)
    index.train(vectors if train_size == total else vectors[np.sort(rng.choice(total, train_size, replace=False))])
    index.add(vectors)
    params = faiss.IndexRefineSearchParameters(
        k_factor=IVF_REFINE_FACTOR, base_index_params=faiss.SearchParametersIVF(nprobe=min(nlist, IVF_NPROBE)))
    found_idx = np.full((n_queries, k), -1, np.int64)
    found_sim = np.full((n_queries, k), -np.inf, np.float32)
    for r0 in range(0, n_queries, IVF_QUERY_BATCH):  # bounded result memory per call
        r1 = min(n_queries, r0 + IVF_QUERY_BATCH)
        sims, idx = index.search(vectors[r0:r1], k + 1, params=params)
        rows = np.arange(r0, r1)[:, None]
        keep = (idx >= 0) & (idx != rows) & (sims >= threshold)
        idx = np.where(keep, idx, -1)
        sims = np.where(keep, sims, -np.inf).astype(np.float32)
        order = np.lexsort((np.where(idx < 0, np.iinfo(np.int64).max, idx), -sims), axis=-1)[:, :k]
        found_idx[r0:r1] = np.take_along_axis(idx, order, 1)
        found_sim[r0:r1] = np.take_along_axis(sims, order, 1)
    return found_idx, found_sim


def index_top_k(vectors: np.ndarray, k: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar other rows by the faiss IVF index of :func:`find_duplicates` (approximate
    candidates, exact similarities): ``(indices [n, k], similarities [n, k])``, most similar first; -1 and
    -inf pad a row whose probed cells held fewer than ``k`` other rows."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return _index_neighbors(vectors, len(vectors), k, -np.inf, threads)


IVF_NPROBE = 8
IVF_PCA_DIM = 64
IVF_REFINE_FACTOR = 2
IVF_MAX_LISTS = 8192
IVF_TRAIN_PER_LIST = 32
IVF_QUERY_BATCH = 8192


# ---------------------------------------------------------------------------------------------- groups
def _groups(ids: list[str], earlier_ids: list[str], edges_u: list[np.ndarray], edges_v: list[np.ndarray],
            edges_s: list[np.ndarray], edges_near: list[np.ndarray], edges_h: list[np.ndarray], threshold: float,
            method: str, searched: int,
            max_groups: int, max_group_size: int) -> DuplicateReport:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n, m = len(ids), len(earlier_ids)
    nodes = n + m
    u = np.concatenate(edges_u) if edges_u else np.zeros(0, np.int64)
    v = np.concatenate(edges_v) if edges_v else np.zeros(0, np.int64)
    s = np.concatenate(edges_s) if edges_s else np.zeros(0, np.float32)
    near = np.concatenate(edges_near) if edges_near else np.zeros(0, bool)
    h = np.concatenate(edges_h) if edges_h else np.zeros(0, np.int64)
    if not len(u):
        return DuplicateReport(groups=(), threshold=float(threshold), method=method, searched=searched)
    graph = coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(nodes, nodes))
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[u]
    sizes = np.bincount(labels, minlength=nodes)
    # component order: by its first request position (every component with an edge holds a request item)
    first = np.full(nodes, np.iinfo(np.int64).max)
    np.minimum.at(first, labels[:n], np.arange(n))
    component_ids = np.unique(edge_label)
    component_ids = component_ids[np.argsort(first[component_ids], kind="stable")]
    total = len(component_ids)
    kept = component_ids[:max_groups]
    max_s = np.full(nodes, -np.inf)
    min_s = np.full(nodes, np.inf)
    np.maximum.at(max_s, edge_label, s)
    np.minimum.at(min_s, edge_label, s)
    has_near = np.zeros(nodes, bool)
    np.logical_or.at(has_near, edge_label, near)
    max_h = np.full(nodes, -1, np.int64)
    np.maximum.at(max_h, edge_label, h)
    kept_set = np.zeros(nodes, bool)
    kept_set[kept] = True
    members: dict[int, list[int]] = {int(c): [] for c in kept}
    for node in np.flatnonzero(kept_set[labels]):  # nodes in input order: request first, then earlier
        members[int(labels[node])].append(int(node))
    groups = []
    ids_omitted = 0
    for c in kept:
        nodes_c = members[int(c)]
        request_nodes = [i for i in nodes_c if i < n]
        earlier_nodes = [i - n for i in nodes_c if i >= n]
        shown_request = request_nodes[:max_group_size]
        shown_earlier = earlier_nodes[:max(0, max_group_size - len(shown_request))]
        omitted = len(nodes_c) - len(shown_request) - len(shown_earlier)
        ids_omitted += omitted
        groups.append(DuplicateGroup(
            ids=tuple(ids[i] for i in shown_request), kind="near" if has_near[c] else "exact",
            max_similarity=min(1.0, float(max_s[c])), min_similarity=min(1.0, float(min_s[c])),
            earlier_ids=tuple(earlier_ids[j] for j in shown_earlier), size=int(sizes[c]), ids_omitted=omitted,
            hash_distance=int(max_h[c]) if max_h[c] >= 0 else None))
    notes = ()
    if total > len(kept) or ids_omitted:
        notes = (f"{total - len(kept)} of {total} groups and {ids_omitted} ids of the returned groups left out"
                 f" (max_groups {max_groups}, max_group_size {max_group_size})",)
    return DuplicateReport(groups=tuple(groups), threshold=float(threshold), method=method,  # type: ignore[arg-type]
                           groups_total=total, groups_omitted=total - len(kept), ids_omitted=ids_omitted,
                           searched=searched, notes=notes)
