"""Chat-first sharing: the worker yields the GPU while the chatbot is busy.

Under time-slicing the GPU alternates between the two vLLM servers, so every feedback
step it runs delays the chatbot's next token (under MPS the policy measured no gain and
compose leaves it off: docs/sharing.md). The chatbot's own Prometheus endpoint says how many chat
requests are running and waiting; from that the worker sets how many engine calls
it makes at once:

- chat busy (running + waiting >= FEEDBACK_CHAT_BUSY_THRESHOLD): drop at once to
  FEEDBACK_BUSY_IN_FLIGHT (0 pauses feedback), so new chat turns soon find a quiet
  GPU; calls already running finish;
- chat idle for FEEDBACK_CHAT_IDLE_HOLD_S: double the limit each poll up to
  FEEDBACK_MAX_IN_FLIGHT. The hold spans the pauses between a user's turns, so
  the limit does not swing up and down with every message (no oscillation).

If the chatbot's metrics cannot be read the limit stays where it is for the hold
time, then ramps up as if idle (a dead chatbot needs no protection).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx2
import structlog
from cohost_shared.metrics import VLLM_LOAD, Metrics

from feedback import metrics
from feedback.limiter import Limiter
from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)


def chat_load(body: str) -> int | None:
    """Chat requests from the chatbot's /load or /metrics (None if it says neither).

    /load (vLLM's `--enable-server-load-tracking`, which the launcher turns on) is
    `{"server_load": N}`: requests counted from their arrival to their last byte, and a
    few bytes to read. /metrics says running + waiting, which vLLM moves only when it
    records an engine step, so a new request shows there after its first step
    (docs/sharing.md), and the page is a few hundred lines to render and parse."""
    if body.lstrip().startswith("{"):
        try:
            return int(json.loads(body)["server_load"])
        except (ValueError, KeyError, TypeError):
            return None
    return Metrics.parse(body, VLLM_LOAD).vllm_load()


@dataclass
class Policy:
    """The pure decision: the next limit from the current one and what chat is doing."""

    full: int
    floor: int
    busy_threshold: int
    idle_hold_s: float
    idle_since: float | None = None

    def next_limit(self, current: int, load: int | None, now: float) -> int:
        if load is not None and load >= self.busy_threshold:
            self.idle_since = None
            return self.floor
        if self.idle_since is None:
            self.idle_since = now
        if now - self.idle_since < self.idle_hold_s:
            return current
        return min(self.full, max(self.floor, 1, current * 2))


class ChatFirst:
    def __init__(self, url: str, limiter: Limiter, policy: Policy, poll_s: float) -> None:
        self._url = url
        self._limiter = limiter
        self._policy = policy
        self._poll_s = poll_s

    @classmethod
    def from_settings(cls, settings: WorkerSettings, limiter: Limiter) -> ChatFirst | None:
        if not settings.chat_metrics_url or settings.preempting():
            return None  # preemption (feedback/preempt.py) replaces the limit policy
        policy = Policy(
            full=settings.max_in_flight,
            floor=settings.busy_in_flight,
            busy_threshold=settings.chat_busy_threshold,
            idle_hold_s=settings.chat_idle_hold_s,
        )
        return cls(settings.chat_metrics_url, limiter, policy, settings.chat_poll_interval())

    async def run(self) -> None:
        log.info("chat_first_on", url=self._url, full=self._policy.full, floor=self._policy.floor)
        await poll_load(self._url, self._poll_s, self._apply)

    def _apply(self, load: int | None) -> None:
        current = self._limiter.limit
        limit = self._policy.next_limit(current, load, time.monotonic())
        if limit != current:
            self._limiter.set_limit(limit)
            metrics.CONCURRENCY_LIMIT.set(limit)
            log.info("concurrency_limit", limit=limit, chat_load=load)


class _QuietPolls(logging.Filter):
    """Drops httpx2's INFO line for each poll: at 20 ms they would be most of the log."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url

    def filter(self, record: logging.LogRecord) -> bool:
        return self._url not in record.getMessage()


async def poll_load(url: str, poll_s: float, on_load: Callable[[int | None], None]) -> None:
    """Read the chatbot's load every `poll_s` and hand it to `on_load` (None while the
    page cannot be read), until cancelled. Shared by chat-first and preemption."""
    logging.getLogger("httpx2").addFilter(_QuietPolls(url))
    unreadable = False
    async with httpx2.AsyncClient(timeout=max(poll_s, 1.0)) as client:
        while True:
            load: int | None
            try:
                response = await client.get(url)
                response.raise_for_status()
                load = chat_load(response.text)
                if unreadable:
                    log.info("chat_metrics_readable")
                unreadable = False
            except httpx2.HTTPError as exc:
                load = None
                if not unreadable:
                    log.warning("chat_metrics_unreadable", error=str(exc))
                unreadable = True
            on_load(load)
            await asyncio.sleep(poll_s)
