"""Learned features judged with real ImageNet weights against plain baselines on the same vectors.

Run from the repository root:  .venv/bin/python bench/learned.py [--sets photo_crops textures] [--per-class 60]

Parts (``--parts``): duplicates (``photo_crops``, ``textures``), audit and few-shot (every set in ``--sets``,
including the overlapping-class sets ``photo_halves`` and ``texture_blends``), and ``fit_time`` (a synthetic
100-class few-shot fit with a text tower, single-thread CPU seconds).

Vectors: the worker's timm embedder (``ml.timm_backbone``, ``tf_efficientnet_lite0`` with the real weights of
``testkit.real_backbone``) of the sets of ``testkit.learned_sets`` (look-alike photo crops; tinted textures).
Embeddings are cached under ``.cache/learned/`` by set, size and weights file, so a rerun measures the methods
only (the first run embeds ~2,300 images: a few minutes on 2 idle cores).

Per set:

1. Near-duplicates: non-overlapping tiles of every source (distinct look-alikes) plus one copy of each per kind
   (``COPY_KINDS``). Recall per copy kind (the copy in the same group as its original) and false links (groups
   joining different originals, counted as extra originals per group) for cosine only at the default
   threshold, the perceptual hash only, and the default (both signals).
2. Audit: 10% of the labels flipped at random, or to the most similar class (class-conditional), or none
   (clean), over ``--audit-seeds`` noise draws (mean reported, per-seed values in the JSON). The default ``ml.audit.audit``
   (and, for its cost and gain, the same without its refit pass, ``refit=False``) against the plain baseline: 5-fold
   ``LogisticRegression()`` (scikit-learn defaults) out-of-sample probabilities and the confident-learning rule
   on the same vectors. Precision / recall of the flagged labels against the flipped ones, flag rate on clean;
   and the best cut of ours' ranking (``issue_score``): the highest precision any threshold on it reaches at the
   baseline's recall, chosen knowing the flips (an upper bound for every rule that flags by that ranking).
3. Few-shot: 1/4/16 examples per class over 5 seeds (support drawn per seed, every other image a query):
   accuracy of every method without a text tower and of ``auto``, auto's picks, fit times.

Every loop is bounded by the set sizes. Prints tables and one JSON line (prefix ``BENCH_JSON ``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml.audit import AuditOptions, audit  # noqa: E402
from ml.duplicates import DEFAULT_THRESHOLD, find_duplicates  # noqa: E402
from ml.fewshot import VISION_METHODS, SupportSet, fit_few_shot  # noqa: E402
from ml.perceptual_hash import perceptual_hashes  # noqa: E402
from testkit.learned_sets import (  # noqa: E402
    COPY_KINDS,
    LABELED_SET_NAMES,
    NOISE_RATE,
    SET_NAMES,
    baseline_issues,
    duplicate_set,
    flipped,
    labeled_set,
    real_embeddings,
)
from testkit.real_backbone import lite0_safetensors  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "learned"
SHOTS = (1, 4, 16)
SEEDS = 5
PARTS = ("duplicates", "audit", "few_shot", "fit_time")


def cached_embeddings(key: str, images, weights: Path) -> np.ndarray:
    digest = hashlib.sha256(f"{key}|{weights.stat().st_size}|{weights.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    path = CACHE / f"{key}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    vectors = real_embeddings(list(images), str(weights))
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


# -- duplicates --------------------------------------------------------------------------------------------------


def duplicates_scores(items, vectors: np.ndarray, **kwargs) -> dict:
    ids = [item.id for item in items]
    started = time.perf_counter()
    report = find_duplicates(ids, vectors, max_groups=len(ids), max_group_size=len(ids), **kwargs)
    seconds = time.perf_counter() - started
    group_of = {}
    false_links = 0
    for g, group in enumerate(report.groups):
        for i in group.ids:
            group_of[i] = g
        originals = {items[ids.index(i)].original for i in group.ids}
        false_links += len(originals) - 1
    recall = {}
    for kind in COPY_KINDS:
        copies = [item for item in items if item.kind == kind]
        found = [item.id in group_of and group_of.get(item.original) == group_of[item.id] for item in copies]
        recall[kind] = float(np.mean(found))
    recall["all"] = float(np.mean([recall[k] for k in COPY_KINDS]))
    return {"recall": recall, "false_links": false_links, "seconds": round(seconds, 4)}


def bench_duplicates(name: str, weights: Path, max_originals: int) -> dict:
    items = duplicate_set(name, max_originals=max_originals)
    vectors = cached_embeddings(f"{name}-dup-{max_originals}", (item.image for item in items), weights)
    started = time.perf_counter()
    hashes = perceptual_hashes([item.image for item in items])
    hash_seconds = time.perf_counter() - started
    content = [hashlib.sha256(item.data).hexdigest() for item in items]
    rows = {
        f"cosine only (>= {DEFAULT_THRESHOLD})": duplicates_scores(items, vectors, hashes=content),
        "hash only (<= 10 bits)": duplicates_scores(items, vectors, hashes=content, threshold=1.0,
                                                    perceptual_hashes=hashes, hash_min_cosine=-1.0),
        "default (cosine or hash)": duplicates_scores(items, vectors, hashes=content, perceptual_hashes=hashes),
    }
    return {"items": len(items), "originals": sum(item.kind == "original" for item in items),
            "hash_ms_per_image": round(1000 * hash_seconds / len(items), 3), "rows": rows}


# -- audit -------------------------------------------------------------------------------------------------------


def precision_recall(flags: np.ndarray, truth: np.ndarray) -> dict:
    hits = int((flags & truth).sum())
    return {"precision": hits / max(1, int(flags.sum())), "recall": hits / max(1, int(truth.sum())),
            "flagged": int(flags.sum()), "flag_rate": float(flags.mean())}


def best_cut_precision(scores: np.ndarray, truth: np.ndarray, recall: float) -> float:
    """The highest precision of any threshold on ``scores`` (flag the highest) whose recall is at least
    ``recall``: chosen knowing ``truth``, an upper bound for every rule that flags by this ranking."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(truth[order])
    enough = hits / truth.sum() >= recall - 1e-12
    return float((hits / np.arange(1, len(order) + 1))[enough].max())


