"""Annotation benchmark: raw model throughput, end-to-end throughput through Kafka, a naive loop, and
latency under load.

Run from the repository root:

    .venv/bin/python bench/annotation.py [--images 512] [--variant ViT-B-32] [--quick] [--scenarios load]

This file parses the arguments, runs the parts and reports; the parts: ``bench/annotation_model.py`` (in this
process: text embeddings, stages, (a), (c)), ``bench/annotation_e2e.py`` (broker, worker, warm-up, idle
latency, (b)), ``bench/annotation_load.py`` (latency under load, two bulk requests), ``bench/common.py``
(CPU accounting, metrics, the results reader). Broker, worker process, images and image server come from
``testkit``.

In one run, on one machine, with random weights and N JPEG images of 640x480 (cut from scikit-image and
scikit-learn sample photos: random crops, flips, brightness, JPEG quality) served by a local HTTP server
on 127.0.0.1 (a separate process, ``testkit.images.ImageServerProcess``):

(a) model: preprocessed tensors straight into ``model.encode_images`` at several batch sizes; the best is
    the reference. The text embeddings (classes x prompt templates) are computed first and reported on
    their own (first pass, then a cached call).
    stages: fetch (urllib), decode (``handlers.images.decode_image``), preprocess, one image at a time on
    one thread, so the CPU cost per image next to the model's is visible.
(c) naive baseline, in this process: per image fetch (urllib) -> decode (PIL) -> preprocess -> forward
    (batch 1) -> scores.
(b) end to end: a local broker (``deploy/local/kafka.sh`` on a free port, temporary state, stopped at the
    end) unless ``KAFKA_BOOTSTRAP_SERVERS`` is set; topics provisioned under a unique prefix; the worker
    (``python -m consumers.cli annotation``) as a subprocess with ``CLS_TORCH_THREADS`` equal to the
    threads used here. After a warm-up request (the worker's text pass) and sequential single-image
    requests (idle latency p50/p95), all N images go out as requests of ``--request-size`` images as fast
    as possible; the time runs from the first produce to the last result part received.
    The worker's peak RSS (VmHWM) is read at the end; CPU seconds of every process (worker: event-loop
    thread and the others) and of the whole machine are recorded per phase, with the worker's batch sizes
    from its /metrics endpoint.
(text) new classes (``bench/annotation_text.py``): the first interactive request with 5 new classes (quick
    prompt set, the ensemble then computed in the background), the next one (full ensemble), a first bulk
    request with 5 other new classes (the full text pass, for comparison), and a restarted worker on the same
    CLS_TEXT_CACHE_DIR (no text pass).
(load) against the same worker (``--scenarios``: ``throughput`` is (a), (c), (b); ``load`` this one; both by
    default): one-image interactive requests idle and while a 2,000-image bulk request runs, bulk throughput
    with and without them, the worker's bulk batch forward time, and two equal bulk requests sent together
    (see ``bench/annotation_load.py`` for the method and targets).

Shared machines: after the warm-up, (a), (c) and (b) run in ``--rounds`` rounds, in turn. Before each
measurement the script waits (bounded by ``--wait-quiet`` and ``--wait-budget``) until other processes use
less than ``--quiet-cores``; a measurement during which they used more than ``--disturbed-cores`` is repeated
(``--retries``). Other load only ever slows a measurement down, so the fastest attempt and the best round
count; every attempt, with the cores other processes used, is in the JSON.

Prints a table and one JSON line (prefix ``BENCH_JSON ``). Targets: (b)/(a) >= 0.8, (b)/(c) >= 1.4,
worker peak RSS < 2.5 GB; under load: p95 <= idle p95 + one bulk batch forward, bulk throughput loss <= 10%,
two bulk requests finish within 20% of each other. ``--quick`` (64 images, cls-tiny-clip, one round, no waiting) smoke-tests the
script in under a minute. ``--worker-env KEY=VALUE`` (repeatable) passes extra settings to the worker, for
experiments (e.g. ``CLS_TORCH_THREADS=1``, ``CLS_MAX_IN_FLIGHT=16``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root on the path
    sys.path.insert(0, str(REPO))

from bench.common import set_wait_budget  # noqa: E402
from schemas.defaults import DEFAULT_CLIP_VARIANT  # noqa: E402
from testkit.images import VARIED_SIZE as IMAGE_SIZE  # noqa: E402

CLASSES = ["cat", "astronaut", "coffee cup", "rocket", "flower", "building", "coins", "galaxy", "text", "clock"]
RSS_TARGET_BYTES = int(2.5 * 1024**3)
E2E_TARGET = 0.8
BASELINE_TARGET = 1.4


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="N images (default 512; --quick: 64)")
    parser.add_argument("--variant", default=None, help=f"CLIP variant (default {DEFAULT_CLIP_VARIANT}; --quick: cls-tiny-clip)")
    parser.add_argument("--weights", default="random", help="CLIP weights spec (default: random)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64 images, cls-tiny-clip, fewer reps")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads here and CLS_TORCH_THREADS for the worker (default: usable cores)")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="batch sizes for (a)")
    parser.add_argument("--classes", type=int, default=5, help="number of classes per request (max %d)" % len(CLASSES))
    parser.add_argument("--templates", type=int, default=80,
                        help="prompt templates: the first K of the default 80 (worker and here alike)")
    parser.add_argument("--request-size", type=int, default=32, help="images per request in (b)")
    parser.add_argument("--latency-requests", type=int, default=None, help="sequential 1-image requests (default 20)")
    parser.add_argument("--sample", type=int, default=None,
                        help="images for the stage and model timings (default min(N, 128); --quick: 32)")
    parser.add_argument("--baseline-images", type=int, default=None, help="images through (c) (default: --sample)")
    parser.add_argument("--worker-batch-size", type=int, default=32, help="CLS_BATCH_SIZE of the worker")
    parser.add_argument("--worker-batch-wait-ms", type=float, default=10.0, help="CLS_BATCH_WAIT_MS of the worker")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the worker (repeatable), e.g. CLS_MAX_IN_FLIGHT=16")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of (a), (c), (b) in turn; bests are compared (default 2; --quick: 1)")
    parser.add_argument("--wait-quiet", type=float, default=None,
                        help="before each measurement wait up to this many seconds until other processes use less "
                             "than --quiet-cores (a shared machine); default 90, --quick: 0")
    parser.add_argument("--quiet-cores", type=float, default=0.3)
    parser.add_argument("--wait-budget", type=float, default=600.0, help="seconds of waiting for quiet, all in all")
    parser.add_argument("--retries", type=int, default=None,
                        help="repeat a measurement disturbed by other processes (default 2; --quick: 0)")
    parser.add_argument("--disturbed-cores", type=float, default=0.5,
                        help="a measurement is disturbed when other processes used more cores than this")
    parser.add_argument("--skip-e2e", action="store_true", help="only (a), the stages and (c)")
    parser.add_argument("--e2e-timeout", type=float, default=None, help="seconds for the throughput phase of (b)")
    parser.add_argument("--workdir", default=None, help="keep images, broker state and worker log here")
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default="throughput,load,text",
                        help="what runs through Kafka: throughput ((a), (c), (b) rounds), load (latency under "
                             "load, two bulk requests), text (new classes: the first interactive request, the next "
                             "one, a restarted worker with a warm disk cache); default all three")
    parser.add_argument("--load-bulk-images", type=int, default=None,
                        help="images in the bulk request of the load scenario (default 2000; --quick: 300)")
    parser.add_argument("--load-probes", type=int, default=None,
                        help="one-image probes, idle and under load (default 20; --quick: 5)")
    parser.add_argument("--probe-gap-s", type=float, default=0.5,
                        help="pause between a probe's answer and the next probe (a labeler looks at the suggestion)")
    parser.add_argument("--load-window-s", type=float, default=None,
                        help="seconds of bulk without probes, before and after the probes (default 60; --quick: 5)")
    parser.add_argument("--fair-images", type=int, default=None,
                        help="images in each of the two equal bulk requests (default 256; --quick: 64)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.images = args.images or (64 if quick else 512)
    args.variant = args.variant or ("cls-tiny-clip" if quick else DEFAULT_CLIP_VARIANT)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.latency_requests = args.latency_requests if args.latency_requests is not None else (5 if quick else 20)
    args.wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if quick else 90.0)
    args.retries = max(0, args.retries if args.retries is not None else (0 if quick else 2))
    args.rounds = max(1, args.rounds if args.rounds is not None else (1 if quick else 2))
    args.sample = min(args.images, args.sample or (32 if quick else 128))
    args.baseline_images = min(args.images, args.baseline_images or args.sample)
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    if quick and args.batch_sizes == [1, 8, 32, 64]:
        args.batch_sizes = [1, 8, 32]
    args.load_bulk_images = args.load_bulk_images or (300 if quick else 2000)
    args.load_probes = args.load_probes or (5 if quick else 20)
    args.load_window_s = args.load_window_s if args.load_window_s is not None else (5.0 if quick else 60.0)
    args.fair_images = args.fair_images or (64 if quick else 256)
    args.scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if not args.scenarios <= {"throughput", "load", "text"}:
        parser.error(f"--scenarios {sorted(args.scenarios)}: expected throughput, load and/or text")
    args.classes = max(2, min(args.classes, len(CLASSES)))
    args.templates = max(1, min(args.templates, 80))
    for item in args.worker_env:
        if "=" not in item:
            parser.error(f"--worker-env {item!r}: expected KEY=VALUE")
    return args


# ----------------------------------------------------------------------------------------------- report
def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}" if value < 100 else f"{value:,.1f}{unit}"
    return f"{value}{unit}"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Best of the rounds for (a), (b), (c) (other processes only ever slow a measurement down), the ratios
    of the bests, and the ratios within each round."""
    rounds = result["rounds"]
    if not rounds:  # --scenarios load: no (a), (b), (c)
        return {}
    model_best = max(rounds, key=lambda x: x["model"]["best_images_per_s"])["model"]
    summary: dict[str, Any] = {
        "model_images_per_s": model_best["best_images_per_s"], "model_best_batch": model_best["best_batch"],
        "baseline_images_per_s": max(x["baseline"]["images_per_s"] for x in rounds),
    }
    if all("e2e" in x for x in rounds):
        best = max(rounds, key=lambda x: x["e2e"]["images_per_s"])["e2e"]
        summary["e2e_images_per_s"] = best["images_per_s"]
        summary["e2e_best_round"] = best
        summary["e2e_over_model"] = round(best["images_per_s"] / summary["model_images_per_s"], 3)
        summary["e2e_over_baseline"] = round(best["images_per_s"] / summary["baseline_images_per_s"], 3)
        summary["per_round"] = [
            {"model": x["model"]["best_images_per_s"], "baseline": x["baseline"]["images_per_s"],
             "e2e": x["e2e"]["images_per_s"],
             "e2e_over_model": round(x["e2e"]["images_per_s"] / x["model"]["best_images_per_s"], 3),
             "e2e_over_baseline": round(x["e2e"]["images_per_s"] / x["baseline"]["images_per_s"], 3),
             "others_cores_during_e2e": x["e2e"]["cpu"].get("others_cores")}
            for x in rounds
        ]
        rss = (result.get("e2e") or {}).get("worker_peak_rss_bytes")
        summary["worker_peak_rss_ok"] = bool(rss and rss < RSS_TARGET_BYTES)
    return summary


