"""``cls-worker annotation`` as a real process on the real broker: results, errors, redelivery, metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from testkit.local import free_port
from testkit.kafka import produce, provision, read_until, settings_for
from testkit.worker_processes import start_annotation_worker

pytestmark = pytest.mark.kafka

@pytest.mark.slow
async def test_annotation_worker_end_to_end(tmp_path, kafka_bootstrap, topic_prefix, http_server, s3_server):
    settings = settings_for(topic_prefix)
    await provision(settings)
    w = settings.worker
    port = free_port()
    worker = start_annotation_worker(tmp_path, topic_prefix, CLS_METRICS_PORT=str(port), CLS_METRICS_HOST="127.0.0.1",
                                     CLS_FAULT_CRASH_AFTER_PUBLISH="1")
    names = ["astronaut_jpg", "coffee_jpg", "not_found", "truncated_jpg", "cmyk_jpg", "gray16_png", "animated_gif",
             "bomb_png", "slow_body", "not_an_image"]
    body = {"task": "classify", "model": "clip", "images": [{"id": n, "url": http_server.urls[n]} for n in names],
            "classes": ["cat", "dog", "rocket"], "top_k": 2, "threshold": 0.0}
    try:
        await worker.wait_for_log("partitions_assigned", timeout_s=120)
        await produce(kafka_bootstrap, w.annotation_requests_topic, body, key="ann-1")
        # crash after the result is acknowledged, before the commit: the restarted worker redoes it
        assert await worker.wait_exit(120) == 137
    finally:
        worker.close()
    worker = start_annotation_worker(tmp_path, topic_prefix, "restarted", CLS_METRICS_PORT=str(port),
                                     CLS_METRICS_HOST="127.0.0.1")
    try:
        records = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: len(rs) >= 2, timeout_s=120)
        first, second = (r.json() for r in records[:2])
        assert first["message_id"] == second["message_id"]
        for a, b in zip(first["results"], second["results"], strict=True):
            assert a["id"] == b["id"]
            assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
            for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
                assert abs(pa["confidence"] - pb["confidence"]) < 1e-4
        result = second
        assert result["status"] == "completed" and result["request_id"] == "ann-1"
        assert result["model"] == {"family": "clip", "variant": "cls-tiny-clip", "weights": "random", "prompt_set": "full"}
        by_id = {r["id"]: r for r in result["results"]}
        assert [r["id"] for r in result["results"]] == names
        for n in ("astronaut_jpg", "coffee_jpg", "cmyk_jpg", "gray16_png", "animated_gif"):
            assert len(by_id[n]["predictions"]) == 2 and "error" not in by_id[n]
        for n in ("not_found", "truncated_jpg", "bomb_png", "slow_body", "not_an_image"):
            assert by_id[n]["predictions"] == []
            assert by_id[n]["error"]["code"] == http_server.expected_errors[n]

        # a model that cannot be loaded fails the whole request with a typed error
        await produce(kafka_bootstrap, w.annotation_requests_topic, {**body, "model_variant": "no-such-model"}, key="ann-2")
        records = await read_until(kafka_bootstrap, w.annotation_results_topic, lambda rs: any(r.key == b"ann-2" for r in rs))
        failed = next(r.json() for r in records if r.key == b"ann-2")
        assert failed["status"] == "failed" and failed["error"]["code"] == "model_unavailable"

        # metrics and health endpoints move during a real run
        def scrape(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        def handled_lines(text: str) -> list[str]:
            return [line for line in text.splitlines() if line.startswith("cls_records_handled_total")]

        # the counter moves after the commit, which follows the (already visible) result: poll, bounded
        for _ in range(50):
            status, text = await asyncio.to_thread(scrape, "/metrics")
            if sum(float(line.rsplit(" ", 1)[1]) for line in handled_lines(text)) >= 2:
                break
            await asyncio.sleep(0.2)
        assert status == 200
        handled = handled_lines(text)
        assert sum(float(line.rsplit(" ", 1)[1]) for line in handled) >= 2, handled
        images_line = next(line for line in text.splitlines() if line.startswith("cls_images_total"))
        assert float(images_line.rsplit(" ", 1)[1]) >= 5
        assert 'cls_text_cache_total{result="miss"} 1.0' in text
        assert any(line.startswith('cls_model_load_seconds{family="clip",variant="cls-tiny-clip"}') for line in text.splitlines())
        assert (await asyncio.to_thread(scrape, "/healthz"))[0] == 200
        status, ready = await asyncio.to_thread(scrape, "/readyz")
        assert status == 200 and json.loads(ready)["ready"] is True
        summary = await worker.wait_for_log("annotation_summary")
        assert summary["images"] == len(names) and summary["failed_images"] == 5
    finally:
        worker.close()
