"""``cls-worker send``: produce a request and follow its events to the end (a command-line for people).

    cls-worker send annotate --classes cat,dog,bird https://.../a.jpg https://.../b.jpg
    cls-worker send classify --classes cat,dog --examples support.jsonl https://.../a.jpg   # few-shot
    cls-worker send embed --output s3://bucket/vectors --duplicates 0.95 https://.../a.jpg https://.../b.jpg
    cls-worker send audit --manifest labels.jsonl --output s3://bucket/audits   # {"id", "url", "label"} per line
    cls-worker send train --dataset s3://bucket/prefix/ --model-name convnext_tiny --output s3://bucket/models/x
    cls-worker send request.json            # any request as JSON (the topic follows from its "task")

Prints each result part / status event as it arrives (``--json``: one JSON event per line), exits 0 when
the request completed, 1 when it failed or was cancelled, 2 when the broker is unreachable or the
request is invalid, 3 on timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from consumers.settings import Settings
from consumers.topics_admin import topic_partitions
from schemas.annotation import (
    MAX_FEW_SHOT_EXAMPLES,
    MAX_IMAGES_PER_REQUEST,
    AnnotationRequest,
    AuditRequest,
    EmbedRequest,
    LabeledExample,
    SelectRequest,
)
from schemas.topics import CONTENT_TYPE_JSON, Headers
from schemas.training import CancelRequest, TrainingRequest


def add_send_parser(sub: Any, func: Any) -> None:
    p = sub.add_parser("send", help="produce a request and follow its events", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", help="annotate (or classify) | embed | audit | select | train | cancel | a request JSON file")
    p.add_argument("urls", nargs="*", help="image URLs (annotate, embed)")
    p.add_argument("--classes", help="comma-separated class names (annotate; audit: the labels allowed)")
    p.add_argument("--model", default="clip", choices=["clip", "siglip", "custom", "timm"])
    p.add_argument("--model-variant")
    p.add_argument("--model-url", help="trained model package (with --model custom)")
    p.add_argument("--top-k", type=int, default=None, help="default: min(3, number of classes)")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--examples", metavar="MANIFEST",
                   help="classify few-shot: labeled examples as JSON Lines of {url, label}; a local file is sent inline "
                        "(examples), an s3:// or file:// URL is read by the worker (examples_url)")
    p.add_argument("--few-shot-method", choices=["auto", "linear_probe", "tip_adapter", "prototype", "knn",
                                                 "logistic_regression"],
                   help="classify few-shot: the method (default auto: picked by cross-validation on the examples)")
    p.add_argument("--duplicates", type=float, metavar="THRESHOLD", help="embed: report duplicate groups (cosine >= THRESHOLD)")
    p.add_argument("--against", action="append", help="embed: an earlier embeddings_url to find duplicates against (repeatable)")
    p.add_argument("--inline", action="store_true", help="embed: vectors in the result too (small requests)")
    p.add_argument("--manifest", help="audit: a local JSON Lines file of {\"id\", \"url\", \"label\"} (sent inline, up to "
                                      f"{MAX_IMAGES_PER_REQUEST} lines) or its s3:// / https:// URL (up to the worker's "
                                      "CLS_AUDIT_MAX_IMAGES)")
    p.add_argument("--folds", type=int, help="audit: cross-validation folds (default 5)")
    p.add_argument("--multi-label", action="store_true",
                   help="classify: independent per-class probabilities and a tag set per image; train: a multi-label "
                        "job from --manifest (JSON Lines of {\"url\", \"labels\": [...], \"split\"})")
    p.add_argument("--multi-label-loss", choices=["bce", "asymmetric"], help="train --multi-label: the loss (default bce)")
    p.add_argument("--pool", help="select: the unlabeled pool, a local JSON Lines file of {\"id\", \"url\"} (sent inline) "
                                  "or its s3:// / https:// URL")
    p.add_argument("--labeled", help="select: the labeled images, a local JSON Lines file of {\"id\", \"url\", \"label\"} "
                                     "or its URL (default: none, a cold start)")
    p.add_argument("--budget", type=int, help="select: how many images to pick")
    p.add_argument("--strategy", default="auto", choices=["auto", "random", "typiclust", "margin", "kcenter"],
                   help="select: the strategy (default auto)")
    p.add_argument("--duplicate-threshold", type=float, help="select: cosine at or above which two images are "
                                                             "near-duplicates, never both selected (default 0.96, the contract's)")
    p.add_argument("--dataset", help="s3://bucket/prefix/ with <class>/<file> keys (train)")
    p.add_argument("--model-name", help="timm model name (train)")
    p.add_argument("--output", help="output_path s3://... (train; default: <dataset>/../models/<job id>; embed, audit: "
                                    "default CLS_EMBED_OUTPUT_PATH)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--augmentation", default="light", choices=["none", "light", "medium", "heavy"])
    p.add_argument("--image-size", type=int)
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--id", dest="entity_id", help="request/job id (default: a new UUID)")
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.add_argument("--no-follow", action="store_true", help="produce and exit")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow before giving up")
    p.set_defaults(func=func)


def _image_refs(urls: list[str]) -> list[dict[str, str]]:
    """Images named by their file names (prefixed with their position when names repeat)."""
    images = [{"id": Path(u.split("?")[0]).name or f"image-{i}", "url": u} for i, u in enumerate(urls)]
    ids = [img["id"] for img in images]
    if len(set(ids)) != len(ids):
        images = [{"id": f"{i}:{img['id']}", "url": img["url"]} for i, img in enumerate(images)]
    return images


async def build_request(settings: Settings, args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(topic, id, body) for the command line."""
    w = settings.worker
    entity_id = args.entity_id or str(uuid.uuid4())
    if args.what in ("annotate", "classify"):
        if not args.urls:
            raise ValueError("give at least one image URL")
        body: dict[str, Any] = {
            "task": "classify", "request_id": entity_id, "model": args.model, "images": _image_refs(args.urls),
            "threshold": args.threshold,
        }
        if args.classes:
            body["classes"] = _class_list(args.classes)
        body["top_k"] = args.top_k or min(3, len(body.get("classes") or [0, 0, 0]))
        if args.model_variant:
            body["model_variant"] = args.model_variant
        if args.model_url:
            body["model_url"] = args.model_url
        if args.examples:
            if "://" in args.examples:
                body["examples_url"] = args.examples
            else:
                body["examples"] = read_examples(Path(args.examples))
            labels = {name for e in body.get("examples") or [] for name in e.get("labels", [e.get("label")])}
            if "classes" not in body and labels:
                body["top_k"] = args.top_k or min(3, len(labels))
        if args.few_shot_method:
            body["few_shot"] = {"method": args.few_shot_method}
        if args.multi_label:
            body["multi_label"] = True
        AnnotationRequest.model_validate(body)
        return w.annotation_requests_topic, entity_id, body
    if args.what == "embed":
        if not args.urls:
            raise ValueError("give at least one image URL")
        body = {"task": "embed", "request_id": entity_id, "model": args.model,
                "images": _image_refs(args.urls)}
        _set_model_fields(body, args)
        if args.against:
            body["against"] = args.against
        if args.inline:
            body["inline"] = True
        if args.duplicates is not None:
            body["duplicates"] = {"threshold": args.duplicates}
        EmbedRequest.model_validate(body)
        return w.annotation_requests_topic, entity_id, body
    if args.what == "audit":
        body = {"task": "audit", "request_id": entity_id, "model": args.model, **audit_images(args.manifest)}
        _set_model_fields(body, args)
        if args.classes:
            body["classes"] = _class_list(args.classes)
        if args.folds is not None:
            body["options"] = {"folds": args.folds}
        AuditRequest.model_validate(body)
        return w.annotation_requests_topic, entity_id, body
    if args.what == "select":
        if not args.pool or args.budget is None:
            raise ValueError("select needs --pool FILE.jsonl (or its URL) and --budget N")
        body = {"task": "select", "request_id": entity_id, "model": args.model, "budget": args.budget,
                "strategy": args.strategy, **audit_images(args.pool, "--pool")}
        if args.labeled:
            labeled = audit_images(args.labeled, "--labeled")
            body.update({"labeled_url": labeled["manifest_url"]} if "manifest_url" in labeled else
                        {"labeled": labeled["images"]})
        _set_model_fields(body, args)
        if args.classes:
            body["classes"] = _class_list(args.classes)
        if args.duplicate_threshold is not None:
            body["options"] = {"duplicate_threshold": args.duplicate_threshold}
        SelectRequest.model_validate(body)
        return w.annotation_requests_topic, entity_id, body
    if args.what == "train":
        if args.multi_label:
            if not args.manifest or not args.model_name or not args.output:
                raise ValueError("train --multi-label needs --manifest FILE.jsonl, --model-name and --output s3://...")
            train_urls, val_urls, class_names = multi_label_dataset(Path(args.manifest), args.classes)
            urls: list[Any] = train_urls
        else:
            if not args.dataset or not args.model_name:
                raise ValueError("train needs --dataset s3://bucket/prefix/ and --model-name")
            urls = await list_dataset(settings, args.dataset)
            val_urls = []
            class_names = sorted({u.rsplit("/", 2)[-2] for u in urls})
        output = args.output or args.dataset.rstrip("/").rsplit("/", 1)[0] + f"/models/{entity_id}"
        config: dict[str, Any] = {
            "model_name": args.model_name, "num_classes": len(class_names), "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "augmentation": args.augmentation,
            "pretrained": not args.no_pretrained,
        }
        if args.image_size:
            config["image_size"] = args.image_size
        if args.multi_label:
            config["multi_label"] = True
            if args.multi_label_loss:
                config["multi_label_loss"] = args.multi_label_loss
        body = {"task": "train", "job_id": entity_id, "config": config,
                "dataset": {"train_urls": urls, "val_urls": val_urls, "class_names": class_names}, "output_path": output}
        TrainingRequest.model_validate(body)
        return w.training_requests_topic, entity_id, body
    if args.what == "cancel":
        if not args.entity_id:
            raise ValueError("cancel needs --id JOB_ID")
        body = {"task": "cancel", "job_id": args.entity_id}
        CancelRequest.model_validate(body)
        return w.training_control_topic, args.entity_id, body
    path = Path(args.what)
    if not path.exists():
        raise ValueError(f"{args.what!r} is neither annotate|embed|audit|select|train|cancel nor a request file")
    body = json.loads(path.read_text())
    task = body.get("task")
    if task in ("classify", "embed", "audit", "select"):
        entity_id = body.setdefault("request_id", entity_id)
        {"classify": AnnotationRequest, "embed": EmbedRequest, "audit": AuditRequest,
         "select": SelectRequest}[task].model_validate(body)
        return w.annotation_requests_topic, entity_id, body
    if task == "train":
        entity_id = body.setdefault("job_id", entity_id)
        TrainingRequest.model_validate(body)
        return w.training_requests_topic, entity_id, body
    if task == "cancel":
        CancelRequest.model_validate(body)
        return w.training_control_topic, body["job_id"], body
    raise ValueError(f"unknown task {task!r} in {path}")


