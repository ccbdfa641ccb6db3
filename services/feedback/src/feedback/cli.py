"""`feedback-worker`: run the worker, set up Pub/Sub, or submit one request.

feedback-worker [run]          pull requests and answer them until SIGTERM/SIGINT
feedback-worker setup          create the topics and subscriptions (idempotent)
feedback-worker submit TEXT    publish one request and print its result
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog
from cohost_shared import logs
from cohost_shared.messages import FeedbackRequest
from cohost_shared.settings import env_errors
from pydantic import ValidationError

from feedback.settings import WorkerSettings


def _settings() -> WorkerSettings:
    try:
        return WorkerSettings()
    except ValidationError as exc:
        sys.exit("invalid settings:\n" + "\n".join(env_errors(exc, "FEEDBACK_")))


def _run(settings: WorkerSettings) -> int:
    from feedback import metrics
    from feedback.allocator import limit_arenas
    from feedback.pubsub import PubSubSink, PubSubSource
    from feedback.worker import SourceFailed, Worker

    # Before any thread starts: arenas are handed out as threads first allocate.
    arenas = limit_arenas(settings.malloc_arena_max)
    log = structlog.get_logger("feedback.cli")
    try:
        settings.project_id()
    except ValueError as exc:
        sys.exit(str(exc))
    try:
        metrics.serve(settings.metrics_host, settings.metrics_port)
    except OSError as exc:
        sys.exit(
            f"feedback-worker: cannot serve metrics on {settings.metrics_host}:"
            f"{settings.metrics_port} ({exc.strerror or exc}); stop what holds it, or set "
            "FEEDBACK_METRICS_PORT to another port (0: no metrics server)"
        )
    worker = Worker(settings, PubSubSource(settings), PubSubSink(settings))
    log.info(
        "worker_starting",
        engine=settings.llm_base_url,
        model=settings.llm_model,
        subscription=settings.requests_subscription,
        max_in_flight=settings.max_in_flight,
        metrics_port=settings.metrics_port,
        malloc_arena_max=arenas,
    )
    try:
        asyncio.run(worker.run())
    except SourceFailed as exc:
        log.error("worker_failed", error=str(exc))
        return 1
    return 0


def _setup(settings: WorkerSettings) -> int:
    from feedback.pubsub import ensure_topology

    try:
        for line in ensure_topology(settings):
            print(line)
    except ValueError as exc:
        sys.exit(str(exc))
    return 0


def _submit(settings: WorkerSettings, args: argparse.Namespace) -> int:
    from feedback.client import NoAnswer, submit

    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        request = FeedbackRequest(
            request_id=args.request_id,
            text=text,
            instructions=args.instructions,
            language=args.language,
            max_tokens=args.max_tokens,
        )
    except ValidationError as exc:
        sys.exit(f"invalid request: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    print(
        f"submitting to {settings.requests_topic}, waiting up to {args.timeout:.0f} s",
        file=sys.stderr,
    )
    try:
        answer = submit(settings, request, timeout_s=args.timeout)
    except NoAnswer as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ValueError as exc:
        sys.exit(str(exc))
    if answer.result is not None:
        print(answer.result.model_dump_json(indent=2))
        return 0
    print(
        f"request {answer.request_id} was dead-lettered: {answer.error}: {answer.error_detail}",
        file=sys.stderr,
    )
    return 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feedback-worker", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the worker (the default)")
    sub.add_parser("setup", help="create topics and subscriptions idempotently")
    p = sub.add_parser("submit", help="publish one request and print its result")
    p.add_argument("text", help="the text to get feedback on ('-' reads stdin)")
    p.add_argument("--instructions", help="what to focus on")
    p.add_argument("--language", default="en")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--request-id")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
    args = parser.parse_args(argv)

    settings = _settings()
    logs.configure(settings.log_level, json=settings.log_json)
    if args.command == "setup":
        return _setup(settings)
    if args.command == "submit":
        return _submit(settings, args)
    return _run(settings)


if __name__ == "__main__":
    sys.exit(main())