def report(result: dict[str, Any]) -> None:
    cfg = result["config"]
    inproc = result["in_process"]
    stages = inproc["stages"]
    summary = result["summary"]
    e2e = result.get("e2e") or {}
    rows: list[tuple[str, str, str]] = []
    if result["rounds"]:
        first = result["rounds"][0]["model"]
        for batch, entry in first["by_batch"].items():
            rows.append((f"(a) model encode_images, batch {batch}", _fmt(entry["images_per_s"]),
                         f"{entry['batches']} batches, fastest batch {entry['best_batch_images_per_s']}/s; "
                         f"others on the box {entry['others_cores']} cores"))
        rows.append((f"(a) model, best (batch {summary['model_best_batch']})", _fmt(summary["model_images_per_s"]),
                     f"reference; best of {len(result['rounds'])} round(s)"))
    rows.append((f"text embeddings, {inproc['text_prompts']} prompts", "-",
                 f"first pass {inproc['text_first_s']} s, cached call {inproc['text_cached_ms']} ms"))
    rows.append(("stage: fetch (urllib, 1 thread)", _fmt(stages["fetch_per_s"]), f"{stages['mean_jpeg_kb']} KB/image"))
    rows.append(("stage: decode (decode_image, 1 thread)", _fmt(stages["decode_per_s"]), ""))
    rows.append((f"stage: preprocess (1 thread, torch threads {inproc['torch_threads']})",
                 _fmt(stages["preprocess_per_s"]), f"with torch threads 1: {stages['preprocess_1thread_per_s']}/s"))
    rows.append(("stages together", _fmt(1000 / stages["cpu_ms_per_image"]),
                 f"{stages['cpu_ms_per_image']} ms per image before the model"))
    if result["rounds"]:
        rows.append(("(c) naive loop (fetch,decode,prep,b=1)", _fmt(summary["baseline_images_per_s"]),
                     f"{cfg['baseline_images']} images; best of {len(result['rounds'])} round(s)"))
    if "e2e_images_per_s" in summary:
        tp = summary["e2e_best_round"]
        cpu = tp["cpu"]
        wall = cpu["wall_s"] or 1.0
        rows.append(("(b) end-to-end via Kafka", _fmt(summary["e2e_images_per_s"]),
                     f"{tp['requests']} req x {tp['request_size']}, {tp['seconds']} s, mean batch {tp['mean_batch']}, "
                     f"image errors {tp['image_errors']}"))
        rows.append(("    CPU during (b)", _fmt(cpu.get("worker_cpu_s", 0) / wall, " cores"),
                     f"worker (event loop {_fmt(cpu.get('worker.main_thread_cpu_s', 0) / wall, ' cores')}); broker "
                     f"{_fmt((cpu.get('broker_cpu_s') or 0) / wall, ' cores')}; image server "
                     f"{_fmt((cpu.get('image_server_cpu_s') or 0) / wall, ' cores')}; others on the box "
                     f"{_fmt(cpu.get('others_cores'), ' cores')}"))
    if e2e:
        lat = e2e["latency_ms"]
        rows.append(("latency, 1-image request, idle worker", f"p50 {lat['p50']} ms",
                     f"p95 {lat['p95']} ms, n={lat['n']}; in the handler p50 {lat.get('handler_p50')} ms"))
        rows.append(("first request (worker text pass)", f"{e2e['first_request_s']} s", f"{cfg['request_size']} images"))
        rss = e2e.get("worker_peak_rss_bytes")
        rows.append(("worker peak RSS (VmHWM)", _fmt(rss / 1024**3 if rss else None, " GB"),
                     "target < 2.5 GB: " + ("ok" if rss and rss < RSS_TARGET_BYTES else "MISSED")))
    if "e2e_images_per_s" in summary:
        for name, label, target in (("e2e_over_model", "(b)/(a)", E2E_TARGET),
                                    ("e2e_over_baseline", "(b)/(c)", BASELINE_TARGET)):
            per_round = ", ".join(f"{x[name]:.2f}" for x in summary["per_round"])
            ok = "ok" if summary[name] >= target else "MISSED"
            rows.append((f"ratio {label}", f"{summary[name]:.2f}", f"target >= {target}: {ok}; per round: {per_round}"))
    if e2e.get("load"):
        rows.extend(load_rows(e2e["load"], result, cfg))
    if e2e.get("text"):
        rows.extend(text_rows(e2e["text"], cfg))

    title = (f"annotation benchmark: CLIP {cfg['variant']} ({cfg['weights']} weights), {cfg['images']} JPEG "
             f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, device {inproc['device']}, torch threads {inproc['torch_threads']} "
             f"(worker CLS_TORCH_THREADS={cfg['threads']}), {cfg['cpus']} CPUs, torch {cfg.get('torch')}")
    print()
    print(title)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'images/s':>14}  notes")
    for name, value, notes in rows:
        print(f"{name.ljust(width)}  {value:>14}  {notes}")