def multi_label_dataset(path: Path, classes: str | None) -> tuple[list[dict], list[dict], list[str]]:
    """(train entries, val entries, class names) from a local JSON Lines file of ``{"url", "labels", "split"}``
    (split ``val`` goes to validation, anything else to training). Class names: ``classes`` (comma-separated), else
    every label used, sorted."""
    train: list[dict] = []
    val: list[dict] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry, dict) or not isinstance(entry.get("labels"), list) or "url" not in entry:
            raise ValueError(f"{path} line {number}: expected {{\"url\", \"labels\": [...]}}")
        item = {"url": entry["url"], "labels": entry["labels"]}
        (val if str(entry.get("split", "train")).lower() in ("val", "valid", "validation") else train).append(item)
    names = ([c.strip() for c in classes.split(",") if c.strip()] if classes
             else sorted({str(label) for entry in train + val for label in entry["labels"]}))
    return train, val, names


def read_examples(path: Path) -> list[dict[str, str]]:
    """A local JSON Lines file of ``{url, label}`` -> the ``examples`` list (blank lines skipped); ValueError naming
    the line that is not one."""
    if not path.is_file():
        raise ValueError(f"--examples {path}: no such file (a local JSON Lines file, or an s3:// or file:// URL)")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if len(examples) >= MAX_FEW_SHOT_EXAMPLES:
                raise ValueError(f"--examples {path}: more than {MAX_FEW_SHOT_EXAMPLES} examples (put them in S3 and "
                                 "pass the s3:// URL)")
            try:
                example = LabeledExample.model_validate(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"--examples {path} line {number}: not an object of url and label (or labels) ({exc.__class__.__name__})") from exc
            examples.append({"url": example.url, "label": example.label} if example.labels is None
                            else {"url": example.url, "labels": example.labels})
    if not examples:
        raise ValueError(f"--examples {path}: no examples")
    return examples


