"""Short fine-tunes: ``ml.training.train`` with its defaults against a plain timm + torch loop.

Run from the repository root:  .venv/bin/python -m bench.training --scenario finetune

The question: does fine-tuning a pretrained backbone for a few epochs with our defaults lose
anything to the loop an ML engineer would write by hand (AdamW, the same learning rate, constant, no warmup,
no label smoothing)? And what do warmup and label smoothing cost at 3-5 epochs?

1. A backbone is pretrained here (no hub): ``--model`` on the digits of classes 0-4, saved as safetensors.
2. Fine-tuning task: classes 5-9 (a new 5-way head), stratified train / val / test split.
3. For each schedule (``--finetune-epochs``) and seed (``--seeds``), the same data and batches are trained by
   - ``plain``: timm.create_model + the backbone weights, AdamW(lr, weight_decay 0.05), constant lr,
     cross-entropy, best epoch on val kept;
   - ``ours`` with the request defaults (label smoothing and warmup left unset, so they scale with the
     schedule), and with each of them forced on (``ls=0.1``, ``warmup=1``) to see what they cost.
   Every run is scored on the held-back test split (never used for choosing an epoch).
Augmentation is ``none`` everywhere so that only the optimisation recipe differs.

With ``--real-weights`` steps 1-2 change: the backbone is ``tf_efficientnet_lite0`` with its real ImageNet
weights (``testkit.real_backbone``: the safetensors file a training request names as ``pretrained_url``), and
the task is a 10-class set of ``testkit.learned_sets`` (``--real-set``, default ``textures``; ``--real-per-class``
images per class, written as JPEG files), split the same way. ``--recipes`` picks which of ours' recipes run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from ml.training import NullCallbacks, TrainSpec, stratified_split, train
from ml.training.augment import eval_transform, resolve_data_config
from ml.training.data import ImageFileDataset
from ml.training.models import load_backbone_weights
from testkit.learned_sets import LABELED_SET_NAMES

PRETRAIN_CLASSES = range(0, 5)
FINETUNE_CLASSES = range(5, 10)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("finetune scenario")
    group.add_argument("--finetune-epochs", type=int, nargs="+", default=[3, 5])
    group.add_argument("--seeds", type=int, default=3, help="seeds per schedule and recipe")
    group.add_argument("--pretrain-epochs", type=int, default=6)
    group.add_argument("--finetune-learning-rate", type=float, default=1e-3)
    group.add_argument("--real-weights", action="store_true",
                       help="fine-tune tf_efficientnet_lite0 from its real ImageNet weights on the textures set")
    group.add_argument("--real-per-class", type=int, default=40, help="images per class with --real-weights")
    group.add_argument("--real-set", default="textures", choices=LABELED_SET_NAMES,
                       help="the set of testkit.learned_sets fine-tuned on with --real-weights")
    group.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                       help="which of ours' recipes run beside the plain loop")


def _loader(model: nn.Module, samples, image_size: int, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    transform = eval_transform(resolve_data_config(model, image_size, "none"))
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ImageFileDataset(samples, transform), batch_size=batch_size, shuffle=shuffle, generator=generator)


@torch.no_grad()
def accuracy(model: nn.Module, samples, image_size: int, device: torch.device) -> float:
    model.eval().to(device)
    correct = 0
    for images, targets in _loader(model, samples, image_size, 256, False, 0):
        correct += int((model(images.to(device)).argmax(1).cpu() == targets).sum())
    return correct / len(samples)


def _relabel(samples, classes: range) -> list[tuple[str, int]]:
    first = classes.start
    return [(path, label - first) for path, label in samples if label in classes]


def pretrain(args, samples, workdir: Path) -> Path:
    """Train ``--model`` from scratch on classes 0-4; return its weights as a safetensors file."""
    data = _relabel(samples, PRETRAIN_CLASSES)
    train_part, val_part = stratified_split(data, 0.2, 0)
    names = [str(c) for c in PRETRAIN_CLASSES]
    spec = TrainSpec(
        model_name=args.model, num_classes=len(names), class_names=names, epochs=args.pretrain_epochs,
        batch_size=args.batch_size, learning_rate=3e-3, augmentation="none", pretrained=False,
        image_size=args.image_size, label_smoothing=0.0, device=args.device, heartbeat_s=3600.0, report=False,
    )
    result = train(spec, train_part, val_part, workdir / "pretrain", NullCallbacks())
    path = workdir / "backbone.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(path))
    return path


def run_plain(args, weights: Path, split, epochs: int, seed: int, device: torch.device) -> float:
    train_part, val_part, test_part = split
    torch.manual_seed(seed)
    model = timm.create_model(args.model, pretrained=False, num_classes=_num_classes(args))
    load_backbone_weights(model, args.model, safetensors.torch.load_file(str(weights)))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.finetune_learning_rate, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss()
    loader = _loader(model, train_part, args.image_size, args.batch_size, True, seed)
    best_val, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        for images, targets in loader:
            loss = criterion(model(images.to(device)), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val = accuracy(model, val_part, args.image_size, device)
        if val > best_val:
            best_val, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return accuracy(model, test_part, args.image_size, device)


def run_ours(args, weights: Path, split, epochs: int, seed: int, workdir: Path, device: torch.device, **recipe) -> float:
    train_part, val_part, test_part = split
    names = [str(c) for c in range(_num_classes(args))]
    spec = TrainSpec(
        model_name=args.model, num_classes=len(names), class_names=names, epochs=epochs,
        batch_size=args.batch_size, learning_rate=args.finetune_learning_rate, augmentation="none",
        pretrained=True, pretrained_path=str(weights), image_size=args.image_size, seed=seed,
        device=args.device, heartbeat_s=3600.0, report=False, **recipe,
    )
    result = train(spec, train_part, val_part, workdir, NullCallbacks())
    return accuracy(result.model, test_part, args.image_size, device)


RECIPES: dict[str, dict] = {
    "ours (defaults)": {},
    "ours ls=0.1": {"label_smoothing": 0.1},
    "ours warmup=1": {"warmup_epochs": 1.0},
}


def _num_classes(args) -> int:
    return 10 if getattr(args, "real_weights", False) else len(FINETUNE_CLASSES)


def real_task(args, workdir: Path) -> tuple[Path, list[tuple[str, int]]]:
    """The real backbone's weights file and the ``--real-set`` set written as JPEG files ``(path, label)``."""
    from testkit.learned_sets import labeled_set
    from testkit.real_backbone import ARCHITECTURE, lite0_safetensors

    args.model = ARCHITECTURE
    data = labeled_set(args.real_set, per_class=args.real_per_class, seed=1)
    folder = workdir / args.real_set
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        path = folder / f"{index:05d}.jpg"
        image.save(path, "JPEG", quality=90)
        samples.append((str(path), int(label)))
    return lite0_safetensors(), samples


