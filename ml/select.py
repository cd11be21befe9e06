"""Active learning on image embeddings: which unlabeled pool images to label next.

Given L2-normalised pool embeddings ``[N, D]``, labeled embeddings ``[M, D]`` with class indices (``M`` may be 0:
a cold start) and a budget ``B``, :func:`select` returns ``B`` pool rows in selection order:

- ``random``: a seeded permutation (the baseline).
- ``typiclust`` (Hacohen, Dekel & Weinshall, ICML 2022): k-means of pool and labeled images into ``M + B``
  clusters (at most :data:`MAX_CLUSTERS`); repeatedly the cluster with the fewest labeled or selected images
  (ties: the larger, then the lower index; clusters under :data:`MIN_CLUSTER_SIZE` images last) gives its most
  typical unselected image. Typicality is ``1 / mean distance to the k = 20 nearest images of its cluster``.
- ``margin``: the smallest top-1 minus top-2 probability of a logistic-regression head fitted on the labeled
  embeddings (needs two labeled classes); without them, of the zero-shot classifier's probabilities when the
  caller gives them (a model with a text tower and named classes), else it runs ``typiclust``.
- ``kcenter`` (coreset, Sener & Savarese 2018): greedy farthest point from the labeled and already selected
  images (cold start: the image nearest the pool's mean first).
- ``auto``: ``typiclust`` while the labeled set holds fewer than ``auto_switch_per_class`` images per class,
  then ``diverse_margin``: ``B // classes`` images of each predicted class from the ``balanced_factor x B``
  lowest-margin images, the rest from the ``uncertain_factor x B`` lowest-margin ones, each by greedy farthest
  point from the labeled and already taken ones (uncertain, class-balanced and diverse: a batch of plain margin
  picks piles into one confusing region, usually one pair of classes). The switch point and both factors were
  measured with ``bench/selection.py`` on six data sets (docs/select.md).
  Below the switch point, with zero-shot probabilities given, ``diverse_margin`` on their margins instead.

``predicted`` is the top-1 of the classifier that gave the margins (``Selection.predicted_by``: the head, else
the zero-shot one). With ``SelectOptions.rank_all`` every other candidate is ranked after the selection
(``Selection.rest``: random continues its permutation, margin and ``diverse_margin`` go on by margin, typiclust
goes on round-robin over its clusters, kcenter by distance to the nearest labeled or selected image).

**Near-duplicates are never selected twice**: before any strategy runs, the pool's near-duplicate groups are
found by :func:`ml.duplicates.find_duplicates` (cosine ``>= duplicate_threshold``, labeled images as the
earlier set); a group holding a labeled image gives no candidate, any other group only its first member.

Clustering runs on the embeddings projected on their top :data:`CLUSTER_DIMS` principal axes (faiss k-means,
seeded), so 100,000 pool images select in seconds after embedding (``bench/selection.py --scale``). Everything is
seeded: the same inputs give the same selection.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["STRATEGIES", "SelectError", "SelectOptions", "Selection", "candidates_without_duplicates", "select"]

Strategy = Literal["auto", "random", "typiclust", "margin", "kcenter"]
STRATEGIES: tuple[str, ...] = ("auto", "random", "typiclust", "margin", "kcenter")
MAX_CLUSTERS = 2000
"""k-means clusters at most (above it typiclust takes several images per cluster, fewest-covered first)."""
MIN_CLUSTER_SIZE = 5
CLUSTER_DIMS = 64
TYPICALITY_NEIGHBOURS = 20
TYPICALITY_REFERENCES = 2000
"""A cluster larger than this scores typicality against a seeded sample of this many of its images."""


class SelectError(ValueError):
    """The selection cannot run on what was given (a request error)."""


@dataclass(frozen=True)
class SelectOptions:
    duplicate_threshold: float = 0.95
    seed: int = 0
    auto_switch_per_class: float = 3.0  # auto: typiclust below this many labeled images per class (measured)
    uncertain_factor: int = 10  # auto: pick among this many times the budget of the most uncertain images
    balanced_factor: int = 3  # auto: each predicted class's share comes from this many times the budget (measured)
    regularization: float = 1.0  # the head's LogisticRegression C on sqrt(D)-scaled features
    max_iter: int = 200
    kmeans_iterations: int = 20
    cv_accuracy: bool = True  # also cross-validate the head on the labeled set (5 more fits; for the summary only)
    rank_all: bool = False  # also rank every other candidate after the selection (Selection.rest)


@dataclass(frozen=True)
class Selection:
    """The selection, in rank order: pool rows, scores, reasons, the head's top-1 class and probability."""

    rows: np.ndarray  # [S] int64 pool rows, rank order
    scores: np.ndarray  # [S] float64
    reasons: list[str]
    predicted: np.ndarray | None  # [S] class indices (None without a head)
    predicted_probability: np.ndarray | None  # [S]
    strategy: str  # the strategy that ran: random | typiclust | margin | kcenter | diverse_margin
    candidates: int  # pool rows left after removing near-duplicates
    cv_accuracy: float | None  # the head's cross-validated accuracy on the labeled set
    predicted_by: str | None = None  # "head" (fitted on the labeled set), "zero_shot", or None: no classifier
    # with ``SelectOptions.rank_all``: every other candidate, in rank order after the selection (else empty)
    rest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rest_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rest_predicted: np.ndarray | None = None
    rest_probability: np.ndarray | None = None
    duplicates: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # pool rows left out as near-duplicates (not ranked)


