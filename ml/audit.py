"""Label audit on image embeddings: which given labels are probably wrong, what they should be, which
images are outliers, and which near-duplicates disagree.

For ``N`` L2-normalised embeddings with given labels (class indices):

- **out-of-sample probabilities**: k-fold multinomial logistic regression (scikit-learn, L-BFGS, float32,
  features scaled by ``sqrt(D)``, ``C = 0.01``: measured on digits embeddings and on noisy synthetic 512-d
  vectors, weaker regularisation overfits the flipped labels (precision 0.61 instead of 1.0 at 10k noisy
  vectors), stronger loses recall); every image is scored by the model fitted on the other folds. The BLAS
  pool is limited to one thread per fit (an oversubscribed OpenBLAS on a busy 2-core machine runs ~8x
  slower) and the folds run ``jobs`` at a time.
- **repeated folds**: the k-fold fit is repeated ``repeats`` times (default 5, each split shuffled with its own
  seed; at most ``repeat_rows_budget // N`` = 25,000 // N times, so one split above 12,500 images) and the
  out-of-sample probabilities averaged. On
  real ImageNet features of sets whose classes overlap (docs/learned-features.md) this raised the rule's
  precision by 0.03-0.07 at equal recall: a single split's probabilities near a class boundary depend on
  which few neighbours landed in the training folds, and those wobbles are what flags correct labels.
- **refit pass** (``refit``, default on): the rows the confident-learning rule (below) flags on those
  probabilities are left out, the repeated k-fold fit runs again on the kept rows only, and every row is
  rescored (a kept row by the models of the folds without it, a left-out row by the mean of all the folds'
  models; no model sees the row it scores). The flipped labels no longer pull the fitted boundary towards
  them, so the ranking separates flips from correct labels near the boundary better. The flags of this pass:
  the rule with each class's threshold from its kept rows only (the expected self-confidence of a correct
  label, not lowered by the flipped ones), united with as many rows again taken by the ranking (lowest
  self-confidence first; such a row is suggested its most probable other class). That count is conservative
  (on well-separated synthetic clusters it finds 40 of 50 flips where the single pass finds 48, both without
  a false flag); on real ImageNet features of overlapping classes it raised precision by 0.09-0.12 over the
  single pass, recall -0.04..+0.10 (docs/learned-features.md). The cost is a second repeated k-fold fit
  (bounded like the first by ``repeat_rows_budget``): 1.6-1.9x the single pass's CPU time.
- **neighbour vote** (optional, ``neighbour_weight``, default 0): the labels of each image's ``neighbours``
  most similar other images vote with weights ``exp((cos - 1) / 0.05)`` (out of sample: an image is never its
  own neighbour); the probabilities the rule sees are ``(1 - neighbour_weight) * logistic + neighbour_weight *
  vote``. Measured on real ImageNet features (docs/learned-features.md) a half-and-half mixture found more
  flipped labels on one set and fewer on the other, at slightly lower precision: not the default.
- **confident learning** (Northcutt, Jiang & Chuang, JAIR 2021, section 3): per-class thresholds
  ``t_j = mean of p_j(x) over the examples labeled j`` (mean self-confidence); an example labeled ``i``
  counts towards the confident joint ``C[i][j]`` for ``j = argmax_{k: p_k(x) >= t_k} p_k(x)`` (examples
  with no class above its threshold are not counted); the off-diagonal entries of ``C`` are the label
  issues (the paper's ``C_{y~,y*}`` method, not its pruning variants) and ``j`` is the suggested label.
- **issue score** ``1 - p_label(x)`` (one minus the self-confidence, the paper's ranking): sort by it.
- **outlier score** ``1 - mean cosine similarity to the k nearest other images``.
- **disagreeing near-duplicates**: pairs with cosine similarity ``>= duplicate_threshold`` and different
  labels, within the near-duplicate groups of ``ml.duplicates``.

Neighbours are exact (blocked ``X X^T``) up to ``exact_neighbours_max`` images; above it they come from the
faiss IVF index of ``ml.duplicates`` (PCA to 64 dimensions, ``2 sqrt(N)`` cells, 8 probed per image, candidates
re-scored with the full vectors), so the similarities reported are exact but a true neighbour may be missed
(the price of not doing ``N^2 D`` work at 100,000 images; ``bench/audit.py`` times it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import warnings

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = [
    "AuditError",
    "AuditOptions",
    "AuditTable",
    "ConfidentLearning",
    "audit",
    "confident_learning",
    "disagreeing_duplicates",
    "label_issues",
    "nearest_neighbours",
    "out_of_sample_probabilities",
    "repeated_out_of_sample_probabilities",
]


class AuditError(ValueError):
    """The audit cannot run on what was given (a request error: ``invalid_request``)."""


@dataclass(frozen=True)
class AuditOptions:
    folds: int = 5
    neighbours: int = 10
    duplicate_threshold: float = 0.95
    regularization: float = 0.01  # LogisticRegression's C on the sqrt(D)-scaled features (raw: C = 0.01 D)
    max_iter: int = 100
    seed: int = 0
    jobs: int = 2  # folds fitted at once (threads; each fit's BLAS is single-threaded)
    exact_neighbours_max: int = 20_000
    candidate_dims: int = 64  # unused: the IVF index reduces to its own 64 dimensions (kept for callers)
    block_rows: int = 1024
    max_pairs: int = 10_000  # disagreeing near-duplicate pairs reported
    neighbour_weight: float = 0.0  # share of the neighbour vote in the probabilities (0: logistic regression only)
    repeats: int = 5  # k-fold splits averaged (each with its own shuffle), at most repeat_rows_budget // N
    repeat_rows_budget: int = 25_000  # rows x repeats: above 5,000 images fewer repeats, above 12,500 one split
    refit: bool = True  # second pass: refit without the first pass's flags, then the clean-threshold rule + ranking


@dataclass(frozen=True)
class ConfidentLearning:
    thresholds: np.ndarray  # [C] t_j; NaN for classes nobody is labeled with
    confident_joint: np.ndarray  # [C, C] int64, rows: given label, columns: suggested label
    label_issue: np.ndarray  # [N] bool
    suggested_label: np.ndarray  # [N] int64; the given label where there is no issue


@dataclass(frozen=True)
class AuditTable:
    """One row per image, in input order."""

    labels: np.ndarray  # [N] given labels
    label_probability: np.ndarray  # [N] out-of-sample probability of the given label
    predicted_label: np.ndarray  # [N] out-of-sample argmax
    suggested_label: np.ndarray  # [N]
    suggested_probability: np.ndarray  # [N] out-of-sample probability of the suggested label
    label_issue: np.ndarray  # [N] bool
    issue_score: np.ndarray  # [N] 1 - label_probability
    outlier_score: np.ndarray  # [N]
    duplicate_pairs: list[tuple[int, int, float]]  # (i, j, similarity), i < j, labels differ, most similar first
    confident_joint: np.ndarray
    thresholds: np.ndarray
    cv_accuracy: float  # out-of-sample accuracy against the given labels
    folds: int

    def order(self) -> np.ndarray:
        """Row indices by issue score, highest first (ties: input order)."""
        return np.argsort(-self.issue_score, kind="stable")


def _validate(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise AuditError(f"{labels.shape} labels for embeddings of shape {embeddings.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise AuditError("labels outside the classes")
    if not np.isfinite(embeddings).all():
        raise AuditError("embeddings are not finite")
    problem = _fit_problem(labels, num_classes)
    if problem:
        raise AuditError(problem)
    return embeddings, labels


def _fit_problem(labels: np.ndarray, num_classes: int) -> str | None:
    """Why no model can be fitted on rows with these ``labels`` (None: one can)."""
    counts = np.bincount(labels, minlength=num_classes)
    if (counts > 0).sum() < 2:
        return "an audit needs images of at least 2 classes"
    if counts.max() < 2:
        return "an audit needs at least 2 images of some class"
    return None


def _folds(labels: np.ndarray, wanted: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds; classes rarer than the fold count are spread round-robin (scikit-learn would warn)."""
    counts = np.bincount(labels)
    folds = int(max(2, min(wanted, counts.max())))
    rng = np.random.default_rng(seed)
    assignment = np.empty(labels.size, dtype=np.int64)
    offset = 0
    for label in np.flatnonzero(counts):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        assignment[rows] = (np.arange(rows.size) + offset) % folds
        offset += rows.size  # rotate so small classes do not all start in fold 0
    return [(np.flatnonzero(assignment != k), np.flatnonzero(assignment == k)) for k in range(folds)]


