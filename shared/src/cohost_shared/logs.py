"""Structured logs: one JSON object per line on stderr, with bound context (request ids).

Every process of the project calls `configure()` once; code then logs events with
`structlog.get_logger().info("event_name", key=value)`. Context bound with
`structlog.contextvars.bind_contextvars(request_id=...)` follows the event through
asyncio tasks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import structlog


def configure(level: str = "INFO", *, json: bool = True) -> None:
    """Route structlog and stdlib logging (google-cloud, httpx) to one JSON stream."""
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Chatty libraries stay at WARNING unless we debug.
    for noisy in ("httpx", "httpcore", "openai", "google", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


# The event the worker logs once its subscription stream is open: what `cohost up`, the
# tests and the benchmarks wait for before they publish.
WORKER_READY_EVENT = "pulling"


def logged(path: Path, event: str) -> bool:
    """Whether the JSON log at `path` holds an `event` line (False while it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return False
    return f'"event": "{event}"' in text or f'"event":"{event}"' in text
