"""Preemption by pausing the feedback engine itself (FEEDBACK_PREEMPT_MODE=pause).

While chat is busy the worker asks its own vLLM server to stop scheduling: `POST
/pause?mode=keep` freezes every request where it is, KV cache and all, at the end of the
engine step under way; `POST /resume` lets them go on from there. Nothing is cut, re-posted
or prefilled again, so giving the GPU back costs one HTTP call each way, where stopping
and continuing 32 answers (`feedback.preempt`, mode `abort`) took about 120 ms to resume on
the GPU (docs/sharing.md). The engine calls themselves are plain ones meanwhile: they just
take longer.

vLLM serves these two only in its development mode (VLLM_SERVER_DEV_MODE=1, set by the
launcher for the feedback engine alone: docs/sharing.md, "The pause's endpoints"). An
engine without them answers 404: the worker then preempts by abort instead, and says so
once.

The pause is held by the engine, not the worker: a worker that dies while chat is busy
leaves its engine paused, so each worker resumes it when it starts and when it stops. While
chat stays busy the pause is sent again every REASSERT_S, so an engine restarted meanwhile
(unpaused) is paused again.

A paused answer is not a slow one: FEEDBACK_LLM_TIMEOUT_S counts only the time its engine
was not held paused (`within`), so chat busy for longer than that costs feedback a wait,
never a timed-out call redone from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx2
import structlog

from feedback import metrics
from feedback.engine import EngineUnavailable
from feedback.preempt import ChatWatch
from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)
T = TypeVar("T")

PAUSE: tuple[str, dict[str, str]] = ("/pause", {"mode": "keep", "clear_cache": "false"})
RESUME: tuple[str, dict[str, str]] = ("/resume", {})
REASSERT_S = 1.0


class EnginePause:
    """Keeps the feedback engine paused exactly while `watch` sees chat busy."""

    def __init__(self, settings: WorkerSettings, watch: ChatWatch) -> None:
        root = settings.llm_base_url.rstrip("/").removesuffix("/v1")
        self._http = httpx2.AsyncClient(
            base_url=root,
            headers={"Authorization": f"Bearer {settings.api_key()}"},
            timeout=10.0,
        )
        self._watch = watch
        self._limit_s = settings.llm_timeout_s
        self.works = True  # False: the engine has no /pause, preempt by abort
        self._paused: bool | None = None  # what the engine last confirmed; None: unknown
        self._sent_at = 0.0
        self._started = False
        # The held clock: from a confirmed pause to the next confirmed resume.
        self._held_total = 0.0
        self._held_from: float | None = None

    @property
    def paused(self) -> bool | None:
        """What the engine last confirmed (None: not known)."""
        return self._paused

    def held_s(self) -> float:
        """Seconds the engine has been held paused, in all, the current pause included. A
        resume that failed leaves the clock running: the engine is most likely still
        paused."""
        now = time.monotonic() - self._held_from if self._held_from is not None else 0.0
        return self._held_total + now

    async def timed(self, call: Awaitable[T]) -> T:
        """`call` (an engine call with no timeout of its own) timed out after
        FEEDBACK_LLM_TIMEOUT_S of the time this engine was not held paused."""
        return await within(call, self._limit_s, self.held_s)

    async def start(self) -> None:
        """Resume the engine (a worker that died during a pause left it paused) and learn
        whether it can pause at all."""
        self._started = True
        status = await self._post(*RESUME)
        if status == 404:
            self.works = False
            log.warning(
                "engine_pause_missing",
                detail="the feedback engine does not serve /pause (vLLM's development "
                "mode, VLLM_SERVER_DEV_MODE=1, which `cohost launch feedback` sets): "
                "preempting by abort instead",
            )
        elif status == 200:
            self._paused = False

    async def run(self) -> None:
        """Follow chat until cancelled: pause on busy, resume on idle."""
        if not self.works:
            return
        while True:
            want = self._watch.busy
            due = want and time.monotonic() - self._sent_at >= REASSERT_S
            if want != self._paused or due:
                await self._set(want)
            await self._watch.wait_change(REASSERT_S)

    async def close(self) -> None:
        """Leave the engine running for whoever comes next."""
        if self._started and self.works and self._paused is not False:
            await self._set(False)
        await self._http.aclose()

    async def _set(self, paused: bool) -> None:
        since = self._watch.busy_since if paused else self._watch.idle_since
        path, params = PAUSE if paused else RESUME
        started = time.monotonic()
        status = await self._post(path, params)
        self._sent_at = time.monotonic()
        if status != 200:
            self._paused = None  # unknown: sent again at the next change or REASSERT_S
            return
        if paused and self._held_from is None:
            self._held_from = self._sent_at
        elif not paused and self._held_from is not None:
            held = self._sent_at - self._held_from
            self._held_total += held
            self._held_from = None
            metrics.ENGINE_PAUSED_SECONDS.inc(held)
        changed = self._paused is not paused
        self._paused = paused
        if not changed:
            return
        metrics.ENGINE_PAUSED.set(int(paused))
        if paused:
            metrics.ENGINE_PAUSES.inc()
        log.info(
            "engine_paused" if paused else "engine_resumed",
            took_ms=round((self._sent_at - started) * 1000, 2),
            after_chat_ms=round((self._sent_at - since) * 1000, 2) if since else None,
        )

    async def _post(self, path: str, params: dict[str, str]) -> int | None:
        """The engine's status code, or None when it could not be reached."""
        try:
            response = await self._http.post(path, params=params)
        except httpx2.HTTPError as exc:
            log.warning("engine_pause_failed", path=path, error=f"{type(exc).__name__}: {exc}")
            return None
        if response.status_code not in (200, 404):
            log.warning("engine_pause_failed", path=path, status=response.status_code,
                        body=response.text[:200])  # fmt: skip
        return response.status_code


async def within(call: Awaitable[T], limit_s: float, held_s: Callable[[], float]) -> T:
    """`call`'s result, or EngineUnavailable once it has run `limit_s` seconds not counting
    those the engine spent held paused (`held_s`, a clock that only runs while it is)."""
    task = asyncio.ensure_future(call)
    began, held = time.monotonic(), held_s()
    try:
        while True:
            left = limit_s - (time.monotonic() - began - (held_s() - held))
            if left <= 0:
                raise EngineUnavailable(
                    f"no answer after {limit_s:g} s of unpaused engine time "
                    "(FEEDBACK_LLM_TIMEOUT_S)"
                )
            done, _ = await asyncio.wait({task}, timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()  # closes the connection: vLLM aborts the request
            with contextlib.suppress(asyncio.CancelledError):
                await task
