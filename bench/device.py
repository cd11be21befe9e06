"""Device benchmark: the data path and the model on one device, each against a baseline measured in the same run.

Run from the repository root:  .venv/bin/python bench/device.py [--dry] [--json-out FILE]
(bench/device_check.sh runs it on a GPU machine; ``--dry`` is the same on the CPU with tiny sizes.)

1. preprocess: decode + preprocess of 640x480 JPEGs per CPU thread, Pillow path (CLS_PREPROCESS=pil) against
   the tensor path (ml.preprocess), and their largest pixel difference;
2. annotation, per CLIP variant (ViT-B-32, ViT-L-14; --dry: cls-tiny-clip): the image tower alone on synthetic
   preprocessed tensors (the ceiling), then end to end from JPEG bytes in memory to embeddings with (i) CPU decode
   + tensor preprocessing on a thread pool, batches staged with pinned copies on a side stream, and (ii) on CUDA,
   batched nvJPEG decode + resize on the GPU; img/s and each as a ratio of the tower;
3. training: the real ``ml.training.train()`` on a small synthetic JPEG set (bounded: --train-images, --train-epochs)
   for four families at 224 px (--dry: four small ones at 32 px), AMP against fp32 (``TrainSpec.mixed_precision``),
   the last epoch's training img/s as train() reports it, and the ratio.

Prints one table per section and one JSON line (prefix ``BENCH_JSON ``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root on the path
    sys.path.insert(0, str(REPO))

from handlers.images import DecodeLimits, decoded, decoded_tensor  # noqa: E402
from ml.device import policy_for, stage_batch  # noqa: E402
from ml.preprocess import decode_jpegs, tensor_preprocess_for  # noqa: E402
from schemas.defaults import DEFAULT_CLIP_VARIANT  # noqa: E402
from testkit.photos import photo_jpegs  # noqa: E402
from testkit.configs import decode_limits  # noqa: E402

FAMILIES = ("vit_base_patch16_224", "convnext_tiny", "efficientnet_b0", "swin_tiny_patch4_window7_224")
DRY_FAMILIES = ("test_vit", "test_convnext", "test_efficientnet", "test_resnet")  # the four kinds, timm's tiny test nets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny models and sizes: checks the script runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default=None, help=f"CLIP variants (default {DEFAULT_CLIP_VARIANT},ViT-L-14; --dry: cls-tiny-clip)")
    parser.add_argument("--images", type=int, default=None, help="JPEGs per end-to-end run (default 2048; --dry 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 32 on the CPU, --dry 8")
    parser.add_argument("--decode-threads", type=int, default=None, help="CPU decode threads (default: the cores)")
    parser.add_argument("--seconds", type=float, default=None, help="time per measurement (default 10; --dry 1)")
    parser.add_argument("--train-images", type=int, default=None, help="training samples per run (default 1536; --dry 8)")
    parser.add_argument("--train-epochs", type=int, default=None, help="epochs per training run (default 2; --dry 1)")
    parser.add_argument("--train-workers", type=int, default=None, help="data loader workers (default: cores, max 8)")
    parser.add_argument("--sections", default="preprocess,annotation,training")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def rate(fn: Callable[[], int], seconds: float, warmup: int = 1) -> float:
    """Items per second of repeated ``fn()`` calls (each returns how many items it did) for about ``seconds``
    (at least one call; none of the warm-up calls is counted)."""
    for _ in range(warmup if seconds > 0 else 0):
        fn()
    sync()
    done, started = 0, time.perf_counter()
    while True:
        done += fn()
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "cpu_cores": len(os.sched_getaffinity(0))}
    import torchvision

    info["torchvision"] = torchvision.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return info


def bench_preprocess(args: argparse.Namespace) -> dict[str, Any]:
    from ml.backbones import load_zero_shot_model

    model = load_zero_shot_model("clip", "cls-tiny-clip" if args.dry else DEFAULT_CLIP_VARIANT, "random", device="cpu")
    recipe = tensor_preprocess_for(model)
    assert recipe is not None
    datas = photo_jpegs(4 if args.dry else 32, (640, 480))
    limits = decode_limits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per CPU thread, as the worker's decode pool runs it
    try:
        def pil() -> int:
            for data in datas:
                with decoded(data, limits) as image:
                    model.preprocess(image)
            return len(datas)

        def tensor() -> int:
            for data in datas:
                with decoded_tensor(data, limits) as pixels:
                    recipe(pixels)
            return len(datas)

        pil_rate, tensor_rate = rate(pil, args.seconds), rate(tensor, args.seconds)
    finally:
        torch.set_num_threads(threads)
    worst = 0.0
    for data in datas:
        with decoded(data, limits) as image:
            reference = model.preprocess(image)
        with decoded_tensor(data, limits) as pixels:
            worst = max(worst, (recipe(pixels) - reference).abs().max().item())
    return {"image_size": model.image_size, "pil_img_s": pil_rate, "tensor_img_s": tensor_rate,
            "tensor_over_pil": tensor_rate / pil_rate, "max_pixel_difference": worst}


def bench_annotation(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    from ml.backbones import load_zero_shot_model

    model = load_zero_shot_model("clip", variant, "random", device=args.device)
    device, size, batch = model.device, model.image_size, args.batch_size
    recipe = tensor_preprocess_for(model)
    assert recipe is not None
    out: dict[str, Any] = {"variant": variant, "device": str(device), "batch": batch,
                           "amp": str(model.policy.amp_dtype).replace("torch.", "")}
    synthetic = torch.randn(batch, 3, size, size)
    staged_once = stage_batch(synthetic, device).get()  # already on the device: the tower alone
    out["tower_img_s"] = rate(lambda: (model.encode_images(staged_once), batch)[1], args.seconds)

    datas = photo_jpegs(args.images, (640, 480))
    limits = decode_limits()
    pool = ThreadPoolExecutor(args.decode_threads)

    def cpu_decode(data: bytes) -> torch.Tensor:
        with decoded_tensor(data, limits) as pixels:
            return recipe(pixels)

    def end_to_end_cpu_decode() -> int:
        chunks = [datas[i : i + batch] for i in range(0, len(datas), batch)]
        pending = pool.map(lambda chunk: stage_batch(list(map(cpu_decode, chunk)), device), chunks)
        for staged in pending:  # the pool decodes and stages ahead while the model runs this batch
            model.encode_images(staged)
        return len(datas)

    out["e2e_cpu_decode_img_s"] = rate(end_to_end_cpu_decode, args.seconds, warmup=0)
    out["e2e_cpu_decode_over_tower"] = out["e2e_cpu_decode_img_s"] / out["tower_img_s"]
    if device.type == "cuda":
        def end_to_end_gpu_decode() -> int:
            for start in range(0, len(datas), batch):
                chunk = datas[start : start + batch]
                images = decode_jpegs(chunk, device)
                images = [image if image is not None else cpu_decode_uint8(data, limits).to(device)
                          for image, data in zip(images, chunk, strict=True)]
                model.encode_images(recipe.batch(images))
            return len(datas)

        out["e2e_gpu_decode_img_s"] = rate(end_to_end_gpu_decode, args.seconds, warmup=1)
        out["e2e_gpu_decode_over_tower"] = out["e2e_gpu_decode_img_s"] / out["tower_img_s"]
    pool.shutdown()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def cpu_decode_uint8(data: bytes, limits: DecodeLimits) -> torch.Tensor:
    with decoded_tensor(data, limits) as pixels:
        return pixels.clone()


class _EpochRates:
    """Training callbacks that keep each epoch's ``images_per_s`` (train steps only, validation excluded)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_epoch_end(self, epoch: int, epochs: int, metrics: dict[str, Any]) -> None:
        self.rates.append(float(metrics["images_per_s"]))

    def on_heartbeat(self, epoch: int, step: int, steps: int, metrics: dict[str, Any]) -> None:
        return None

    def should_stop(self) -> str | None:
        return None


