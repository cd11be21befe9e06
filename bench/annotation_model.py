"""The annotation benchmark's in-process measurements (the model in the bench process, no Kafka): the text
embeddings, each stage's rate (fetch, decode, preprocess), (a) the model alone at several batch sizes, and
(c) the naive one-image-at-a-time loop."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

from bench.common import CpuProbe, http_get, timed_rate, undisturbed, wait_quiet
from testkit.images import ImageServerProcess
from testkit.configs import decode_limits


class InProcess:
    """The model in this process: text embeddings, per-stage rates, (a) model batches and (c) the naive loop."""

    def __init__(self, args: argparse.Namespace, paths: list[Path], server: ImageServerProcess, classes: list[str],
                 templates: list[str], cpu_pids: dict[str, int]) -> None:
        import torch

        from consumers.worker import configure_torch_threads
        from handlers.images import decode_image
        from ml.backbones import load_zero_shot_model

        self.args = args
        self.cpu_pids = cpu_pids
        configure_torch_threads(args.threads)
        info: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                                "torch_interop_threads": torch.get_num_interop_threads()}
        started = time.perf_counter()
        model = self.model = load_zero_shot_model("clip", args.variant, args.weights, device="auto", seed=args.seed)
        info["model_load_s"] = round(time.perf_counter() - started, 2)
        info["device"] = str(model.device)
        self._sync = (lambda: torch.cuda.synchronize()) if model.device.type == "cuda" else (lambda: None)

        # text embeddings first (the worker does the same on its first request for these classes/templates)
        started = time.perf_counter()
        self.text = model.text_embeddings(classes, templates)
        info["text_first_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        model.text_embeddings(classes, templates)
        info["text_cached_ms"] = round((time.perf_counter() - started) * 1000, 3)
        info["text_prompts"] = len(classes) * len(templates)

        # per-stage throughput, one thread, one image at a time
        urls = [server.url(p.name) for p in paths[: args.sample]]
        limits = decode_limits()
        quiet = wait_quiet(cpu_pids, args.wait_quiet, args.quiet_cores)
        probe = CpuProbe(cpu_pids)
        probe.start()
        datas: list[bytes] = []
        fetch_rate, _, _ = timed_rate(lambda u: datas.append(http_get(u)), urls)
        decoded: list[Any] = []
        decode_rate, _, _ = timed_rate(lambda d: decoded.append(decode_image(d, limits)), datas)
        tensors: list[torch.Tensor] = []
        preprocess_rate, _, _ = timed_rate(lambda im: tensors.append(model.preprocess(im)), decoded)
        cpu = probe.stop()
        # the same preprocessing with one torch thread: ToTensor/Normalize are torch ops that fork an
        # OpenMP team per call; on a busy CPU that costs more than the work
        torch.set_num_threads(1)
        try:
            preprocess_1t, _, _ = timed_rate(model.preprocess, decoded)
        finally:
            torch.set_num_threads(args.threads)
        info["stages"] = {
            "fetch_per_s": round(fetch_rate, 1), "decode_per_s": round(decode_rate, 1),
            "preprocess_per_s": round(preprocess_rate, 1), "preprocess_1thread_per_s": round(preprocess_1t, 1),
            "cpu_ms_per_image": round(1000 / fetch_rate + 1000 / decode_rate + 1000 / preprocess_rate, 2),
            "mean_jpeg_kb": round(sum(len(d) for d in datas) / len(datas) / 1024, 1),
            "cpu": cpu, **quiet,
        }
        self.info = info
        self.tensors = tensors
        self.baseline_urls = [server.url(p.name) for p in paths[: args.baseline_images]]

    def model_round(self, batch_sizes: list[int]) -> dict[str, Any]:
        """(a): preprocessed tensors straight into encode_images, per batch size."""
        import torch

        model, tensors = self.model, self.tensors
        by_batch: dict[str, Any] = {}
        for batch in batch_sizes:
            pixels = torch.stack([tensors[i % len(tensors)] for i in range(batch)])
            model.encode_images(pixels)  # warm-up at this shape
            self._sync()
            want = max(self.args.sample, 2 * batch)

            def measure(pixels=pixels, batch=batch, want=want) -> dict[str, Any]:
                times: list[float] = []
                budget = time.perf_counter() + 90
                probe = CpuProbe(self.cpu_pids)
                probe.start()
                while len(times) * batch < want and (not times or time.perf_counter() < budget):
                    t0 = time.perf_counter()
                    model.encode_images(pixels)
                    self._sync()
                    times.append(time.perf_counter() - t0)
                return {"images_per_s": round(batch * len(times) / sum(times), 2),
                        "best_batch_images_per_s": round(batch / min(times), 2), "batches": len(times),
                        "others_cores": probe.stop().get("others_cores")}

            by_batch[str(batch)] = undisturbed(measure, self.args, self.cpu_pids)
        best = max(by_batch, key=lambda b: by_batch[b]["images_per_s"])
        return {"by_batch": by_batch, "best_batch": int(best), "best_images_per_s": by_batch[best]["images_per_s"]}

    def baseline_round(self) -> dict[str, Any]:
        """(c): per image fetch (urllib), decode (PIL), preprocess, forward (batch 1), scores."""
        from PIL import Image

        model, text = self.model, self.text

        def naive(url: str) -> None:
            data = http_get(url)
            image = Image.open(io.BytesIO(data)).convert("RGB")
            pixels = model.preprocess(image).unsqueeze(0)
            scores = model.scores(model.encode_images(pixels), text)
            scores.argmax(dim=-1).tolist()

        naive(self.baseline_urls[0])  # warm-up

        def measure() -> dict[str, Any]:
            probe = CpuProbe(self.cpu_pids)
            probe.start()
            rate, done, elapsed = timed_rate(naive, self.baseline_urls, budget_s=300)
            cpu = probe.stop()
            return {"images_per_s": round(rate, 2), "images": done, "seconds": round(elapsed, 2), "cpu": cpu,
                    "others_cores": cpu.get("others_cores")}

        return undisturbed(measure, self.args, self.cpu_pids)

    def focus_sizes(self, first: dict[str, Any]) -> list[int]:
        """Batch sizes re-measured in later rounds: the best of round 1 and the worker's batch size."""
        return sorted({first["best_batch"], self.args.worker_batch_size})
