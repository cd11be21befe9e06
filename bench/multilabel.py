"""Multi-label training benchmark (``bench/training.py --scenario multilabel``): quality, not speed.

Data: 2x2 mosaics of scikit-learn's digits (``testkit.mosaics``), tagged with the target digits they contain (some
none, some repeated, some several); the digit images of the train, validation and test mosaics are disjoint.
Model: ``tf_efficientnet_lite0`` with real ImageNet weights (``testkit.real_backbone``), or any timm name with
``--ml-model`` (random init unless it is lite0).

1. Ours vs a plain loop, per seed: ``ml.training.train(multi_label=True)`` with its defaults (warmup-stable-decay
   lr, gradient clipping, BCE, best epoch by validation mAP, per-class calibration and thresholds) against a minimal
   timm loop (same model and weights, split, epochs, batch size and learning rate; AdamW, constant lr,
   ``BCEWithLogitsLoss``, the last epoch's weights). Both without augmentation (``augmentation: none``, as
   ``bench/finetune.py``), so the loops alone are compared. Both are scored on the TEST mosaics:
   mAP, and macro-F1 at per-class thresholds tuned on the validation mosaics (ours: the thresholds in its
   package, on its calibrated probabilities; plain: the same F1 rule on its raw sigmoids).
2. Asymmetric loss vs BCE on a many-negatives set: mosaics tagged with all ten digits where most tiles are blank
   (about one tag of ten per image); ``train()`` twice per seed, only ``multi_label_loss`` differs.

3. Auto-accept on a split the thresholds never saw: per seed, class and target precision, ours's package threshold
   (the class's own table, or the pooled one: ``source``) applied to the TEST mosaics; how many tags it accepts and
   the realised precision, held to the target minus 0.02 where at least ``MIN_ACCEPTED`` tags are accepted.

Prints a table, ratios (ours / plain, asymmetric / bce) of the means over seeds, the auto-accept table, and one
``BENCH_JSON`` line.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.training import NullCallbacks, TrainSpec, train
from ml.training import multilabel
from ml.training.augment import eval_transform, resolve_data_config
from ml.training.data import ImageFileDataset
from testkit.images import DIGIT_CLASS_NAMES
from testkit.mosaics import MOSAIC_TAGS, write_mosaics


MIN_ACCEPTED = 20
"""Classes with fewer accepted test tags than this (in a seed) are listed but not held to the target."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multilabel scenario")
    group.add_argument("--ml-model", default="tf_efficientnet_lite0",
                       help="timm model; tf_efficientnet_lite0 starts from the real ImageNet weights")
    group.add_argument("--ml-image-size", type=int, default=64, help="mosaic side: 64 puts each digit tile on one cell of the 2x2 final feature map")
    group.add_argument("--ml-train", type=int, default=400, help="training mosaics per seed")
    group.add_argument("--ml-val", type=int, default=300, help="enough positives per class (>= 50) for per-class auto-accept tables")
    group.add_argument("--ml-test", type=int, default=400)
    group.add_argument("--ml-epochs", type=int, default=6)
    group.add_argument("--ml-batch-size", type=int, default=32)
    group.add_argument("--ml-learning-rate", type=float, default=1e-3)
    group.add_argument("--ml-seeds", type=int, default=3)


def _pretrained(model_name: str) -> str | None:
    if model_name != "tf_efficientnet_lite0":
        return None
    from testkit.real_backbone import lite0_safetensors

    return str(lite0_safetensors())