def synthetic_image_set(folder: Path, count: int, size: int, classes: int, distinct: int = 64) -> list[tuple[str, int]]:
    """``count`` labelled samples (round robin over ``classes``) over ``distinct`` JPEG files of ``size`` px, crops of
    the sample photos: the data loader decodes and transforms every sample as in a real job."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, data in enumerate(photo_jpegs(min(count, distinct), (size, size))):
        path = folder / f"{index:04d}.jpg"
        path.write_bytes(data)
        paths.append(str(path))
    return [(paths[i % len(paths)], i % classes) for i in range(count)]


def bench_training(args: argparse.Namespace, name: str, workdir: Path) -> dict[str, Any]:
    """The real ``ml.training.train()`` (data loader from JPEG files, 'light' augmentation, the device policy,
    fused AdamW, GradScaler when fp16, validation, packaging) with AMP and with fp32 on the same images; the
    rate is the last epoch's training images/s as train() reports it (the first epoch warms up when there are two)."""
    from ml.training import TrainSpec, train

    size = 32 if args.dry else 224
    batch = 4 if args.dry else 64
    classes = 4
    samples = synthetic_image_set(workdir / "images", args.train_images, size + size // 8, classes)
    val = samples[: max(classes, batch)]
    result: dict[str, Any] = {"model": name, "image_size": size, "batch": batch, "train_images": len(samples),
                              "epochs": args.train_epochs}
    for label, mixed in (("amp", True), ("fp32", False)):
        spec = TrainSpec(model_name=name, num_classes=classes, class_names=[f"class{i}" for i in range(classes)],
                         epochs=args.train_epochs, batch_size=batch, learning_rate=1e-4, augmentation="light",
                         pretrained=False, image_size=size, device=args.device, num_workers=args.train_workers,
                         report=False, mixed_precision=mixed, seed=0)
        callbacks = _EpochRates()
        started = time.perf_counter()
        done = train(spec, samples, val, workdir / f"{name}-{label}", callbacks)
        result[f"{label}_img_s"] = callbacks.rates[-1]
        result[f"{label}_wall_s"] = time.perf_counter() - started
        policy = policy_for(args.device, done.model)
        result[f"{label}_dtype"] = str((policy.amp_dtype if mixed else None) or torch.float32).replace("torch.", "")
        result["device"] = str(policy.device)
        del done
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["amp_over_fp32"] = result["amp_img_s"] / result["fp32_img_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = policy_for(args.device).cuda
    if args.dry:
        args.device = "cpu"
        cuda = False
    args.images = args.images or (8 if args.dry else 2048)
    args.batch_size = args.batch_size or (4 if args.dry else 256 if cuda else 32)
    args.seconds = args.seconds if args.seconds is not None else (0.0 if args.dry else 10.0)  # dry: one call each
    args.train_images = args.train_images or (8 if args.dry else 1536)
    args.train_epochs = args.train_epochs or (1 if args.dry else 2)
    if args.train_workers is None:
        args.train_workers = 0 if args.dry else min(8, len(os.sched_getaffinity(0)))
    variants = (args.variants or ("cls-tiny-clip" if args.dry else f"{DEFAULT_CLIP_VARIANT},ViT-L-14")).split(",")
    sections = set(args.sections.split(","))
    if args.dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    result: dict[str, Any] = {"environment": environment(), "dry": args.dry}
    print("environment:", json.dumps(result["environment"]))
    if "preprocess" in sections:
        pre = result["preprocess"] = bench_preprocess(args)
        print(f"\npreprocess, one CPU thread, 640x480 JPEG -> {pre['image_size']} px:  pil {pre['pil_img_s']:.1f} img/s"
              f"  tensor {pre['tensor_img_s']:.1f} img/s  = {pre['tensor_over_pil']:.2f} x pil"
              f"  (max pixel difference {pre['max_pixel_difference']:.4f})")
    if "annotation" in sections:
        result["annotation"] = []
        print("\nannotation (img/s)            tower   e2e cpu-decode (x tower)   e2e gpu-decode (x tower)")
        for variant in variants:
            row = bench_annotation(args, variant)
            result["annotation"].append(row)
            gpu = (f"{row['e2e_gpu_decode_img_s']:8.1f} ({row['e2e_gpu_decode_over_tower']:.2f})"
                   if "e2e_gpu_decode_img_s" in row else "     n/a (no CUDA)")
            print(f"  {variant:<14} {row['device']:<8} {row['tower_img_s']:8.1f}   "
                  f"{row['e2e_cpu_decode_img_s']:8.1f} ({row['e2e_cpu_decode_over_tower']:.2f})          {gpu}")
    if "training" in sections:
        result["training"] = []
        print(f"\ntraining, ml.training.train() ({args.train_images} images, {args.train_epochs} epoch(s)), img/s"
              "       amp        fp32    amp/fp32")
        with tempfile.TemporaryDirectory(prefix="cls-device-bench-") as scratch:
            for name in DRY_FAMILIES if args.dry else FAMILIES:
                row = bench_training(args, name, Path(scratch) / name)
                result["training"].append(row)
                print(f"  {name:<32} {row['amp_img_s']:9.1f} ({row['amp_dtype']}) {row['fp32_img_s']:9.1f}"
                      f"   {row['amp_over_fp32']:.2f}")
    line = json.dumps(result)
    print("\nBENCH_JSON " + line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
