"""Near-duplicates, few-shot ``auto`` and the audit on REAL ImageNet features (EfficientNet-Lite0 from the
wheel, the ``real_backbone`` fixture) of the hard sets in ``testkit.learned_sets``, against plain baselines
on the same vectors. Small seeded samples (the full measurement is ``bench/learned.py``); the assertions are
margins that the bench measured on every set and seed, not the bench's exact numbers."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

from handlers.embedding import duplicate_groups
from ml.audit import AuditOptions, audit, confident_learning
from ml.duplicates import DEFAULT_HASH_DISTANCE, DEFAULT_THRESHOLD, find_duplicates
from ml.fewshot import VISION_METHODS, SupportSet, fit_few_shot
from ml.perceptual_hash import hamming_distances, perceptual_hash, perceptual_hashes
from testkit.learned_sets import COPY_KINDS, SET_NAMES, baseline_issues, duplicate_set, flipped, labeled_set, real_embeddings
from tests.fixtures.zeroshot import _few_threads  # noqa: F401 - autouse fixture

ORIGINALS_PER_SET = 10


@pytest.fixture(scope="module")
def copies(real_backbone):
    items = [item for name in SET_NAMES for item in duplicate_set(name, max_originals=ORIGINALS_PER_SET)]
    vectors = real_embeddings([item.image for item in items], str(real_backbone))
    return items, vectors, perceptual_hashes([item.image for item in items])


@pytest.fixture(scope="module")
def labeled(real_backbone):
    data = labeled_set("photo_crops", per_class=15)
    return data, real_embeddings(data.images, str(real_backbone))


def _groups_by_id(report):
    return {i: g for g, group in enumerate(report.groups) for i in group.ids}


def _recall_and_false_links(items, report):
    group_of = _groups_by_id(report)
    copies = [item for item in items if item.kind != "original"]
    found = sum(item.id in group_of and group_of.get(item.original) == group_of[item.id] for item in copies)
    by_id = {item.id: item for item in items}
    false_links = sum(len({by_id[i].original for i in group.ids}) - 1 for group in report.groups)
    return found / len(copies), false_links


def test_default_duplicates_find_copies_of_every_kind_and_never_join_look_alikes(copies):
    items, vectors, hashes = copies
    ids = [item.id for item in items]
    assert len(items) == 2 * ORIGINALS_PER_SET * (1 + len(COPY_KINDS))
    default = find_duplicates(ids, vectors, perceptual_hashes=hashes)
    recall, false_links = _recall_and_false_links(items, default)
    cosine_recall, cosine_false = _recall_and_false_links(items, find_duplicates(ids, vectors))
    print(f"\ndefault: recall {recall:.3f}, false links {false_links}; cosine only >= {DEFAULT_THRESHOLD}: "
          f"recall {cosine_recall:.3f}, false links {cosine_false}")
    assert recall >= 0.95 and false_links == 0
    assert cosine_recall <= 0.85  # the embedding alone loses the re-encoded and resized copies (bench: 0.64-0.72)
    assert all(group.kind == "near" and group.hash_distance is not None for group in default.groups)
    assert any(group.min_similarity < DEFAULT_THRESHOLD for group in default.groups)  # joined by the hash
    # the look-alikes: tiles of one texture are close in the embedding, far in the hash
    originals = np.flatnonzero([item.kind == "original" for item in items])
    similarity = vectors[originals] @ vectors[originals].T
    np.fill_diagonal(similarity, -1)
    distance = hamming_distances(hashes[originals][:, None], hashes[originals][None, :])
    close = similarity >= 0.8
    assert close.any() and distance[close].min() > DEFAULT_HASH_DISTANCE


def test_perceptual_hash_survives_what_a_re_upload_does(copies):
    items, _, hashes = copies
    position = {item.id: i for i, item in enumerate(items)}
    for kind in ("jpeg_q40", "half_size", "brightness_15", "png", "border_10px"):
        distances = [int(hamming_distances(hashes[position[item.id]], hashes[position[item.original]]))
                     for item in items if item.kind == kind]
        assert np.median(distances) <= 4, (kind, distances)


def test_embed_groups_carry_their_signals(copies):
    items, vectors, hashes = copies
    first_texture = items[ORIGINALS_PER_SET * (1 + len(COPY_KINDS))]  # its copies' cosines are 0.75 and up
    assert first_texture.kind == "original"
    chosen = [i for i, item in enumerate(items) if item.original == first_texture.id
              and item.kind in ("original", "jpeg_q40", "brightness_15")] + [0]
    ids = [items[i].id for i in chosen]
    content = ["sha256:" + hashlib.sha256(items[i].data).hexdigest() for i in chosen]
    import torch

    groups = duplicate_groups(ids, content, [torch.from_numpy(vectors[i]) for i in chosen], [], DEFAULT_THRESHOLD,
                              {c: perceptual_hash(items[i].image) for c, i in zip(content, chosen)})
    (group,) = groups
    assert set(group.ids) == set(ids[:-1]) and group.kind == "near"
    assert group.signals is not None and group.signals.cosine == group.similarity < DEFAULT_THRESHOLD
    assert 0 <= group.signals.hash_distance <= DEFAULT_HASH_DISTANCE  # the hash joined the low-cosine copies
    assert group.model_dump()["signals"] == {"hash_distance": group.signals.hash_distance, "cosine": group.similarity}


def test_few_shot_auto_is_within_a_point_of_the_best_method(labeled):
    data, vectors = labeled
    labels = data.labels
    classes = tuple(data.classes)
    gaps = []
    for shots in (1, 4):
        for seed in range(3):
            rng = np.random.default_rng(seed)
            support = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                                      for c in range(len(classes))])
            queries = np.setdiff1d(np.arange(len(labels)), support)
            support_set = SupportSet(vectors[support], labels[support], classes)
            accuracy = {}
            for method in (*VISION_METHODS, "auto"):
                head = fit_few_shot(support_set, method, seed=seed).head
                accuracy[method] = float((head.logits(vectors[queries]).argmax(axis=1) == labels[queries]).mean())
            gaps.append(accuracy["auto"] - max(accuracy[m] for m in VISION_METHODS))
            assert accuracy["auto"] >= 0.8, (shots, seed, accuracy)  # real features: far above chance (0.1)
    print(f"\nauto - best per run: {[round(g, 3) for g in gaps]}")
    assert np.mean(gaps) >= -0.015  # measured -0.0065 here (one query is 0.0074); bench: within 0.006 on 5 seeds


def test_audit_finds_at_least_what_plain_confident_learning_finds(labeled):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    data, vectors = labeled
    labels = data.labels
    classes = len(data.classes)
    ours_hits = base_hits = ours_flags = base_flags = flips = 0
    for seed in range(2):
        rng = np.random.default_rng(seed)
        noisy = labels.copy()
        flipped = rng.choice(len(labels), len(labels) // 10, replace=False)
        noisy[flipped] = (labels[flipped] + rng.integers(1, classes, len(flipped))) % classes
        truth = noisy != labels
        ours = audit(vectors, noisy, classes, AuditOptions(seed=seed)).label_issue
        probabilities = np.zeros((len(labels), classes))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(vectors, noisy):
                model = LogisticRegression().fit(vectors[train], noisy[train])
                probabilities[np.ix_(test, model.classes_)] = model.predict_proba(vectors[test])
        base = confident_learning(probabilities, noisy).label_issue
        ours_hits += int((ours & truth).sum())
        base_hits += int((base & truth).sum())
        ours_flags += int(ours.sum())
        base_flags += int(base.sum())
        flips += int(truth.sum())
    print(f"\nours: {ours_hits}/{ours_flags} flagged right, recall {ours_hits / flips:.3f}; "
          f"baseline: {base_hits}/{base_flags}, recall {base_hits / flips:.3f}")
    assert ours_hits >= base_hits
    assert ours_hits / max(1, ours_flags) >= 0.85
    clean = audit(vectors, labels, classes).label_issue
    assert clean.mean() <= 0.03  # correct labels are rarely flagged


@pytest.fixture(scope="module")
def overlapping(real_backbone):
    data = labeled_set("photo_halves", per_class=24)
    return data, real_embeddings(data.images, str(real_backbone))


def test_audit_beats_plain_confident_learning_where_classes_overlap(overlapping):
    """photo_halves: each photo's left and right halves are two classes, and crops near the middle belong to
    both. The plain baseline flags many correct labels there; the default audit (repeated folds, refit pass)
    keeps its recall with clearly fewer false flags, for random and for class-conditional flips."""
    data, vectors = overlapping
    labels = data.labels
    ours_hits = base_hits = ours_flags = base_flags = flips = 0
    for kind in ("random", "class_conditional"):
        for seed in range(2):
            noisy = flipped(labels, vectors, kind, seed)
            truth = noisy != labels
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = audit(vectors, noisy, len(data.classes), AuditOptions(seed=seed)).label_issue
                base = baseline_issues(vectors, noisy, seed)
            ours_hits += int((ours & truth).sum())
            base_hits += int((base & truth).sum())
            ours_flags += int(ours.sum())
            base_flags += int(base.sum())
            flips += int(truth.sum())
    ours_precision, base_precision = ours_hits / max(1, ours_flags), base_hits / max(1, base_flags)
    print(f"\nphoto_halves: ours {ours_hits}/{ours_flags} (precision {ours_precision:.3f}), baseline "
          f"{base_hits}/{base_flags} (precision {base_precision:.3f}) of {flips} flips")
    assert base_precision <= 0.75  # the set is hard: the textbook rule flags many correct labels
    assert ours_hits >= base_hits
    assert ours_precision >= base_precision + 0.10
    clean = audit(vectors, labels, len(data.classes)).label_issue
    assert clean.mean() <= 0.03