MANIFEST_URL_PREFIXES = ("s3://", "http://", "https://", "file://")


def _set_model_fields(body: dict[str, Any], args: argparse.Namespace) -> None:
    """The model and output fields every embedding task takes, where the command line gives them."""
    for field, value in (("model_variant", args.model_variant), ("model_url", args.model_url),
                         ("output_path", args.output)):
        if value:
            body[field] = value


def _class_list(classes: str) -> list[str]:
    return [c.strip() for c in classes.split(",") if c.strip()]


def audit_images(manifest: str | None, option: str = "--manifest") -> dict[str, Any]:
    """``{"manifest_url": ...}`` for a URL, or ``{"images": [...]}`` read from a local JSON Lines file (blank
    lines skipped); a file over the inline limit is refused with what to do instead."""
    if not manifest:
        raise ValueError("audit needs --manifest FILE.jsonl (or its s3:// URL): {\"id\", \"url\", \"label\"} per line")
    if manifest.startswith(MANIFEST_URL_PREFIXES):
        return {"manifest_url": manifest}
    path = Path(manifest)
    if not path.is_file():
        raise ValueError(f"{option} {manifest}: no such file (or give an s3:// URL)")
    images: list[Any] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if len(images) >= MAX_IMAGES_PER_REQUEST:
                raise ValueError(f"{manifest} has more than {MAX_IMAGES_PER_REQUEST} images, the most a request carries "
                                 "inline: upload it (e.g. aws s3 cp) and pass --manifest s3://bucket/key.jsonl")
            try:
                images.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{manifest} line {number}: not JSON ({exc})") from exc
    return {"images": images}