def load_rows(load: dict[str, Any], result: dict[str, Any], cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The latency-under-load scenario's rows (``bench/annotation_load.py``)."""
    idle, busy, fair = load["idle"], load["under_load"], load["fairness"]
    batch = load["bulk_batch_size"]
    in_process = ""
    for x in result["rounds"][:1]:
        entry = x["model"]["by_batch"].get(str(batch))
        if entry:
            in_process = f"; in this process (a) {1000 * batch / entry['images_per_s']:.0f} ms"
    valid = load["valid"]  # the bulk request still ran when the probes ended; else the comparison means nothing
    ok = lambda flag: ("ok" if flag else "MISSED") if valid else "INVALID (the bulk request ended first)"  # noqa: E731
    w = load["windows"]
    return [
        ("latency, 1-image interactive request, idle", f"p50 {idle['p50_ms']} ms",
         f"p95 {idle['p95_ms']} ms, n={idle['n']}, {load['probe_gap_s']} s between probes"),
        (f"latency, same, under a {cfg['load_bulk_images']}-image bulk request", f"p50 {busy['p50_ms']} ms",
         f"p95 {busy['p95_ms']} ms (x{load['p95_ratio']} idle), max {busy['max_ms']} ms; bulk still running when "
         f"the probes ended: {load['bulk_running_when_probes_ended']}"),
        (f"one bulk batch forward ({batch} images, in the worker)", f"{load['bulk_batch_forward_ms']} ms",
         f"per-image forward time x {batch} over the windows without probes (mean forward as batched "
         f"{load.get('bulk_mean_forward_ms')} ms){in_process}; interactive batches during the probes: "
         f"{w['probes']['interactive_forwards']}, {_fmt(w['probes']['interactive_forward_s'], ' s')} each; model "
         f"thread busy {w['before']['forward_busy']}, {w['probes']['forward_busy']}, {w['after']['forward_busy']}"),
        ("target: p95 under load <= idle p95 + one forward", f"{busy['p95_ms']} ms",
         f"budget {load['p95_budget_ms']} ms: {ok(load['latency_ok'])}"),
        ("bulk throughput without / with probes", f"{load['bulk_images_per_s_without_probes']}",
         f"with probes {load['bulk_images_per_s_with_probes']}/s (windows: {w['before']['bulk_images_per_s']}, "
         f"{w['probes']['bulk_images_per_s']}, {w['after']['bulk_images_per_s']}/s; others on the box "
         f"{w['before']['others_cores']}, {w['probes']['others_cores']}, {w['after']['others_cores']} cores)"),
        ("target: bulk throughput loss <= 10%", f"{100 * load['bulk_throughput_loss']:.1f}%",
         f"{ok(load['throughput_ok'])}; model thread in bulk forwards {w['before']['bulk_busy']}, "
         f"{w['probes']['bulk_busy']}, {w['after']['bulk_busy']} of the time: "
         f"{100 * (load['bulk_busy_loss'] or 0):.1f}% less with probes"),
        (f"two bulk requests of {fair['images_each']} sent together", f"x{fair['ratio']}",
         f"finished at {fair['finished_s']['fair-a']} s and {fair['finished_s']['fair-b']} s; target <= x1.2: "
         f"{'ok' if fair['ok'] else 'MISSED'}"),
        ("load average (1 min) during the scenario", f"{load['loadavg_at_start'][0]}",
         f"at the end {load['loadavg_at_end'][0]} ({cfg['cpus']} CPUs)"),
    ]


def text_rows(text: dict[str, Any], cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The text scenario's rows (``bench/annotation_text.py``)."""
    first, nxt, bulk = text["first_interactive"], text["next_interactive"], text["first_bulk_full_ensemble"]
    rows = [
        ("first interactive request with 5 new classes", f"{first['seconds']} s",
         f"prompt set {first['prompt_set']}; target < 2 s: {'ok' if first['seconds'] < 2 else 'MISSED'}; the full "
         f"ensemble ({cfg['templates']} templates) ready {text['background_ensemble_s']} s after the answer"),
        ("next interactive request, same classes", f"{nxt['seconds']} s", f"prompt set {nxt['prompt_set']}"),
        ("first bulk request with 5 other new classes", f"{bulk['seconds']} s",
         f"prompt set {bulk['prompt_set']}: the full text pass in the request (what an interactive one waited before)"),
    ]
    restarted = text.get("restarted")
    if restarted:
        rows.append(("restarted worker with a warm disk cache", f"{restarted['seconds']} s",
                     f"interactive, the 5 classes; prompt set {restarted['prompt_set']}, text cache "
                     f"{restarted['text_cache']} (no text pass); worker ready after {restarted['worker_ready_s']} s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum, _frame):  # SIGTERM: unwind through every finally (worker, broker, server stopped)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    set_wait_budget(args.wait_budget)
    import torch

    from bench.annotation_e2e import run_e2e
    from bench.annotation_model import InProcess
    from testkit.images import ImageServerProcess, varied_jpegs

    from consumers.logging_setup import configure_logging
    from ml.zeroshot import DEFAULT_TEMPLATES

    configure_logging("WARNING", "console")  # topic provisioning logs stay quiet
    classes = CLASSES[: args.classes]
    templates = DEFAULT_TEMPLATES[: args.templates]
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="cls-bench-annotation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server: ImageServerProcess | None = None
    result: dict[str, Any] = {
        "bench": "annotation",
        "config": {"variant": args.variant, "weights": args.weights, "images": args.images, "threads": args.threads,
                   "batch_sizes": args.batch_sizes, "classes": len(classes), "templates": len(templates),
                   "request_size": args.request_size, "sample": args.sample, "baseline_images": args.baseline_images,
                   "rounds": args.rounds, "worker_batch_size": args.worker_batch_size,
                   "worker_batch_wait_ms": args.worker_batch_wait_ms, "worker_env": args.worker_env,
                   "quick": args.quick, "scenarios": sorted(args.scenarios), "load_bulk_images": args.load_bulk_images,
                   "load_probes": args.load_probes, "probe_gap_s": args.probe_gap_s, "fair_images": args.fair_images,
                   "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                   "machine": platform.machine(), "torch": torch.__version__},
    }
    rounds: list[dict[str, Any]] = []
    result["rounds"] = rounds
    try:
        started = time.monotonic()
        paths = varied_jpegs(args.images, workdir / "images", args.seed)
        print(f"made {len(paths)} images in {time.monotonic() - started:.1f}s under {workdir / 'images'}", flush=True)
        server = ImageServerProcess(workdir / "images")
        cpu_pids = {"bench": os.getpid(), "image_server": server.pid}
        print("in-process: model, text embeddings, stages ...", flush=True)
        inproc = InProcess(args, paths, server, classes, templates, cpu_pids)
        result["in_process"] = inproc.info
        if args.skip_e2e:
            for r in range(args.rounds):
                sizes = args.batch_sizes if r == 0 else inproc.focus_sizes(rounds[0]["model"])
                rounds.append({"model": inproc.model_round(sizes), "baseline": inproc.baseline_round()})
        else:
            then = [f"{args.rounds} round(s) of (a), (c), (b)"] if "throughput" in args.scenarios else []
            then += ["latency under load"] if "load" in args.scenarios else []
            print(f"end to end: broker, worker, warm-up, latency, then {' and '.join(then)} ...", flush=True)
            urls = [server.url(p.name) for p in paths]
            result["e2e"] = run_e2e(args, workdir, urls, classes, templates, server, inproc, rounds)
        result["summary"] = summarize(result)
    except KeyboardInterrupt:
        print("interrupted: the worker, broker and image server are stopped", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    line = json.dumps(result, sort_keys=True)
    print("BENCH_JSON " + line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
