"""Duplicate search (ml.duplicates) over random 512-d unit vectors with planted near-duplicate pairs.

For each size: the time of ``find_duplicates`` (exact blocked search up to ``EXACT_MAX`` items, the faiss IVF
index above), the recall of the planted pairs (cosine uniform in [threshold, 0.995]) and the false pairs.
Baseline, measured in the same run: the exact blocked search, in full at the sizes where it is affordable
(``--exact-max``), and above that estimated from a slab of ``--slab`` query rows scaled to all rows (the
blocked search is linear in its query rows). Random vectors are the hardest case for an index (no
structure), and they have no other pairs above any useful threshold (random 512-d cosines are ~N(0, 0.044)),
so the planted pairs are the whole truth. The CPU time of the search divided by the cores is printed too:
the wall time it would take with no other work on them (wall time counts the waits for a busy core).

    python bench/duplicates.py                      # 10k and 100k
    python bench/duplicates.py --sizes 100000 --compare-usearch   # also usearch's HNSW, when installed
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from ml.duplicates import (
    BLOCK_ROWS,
    DEFAULT_NEIGHBORS,
    EXACT_MAX,
    IVF_NPROBE,
    _exact_neighbors,
    find_duplicates,
)

DIM = 512


def dataset(n: int, pairs: int, threshold: float, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chosen = rng.choice(n, 2 * pairs, replace=False)
    truth = set()
    for a, b in zip(chosen[:pairs], chosen[pairs:], strict=True):
        cos = rng.uniform(threshold + 0.002, 0.995)
        noise = rng.standard_normal(DIM).astype(np.float32)
        noise -= noise @ x[a] * x[a]
        noise /= np.linalg.norm(noise)
        x[b] = cos * x[a] + np.sqrt(1 - cos**2) * noise
        truth.add((int(min(a, b)), int(max(a, b))))
    return x, truth


def found_pairs(report, n: int) -> set[tuple[int, int]]:
    pairs = set()
    for group in report.groups:
        members = sorted(int(i) for i in group.ids)
        pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1:])
    return pairs


def exact_seconds(x: np.ndarray, threshold: float, rows: int | None) -> tuple[float, bool]:
    """Seconds of the exact blocked search over all of ``x`` (estimated from ``rows`` query rows when given)."""
    if rows is None or rows >= len(x):
        start = time.perf_counter()
        _exact_neighbors(x, len(x), DEFAULT_NEIGHBORS, threshold)
        return time.perf_counter() - start, False
    start = time.perf_counter()
    _exact_neighbors(x, rows, DEFAULT_NEIGHBORS, threshold)  # the first rows against all n columns
    return (time.perf_counter() - start) * len(x) / rows, True


def usearch_seconds(x: np.ndarray, truth: set[tuple[int, int]], threshold: float, threads: int) -> str:
    from usearch.index import Index

    start = time.perf_counter()
    index = Index(ndim=DIM, metric="ip", dtype="f16", connectivity=16, expansion_add=64, expansion_search=32)
    index.add(np.arange(len(x)), x, threads=threads)
    matches = index.search(x, DEFAULT_NEIGHBORS + 1, threads=threads)
    seconds = time.perf_counter() - start
    keys, sims = matches.keys.astype(np.int64), 1 - matches.distances
    rows, cols = np.nonzero((sims >= threshold) & (keys != np.arange(len(x))[:, None]))
    got = {(int(min(r, keys[r, c])), int(max(r, keys[r, c]))) for r, c in zip(rows, cols, strict=True)}
    return f"usearch HNSW f16 (M=16, ef 64/32): {seconds:.2f} s, recall {len(got & truth) / len(truth):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--pair-fraction", type=float, default=0.01)
    parser.add_argument("--exact-max", type=int, default=20_000, help="largest size timed with the full exact search")
    parser.add_argument("--slab", type=int, default=4 * BLOCK_ROWS, help="query rows for the exact estimate above it")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--compare-usearch", action="store_true")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"cores {args.threads}, load average {load:.1f} (other work on the machine slows every number alike)")
    print(f"threshold {args.threshold}, {DIM}-d, exact search up to EXACT_MAX={EXACT_MAX} items, IVF nprobe {IVF_NPROBE}")
    for n in (int(s) for s in args.sizes.split(",")):
        x, truth = dataset(n, max(1, int(n * args.pair_fraction)), args.threshold)
        ids = [str(i) for i in range(n)]
        start, cpu_start = time.perf_counter(), time.process_time()
        report = find_duplicates(ids, x, threshold=args.threshold, threads=args.threads)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        got = found_pairs(report, n)
        recall = len(got & truth) / len(truth)
        baseline, estimated = exact_seconds(x, args.threshold, None if n <= args.exact_max else args.slab)
        print(f"n={n:>8,}  {report.method:5s} {seconds:7.2f} s  recall {recall:.4f} ({len(got & truth)}/{len(truth)})"
              f"  false pairs {len(got - truth)}  | exact blocked {'~' if estimated else ''}{baseline:7.2f} s"
              f"{' (estimated from ' + str(args.slab) + ' rows)' if estimated else ''}  -> {baseline / seconds:5.1f}x")
        print(f"             CPU time {cpu:7.2f} s = {cpu / args.threads:6.2f} s of wall time on {args.threads} idle cores"
              " (what the search costs when no other work shares them)")
        if report.method == "exact" and n >= 2000:
            start = time.perf_counter()
            indexed = find_duplicates(ids, x, threshold=args.threshold, method="index", threads=args.threads)
            index_seconds = time.perf_counter() - start
            index_recall = len(found_pairs(indexed, n) & truth) / len(truth)
            print(f"             index {index_seconds:7.2f} s  recall {index_recall:.4f}  (same size: exact/index"
                  f" {seconds / index_seconds:5.2f}x)")
        if args.compare_usearch:
            print("             " + usearch_seconds(x, truth, args.threshold, args.threads))
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