def bench_audit(vectors: np.ndarray, labels: np.ndarray, seeds: int, first_seed: int = 0) -> dict:
    """Per noise kind, the mean over ``seeds`` noise draws (the audit's fold seed follows the draw)."""
    out = {}
    classes = int(labels.max()) + 1
    for kind in ("random", "class_conditional", "clean"):
        rows: dict[str, list[dict]] = {"ours": [], "single_pass": [], "baseline": []}
        for seed in range(first_seed, first_seed + (seeds if kind != "clean" else 1)):
            noisy = flipped(labels, vectors, kind, seed)
            truth = noisy != labels
            started, cpu = time.perf_counter(), time.process_time()
            table = audit(vectors, noisy, classes, AuditOptions(seed=seed))
            ours = table.label_issue
            rows["ours"].append({**precision_recall(ours, truth), "seconds": time.perf_counter() - started,
                                 "cpu_seconds": time.process_time() - cpu})
            started, cpu = time.perf_counter(), time.process_time()
            single = audit(vectors, noisy, classes, AuditOptions(seed=seed, refit=False))
            rows["single_pass"].append({**precision_recall(single.label_issue, truth),
                                        "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu})
            started, cpu = time.perf_counter(), time.process_time()
            base = baseline_issues(vectors, noisy, seed)
            rows["baseline"].append({**precision_recall(base, truth), "seconds": time.perf_counter() - started,
                                     "cpu_seconds": time.process_time() - cpu})
            if truth.any():
                for who, result in (("ours", table), ("single_pass", single)):
                    rows[who][-1]["best_cut_precision"] = best_cut_precision(result.issue_score, truth,
                                                                             rows["baseline"][-1]["recall"])
        out[kind] = {who: {key: round(float(np.mean([r[key] for r in runs])), 4) for key in runs[0]}
                     for who, runs in rows.items()}
        for who, runs in rows.items():
            out[kind][who]["per_seed"] = [(round(r["precision"], 3), round(r["recall"], 3)) for r in runs]
    return out


# -- few-shot ----------------------------------------------------------------------------------------------------


def bench_few_shot(vectors: np.ndarray, labels: np.ndarray) -> dict:
    classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    out = {}
    for shots in SHOTS:
        accuracy: dict[str, list[float]] = {m: [] for m in (*VISION_METHODS, "auto")}
        seconds: dict[str, list[float]] = {m: [] for m in accuracy}
        picks = []
        for seed in range(SEEDS):
            rng = np.random.default_rng(seed)
            support = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False)
                                      for c in range(len(classes))])
            queries = np.setdiff1d(np.arange(len(labels)), support)
            support_set = SupportSet(vectors[support], labels[support], classes)
            for method in accuracy:
                started = time.perf_counter()
                result = fit_few_shot(support_set, method, seed=seed)
                seconds[method].append(time.perf_counter() - started)
                accuracy[method].append(float((result.head.logits(vectors[queries]).argmax(axis=1) == labels[queries]).mean()))
                if method == "auto":
                    picks.append(result.method)
        mean = {m: float(np.mean(v)) for m, v in accuracy.items()}
        best = max(mean[m] for m in VISION_METHODS)
        out[str(shots)] = {"accuracy": mean, "auto_minus_best": mean["auto"] - best, "auto_picks": picks,
                           "fit_ms": {m: round(1000 * float(np.mean(v)), 1) for m, v in seconds.items()}}
    return out


