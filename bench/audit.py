"""Audit benchmark: the fitting step of ``"task": "audit"`` (k-fold logistic regression on embeddings) at 10k
and 100k images of 512-d vectors, against plain scikit-learn in the same run.

Run from the repository root:  .venv/bin/python bench/audit.py [--sizes 10000 100000] [--classes 10]

Data: synthetic L2-normalised 512-d vectors around ``--classes`` random centres (cross-validated accuracy
~0.9, like real embeddings of a real labeling project), 10% of the labels flipped to another class.

- ours: ``ml.audit.label_issues`` with the defaults, i.e. the audit's fitting and flagging as shipped (5 folds
  repeated over ``25,000 // N`` shuffled splits, at least one; L-BFGS at most 100 iterations, float32, BLAS held
  to one thread per fit, 2 folds at once; the confident-learning rule; the refit pass without the flagged
  rows and its rule), then the neighbour pass (outlier scores and near-duplicates; exact below 20,000 images,
  the IVF index above); ``--single-pass`` times it with ``refit=False``;
- baseline: ``cross_val_predict(LogisticRegression(), X, y, cv=5, method="predict_proba")``, scikit-learn's
  defaults (L-BFGS, 100 iterations, the BLAS pool as it comes), on the same vectors; skipped above
  ``--baseline-max`` images (it is the slow thing being measured).

Prints one row per size (times in seconds; the fit's process CPU time too, which on a shared machine says
what it would take alone: divide by the 2 cores it uses; ratio baseline / ours, and the label_issue precision/recall of
both against the flipped set, so a faster fit that finds less would show) and one JSON line (``BENCH_JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml.audit import AuditOptions, confident_learning, label_issues, nearest_neighbours  # noqa: E402


def synthetic(n: int, classes: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    truth = rng.integers(0, classes, n)
    vectors = centers[truth] * 0.08 + rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(n, n // 10, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, classes, flipped.size)) % classes
    return vectors, given, flipped


def quality(issue: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    hits = np.intersect1d(np.flatnonzero(issue), flipped).size
    return hits / max(int(issue.sum()), 1), hits / flipped.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--baseline-max", type=int, default=100_000)
    parser.add_argument("--skip-neighbours", action="store_true")
    parser.add_argument("--neighbours-only", action="store_true", help="time the neighbour pass alone (no fits)")
    parser.add_argument("--single-pass", action="store_true", help="ours without the refit pass (refit=False)")
    args = parser.parse_args()
    options = AuditOptions(refit=not args.single_pass)
    rows = []
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'images':>8} {'ours fit':>9} {'fit CPU':>8} {'neighbours':>10} {'nb CPU':>8} {'baseline fit':>12} {'ratio':>6} "
          f"{'ours P/R':>11} {'baseline P/R':>13}")
    for n in args.sizes:
        vectors, given, flipped = synthetic(n, args.classes, args.dim, seed=n)
        if args.neighbours_only:
            start, cpu_start = time.perf_counter(), time.process_time()
            nearest_neighbours(vectors, options.neighbours, options)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            print(f"{n:>8} neighbour pass (k={options.neighbours}): {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
            rows.append({"images": n, "dim": args.dim, "neighbours_s": wall, "neighbours_cpu_s": cpu})
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        _, _, rule = label_issues(vectors, given, args.classes, options)
        fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        neighbours_s = neighbours_cpu_s = None
        if not args.skip_neighbours:
            start, cpu_start = time.perf_counter(), time.process_time()
            nearest_neighbours(vectors, options.neighbours, options)
            neighbours_s, neighbours_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        ours_pr = quality(rule.label_issue, flipped)
        baseline_s = baseline_pr = None
        if n <= args.baseline_max:
            from sklearn.linear_model import LogisticRegression
            from sklearn.model_selection import cross_val_predict

            start = time.perf_counter()
            baseline = cross_val_predict(LogisticRegression(), vectors, given, cv=5, method="predict_proba")
            baseline_s = time.perf_counter() - start
            baseline_pr = quality(confident_learning(baseline, given).label_issue, flipped)
        ratio = baseline_s / fit_s if baseline_s else None
        print(f"{n:>8} {fit_s:>9.2f} {fit_cpu_s:>8.2f} {neighbours_s if neighbours_s is not None else float('nan'):>10.2f} "
              f"{neighbours_cpu_s if neighbours_cpu_s is not None else float('nan'):>8.2f} "
              f"{baseline_s if baseline_s else float('nan'):>12.2f} {ratio if ratio else float('nan'):>6.2f} "
              f"{ours_pr[0]:>5.3f}/{ours_pr[1]:.3f} "
              + (f"{baseline_pr[0]:>7.3f}/{baseline_pr[1]:.3f}" if baseline_pr else f"{'-':>13}"), flush=True)
        rows.append({"images": n, "dim": args.dim, "classes": args.classes, "refit": options.refit, "fit_s": fit_s, "fit_cpu_s": fit_cpu_s,
                     "neighbours_s": neighbours_s, "neighbours_cpu_s": neighbours_cpu_s, "baseline_fit_s": baseline_s, "speedup": ratio,
                     "precision": ours_pr[0], "recall": ours_pr[1],
                     "baseline_precision": baseline_pr[0] if baseline_pr else None,
                     "baseline_recall": baseline_pr[1] if baseline_pr else None})
    print("BENCH_JSON " + json.dumps({"bench": "audit", "rows": rows, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
