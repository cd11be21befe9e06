"""``cls-worker``: run the workers, provision topics, export the contract, send requests.

    cls-worker annotation                 consume annotation requests (CLIP / SigLIP / custom)
    cls-worker training [--max-jobs N]    consume training requests (timm fine-tuning)
    cls-worker topics create              create every topic with partitions, retention, compaction
    cls-worker topics list                the topics and partition counts the workers expect
    cls-worker schemas export DIR         write JSON Schema files (and docs/asyncapi.yaml with --asyncapi)
    cls-worker settings                   print the effective settings (secrets masked)
    cls-worker send ...                   produce a request and follow its events (see --help)
    cls-worker prefetch [--classes a,b]   download the configured pretrained weights into the cache (and warm
                                          CLS_TEXT_CACHE_DIR with the classes' text embeddings)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from consumers.logging_setup import configure_logging
from consumers.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic ValidationError: a clear message, not a traceback
        print(f"cls-worker: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_annotation(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.worker.log_level, settings.worker.log_format)
    from consumers.annotation_worker import run_annotation_worker

    return asyncio.run(run_annotation_worker(settings, max_requests=args.max_requests))


def _cmd_training(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.worker.log_level, settings.worker.log_format)
    from consumers.training_worker import run_training_worker

    return asyncio.run(run_training_worker(settings, max_jobs=args.max_jobs or settings.worker.max_jobs))


def _cmd_topics(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.worker.log_level, settings.worker.log_format)
    from consumers.topics_admin import create_topics, topic_specs

    if args.action == "list":
        for spec in topic_specs(settings):
            print(f"{spec.name}\tpartitions={spec.partitions}\t" + ",".join(f"{k}={v}" for k, v in spec.configs.items()))
        return 0
    try:
        outcomes = asyncio.run(create_topics(settings))
    except Exception as exc:
        print(f"cls-worker: could not create topics on {settings.kafka.bootstrap_servers}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    for name, outcome in outcomes.items():
        print(f"{name}\t{outcome}")
    return 0


def _cmd_schemas(args: argparse.Namespace) -> int:
    from schemas.export import export

    for path in export(args.directory):
        print(path)
    if args.asyncapi:
        from schemas.asyncapi import write_asyncapi

        print(write_asyncapi(args.asyncapi))
    return 0


def _cmd_settings(_args: argparse.Namespace) -> int:
    print(json.dumps(_settings().redacted(), indent=2, default=str))
    return 0


def _cmd_send(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging("WARNING", settings.worker.log_format)
    from consumers.send import run_send

    return asyncio.run(run_send(settings, args))


def _cmd_prefetch(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.worker.log_level, settings.worker.log_format)
    classes = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
    if args.classes_file:
        lines = Path(args.classes_file).read_text(encoding="utf-8").splitlines()
        classes += [line.strip() for line in lines if line.strip()]
    if classes and not (settings.worker.text_cache_dir and settings.worker.text_cache_disk_mb > 0):
        print("prefetch --classes needs CLS_TEXT_CACHE_DIR (and CLS_TEXT_CACHE_DISK_MB > 0)", file=sys.stderr)
        return 2
    from consumers.annotation_worker import prefetch

    return prefetch(settings, classes or None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cls-worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("annotation", help="run the annotation worker")
    p.add_argument("--max-requests", type=int, default=None, help="exit after handling this many requests")
    p.set_defaults(func=_cmd_annotation)

    p = sub.add_parser("training", help="run the training worker")
    p.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (Kubernetes job-per-request)")
    p.set_defaults(func=_cmd_training)

    p = sub.add_parser("topics", help="provision or list topics")
    p.add_argument("action", choices=["create", "list"])
    p.set_defaults(func=_cmd_topics)

    p = sub.add_parser("schemas", help="export the contract")
    p.add_argument("action", choices=["export"])
    p.add_argument("directory")
    p.add_argument("--asyncapi", metavar="FILE", help="also write the AsyncAPI 3.0 document to FILE")
    p.set_defaults(func=_cmd_schemas)

    p = sub.add_parser("settings", help="print the effective settings (secrets masked)")
    p.set_defaults(func=_cmd_settings)

    p = sub.add_parser("prefetch", help="download the configured pretrained weights into the cache; with --classes, "
                       "also their text embeddings into CLS_TEXT_CACHE_DIR")
    p.add_argument("--classes", default=None, help="comma-separated class names to warm the disk text cache with")
    p.add_argument("--classes-file", default=None, help="a file of class names, one per line")
    p.set_defaults(func=_cmd_prefetch)

    try:
        from consumers.send import add_send_parser
    except ImportError:  # pragma: no cover - send is optional while it is being built
        pass
    else:
        add_send_parser(sub, _cmd_send)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `send annotate --classes a,b URL...`: URLs after the options belong to the positional list
        if args.command == "send" and not any(item.startswith("-") for item in extra):
            args.urls = [*args.urls, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