def _validate(pool: np.ndarray, labeled: np.ndarray, labels: np.ndarray, num_classes: int,
              budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    labeled = np.ascontiguousarray(labeled, dtype=np.float32).reshape(labels.size, pool.shape[1] if pool.ndim == 2 else -1)
    if pool.ndim != 2 or pool.shape[0] == 0:
        raise SelectError(f"the pool must be a non-empty [N, D] matrix, got shape {pool.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise SelectError("labels outside the classes")
    if not (np.isfinite(pool).all() and np.isfinite(labeled).all()):
        raise SelectError("embeddings are not finite")
    if budget < 1:
        raise SelectError(f"budget must be at least 1, got {budget}")
    return pool, labeled, labels


def candidates_without_duplicates(pool: np.ndarray, labeled: np.ndarray, threshold: float) -> np.ndarray:
    """Pool rows that may be selected: of each near-duplicate group (cosine ``>= threshold``) only its first row,
    and no row of a group that holds a labeled image."""
    from ml.duplicates import EmbeddingSet, find_duplicates

    n = pool.shape[0]
    ids = [str(i) for i in range(n)]
    earlier = None
    if labeled.shape[0]:
        earlier = EmbeddingSet(ids=[f"L{i}" for i in range(labeled.shape[0])], vectors=_normalised(labeled))
    report = find_duplicates(ids, _normalised(pool), threshold=threshold, earlier=earlier, max_groups=n,
                             max_group_size=n + labeled.shape[0])
    keep = np.ones(n, dtype=bool)
    for group in report.groups:
        members = [int(i) for i in group.ids]
        keep[members if group.earlier_ids else members[1:]] = False
    return np.flatnonzero(keep)


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _projection(x: np.ndarray, dims: int) -> np.ndarray:
    """``x`` projected on its top ``dims`` principal axes (centred); ``x`` itself when it has few dimensions."""
    if x.shape[1] <= dims:
        return np.ascontiguousarray(x, dtype=np.float32)
    mean = x.mean(axis=0)
    sample = x if x.shape[0] <= 20_000 else x[np.linspace(0, x.shape[0] - 1, 20_000).astype(np.int64)]
    centred = sample - mean
    _, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))
    axes = vectors[:, ::-1][:, :dims].astype(np.float32)
    return np.ascontiguousarray((x - mean) @ axes, dtype=np.float32)