def bench_text_fit(classes: int = 100, dims: int = 512, shots: tuple[int, ...] = (4, 16), noise: float = 4.0) -> dict:
    """Single-thread CPU seconds (``time.process_time``) of a ``classes``-way few-shot fit WITH a text tower
    (synthetic: unit class centres in ``dims`` dimensions, support = centre + ``noise`` x Gaussian, zero-shot
    weights = centre + Gaussian, logit scale 100; overlapping enough that the linear probe needs ~100
    Newton-CG steps): ``auto`` (cross-validated linear probe and Tip-Adapter, then the chosen head) against one
    linear probe fit (the exact minimum, no cross-validation) on the same support set."""
    from threadpoolctl import threadpool_limits

    from ml.fewshot import ZeroShotWeights, fit_clap_linear_probe

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    out = {}
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dims))
    zero_shot = ZeroShotWeights(unit(centres + rng.normal(size=centres.shape)), 100.0)
    names = tuple(str(c) for c in range(classes))
    for count in shots:
        labels = np.repeat(np.arange(classes), count)
        support = SupportSet(unit(centres[labels] + noise * rng.normal(size=(labels.size, dims))), labels, names)
        row = {}
        with threadpool_limits(limits=1):
            fit_few_shot(SupportSet(support.embeddings[:4], np.array([0, 0, 1, 1]), ("a", "b")), "auto")  # imports: untimed
            started, cpu = time.perf_counter(), time.process_time()
            fit_clap_linear_probe(support, zero_shot)
            row["one_probe_fit"] = {"cpu_s": round(time.process_time() - cpu, 3), "wall_s": round(time.perf_counter() - started, 3)}
            started, cpu = time.perf_counter(), time.process_time()
            result = fit_few_shot(support, "auto", zero_shot)
            row["auto"] = {"cpu_s": round(time.process_time() - cpu, 3), "wall_s": round(time.perf_counter() - started, 3),
                           "picked": result.method}
        out[str(count)] = row
    return out


# -- output ------------------------------------------------------------------------------------------------------


def print_set(name: str, result: dict) -> None:
    dup = result.get("duplicates")
    if dup is not None:
        print_duplicates(name, dup)
    if "audit" in result:
        print_audit(name, result)
    if "few_shot" in result:
        print_few_shot(name, result)


def print_duplicates(name: str, dup: dict) -> None:
    print(f"\n== {name}: duplicates ({dup['originals']} originals, {dup['items']} images; "
          f"perceptual hash {dup['hash_ms_per_image']} ms/image)")
    print(f"{'method':28s} " + " ".join(f"{k:>13s}" for k in (*COPY_KINDS, "all")) + "  false links")
    for method, row in dup["rows"].items():
        print(f"{method:28s} " + " ".join(f"{row['recall'][k]:13.3f}" for k in (*COPY_KINDS, "all"))
              + f"  {row['false_links']:11d}")


