"""Embed vs classify throughput on the same model, the same images, in one process.

    PYTHONPATH=. python bench/embedding.py [--images 128] [--variant ViT-B-32] [--rounds 3] [--quick]

Both tasks run through the real annotation handler (``handlers.annotation.AnnotationHandler``): file://
image URLs (fenced to a temporary directory), real decoding, micro-batched forwards, result parts; embed
also writes its ``.npz`` parts to a file:// output. The embedding cache is off (a second round would
otherwise be free), the text embeddings of classify are warm (as on a running worker). Rounds alternate
classify / embed so machine noise hits both alike; the ratio is embed images/s over classify images/s of
the same round, and the median ratio is printed (target >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.defaults import DEFAULT_CLIP_VARIANT  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--variant", default=DEFAULT_CLIP_VARIANT)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="cls-tiny-clip, 32 images, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.variant, args.images, args.rounds = "cls-tiny-clip", 32, 2
    return args


def make_images(directory: Path, count: int) -> list[Path]:
    """Distinct JPEGs from the packages' real photos (crops at varying offsets)."""
    import numpy as np
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_image

    sources = [data.astronaut(), data.chelsea(), data.coffee(), load_sample_image("china.jpg"),
               load_sample_image("flower.jpg")]
    paths = []
    for i in range(count):
        array = np.asarray(sources[i % len(sources)], dtype=np.uint8)
        dy, dx = (i * 7) % 40, (i * 13) % 40
        path = directory / f"img-{i:05d}.jpg"
        Image.fromarray(array[dy:dy + 280, dx:dx + 280]).save(path, quality=90)
        paths.append(path)
    return paths


async def run(args: argparse.Namespace) -> dict:
    from consumers.annotation_worker import annotation_context
    from consumers.settings import KafkaSettings, Settings, WorkerSettings
    from consumers.worker import configure_torch_threads
    from handlers.annotation import AnnotationHandler
    from schemas.annotation import AnnotationRequest, EmbedRequest

    configure_torch_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="cls-bench-embed-"))
    paths = make_images(root / "images", args.images) if (root / "images").mkdir() is None else []
    settings = Settings(kafka=KafkaSettings(), worker=WorkerSettings(
        clip_variant=args.variant, clip_weights="random", default_prompt_templates="a photo of a {}.",
        allow_file_urls=True, file_root=str(root), embedding_cache_mb=0, batch_size=args.batch_size,
        result_part_size=500))
    images = [{"id": p.stem, "url": p.as_uri()} for p in paths]
    async with annotation_context(settings) as ctx:
        handler = AnnotationHandler(ctx)

        async def timed(request) -> float:
            started = time.perf_counter()
            parts = [p async for p in handler.handle(request)]
            elapsed = time.perf_counter() - started
            assert all(r.error is None for p in parts for r in p.results), "an image failed"
            return len(images) / elapsed

        def classify(k: int) -> AnnotationRequest:
            return AnnotationRequest.model_validate({"task": "classify", "model": "clip", "request_id": f"c{k}",
                                                     "images": images, "classes": ["cat", "dog", "coffee", "person",
                                                                                   "building"], "top_k": 3})

        def embed(k: int) -> EmbedRequest:
            return EmbedRequest.model_validate({"task": "embed", "model": "clip", "request_id": f"e{k}",
                                                "images": images, "output_path": (root / "out").as_uri()})

        await timed(classify(-1))  # warm-up: model load, text embeddings, kernels
        await timed(embed(-1))
        rounds = []
        for k in range(args.rounds):
            c = await timed(classify(k))
            e = await timed(embed(k))
            rounds.append({"classify_images_per_s": round(c, 2), "embed_images_per_s": round(e, 2),
                           "ratio": round(e / c, 3)})
            print(f"round {k + 1}: classify {c:7.1f} img/s   embed {e:7.1f} img/s   embed/classify {e / c:.3f}",
                  flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    return {"variant": args.variant, "images": args.images, "rounds": rounds, "median_ratio": ratio,
            "target": 0.95, "meets_target": ratio >= 0.95}


def main(argv: list[str] | None = None) -> int:
    result = asyncio.run(run(parse_args(argv)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