def _kmeans(x: np.ndarray, k: int, seed: int, iterations: int) -> np.ndarray:
    """Cluster index of each row (faiss k-means, seeded; one thread, so the result does not depend on the machine)."""
    import faiss

    k = int(max(1, min(k, x.shape[0])))
    if k == 1:
        return np.zeros(x.shape[0], dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        kmeans = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, verbose=False,
                              max_points_per_centroid=max(256, -(-x.shape[0] // k)), min_points_per_centroid=1)
        kmeans.train(x)
        _, assignment = kmeans.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(threads)
    return assignment[:, 0].astype(np.int64)


def _typicality(points: np.ndarray, references: np.ndarray) -> np.ndarray:
    """``1 / mean Euclidean distance to the nearest (up to 20) references`` of each point (itself excluded)."""
    if references.shape[0] <= 1:
        return np.ones(points.shape[0])
    k = min(TYPICALITY_NEIGHBOURS, references.shape[0] - 1)
    out = np.empty(points.shape[0])
    reference_norms = (references ** 2).sum(1)[None, :]
    for start in range(0, points.shape[0], 4096):  # [4096, <= 2000] distances at a time
        block = points[start:start + 4096]
        squared = (block ** 2).sum(1)[:, None] + reference_norms - 2.0 * block @ references.T
        distances = np.sqrt(np.maximum(squared, 0.0))
        nearest = np.partition(distances, k, axis=1)[:, :k + 1]  # k + 1: a point's distance to itself (0) is among them
        nearest.sort(axis=1)
        out[start:start + 4096] = 1.0 / (nearest[:, 1:].mean(axis=1) + 1e-8)
    return out


def _typiclust(features: np.ndarray, candidates: np.ndarray, labeled_rows: np.ndarray, budget: int,
               options: SelectOptions, rank_all: bool = False) -> tuple[list[int], list[float]]:
    """TypiClust on ``features`` (pool rows first, then labeled rows): candidate pool rows and their typicality.
    ``rank_all``: after the ``budget`` picks, the same round robin goes on to the last candidate."""
    rows = np.concatenate([candidates, labeled_rows])
    k = min(len(labeled_rows) + budget, MAX_CLUSTERS, rows.size)
    assignment = _kmeans(features[rows], k, options.seed, options.kmeans_iterations)
    sizes = np.bincount(assignment, minlength=k)
    covered = np.bincount(assignment[candidates.size:], minlength=k)
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(k + 1))
    remaining = np.bincount(assignment[:candidates.size], minlength=k)  # unpicked pool images per cluster
    rng = np.random.default_rng(options.seed)
    picked: list[int] = []
    scores: list[float] = []
    typical: dict[int, list[tuple[float, int]]] = {}
    budget = candidates.size if rank_all else min(budget, candidates.size)
    # the next cluster: fewest labeled or selected images, then not tiny, then the largest, then the lowest index
    heap = [(int(covered[c]), bool(sizes[c] < MIN_CLUSTER_SIZE), -int(sizes[c]), c) for c in range(k) if remaining[c]]
    heapq.heapify(heap)
    while len(picked) < budget and heap:
        _, small, negative_size, cluster = heapq.heappop(heap)
        if cluster not in typical:
            inside = order[bounds[cluster]:bounds[cluster + 1]]
            references = inside if inside.size <= TYPICALITY_REFERENCES else np.sort(
                rng.choice(inside, TYPICALITY_REFERENCES, replace=False))
            pool_members = inside[inside < candidates.size]
            values = _typicality(features[rows[pool_members]], features[rows[references]])
            ranked = np.lexsort((pool_members, -values))
            typical[cluster] = [(float(values[i]), int(pool_members[i])) for i in ranked][::-1]  # pop() = most typical
        value, member = typical[cluster].pop()
        picked.append(int(candidates[member]))
        scores.append(value)
        covered[cluster] += 1
        remaining[cluster] -= 1
        if remaining[cluster]:
            heapq.heappush(heap, (int(covered[cluster]), small, negative_size, cluster))
    return picked, scores


def _fit_head(labeled: np.ndarray, labels: np.ndarray, num_classes: int, options: SelectOptions):  # noqa: ANN202
    """A logistic-regression head on the labeled embeddings; None with fewer than 2 labeled classes."""
    if np.unique(labels).size < 2:
        return None
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    scale = np.float32(np.sqrt(labeled.shape[1]))
    model = LogisticRegression(C=options.regularization, max_iter=options.max_iter, solver="newton-cg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(labeled.astype(np.float64) * scale, labels)  # newton-cg: ~8x less CPU than L-BFGS here

    def probabilities(x: np.ndarray) -> np.ndarray:
        out = np.zeros((x.shape[0], num_classes), dtype=np.float64)
        for start in range(0, x.shape[0], 8192):
            out[start:start + 8192][:, model.classes_] = model.predict_proba(x[start:start + 8192].astype(np.float64) * scale)
        return out

    return probabilities


def _cv_accuracy(labeled: np.ndarray, labels: np.ndarray, num_classes: int, options: SelectOptions) -> float | None:
    counts = np.bincount(labels, minlength=num_classes)
    if (counts > 0).sum() < 2 or counts.max() < 2:
        return None
    from ml.audit import AuditOptions, out_of_sample_probabilities

    probabilities, _ = out_of_sample_probabilities(
        labeled, labels, num_classes, AuditOptions(regularization=options.regularization, max_iter=options.max_iter,
                                                   seed=options.seed, jobs=1))
    return float((probabilities.argmax(axis=1) == labels).mean())


def _margins(probabilities: np.ndarray) -> np.ndarray:
    if probabilities.shape[1] < 2:
        return np.ones(probabilities.shape[0])
    top2 = -np.partition(-probabilities, 1, axis=1)[:, :2]
    return top2[:, 0] - top2[:, 1]


def _kcenter(pool: np.ndarray, candidates: np.ndarray, labeled: np.ndarray, budget: int,
             rank_all: bool = False) -> tuple[list[int], list[float]]:
    x = pool[candidates]
    if labeled.shape[0]:
        nearest = np.full(x.shape[0], np.inf)
        for start in range(0, labeled.shape[0], 1024):
            similarity = x @ labeled[start:start + 1024].T
            nearest = np.minimum(nearest, (2.0 - 2.0 * similarity).min(axis=1))
    else:
        nearest = 2.0 - 2.0 * (x @ _normalised(x.mean(axis=0, keepdims=True))[0])  # the central image goes first
        nearest = nearest.max() + 1.0 - nearest
    picked: list[int] = []
    scores: list[float] = []
    for _ in range(min(budget, candidates.size)):
        best = int(np.argmax(nearest))
        picked.append(int(candidates[best]))
        scores.append(float(np.sqrt(max(nearest[best], 0.0))) if labeled.shape[0] or picked[1:] else 0.0)
        nearest = np.minimum(nearest, 2.0 - 2.0 * (x @ x[best]))
        nearest[best] = -np.inf
    if rank_all:  # the rest by distance to the nearest labeled or selected image, farthest first (not greedy again)
        rest = np.flatnonzero(np.isfinite(nearest))
        rest = rest[np.lexsort((rest, -nearest[rest]))]
        picked += [int(candidates[r]) for r in rest]
        scores += [float(np.sqrt(max(nearest[r], 0.0))) for r in rest]
    return picked, scores


def _diverse_margin(features: np.ndarray, candidates: np.ndarray, labeled_rows: np.ndarray, margins: np.ndarray,
                    predicted: np.ndarray, num_classes: int, budget: int, options: SelectOptions,
                    rank_all: bool = False) -> tuple[list[int], list[float]]:
    """Uncertain, class-balanced and diverse picks, ranked by margin. First ``budget // num_classes`` of each
    predicted class from the ``balanced_factor x budget`` lowest-margin candidates, then the rest from the
    ``uncertain_factor x budget`` lowest-margin ones; every pick by greedy farthest point (cosine on ``features``)
    from the labeled rows and those already taken. ``margins``, ``predicted``: per candidate."""
    order = np.lexsort((candidates, margins))
    shortlist = order[:min(candidates.size, options.uncertain_factor * budget)]
    x = _normalised(features[candidates[shortlist]])
    nearest = np.full(shortlist.size, 4.0)
    labeled = _normalised(features[labeled_rows]) if labeled_rows.size else None
    for start in range(0, 0 if labeled is None else labeled.shape[0], 1024):
        nearest = np.minimum(nearest, (2.0 - 2.0 * (x @ labeled[start:start + 1024].T)).min(axis=1))  # type: ignore[index]
    chosen: list[int] = []

    def take(positions: np.ndarray, count: int) -> None:  # greedy farthest point among shortlist positions
        for _ in range(min(count, positions.size)):
            best = int(positions[np.argmax(nearest[positions])])  # ties: the lower margin (positions are by margin)
            chosen.append(best)
            nearest[:] = np.minimum(nearest, 2.0 - 2.0 * (x @ x[best]))
            nearest[best] = -np.inf

    share = budget // max(1, num_classes)
    if share:
        close = np.arange(min(shortlist.size, options.balanced_factor * budget))
        shortlist_predicted = predicted[shortlist[close]]
        for label in range(num_classes):
            take(close[shortlist_predicted == label], share)
    take(np.setdiff1d(np.arange(shortlist.size), chosen), budget - len(chosen))
    rows = shortlist[np.sort(np.asarray(chosen, dtype=np.int64))]
    if rank_all:  # the rest by margin
        taken = np.zeros(candidates.size, dtype=bool)
        taken[rows] = True
        rows = np.concatenate([rows, order[~taken[order]]])
    return [int(candidates[r]) for r in rows], [float(1.0 - margins[r]) for r in rows]


def select(pool: np.ndarray, labeled: np.ndarray, labels: np.ndarray, num_classes: int, budget: int,
           strategy: Strategy = "auto", options: SelectOptions = SelectOptions(),
           zero_shot: np.ndarray | None = None) -> Selection:
    """Up to ``budget`` pool rows to label next, in rank order (see the module docstring). ``zero_shot``: ``[N,
    num_classes]`` class probabilities of the pool rows by a zero-shot classifier, the uncertainty source while the
    labeled set gives no head (margin) or is below the switch point (auto)."""
    if strategy not in STRATEGIES:
        raise SelectError(f"unknown strategy {strategy!r}; one of {list(STRATEGIES)}")
    pool, labeled, labels = _validate(pool, labeled, labels, num_classes, budget)
    if zero_shot is not None:
        zero_shot = np.asarray(zero_shot, dtype=np.float64)
        if zero_shot.shape != (pool.shape[0], num_classes) or not np.isfinite(zero_shot).all():
            raise SelectError(f"zero-shot probabilities must be a finite [{pool.shape[0]}, {num_classes}] matrix, "
                              f"got shape {zero_shot.shape}")
    rank_all = options.rank_all
    with threadpool_limits(limits=1):
        candidates = candidates_without_duplicates(pool, labeled, options.duplicate_threshold)
        head = _fit_head(labeled, labels, num_classes, options) if labels.size else None
        ran = strategy
        source = "head" if head is not None else None  # what gives the margins and `predicted`
        if strategy == "auto":
            below_switch = labels.size / max(1, num_classes) < options.auto_switch_per_class
            if head is not None and not below_switch:
                ran = "diverse_margin"
            elif zero_shot is not None:
                ran, source = "diverse_margin", "zero_shot"
            else:
                ran = "typiclust"
        elif strategy == "margin" and head is None:
            ran, source = ("margin", "zero_shot") if zero_shot is not None else ("typiclust", None)
        elif head is None and zero_shot is not None:
            source = "zero_shot"
        probabilities = None
        if candidates.size and source == "head":
            probabilities = head(pool[candidates])  # type: ignore[misc]
        elif candidates.size and source == "zero_shot":
            probabilities = zero_shot[candidates]  # type: ignore[index]
        budget = min(budget, candidates.size)
        if budget == 0:  # every pool image is a near-duplicate of a labeled one
            picked, scores, reason = [], [], "random"
        elif ran == "random":
            rng = np.random.default_rng(options.seed)
            order = rng.permutation(candidates.size)
            picked = [int(r) for r in candidates[order if rank_all else order[:budget]]]
            scores, reason = [0.0] * len(picked), "random"
        elif ran == "kcenter":
            picked, scores = _kcenter(pool, candidates, labeled, budget, rank_all)
            reason = "diverse"
        elif ran == "margin":
            margins = _margins(probabilities)
            order = np.lexsort((candidates, margins))
            order = order if rank_all else order[:budget]
            picked = [int(candidates[i]) for i in order]
            scores, reason = [float(1.0 - margins[i]) for i in order], "uncertain"
        else:
            features = _projection(np.concatenate([pool, labeled]), CLUSTER_DIMS)
            if ran == "typiclust":
                labeled_rows = pool.shape[0] + np.arange(labeled.shape[0])
                picked, scores = _typiclust(features, candidates, labeled_rows, budget, options, rank_all)
                reason = "typical"
            else:
                labeled_rows = pool.shape[0] + np.arange(labeled.shape[0])
                picked, scores = _diverse_margin(features, candidates, labeled_rows, _margins(probabilities),
                                                 probabilities.argmax(axis=1), num_classes, budget, options, rank_all)
                reason = "uncertain"
        ranked = np.asarray(picked, dtype=np.int64)
        predicted = predicted_probability = None
        if probabilities is not None:
            position = np.empty(pool.shape[0], dtype=np.int64)
            position[candidates] = np.arange(candidates.size)
            chosen = probabilities[position[ranked]]
            predicted, predicted_probability = chosen.argmax(axis=1), chosen.max(axis=1)
        cv_accuracy = _cv_accuracy(labeled, labels, num_classes, options) if labels.size and options.cv_accuracy else None
    duplicates = np.setdiff1d(np.arange(pool.shape[0]), candidates)
    return Selection(rows=ranked[:budget], scores=np.asarray(scores[:budget], dtype=np.float64),
                     reasons=[reason] * budget,
                     predicted=None if predicted is None else predicted[:budget],
                     predicted_probability=None if predicted_probability is None else predicted_probability[:budget],
                     strategy=ran, candidates=int(candidates.size), cv_accuracy=cv_accuracy, predicted_by=source,
                     rest=ranked[budget:], rest_scores=np.asarray(scores[budget:], dtype=np.float64),
                     rest_predicted=None if predicted is None else predicted[budget:],
                     rest_probability=None if predicted_probability is None else predicted_probability[budget:],
                     duplicates=duplicates)