def _samples(entries: list[tuple[str, list[str]]], tags: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    index = {t: i for i, t in enumerate(tags)}
    return [(path, tuple(index[t] for t in names)) for path, names in entries]


def _truth(samples: list[tuple[str, tuple[int, ...]]], classes: int) -> np.ndarray:
    return multilabel.multi_hot([label for _, label in samples], classes)


def _logits(model: torch.nn.Module, samples, transform, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(ImageFileDataset(samples, transform, num_classes=1 + max(
        (max(label) for _, label in samples if label), default=0)), batch_size=batch_size)
    model.eval()
    out = []
    with torch.inference_mode():
        for images, _ in loader:
            out.append(model(images.to(device)).float().cpu())
    return torch.cat(out)


def score(probabilities: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, tags: list[str]) -> dict[str, float]:
    """mAP and macro-F1 (at ``thresholds``) on one split."""
    ap = multilabel.per_class_average_precision(probabilities, truth, tags)
    f1 = multilabel.f1_report(probabilities, truth, thresholds, tags)
    return {"map": multilabel.mean_average_precision(ap), "macro_f1": f1["macro_f1"], "micro_f1": f1["micro_f1"]}


def run_ours(args, tags, train_s, val_s, test_s, seed: int, workdir: Path, loss: str = "bce") -> dict[str, Any]:
    spec = TrainSpec(model_name=args.ml_model, num_classes=len(tags), class_names=list(tags), epochs=args.ml_epochs,
                     batch_size=args.ml_batch_size, learning_rate=args.ml_learning_rate,
                     pretrained=_pretrained(args.ml_model) is not None, pretrained_path=_pretrained(args.ml_model),
                     image_size=args.ml_image_size, seed=seed, device=args.device, multi_label=True,
                     multi_label_loss=loss, augmentation="none", report=False)
    started = time.perf_counter()
    result = train(spec, train_s, val_s, workdir, NullCallbacks())
    seconds = time.perf_counter() - started
    from ml.trained import TrainedModel

    model = TrainedModel.load(result.package_dir, device="cpu")
    transform = eval_transform(model.data_config)
    logits = _logits(model.model, test_s, transform, model.device)
    probabilities = (logits * model.calibration_a + model.calibration_b).sigmoid().numpy()
    truth = _truth(test_s, len(tags))
    scores = score(probabilities, truth, model.thresholds.numpy(), tags)
    return {**scores, "seconds": seconds, "val_map": result.metrics["map"],
            "auto_accept": realised_auto_accept(model.auto_accept_tables, probabilities, truth, tags)}


def realised_auto_accept(tables, probabilities: np.ndarray, truth: np.ndarray, tags: list[str]) -> list[dict[str, Any]]:
    """Per class and target precision: the package's auto-accept threshold (the class's own, or the pooled one where
    the class has no table: ``source``) applied to images it never saw; how many tags it accepts, how many are right."""
    from ml.training.auto_accept import TARGET_PRECISIONS, threshold_for

    rows = []
    for c, name in enumerate(tags):
        own = (tables or {}).get("per_class", {}).get(name)
        for position, target in enumerate(TARGET_PRECISIONS):
            threshold = threshold_for(tables, name, target, own_table_decides=True)
            if threshold is None:
                continue
            accepted = probabilities[:, c] >= threshold
            right = int(truth[accepted, c].sum())
            source = "class" if own is not None else "pooled"
            rows.append({"class": name, "target": target, "threshold": threshold, "source": source,
                         "accepted": int(accepted.sum()), "right": right})
    return rows


def run_plain(args, tags, train_s, val_s, test_s, seed: int) -> dict[str, Any]:
    """A minimal timm + torch multi-label loop: AdamW at a constant lr, BCEWithLogitsLoss, last epoch's weights."""
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    model = timm.create_model(args.ml_model, pretrained=False, num_classes=len(tags))
    path = _pretrained(args.ml_model)
    if path is not None:
        state = {k: v for k, v in load_file(path).items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=False)
    data_config = resolve_data_config(model, args.ml_image_size, "none")
    transform = eval_transform(data_config)
    loader = torch.utils.data.DataLoader(ImageFileDataset(train_s, transform, num_classes=len(tags)),
                                         batch_size=args.ml_batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ml_learning_rate, weight_decay=0.05, foreach=True)
    criterion = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for _ in range(args.ml_epochs):
        model.train()
        for images, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), targets).backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    device = torch.device("cpu")
    val_p = _logits(model, val_s, transform, device).sigmoid().numpy()
    thresholds = multilabel.tune_thresholds(val_p, _truth(val_s, len(tags)))
    test_p = _logits(model, test_s, transform, device).sigmoid().numpy()
    return {**score(test_p, _truth(test_s, len(tags)), thresholds, tags), "seconds": seconds}


