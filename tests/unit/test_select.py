"""``ml.select`` on synthetic clustered embeddings: every strategy is deterministic, never picks a near-duplicate of
a labeled or already picked image, and does what it says (typical picks cover the clusters, margin picks sit between
labeled classes, k-center picks are far from the labeled set, auto switches at its measured point and balances its
uncertain picks over the predicted classes)."""

from __future__ import annotations

import numpy as np
import pytest

from ml.select import STRATEGIES, SelectError, SelectOptions, select

DIM = 32


def clusters(classes: int = 5, per_class: int = 60, seed: int = 0, spread: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, DIM))
    y = np.repeat(np.arange(classes), per_class)
    x = centres[y] + spread * rng.normal(size=(y.size, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_and_never_a_duplicate(strategy):
    x, y = clusters()
    labeled = np.arange(0, x.shape[0], 30)  # 2 per class
    pool = np.setdiff1d(np.arange(x.shape[0]), labeled)
    copies = np.concatenate([x[pool], x[pool[:10]], x[labeled[:3]]])  # 10 pool copies, 3 copies of labeled images
    first = select(copies, x[labeled], y[labeled], 5, copies.shape[0], strategy)
    again = select(copies, x[labeled], y[labeled], 5, copies.shape[0], strategy)
    assert np.array_equal(first.rows, again.rows) and np.array_equal(first.scores, again.scores)
    assert first.candidates == pool.size and first.rows.size == pool.size  # the 13 copies are no candidates
    assert set(first.rows.tolist()) == set(range(pool.size))  # the originals, each once
    other = select(copies, x[labeled], y[labeled], 5, 20, strategy, SelectOptions(seed=1))
    assert other.rows.size == 20 and len(set(other.rows.tolist())) == 20


def test_cold_start_typical_picks_cover_every_cluster():
    x, y = clusters(classes=6)
    picked = select(x, np.zeros((0, DIM), np.float32), np.zeros(0, np.int64), 1, 6, "auto")
    assert picked.strategy == "typiclust" and picked.predicted is None and picked.cv_accuracy is None
    assert sorted(y[picked.rows].tolist()) == list(range(6)) and picked.reasons == ["typical"] * 6
    kcenter = select(x, np.zeros((0, DIM), np.float32), np.zeros(0, np.int64), 1, 6, "kcenter")
    assert kcenter.reasons == ["diverse"] * 6 and len(set(kcenter.rows.tolist())) == 6


def test_margin_picks_the_images_between_two_classes_first():
    x, y = clusters(classes=2, spread=0.3)
    between = (x[:5] + x[60:65]) / 2
    between /= np.linalg.norm(between, axis=1, keepdims=True)
    labeled = np.r_[0:10, 60:70]
    pool = np.concatenate([x[10:60], x[70:], between])
    picked = select(pool, x[labeled], y[labeled], 2, 5, "margin")
    assert sorted(picked.rows.tolist()) == list(range(100, 105))  # the five blends
    assert picked.reasons == ["uncertain"] * 5 and list(picked.scores) == sorted(picked.scores, reverse=True)
    assert picked.cv_accuracy == 1.0 and picked.predicted is not None and picked.predicted_probability.max() < 0.9


def test_auto_switches_from_typical_to_uncertain_at_the_measured_point():
    x, y = clusters()
    switch = SelectOptions().auto_switch_per_class
    few = np.r_[[k * 60 + i for k in range(5) for i in range(int(switch) - 1)]]
    many = np.r_[[k * 60 + i for k in range(5) for i in range(int(switch))]]
    assert select(np.delete(x, few, 0), x[few], y[few], 5, 5, "auto").strategy == "typiclust"
    late = select(np.delete(x, many, 0), x[many], y[many], 5, 5, "auto")
    assert late.strategy == "diverse_margin" and late.reasons == ["uncertain"] * 5
    assert select(x[5:], x[:5], y[:5], 5, 5, "margin").strategy == "typiclust"  # one labeled class: no head


def test_auto_gives_each_predicted_class_its_share_of_the_uncertain_picks():
    from ml.select import _diverse_margin

    rng = np.random.default_rng(0)
    labeled = rng.normal(size=(2, DIM))
    spread = rng.normal(size=(10, DIM))  # predicted 0: far from everything, and from each other
    near = labeled[1] + 0.05 * rng.normal(size=(10, DIM))  # predicted 1: close to a labeled image
    features = np.concatenate([spread, near, labeled]).astype(np.float32)
    candidates, labeled_rows = np.arange(20), np.array([20, 21])
    margins = np.r_[np.linspace(0.10, 0.19, 10), np.linspace(0.105, 0.195, 10)]  # interleaved: all 20 uncertain
    predicted = np.repeat([0, 1], 10)
    balanced, _ = _diverse_margin(features, candidates, labeled_rows, margins, predicted, 2, 4, SelectOptions())
    assert sorted(predicted[balanced].tolist()) == [0, 0, 1, 1]  # budget // classes = 2 of each predicted class
    assert balanced == sorted(balanced, key=lambda row: margins[row])  # ranked by margin
    unbalanced, _ = _diverse_margin(features, candidates, labeled_rows, margins, predicted, 2, 4,
                                    SelectOptions(balanced_factor=0))
    assert predicted[unbalanced].tolist() == [0, 0, 0, 0]  # farthest point alone takes the spread-out class only


def test_kcenter_picks_far_from_the_labeled_set():
    x, y = clusters()
    labeled = np.flatnonzero(y < 4)[::5]  # classes 0-3 labeled, class 4 not at all
    pool = np.flatnonzero(~np.isin(np.arange(y.size), labeled))
    picked = select(x[pool], x[labeled], y[labeled], 5, 1, "kcenter")
    assert y[pool[picked.rows[0]]] == 4


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rank_all_ranks_every_other_candidate_after_the_same_selection(strategy):
    x, y = clusters(classes=3, per_class=40)
    labeled = np.r_[0:6, 40:46, 80:86]  # 6 per class: auto is past its switch point
    pool = np.concatenate([np.delete(x, labeled, 0), x[[6, 7]]])  # the last two copy pool rows 0 and 1
    plain = select(pool, x[labeled], y[labeled], 3, 7, strategy)
    full = select(pool, x[labeled], y[labeled], 3, 7, strategy, SelectOptions(rank_all=True))
    assert np.array_equal(full.rows, plain.rows) and np.array_equal(full.scores, plain.scores)
    assert plain.rest.size == 0
    ranked = np.concatenate([full.rows, full.rest])
    assert sorted(ranked.tolist()) == list(range(pool.shape[0] - 2)) and full.duplicates.tolist() == [102, 103]
    assert full.rest_predicted is not None and full.rest_predicted.size == full.rest.size
    if strategy in ("margin", "auto"):  # uncertainty goes on by margin: the scores (1 - margin) fall
        assert np.all(np.diff(full.rest_scores) <= 1e-12)


def test_zero_shot_margin_without_labels():
    x, y = clusters(classes=2, spread=1.0)  # no near-duplicates
    probabilities = np.stack([np.linspace(0.0, 1.0, y.size), 1 - np.linspace(0.0, 1.0, y.size)], axis=1)
    no_labels = (np.zeros((0, DIM), np.float32), np.zeros(0, np.int64))
    for strategy in ("margin", "auto"):
        picked = select(x, *no_labels, 2, 4, strategy, zero_shot=probabilities)
        assert picked.predicted_by == "zero_shot" and picked.reasons == ["uncertain"] * 4 and picked.candidates == y.size
        # near the zero-shot tie, whatever x says (auto: among the 10 x budget least certain, one per cluster)
        assert np.all(np.abs(probabilities[picked.rows, 0] - 0.5) < (0.02 if strategy == "margin" else 0.2))
        assert np.array_equal(picked.predicted, probabilities[picked.rows].argmax(axis=1))
    assert select(x, *no_labels, 2, 4, "margin").strategy == "typiclust"  # no classifier at all
    head = select(x[10:], x[[0, 1, 60, 61]], y[[0, 1, 60, 61]], 2, 4, "margin", zero_shot=probabilities[10:])
    assert head.predicted_by == "head"  # a head from the labels wins
    with pytest.raises(SelectError):
        select(x, *no_labels, 2, 4, "margin", zero_shot=probabilities[:5])


def test_bad_input_is_a_select_error():
    x, y = clusters()
    with pytest.raises(SelectError):
        select(x, x[:3], np.array([0, 1, 9]), 5, 2, "auto")
    with pytest.raises(SelectError):
        select(np.full((4, DIM), np.nan, np.float32), x[:0], y[:0], 1, 2, "random")
    with pytest.raises(SelectError):
        select(x, x[:0], y[:0], 1, 2, "entropy")  # type: ignore[arg-type]


def test_selection_csv_lists_the_whole_pool_once_a_row_at_a_time(tmp_path):
    import csv

    from handlers.select import CSV_COLUMNS, run_selection, write_selection_csv
    from schemas.annotation import ImageRef, ImageResult, SelectRequest

    x, y = clusters(classes=4, per_class=500, spread=1.0)
    x = np.concatenate([x, x[:3]])  # three copies: left out as near-duplicates
    pool = [ImageRef(id=f"img-{'x' * 20}-{k:06d}", url=f"https://example.com/{k}.png") for k in range(x.shape[0] + 1)]
    failed = {x.shape[0]: ImageResult(id=pool[-1].id, predictions=[], error={"code": "http_status", "message": "404"})}
    matrix = np.concatenate([x, np.zeros((1, DIM), np.float32)])
    zero_shot = np.eye(4)[np.r_[y, y[:3], 0]] * 0.7 + 0.075  # a zero-shot classifier that knows the classes
    request = SelectRequest.model_validate({"task": "select", "manifest_url": "s3://b/pool.jsonl", "budget": 50,
                                            "strategy": "auto"})
    picked = run_selection(request, pool, [], ["a", "b", "c", "d"], matrix, failed, np.zeros((0, DIM), np.float32), {},
                           zero_shot)
    path = tmp_path / "selection.csv"
    write_selection_csv(path, picked, pool, list(failed.values()))
    with path.open(newline="", encoding="utf-8") as table:
        rows = list(csv.reader(table))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 1 + len(pool)
    assert sorted(row[0] for row in rows[1:]) == sorted(p.id for p in pool)  # every pool id once
    ranked = [row for row in rows[1:] if row[1]]
    assert [int(row[1]) for row in ranked] == list(range(len(pool) - 4))
    assert [row[0] for row in ranked[:50]] == [e.id for e in picked.entries]
    assert [row[3] for row in rows[-4:-1]] == ["duplicate"] * 3 and rows[-1][6] == "http_status"
    assert all(row[4] in "abcd" and row[4] for row in ranked)  # the zero-shot top-1 for every ranked image
    assert path.stat().st_size / len(pool) < 100  # ~10 MB for a 100,000-image pool with 30-character ids
