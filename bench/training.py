"""Training benchmark: our loop's throughput against a plain timm + torch loop, and time-to-accuracy on digits.

Run from the repository root:  .venv/bin/python -m bench.training [--model resnet10t --image-size 32 ...]

1. Throughput: the same model, data (scikit-learn digits upscaled and written as PNG files), batch size,
   data loading and no augmentation, trained by ``ml.training.train`` and by a minimal loop (timm.create_model,
   DataLoader, AdamW with the same kernels as ours (foreach on CPU, fused on CUDA), cross-entropy, backward,
   step). Training-phase images/s per epoch, the first epoch of each run dropped as warm-up; runs alternate
   (plain, ours, plain, ours ...) so machine noise hits both. On a shared machine other processes only ever slow
   an epoch down, so the headline ratio compares the best epochs (ours / plain, target >= 0.9); the ratio of
   medians is printed too.
2. Time to accuracy: ``train()`` on digits until val_accuracy >= target (wall time from the call, model creation
   included), stopped through ``should_stop`` once reached; bounded by --tta-epochs.
3. Short fine-tunes (``bench/finetune.py``): a backbone pretrained here on digits 0-4, fine-tuned on 5-9 for
   3 and 5 epochs by a plain constant-lr AdamW loop and by ``train()`` with its defaults, with warmup and with
   label smoothing; test accuracy over seeds and the difference to the plain loop.

4. Multi-label (``bench/multilabel.py``): ours vs a plain timm BCE loop on digit mosaics (mAP, macro-F1 at tuned
   thresholds, 3 seeds), and the asymmetric loss vs BCE on a many-negatives set.

``--scenario`` picks throughput (1 and 2), finetune (3), multilabel (4) or all (1-3, the default).

Prints a small table and one JSON line (prefix ``BENCH_JSON ``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

# run as a script (make bench-training): the repository root on the path, for the bench package itself
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.images import DIGIT_CLASS_NAMES, digits_splits, write_digits_dataset

from bench import finetune
from bench import multilabel as multilabel_bench
from ml.training import NullCallbacks, TrainingStopped, TrainSpec, train
from ml.training.augment import eval_transform, resolve_data_config
from ml.training.data import ImageFileDataset
from ml.device import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per throughput run (first is warm-up)")
    parser.add_argument("--reps", type=int, default=3, help="alternating runs of each loop")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--target", type=float, default=0.9, help="val_accuracy for time-to-accuracy")
    parser.add_argument("--tta-epochs", type=int, default=10, help="upper bound of epochs for time-to-accuracy")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--scenario", choices=("all", "throughput", "finetune", "multilabel"), default="all")
    finetune.add_arguments(parser)
    multilabel_bench.add_arguments(parser)
    return parser.parse_args(argv)


class _EpochRecorder(NullCallbacks):
    def __init__(self) -> None:
        self.images_per_s: list[float] = []

    def on_epoch_end(self, epoch, epochs, metrics):
        self.images_per_s.append(float(metrics["images_per_s"]))


class _TimeToTarget(NullCallbacks):
    def __init__(self, target: float, started: float) -> None:
        self.target = target
        self.started = started
        self.reached_s: float | None = None
        self.reached_epoch: int | None = None
        self.accuracies: list[float] = []

    def on_epoch_end(self, epoch, epochs, metrics):
        self.accuracies.append(float(metrics["val_accuracy"]))
        if self.reached_s is None and metrics["val_accuracy"] >= self.target:
            self.reached_s = time.monotonic() - self.started
            self.reached_epoch = epoch

    def should_stop(self):
        return "cancel" if self.reached_s is not None else None


def _spec(args: argparse.Namespace, epochs: int) -> TrainSpec:
    return TrainSpec(
        model_name=args.model,
        num_classes=len(DIGIT_CLASS_NAMES),
        class_names=list(DIGIT_CLASS_NAMES),
        epochs=epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        augmentation="none",
        pretrained=False,
        image_size=args.image_size,
        warmup_epochs=0.5,
        num_workers=args.num_workers,
        device=args.device,
        heartbeat_s=3600.0,
    )


def run_ours(args: argparse.Namespace, train_samples, val_samples, workdir: Path) -> list[float]:
    recorder = _EpochRecorder()
    train(_spec(args, args.epochs), train_samples, val_samples, workdir, recorder)
    return recorder.images_per_s[1:] or recorder.images_per_s


def run_plain(args: argparse.Namespace, train_samples) -> list[float]:
    """A minimal timm + torch loop over the same files and preprocessing."""
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=len(DIGIT_CLASS_NAMES)).to(device)
    transform = eval_transform(resolve_data_config(model, args.image_size, "none"))
    loader = DataLoader(
        ImageFileDataset(train_samples, transform),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    kernels = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.05, **kernels)
    criterion = nn.CrossEntropyLoss()
    model.train()
    rates: list[float] = []
    for _ in range(args.epochs):
        started = time.monotonic()
        seen = 0
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss = criterion(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.monotonic() - started))
    return rates[1:] or rates


def time_to_accuracy(args: argparse.Namespace, train_samples, val_samples, workdir: Path) -> dict:
    started = time.monotonic()
    callbacks = _TimeToTarget(args.target, started)
    try:
        train(_spec(args, args.tta_epochs), train_samples, val_samples, workdir, callbacks)
    except TrainingStopped:
        pass  # stopped on purpose once the target was reached
    return {
        "target_val_accuracy": args.target,
        "time_to_target_s": callbacks.reached_s,
        "epochs_to_target": callbacks.reached_epoch,
        "val_accuracy_per_epoch": callbacks.accuracies,
        "total_s": time.monotonic() - started,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        root = Path(tmp)
        if args.scenario == "multilabel":
            result = multilabel_bench.run(args, root)
            report = {"bench": "training", "scenario": "multilabel", "torch": torch.__version__, "timm": timm.__version__,
                      "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "multilabel": result}
            multilabel_bench.print_table(result)
            print("BENCH_JSON " + json.dumps(report, sort_keys=True))
            return report
        samples, _ = write_digits_dataset(root / "digits", size=args.image_size)
        finetuned = None
        if args.scenario in ("all", "finetune"):
            finetuned = finetune.run(args, samples, root / "finetune", resolve_device(args.device))
        if args.scenario == "finetune":
            report = {"bench": "training", "scenario": "finetune", "torch": torch.__version__, "timm": timm.__version__,
                      "cpu_threads": torch.get_num_threads(), "finetune": finetuned}
            finetune.print_table(finetuned)
            print("BENCH_JSON " + json.dumps(report, sort_keys=True))
            return report
        train_samples, val_samples, _ = digits_splits(samples)
        tiny_val = val_samples[:20]  # throughput runs: keep validation negligible

        ours_rates: list[float] = []
        plain_rates: list[float] = []
        for rep in range(args.reps):
            plain_rates += run_plain(args, train_samples)
            ours_rates += run_ours(args, train_samples, tiny_val, root / f"ours-{rep}")
        ours, plain = max(ours_rates), max(plain_rates)
        ours_median, plain_median = statistics.median(ours_rates), statistics.median(plain_rates)
        tta = time_to_accuracy(args, train_samples, val_samples, root / "tta")

    report = {
        "bench": "training",
        "device": str(resolve_device(args.device)),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "train_images": len(train_samples),
        "throughput": {
            "ours_images_per_s": round(ours, 1),
            "plain_images_per_s": round(plain, 1),
            "ratio": round(ours / plain, 3),
            "ours_median_images_per_s": round(ours_median, 1),
            "plain_median_images_per_s": round(plain_median, 1),
            "ratio_of_medians": round(ours_median / plain_median, 3),
            "target_ratio": 0.9,
            "ours_epochs": [round(r, 1) for r in ours_rates],
            "plain_epochs": [round(r, 1) for r in plain_rates],
        },
        "time_to_accuracy": tta,
        "finetune": finetuned,
    }
    _print_table(report)
    if finetuned is not None:
        finetune.print_table(finetuned)
    print("BENCH_JSON " + json.dumps(report, sort_keys=True))
    return report


def _print_table(report: dict) -> None:
    t = report["throughput"]
    a = report["time_to_accuracy"]
    rows = [
        ("model", f"{report['model']} @ {report['image_size']} px, batch {report['batch_size']}, {report['device']}"),
        ("plain timm loop (img/s)", f"best {t['plain_images_per_s']:.1f}, median {t['plain_median_images_per_s']:.1f}"),
        ("ml.training loop (img/s)", f"best {t['ours_images_per_s']:.1f}, median {t['ours_median_images_per_s']:.1f}"),
        ("ratio ours/plain", f"{t['ratio']:.3f} best, {t['ratio_of_medians']:.3f} medians (target >= {t['target_ratio']})"),
        (
            f"time to val_acc >= {a['target_val_accuracy']}",
            "not reached" if a["time_to_target_s"] is None else f"{a['time_to_target_s']:.1f} s ({a['epochs_to_target']} epochs)",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
