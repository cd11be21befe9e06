"""``cls-worker send classify --examples``: a local JSON Lines file goes inline, a URL goes as examples_url; a bad
line is named by its number; ``--few-shot-method`` sets the method (no broker needed: the request is built only)."""

from __future__ import annotations

import argparse
import json

import pytest

from consumers.cli import build_parser
from consumers.send import build_request
from consumers.settings import KafkaSettings, Settings, WorkerSettings


def args_for(argv: list[str]) -> argparse.Namespace:
    args, extra = build_parser().parse_known_args(["send", *argv])
    args.urls = [*args.urls, *extra]  # what consumers.cli.main does with URLs after the options
    return args


async def built(argv: list[str]) -> dict:
    _, _, body = await build_request(Settings(KafkaSettings(), WorkerSettings()), args_for(argv))
    return body


async def test_local_manifest_is_inlined_and_urls_are_passed(tmp_path):
    manifest = tmp_path / "support.jsonl"
    manifest.write_text('{"url": "https://x/a.jpg", "label": "cat"}\n\n{"url": "https://x/b.jpg", "label": "dog", "extra": 1}\n')
    body = await built(["classify", "--classes", "cat,dog", "--examples", str(manifest), "https://x/q.jpg"])
    assert body["task"] == "classify" and "examples_url" not in body and "few_shot" not in body
    assert body["examples"] == [{"url": "https://x/a.jpg", "label": "cat"}, {"url": "https://x/b.jpg", "label": "dog"}]
    body = await built(["annotate", "--model", "timm", "--model-variant", "resnet18", "--examples",
                        "s3://labels/support.jsonl", "--few-shot-method", "knn", "https://x/q.jpg"])
    assert body["examples_url"] == "s3://labels/support.jsonl" and body["few_shot"] == {"method": "knn"}
    assert "examples" not in body and "classes" not in body


async def test_bad_manifests_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"url": "https://x/a.jpg", "label": "cat"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        await built(["classify", "--classes", "cat", "--examples", str(bad), "https://x/q.jpg"])
    with pytest.raises(ValueError, match="no such file"):
        await built(["classify", "--classes", "cat", "--examples", str(tmp_path / "missing.jsonl"), "https://x/q.jpg"])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"url": "https://x/a.jpg", "label": "dog"}) + "\n")
    with pytest.raises(ValueError, match="not among the classes"):  # the contract's own check, before sending
        await built(["classify", "--classes", "cat", "--examples", str(other), "https://x/q.jpg"])


async def test_multi_label_examples_are_inlined_with_their_tag_sets(tmp_path):
    manifest = tmp_path / "tags.jsonl"
    manifest.write_text('{"url": "https://x/a.jpg", "labels": ["cat", "dog"]}\n{"url": "https://x/b.jpg", "labels": []}\n')
    body = await built(["classify", "--model", "siglip", "--multi-label", "--classes", "cat,dog", "--examples",
                        str(manifest), "https://x/q.jpg"])
    assert body["multi_label"] is True
    assert body["examples"] == [{"url": "https://x/a.jpg", "labels": ["cat", "dog"]}, {"url": "https://x/b.jpg", "labels": []}]
    with pytest.raises(ValueError, match=r"examples\[0\] has 'labels' but the request is single-label"):
        await built(["classify", "--model", "siglip", "--classes", "cat,dog", "--examples", str(manifest),
                     "https://x/q.jpg"])