def print_audit(name: str, result: dict) -> None:
    audit_rows = result["audit"]
    print(f"\n== {name}: audit ({NOISE_RATE:.0%} labels flipped; mean of {len(audit_rows['random']['ours']['per_seed'])} "
          f"seeds; precision / recall / flagged, CPU s per audit)")
    for kind, row in audit_rows.items():
        o, b = row["ours"], row["baseline"]
        s = row["single_pass"]
        if kind == "clean":
            print(f"{kind:18s} ours flag rate {o['flag_rate']:.3f}   baseline flag rate {b['flag_rate']:.3f}   "
                  f"(single pass {s['flag_rate']:.3f})")
        else:
            print(f"{kind:18s} ours {o['precision']:.3f} / {o['recall']:.3f} / {o['flagged']:6.1f} ({o['cpu_seconds']:.1f} s)   "
                  f"baseline {b['precision']:.3f} / {b['recall']:.3f} / {b['flagged']:6.1f} ({b['cpu_seconds']:.1f} s)   "
                  f"precision {o['precision'] - b['precision']:+.3f}, recall {o['recall'] - b['recall']:+.3f}; "
                  f"best cut of ours' ranking at the baseline's recall: precision {o['best_cut_precision']:.3f}")
            print(f"{'':18s} ours without the refit pass (refit=False): {s['precision']:.3f} / {s['recall']:.3f} / "
                  f"{s['flagged']:6.1f} ({s['cpu_seconds']:.1f} s), best cut {s['best_cut_precision']:.3f}")


def print_few_shot(name: str, result: dict) -> None:
    print(f"\n== {name}: few-shot accuracy (mean of {SEEDS} seeds; fit ms)")
    print(f"{'shots':>5s} " + " ".join(f"{m:>20s}" for m in (*VISION_METHODS, "auto")) + "  auto - best  auto picks")
    for shots, row in result["few_shot"].items():
        print(f"{shots:>5s} " + " ".join(f"{row['accuracy'][m]:10.4f} ({row['fit_ms'][m]:6.1f})"
                                         for m in (*VISION_METHODS, "auto"))
              + f"  {row['auto_minus_best']:+.4f}  {','.join(sorted(set(row['auto_picks'])))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(LABELED_SET_NAMES), choices=LABELED_SET_NAMES)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--per-class", type=int, default=60, help="labeled images per class (audit, few-shot)")
    parser.add_argument("--dup-originals", type=int, default=60, help="duplicate originals per set")
    parser.add_argument("--audit-seeds", type=int, default=5, help="noise draws per noise kind (mean reported)")
    parser.add_argument("--audit-first-seed", type=int, default=0,
                        help="the first noise draw (draws not used when choosing the defaults: 5 and up)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="sklearn")
    weights = lite0_safetensors()
    report = {"bench": "learned", "machine": platform.machine(), "python": platform.python_version(), "sets": {}}
    for name in args.sets if set(args.parts) - {"fit_time"} else ():
        labeled = labeled_set(name, args.per_class)
        vectors = cached_embeddings(f"{name}-labeled-{args.per_class}", labeled.images, weights)
        result = {}
        if "duplicates" in args.parts and name in SET_NAMES:  # the hard sets are labeled sets only
            result["duplicates"] = bench_duplicates(name, weights, args.dup_originals)
        if "audit" in args.parts:
            result["audit"] = bench_audit(vectors, labeled.labels, args.audit_seeds, args.audit_first_seed)
        if "few_shot" in args.parts:
            result["few_shot"] = bench_few_shot(vectors, labeled.labels)
        report["sets"][name] = result
        print_set(name, result)
    if "fit_time" in args.parts:
        report["text_fit"] = bench_text_fit()
        print("\n== few-shot fit WITH a text tower: 100 classes x 512-d, synthetic (single-thread CPU s; wall s, loaded or not)")
        for count, row in report["text_fit"].items():
            lp, auto = row["one_probe_fit"], row["auto"]
            print(f"{count:>3s} shots: auto {auto['cpu_s']:.2f} CPU s ({auto['wall_s']:.2f} wall, picked {auto['picked']}); "
                  f"one linear probe fit {lp['cpu_s']:.2f} CPU s; auto / one fit {auto['cpu_s'] / max(lp['cpu_s'], 1e-9):.2f}x")
    print("BENCH_JSON " + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