def _auto_accept_checked(runs: list[dict]) -> dict[str, Any]:
    gaps = [row["right"] / row["accepted"] - row["target"] for run in runs for row in run["auto_accept"]
            if row["accepted"] >= MIN_ACCEPTED]
    return {"checked": len(gaps), "held": sum(1 for g in gaps if g >= -0.02),
            "worst_gap": round(min(gaps), 4) if gaps else None}


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    size = args.ml_image_size
    comparison: dict[str, list[dict]] = {"ours": [], "plain": []}
    losses: dict[str, list[dict]] = {"bce": [], "asymmetric": []}
    all_digits = list(DIGIT_CLASS_NAMES)
    for seed in range(args.ml_seeds):
        data = root / f"seed-{seed}"
        split = {pool: write_mosaics(data / "tags4", count, seed=seed * 10 + i, pool=pool, size=size)
                 for i, (pool, count) in enumerate((("train", args.ml_train), ("val", args.ml_val), ("test", args.ml_test)))}
        train_s, val_s, test_s = (_samples(split[p], MOSAIC_TAGS) for p in ("train", "val", "test"))
        comparison["plain"].append(run_plain(args, MOSAIC_TAGS, train_s, val_s, test_s, seed))
        comparison["ours"].append(run_ours(args, MOSAIC_TAGS, train_s, val_s, test_s, seed, data / "ours"))
        sparse = {pool: write_mosaics(data / "sparse", count, seed=seed * 10 + 5 + i, pool=pool, size=size,
                                      tags=all_digits, p_target=0.3)
                  for i, (pool, count) in enumerate((("train", args.ml_train), ("val", args.ml_val), ("test", args.ml_test)))}
        sparse_train, sparse_val, sparse_test = (_samples(sparse[p], all_digits) for p in ("train", "val", "test"))
        for loss in ("bce", "asymmetric"):
            losses[loss].append(run_ours(args, all_digits, sparse_train, sparse_val, sparse_test, seed,
                                         data / f"loss-{loss}", loss=loss))
        print(f"seed {seed}: plain {comparison['plain'][-1]}\n        ours  {comparison['ours'][-1]}\n"
              f"        bce {losses['bce'][-1]}\n        asl {losses['asymmetric'][-1]}", flush=True)
    tags_per_image = statistics.fmean(len(t) for _, t in sparse["train"])
    report = {
        "auto_accept_checked": _auto_accept_checked(comparison["ours"]),
        "model": args.ml_model, "pretrained": _pretrained(args.ml_model) is not None, "image_size": size,
        "train": args.ml_train, "val": args.ml_val, "test": args.ml_test, "epochs": args.ml_epochs,
        "batch_size": args.ml_batch_size, "learning_rate": args.ml_learning_rate, "seeds": args.ml_seeds,
        "ours_vs_plain": comparison, "bce_vs_asymmetric": losses, "sparse_tags_per_image": tags_per_image,
        "ratios": {
            "map_ours_over_plain": _mean(comparison["ours"], "map") / _mean(comparison["plain"], "map"),
            "macro_f1_ours_over_plain": _mean(comparison["ours"], "macro_f1") / _mean(comparison["plain"], "macro_f1"),
            "map_asymmetric_over_bce": _mean(losses["asymmetric"], "map") / _mean(losses["bce"], "map"),
            "macro_f1_asymmetric_over_bce": _mean(losses["asymmetric"], "macro_f1") / _mean(losses["bce"], "macro_f1"),
        },
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"\nmulti-label: {report['model']} (pretrained {report['pretrained']}) {report['image_size']} px, "
          f"{report['train']}/{report['val']}/{report['test']} mosaics, {report['epochs']} epochs, "
          f"batch {report['batch_size']}, lr {report['learning_rate']}, {report['seeds']} seeds (test split)")
    print(f"{'run':<28}{'mAP mean':>10}{'min':>8}{'macro-F1':>10}{'min':>8}")
    for title, rows in (("plain timm BCE loop", report["ours_vs_plain"]["plain"]),
                        ("ours (train, bce)", report["ours_vs_plain"]["ours"]),
                        (f"sparse ({report['sparse_tags_per_image']:.2f} of 10 tags): bce", report["bce_vs_asymmetric"]["bce"]),
                        ("sparse: asymmetric", report["bce_vs_asymmetric"]["asymmetric"])):
        print(f"{title:<28}{_mean(rows, 'map'):>10.4f}{min(r['map'] for r in rows):>8.4f}"
              f"{_mean(rows, 'macro_f1'):>10.4f}{min(r['macro_f1'] for r in rows):>8.4f}")
    for key, value in report["ratios"].items():
        print(f"{key:<34}{value:>8.4f}")
    print_auto_accept(report)


def print_auto_accept(report: dict[str, Any]) -> None:
    """Realised precision on the test mosaics of the per-class auto-accept thresholds chosen on validation."""
    print(f"\nauto-accept on the test split (thresholds chosen on validation; 'held' needs >= {MIN_ACCEPTED} accepted)")
    print(f"{'seed':>4} {'class':<8}{'target':>7}{'source':>8}{'threshold':>10}{'accepted':>9}{'realised':>9}  held")
    for seed, run in enumerate(report["ours_vs_plain"]["ours"]):
        for row in run["auto_accept"]:
            realised = row["right"] / row["accepted"] if row["accepted"] else None
            held = ("-" if row["accepted"] < MIN_ACCEPTED
                    else "yes" if realised is not None and realised >= row["target"] - 0.02 else "NO")
            print(f"{seed:>4} {row['class']:<8}{row['target']:>7.2f}{row['source']:>8}{row['threshold']:>10.4f}"
                  f"{row['accepted']:>9}{'' if realised is None else f'{realised:.3f}':>9}  {held}")
    checked = report["auto_accept_checked"]
    print(f"auto_accept rows held: {checked['held']} of {checked['checked']} with >= {MIN_ACCEPTED} accepted "
          f"(worst realised minus target: {checked['worst_gap']})")
