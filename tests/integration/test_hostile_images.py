"""Hostile images through the real path: a real ``cls-worker annotation`` process with ViT-B-32
(random weights), the real broker and the local image server. Tiny files that decode to extreme shapes,
float and 16-bit pixels, palettes, many frames and large canvases get per-image errors or predictions,
never a failed request, and the worker's peak RSS stays bounded."""

from __future__ import annotations

import pytest

from consumers.settings import WorkerSettings
from testkit.worker_processes import PEAK_RSS_LIMIT, peak_rss_bytes
from testkit.pictures import hostile_images
from testkit.kafka import produce, provision, read_until, settings_for
from testkit.worker_processes import start_annotation_worker

pytestmark = pytest.mark.kafka

DEFAULT_DECODE_BUDGET = WorkerSettings.model_fields["decode_memory_mb"].default * 1024**2
EXPECTED = {
    "wide_4000x1_png": "bad_aspect_ratio",
    "tall_1x100000_png": "bad_aspect_ratio",
    "float_tiff_16mp": None,  # estimate ~340 MB: admitted
    "float_tiff_40mp": "too_many_pixels",  # estimate ~840 MB > the default 512 MB decode budget
    "gray16_png_16mp": None,
    "palette_png_25mp": None,
    "gif_300_frames": None,  # first frame only
    "canvas_png_36mp": None,  # 1-bit, 4 KB on the wire
    "rgba_png_36mp": "too_many_pixels",  # estimate ~690 MB > the default 512 MB decode budget
    "large_pixels_png": "too_many_pixels",  # 48 MP > CLS_MAX_IMAGE_PIXELS
}


async def test_hostile_images_get_per_image_results_within_bounded_memory(tmp_path, kafka_bootstrap, topic_prefix,
                                                                          http_server):
    settings = settings_for(topic_prefix)
    await provision(settings)
    urls = {name: http_server.add(f"hostile/{name}", body, content_type=ctype)
            for name, (body, ctype) in hostile_images().items()}
    urls["large_pixels_png"] = http_server.urls["large_pixels_png"]
    worker = start_annotation_worker(tmp_path, topic_prefix, CLS_CLIP_VARIANT="ViT-B-32",
                                     CLS_FETCH_READ_TIMEOUT_S="10", CLS_FETCH_TOTAL_TIMEOUT_S="30",
                                     CLS_TORCH_THREADS="2")
    body = {"task": "classify", "model": "clip", "images": [{"id": n, "url": urls[n]} for n in EXPECTED],
            "classes": ["cat", "dog", "rocket"], "top_k": 2, "threshold": 0.0}
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=180)
        ready_peak = peak_rss_bytes(worker.proc.pid)  # the model loaded and warmed up
        ready_rss = peak_rss_bytes(worker.proc.pid, "VmRSS")
        await produce(kafka_bootstrap, settings.worker.annotation_requests_topic, body, key="hostile-1")
        records = await read_until(kafka_bootstrap, settings.worker.annotation_results_topic,
                                   lambda rs: any(r.key == b"hostile-1" for r in rs), timeout_s=120)
        peak = peak_rss_bytes(worker.proc.pid)
        end_rss = peak_rss_bytes(worker.proc.pid, "VmRSS")
    finally:
        worker.close()
    result = next(r.json() for r in records if r.key == b"hostile-1")
    assert result["status"] == "completed", result
    assert result["model"]["variant"] == "ViT-B-32"
    by_id = {r["id"]: r for r in result["results"]}
    assert list(by_id) == list(EXPECTED)
    for name, code in EXPECTED.items():
        if code is None:
            assert "error" not in by_id[name] and len(by_id[name]["predictions"]) == 2, by_id[name]
        else:
            assert by_id[name]["predictions"] == [] and by_id[name]["error"]["code"] == code, by_id[name]
    print(f"worker peak RSS (VmHWM): {ready_peak / 1024**2:.0f} MB when ready, {peak / 1024**2:.0f} MB after the "
          f"request; RSS {ready_rss / 1024**2:.0f} -> {end_rss / 1024**2:.0f} MB")
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak / 1024**2:.0f} MB"
    # what the request added is bounded by the decode budget (512 MB by default), plus forwards and buffers
    assert peak - ready_rss < DEFAULT_DECODE_BUDGET + 256 * 1024**2, f"grew {(peak - ready_rss) / 1024**2:.0f} MB"