async def list_dataset(settings: Settings, prefix: str) -> list[str]:
    """Image URLs under an s3:// prefix laid out as <class>/<file>."""
    from handlers.storage import ObjectStore

    if not prefix.endswith("/"):
        prefix += "/"
    async with ObjectStore(endpoint_url=settings.worker.s3_endpoint_url, region=settings.worker.s3_region) as store:
        urls = await store.list(prefix)
    urls = [u for u in urls if u[len(prefix):].count("/") == 1 and not u.endswith("/")]
    if not urls:
        raise ValueError(f"no <class>/<file> objects under {prefix}")
    return sorted(urls)


def render(event: dict[str, Any]) -> str:
    if event.get("event_type") == "annotation.result":
        if event["status"] == "failed":
            return f"failed: {event['error']['code']}: {event['error']['message']}"
        lines = [f"part {event['part'] + 1}/{event['parts']}  model={event['model']['family']}/{event['model']['variant']}"
                 f" weights={event['model']['weights']}"]
        few_shot = event.get("few_shot")
        if few_shot and event["part"] == 0:
            counts = few_shot["examples_per_class"]
            cv = "n/a" if few_shot.get("cv_accuracy") is None else f"{few_shot['cv_accuracy']:.3f}"
            lines.append(f"  few-shot: {few_shot['method']} on {sum(counts.values())} examples of {len(counts)} classes"
                         f" (cv accuracy {cv}; {few_shot['examples_failed']} failed; "
                         f"{'fitted' if few_shot['fitted'] else 'cached head'})")
        if event.get("task") == "embed":
            lines[0] += f"  dim={event.get('dim')}  vectors={event.get('embeddings_url') or '(none)'}"
        if event.get("task") == "audit":
            summary = event.get("audit_summary") or {}
            lines[0] += (f"  audited={summary.get('audited')}/{summary.get('images')}  label_issues={summary.get('label_issues')}"
                         f"  cv_accuracy={summary.get('cv_accuracy')}  table={event.get('audit_url')}")
        if event.get("task") == "select":
            summary = event.get("select_summary") or {}
            lines[0] += (f"  strategy={summary.get('strategy')}  pool={summary.get('pool')}  labeled={summary.get('labeled')}"
                         f"  cv_accuracy={summary.get('cv_accuracy')}  table={event.get('selection_url')}")
            for entry in event.get("selection") or []:
                guess = entry.get("predicted")
                hint = f"  predicted {guess['class']} ({guess['confidence']:.3f})" if guess else ""
                lines.append(f"  #{entry['rank']} {entry['id']}: {entry['reason']} score={entry['score']:.4f}{hint}")
        for result in event["results"]:
            if result.get("error"):
                lines.append(f"  {result['id']}: ERROR {result['error']['code']}: {result['error']['message'][:120]}")
            elif result.get("audit"):
                a = result["audit"]
                flag = f"  ISSUE -> {a['suggested_label']} ({a['suggested_probability']:.3f})" if a["label_issue"] else ""
                lines.append(f"  #{a['rank']} {result['id']}: {a['label']} p={a['label_probability']:.3f}"
                             f" outlier={a['outlier_score']:.3f}{flag}")
            elif event.get("task") == "embed":
                lines.append(f"  {result['id']}: embedded")
            else:
                preds = ", ".join(f"{p['class']} {p['confidence']:.3f}" for p in result["predictions"]) or "(below threshold)"
                tags = f"  tags: {', '.join(result['labels']) or '(none)'}" if result.get("labels") is not None else ""
                lines.append(f"  {result['id']}: {preds}{tags}")
        for group in event.get("duplicates") or []:
            lines.append(f"  duplicates ({group['kind']}, similarity >= {group['similarity']:.3f}): {', '.join(group['ids'])}")
        if event.get("duplicates_url"):
            lines.append(f"  all duplicate groups: {event['duplicates_url']}")
        for conflict in event.get("label_conflicts") or []:
            pairs = ", ".join(f"{i} ({label})" for i, label in zip(conflict["ids"], conflict["labels"]))
            lines.append(f"  label conflict (similarity {conflict['similarity']:.3f}): {pairs}")
        if event.get("label_conflicts_url"):
            lines.append(f"  all label conflicts: {event['label_conflicts_url']}")
        return "\n".join(lines)
    status = event["status"]
    progress = event.get("progress") or {}
    metrics = progress.get("metrics") or {}
    if status == "running":
        bits = [f"epoch {progress.get('epoch')}/{progress.get('epochs')}"]
        if progress.get("step") is not None:
            bits.append(f"step {progress['step']}/{progress.get('steps')}")
        for key in ("train_loss", "val_loss", "val_accuracy", "images_per_s", "eta_s"):
            if metrics.get(key) is not None:
                bits.append(f"{key}={metrics[key]:.4g}" if isinstance(metrics[key], float) else f"{key}={metrics[key]}")
        return "running  " + "  ".join(bits)
    if status == "completed":
        m = event.get("metrics") or {}
        return f"completed  val_accuracy={m.get('val_accuracy')}  best_epoch={m.get('best_epoch')}  model_url={event.get('model_url')}"
    if event.get("error"):
        return f"{status}  {event['error']['code']}: {event['error']['message']}"
    return f"{status} (attempt {event.get('attempt')})"