def run(args, samples, workdir: Path, device: torch.device) -> dict:
    started = time.monotonic()
    if getattr(args, "real_weights", False):
        weights, data = real_task(args, workdir)
    else:
        weights = pretrain(args, samples, workdir)
        data = _relabel(samples, FINETUNE_CLASSES)
    rest, test_part = stratified_split(data, 0.3, 0)
    train_part, val_part = stratified_split(rest, 0.25, 0)
    split = (train_part, val_part, test_part)
    table: dict[str, dict[str, list[float]]] = {}
    run_no = 0
    for epochs in args.finetune_epochs:
        recipes = getattr(args, "recipes", list(RECIPES))
        rows = table.setdefault(str(epochs), {"plain": [], **{name: [] for name in recipes}})
        for seed in range(args.seeds):
            rows["plain"].append(run_plain(args, weights, split, epochs, seed, device))
            for name in recipes:
                run_no += 1
                rows[name].append(run_ours(args, weights, split, epochs, seed, workdir / f"ft-{run_no}", device,
                                           **RECIPES[name]))
    summary = {}
    for epochs, rows in table.items():
        plain_mean = statistics.fmean(rows["plain"])
        summary[epochs] = {
            name: {
                "test_accuracy": [round(a, 4) for a in accs],
                "mean": round(statistics.fmean(accs), 4),
                "stdev": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
                "delta_vs_plain": round(statistics.fmean(accs) - plain_mean, 4),
            }
            for name, accs in rows.items()
        }
    return {
        "model": args.model,
        "real_weights": bool(getattr(args, "real_weights", False)),
        "real_set": getattr(args, "real_set", None) if getattr(args, "real_weights", False) else None,
        "image_size": args.image_size,
        "learning_rate": args.finetune_learning_rate,
        "pretrain_epochs": args.pretrain_epochs,
        "train_images": len(train_part),
        "val_images": len(val_part),
        "test_images": len(test_part),
        "seeds": args.seeds,
        "by_epochs": summary,
        "total_s": round(time.monotonic() - started, 1),
    }


def print_table(report: dict) -> None:
    origin = (f"real ImageNet weights, fine-tuned on the 10 classes of {report.get('real_set')}" if report.get("real_weights")
              else "pretrained here on digits 0-4, fine-tuned on 5-9")
    print(
        f"\nshort fine-tunes: {report['model']} @ {report['image_size']} px {origin} "
        f"(train {report['train_images']}, test {report['test_images']}), "
        f"lr {report['learning_rate']}, {report['seeds']} seeds"
    )
    print(f"{'epochs':>6}  {'recipe':<16} {'test acc mean':>13} {'stdev':>7} {'vs plain':>9}  per seed")
    for epochs, rows in report["by_epochs"].items():
        for name, row in rows.items():
            print(f"{epochs:>6}  {name:<16} {row['mean']:>13.4f} {row['stdev']:>7.4f} {row['delta_vs_plain']:>+9.4f}  "
                  + " ".join(f"{a:.4f}" for a in row["test_accuracy"]))