def out_of_sample_probabilities(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                                options: AuditOptions = AuditOptions(),
                                fit_rows: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``([N, C] float32 probabilities, folds)``: each row from the model fitted without that row's fold.
    A class absent from a fold's training rows gets probability 0 there. With ``fit_rows`` (``[N]`` bool) only
    those rows are split into folds and trained on; every other row is scored by the mean of all the folds'
    models (none of which saw it)."""
    from sklearn.exceptions import ConvergenceWarning  # scikit-learn's import takes ~0.9 s: only when auditing
    from sklearn.linear_model import LogisticRegression

    embeddings, labels = _validate(embeddings, labels, num_classes)
    features = embeddings * np.float32(np.sqrt(embeddings.shape[1]))
    if fit_rows is None:
        splits = _folds(labels, options.folds, options.seed)
        held_out = np.zeros(0, dtype=np.int64)
    else:
        fit_rows = np.asarray(fit_rows, dtype=bool)
        if fit_rows.shape != labels.shape:
            raise AuditError(f"fit_rows of shape {fit_rows.shape} for {labels.size} labels")
        kept = np.flatnonzero(fit_rows)
        problem = _fit_problem(labels[kept], num_classes)
        if problem:
            raise AuditError(problem)
        splits = [(kept[train], kept[test]) for train, test in _folds(labels[kept], options.folds, options.seed)]
        held_out = np.flatnonzero(~fit_rows)
    probabilities = np.zeros((labels.size, num_classes), dtype=np.float32)
    held_out_share = np.float32(1.0 / len(splits))

    def fit_fold(split: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
        """Fills the fold's own rows; returns its [held_out, C] share of the held-out rows' mean."""
        train_rows, test_rows = split
        present = np.unique(labels[train_rows])
        share = np.zeros((held_out.size, num_classes), dtype=np.float32) if held_out.size else None
        if present.size == 1:
            probabilities[np.ix_(test_rows, present)] = 1.0
            if share is not None:
                share[:, present] = held_out_share
            return share
        model = LogisticRegression(C=options.regularization, max_iter=options.max_iter)
        model.fit(features[train_rows], labels[train_rows])
        probabilities[np.ix_(test_rows, model.classes_)] = model.predict_proba(features[test_rows])
        if share is not None:
            share[:, model.classes_] = held_out_share * model.predict_proba(features[held_out])
        return share

    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the time; a near-optimum is enough
        if options.jobs > 1:
            with ThreadPoolExecutor(max_workers=min(options.jobs, len(splits))) as pool:
                shares = list(pool.map(fit_fold, splits))
        else:
            shares = [fit_fold(split) for split in splits]
    if held_out.size:
        probabilities[held_out] = np.sum(shares, axis=0)
    return probabilities, len(splits)


REPEAT_SEED_STRIDE = 7919


def repeated_out_of_sample_probabilities(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                                         options: AuditOptions = AuditOptions(),
                                         fit_rows: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The mean of :func:`out_of_sample_probabilities` over ``repeats`` k-fold splits (split ``r`` shuffled with
    seed ``seed + 7919 r``), ``repeats = min(options.repeats, options.repeat_rows_budget // N)``, at least 1: the
    extra work is bounded by one fit on ``repeat_rows_budget`` rows. Every image is still scored only by models
    that never saw it; averaging models fitted on different neighbours' labels smooths the probabilities of
    images near a class boundary. ``fit_rows``: as in :func:`out_of_sample_probabilities`."""
    repeats = int(max(1, min(options.repeats, options.repeat_rows_budget // max(1, labels.shape[0]))))
    total, folds = out_of_sample_probabilities(embeddings, labels, num_classes, options, fit_rows)
    for r in range(1, repeats):
        more, _ = out_of_sample_probabilities(embeddings, labels, num_classes,
                                              replace(options, seed=options.seed + REPEAT_SEED_STRIDE * r), fit_rows)
        total += more
    if repeats > 1:
        total /= np.float32(repeats)
    return total, folds


def confident_learning(probabilities: np.ndarray, labels: np.ndarray,
                       threshold_rows: np.ndarray | None = None) -> ConfidentLearning:
    """The confident-learning rule on out-of-sample ``probabilities`` ``[N, C]`` and given ``labels``. The
    thresholds are the mean self-confidence of each class over all rows, or over ``threshold_rows`` (``[N]``
    bool) where given (a class without such rows then has no threshold)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = probabilities.shape
    self_confidence = probabilities[np.arange(n), labels]
    use = np.ones(n, dtype=bool) if threshold_rows is None else np.asarray(threshold_rows, dtype=bool)
    counts = np.bincount(labels[use], minlength=c)
    sums = np.bincount(labels[use], weights=self_confidence[use], minlength=c)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    # A class nobody is labeled with has no threshold: no example is confidently assigned to it.
    above = probabilities >= np.where(np.isnan(thresholds), np.inf, thresholds)[None, :]
    masked = np.where(above, probabilities, -np.inf)
    suggested = masked.argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((c, c), dtype=np.int64)
    np.add.at(joint, (labels[counted], suggested[counted]), 1)
    issue = counted & (suggested != labels)
    return ConfidentLearning(thresholds, joint, issue, np.where(issue, suggested, labels))


def nearest_neighbours(embeddings: np.ndarray, k: int, options: AuditOptions = AuditOptions()) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other rows of each row (cosine on L2-normalised rows): ``(indices [N, k],
    similarities [N, k])``, most similar first. Exact up to ``options.exact_neighbours_max`` rows, else
    principal-axes candidates re-scored exactly (see the module docstring)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    n = embeddings.shape[0]
    k = int(min(k, n - 1))
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    if n <= options.exact_neighbours_max:
        return _top_k(embeddings, embeddings, k, options.block_rows)
    from ml.duplicates import index_top_k

    indices, similarities = index_top_k(embeddings, k)
    missing = indices < 0  # a row whose probed cells held fewer than k others: the exact pass for those rows
    if missing.any():
        rows = np.flatnonzero(missing.any(axis=1))
        indices[rows], similarities[rows] = _top_k(embeddings[rows], embeddings, k, options.block_rows, offset=rows)
    return indices, similarities


def _top_k(queries: np.ndarray, keys: np.ndarray, k: int, block_rows: int,
           offset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar keys of each query, the query's own row excluded (``offset[i]``: the key row of
    query ``i``; by default query ``i`` is key ``i``)."""
    n = queries.shape[0]
    own = np.arange(n) if offset is None else np.asarray(offset)
    indices = np.empty((n, k), dtype=np.int64)
    similarities = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = queries[start:stop] @ keys.T
        block[np.arange(stop - start), own[start:stop]] = -np.inf  # not its own neighbour
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(top, order, axis=1)
        similarities[start:stop] = np.take_along_axis(values, order, axis=1)
    return indices, similarities


def disagreeing_duplicates(embeddings: np.ndarray, labels: np.ndarray, threshold: float,
                           max_pairs: int = 10_000) -> list[tuple[int, int, float]]:
    """Near-duplicate pairs with different labels: ``(i, j, similarity)``, ``i < j``, similarity >=
    ``threshold``, most similar first, at most ``max_pairs``. The groups come from
    :func:`ml.duplicates.find_duplicates` (exact search up to its ``EXACT_MAX`` items, a faiss index above);
    within a group holding more than one label, every differently-labeled pair at or above the threshold
    is reported (members linked only through a third are not a pair)."""
    from ml.duplicates import find_duplicates

    embeddings = np.asarray(embeddings, dtype=np.float32)
    ids = [str(i) for i in range(embeddings.shape[0])]
    report = find_duplicates(ids, embeddings, threshold=threshold, max_groups=max_pairs)
    cutoff = threshold - 1e-6  # identical vectors may score 0.99999994 in float32
    pairs: list[tuple[int, int, float]] = []
    for group in report.groups:
        members = np.array(sorted(int(i) for i in group.ids))
        if np.unique(labels[members]).size < 2:
            continue
        similarity = embeddings[members] @ embeddings[members].T
        rows, columns = np.nonzero(np.triu(similarity >= cutoff, k=1) & (labels[members][:, None] != labels[members][None, :]))
        pairs.extend((int(members[r]), int(members[c]), float(min(similarity[r, c], 1.0))) for r, c in zip(rows, columns))
    pairs.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return pairs[:max_pairs]


VOTE_TEMPERATURE = 0.05


def neighbour_vote(indices: np.ndarray, similarities: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N, C]`` probabilities from the labels of each row's neighbours (``indices`` ``[N, k]``, never the row
    itself), weighted ``exp((cos - 1) / VOTE_TEMPERATURE)``; a row without neighbours gets a uniform vote."""
    n, k = indices.shape
    votes = np.zeros((n, num_classes), dtype=np.float64)
    if k:
        weights = np.exp((similarities.astype(np.float64) - 1.0) / VOTE_TEMPERATURE)
        np.add.at(votes, (np.repeat(np.arange(n), k), labels[indices].ravel()), weights.ravel())
    totals = votes.sum(axis=1, keepdims=True)
    return np.where(totals > 0, votes / np.maximum(totals, 1e-300), 1.0 / num_classes).astype(np.float32)


REFIT_SEED_OFFSET = 1


def _refit_rule(probabilities: np.ndarray, labels: np.ndarray, kept: np.ndarray) -> ConfidentLearning:
    """The second pass's flags on the refitted ``probabilities``: the confident-learning rule with thresholds
    from the ``kept`` rows (the first pass's unflagged ones), united with as many rows again taken by the
    ranking (lowest self-confidence first). A row flagged by the ranking alone is suggested its most probable
    other class."""
    rule = confident_learning(probabilities, labels, threshold_rows=kept)
    count = int(rule.label_issue.sum())
    if count == 0:
        return rule
    n = labels.size
    self_confidence = probabilities[np.arange(n), labels]
    ranked = np.zeros(n, dtype=bool)
    ranked[np.argsort(self_confidence, kind="stable")[:count]] = True
    issue = rule.label_issue | ranked
    others = np.array(probabilities, dtype=np.float64)
    others[np.arange(n), labels] = -np.inf
    suggested = np.where(rule.label_issue, rule.suggested_label, np.where(issue, others.argmax(axis=1), labels))
    return ConfidentLearning(rule.thresholds, rule.confident_joint, issue, suggested)


def label_issues(embeddings: np.ndarray, labels: np.ndarray, num_classes: int, options: AuditOptions = AuditOptions(),
                 vote: np.ndarray | None = None) -> tuple[np.ndarray, int, ConfidentLearning]:
    """``(probabilities, folds, rule)``: the fitting and flagging part of :func:`audit` (the repeated k-fold pass,
    the rule, and the refit pass when ``options.refit``), without the neighbour pass; ``vote`` is the neighbour
    vote mixed in by ``options.neighbour_weight``."""
    embeddings, labels = _validate(embeddings, labels, num_classes)

    def scored(fit_rows: np.ndarray | None, seed: int) -> tuple[np.ndarray, int]:
        probabilities, folds = repeated_out_of_sample_probabilities(embeddings, labels, num_classes,
                                                                    replace(options, seed=seed), fit_rows)
        if vote is not None:
            probabilities = ((1.0 - options.neighbour_weight) * probabilities + options.neighbour_weight * vote).astype(np.float32)
        return probabilities, folds

    probabilities, folds = scored(None, options.seed)
    rule = confident_learning(probabilities, labels)
    kept = ~rule.label_issue
    if options.refit and rule.label_issue.any() and _fit_problem(labels[kept], num_classes) is None:
        probabilities, _ = scored(kept, options.seed + REFIT_SEED_OFFSET)
        rule = _refit_rule(probabilities, labels, kept)
    return probabilities, folds, rule


def audit(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
          options: AuditOptions = AuditOptions()) -> AuditTable:
    """The whole audit table for ``embeddings`` ``[N, D]`` (L2-normalised) with given class indices."""
    if not 0.0 <= options.neighbour_weight <= 1.0:
        raise AuditError(f"neighbour_weight must be in [0, 1], got {options.neighbour_weight}")
    if options.repeats < 1:
        raise AuditError(f"repeats must be at least 1, got {options.repeats}")
    embeddings, labels = _validate(embeddings, labels, num_classes)
    neighbour_indices, neighbour_similarities = nearest_neighbours(embeddings, options.neighbours, options)
    vote = (neighbour_vote(neighbour_indices, neighbour_similarities, labels, num_classes)
            if options.neighbour_weight > 0 else None)
    probabilities, folds, rule = label_issues(embeddings, labels, num_classes, options, vote)
    label_probability = probabilities[np.arange(labels.size), labels]
    if neighbour_similarities.shape[1]:
        outlier = 1.0 - neighbour_similarities.mean(axis=1)
    else:
        outlier = np.zeros(labels.size, dtype=np.float32)
    predicted = probabilities.argmax(axis=1)
    return AuditTable(
        labels=labels,
        label_probability=label_probability,
        predicted_label=predicted,
        suggested_label=rule.suggested_label,
        suggested_probability=probabilities[np.arange(labels.size), rule.suggested_label],
        label_issue=rule.label_issue,
        issue_score=(1.0 - label_probability).astype(np.float32),
        outlier_score=outlier.astype(np.float32),
        duplicate_pairs=disagreeing_duplicates(embeddings, labels, options.duplicate_threshold, options.max_pairs),
        confident_joint=rule.confident_joint,
        thresholds=rule.thresholds,
        cv_accuracy=float((predicted == labels).mean()),
        folds=folds,
    )