def finished(event: dict[str, Any], parts_seen: set[int]) -> bool:
    if event.get("event_type") == "annotation.result":
        return event["status"] == "failed" or len(parts_seen) >= event["parts"]
    return event["status"] in ("completed", "failed", "cancelled") and not event.get("heartbeat")


async def run_send(settings: Settings, args: argparse.Namespace) -> int:
    try:
        topic, entity_id, body = await build_request(settings, args)
    except (ValueError, ValidationError) as exc:
        print(f"cls-worker send: {exc}", file=sys.stderr)
        return 2
    kafka = settings.kafka.client_kwargs()
    out_topic = {settings.worker.annotation_requests_topic: settings.worker.annotation_results_topic,
                 settings.worker.training_requests_topic: settings.worker.training_status_topic}.get(topic)
    consumer = None
    producer = AIOKafkaProducer(**kafka, acks="all", enable_idempotence=True)
    try:
        try:
            await asyncio.wait_for(producer.start(), timeout=30)
            if out_topic and not args.no_follow:
                consumer = AIOKafkaConsumer(**kafka, group_id=None, enable_auto_commit=False)
                await asyncio.wait_for(consumer.start(), timeout=30)
                tps = await topic_partitions(consumer, out_topic)
                if not tps:
                    raise ValueError(f"topic {out_topic} does not exist (run `cls-worker topics create`)")
                consumer.assign(tps)
                await consumer.seek_to_end(*tps)
                for tp in tps:
                    await consumer.position(tp)  # resolve "end" now, before producing
        except (KafkaError, OSError, TimeoutError) as exc:
            print(f"cls-worker send: cannot reach Kafka at {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"cls-worker send: {exc}", file=sys.stderr)
            return 2
        id_header = Headers.JOB_ID if topic != settings.worker.annotation_requests_topic else Headers.REQUEST_ID
        await producer.send_and_wait(topic, json.dumps(body).encode(), key=entity_id.encode(), headers=[
            (Headers.CONTENT_TYPE, CONTENT_TYPE_JSON.encode()), (id_header, entity_id.encode())])
        if not args.json:
            print(f"sent {body['task']} {entity_id} to {topic}")
        if consumer is None:
            return 0
        return await follow(consumer, entity_id, args)
    finally:
        if consumer is not None:
            await consumer.stop()
        await producer.stop()


async def follow(consumer: AIOKafkaConsumer, entity_id: str, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    parts_seen: set[int] = set()
    key = entity_id.encode()
    while time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=500)
        for records in batches.values():
            for record in records:
                if record.key != key or record.value is None:
                    continue
                event = json.loads(record.value)
                if event.get("event_type") == "annotation.result" and event["status"] == "completed":
                    if event["part"] in parts_seen:
                        continue  # a redelivery's duplicate part
                    parts_seen.add(event["part"])
                print(json.dumps(event) if args.json else render(event), flush=True)
                if finished(event, parts_seen):
                    return 0 if event["status"] == "completed" else 1
    print(f"cls-worker send: no final event for {entity_id} within {args.timeout}s", file=sys.stderr)
    return 3
