"""The worker's run loop: pull, process concurrently, shut down without losing work.

On SIGTERM or SIGINT it stops taking new work, gives requests in flight
FEEDBACK_SHUTDOWN_GRACE_S to finish, closes its stream and only then returns (nacks)
what is left, so Pub/Sub redelivers it to the next worker at once, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Protocol

import structlog

from feedback import metrics
from feedback.chatload import ChatFirst
from feedback.copies import Copies
from feedback.engine import EngineClient
from feedback.jobs import Delivery, Outcome, Processor, Sink
from feedback.limiter import Limiter
from feedback.pause import EnginePause
from feedback.preempt import ChatWatch, Preempter
from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Source(Protocol):
    def start(
        self,
        on_message: Callable[[Delivery], None],
        on_failure: Callable[[BaseException], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None: ...
    def drain(self) -> None:
        """Stop handing out messages; nacks from now on wait for `close`."""

    async def close(self) -> int:
        """Stop receiving, then return every message not acked; how many it returned."""


class SourceFailed(RuntimeError):
    """The request source stopped on its own (e.g. the subscription vanished)."""


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        source: Source,
        sink: Sink,
        engine: EngineClient | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.sink = sink
        self.engine = engine or EngineClient(settings)
        self.limiter = Limiter(settings.max_in_flight)
        self.chat_watch = ChatWatch(settings.chat_busy_threshold) if settings.preempting() else None
        self.pause: EnginePause | None = None
        preempter = None
        if self.chat_watch:
            if settings.preempt_mode == "pause":
                self.pause = EnginePause(settings, self.chat_watch)
            preempter = Preempter(settings, self.engine, self.chat_watch, self.pause)
        self.processor = Processor(settings, self.engine, sink, self.limiter, preempter)
        self.copies = Copies()
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._stop = asyncio.Event()
        self._stopping = False
        self._failure: BaseException | None = None

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("shutdown_requested", reason=reason, in_flight=len(self._tasks))
            self._stop.set()

    def _accept(self, delivery: Delivery) -> None:
        if self._stopping:
            # Handed over just before the drain began: the source returns it at close.
            delivery.nack()
            return
        first = self.copies.first(delivery)
        if first is None:
            return  # a copy of one being answered, or answered: settled with it
        task = asyncio.create_task(self.processor.handle(first))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _source_failed(self, exc: BaseException) -> None:
        log.error("source_failed", error=f"{type(exc).__name__}: {exc}")
        self._failure = exc
        self.request_stop("source failed")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        ready = asyncio.create_task(self.engine.wait_ready())
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self.engine.close()
            if self.pause:
                await self.pause.close()
            log.info("shutdown_complete", before="engine ready")
            return
        ready.result()
        metrics.CONCURRENCY_LIMIT.set(self.limiter.limit)
        chat = ChatFirst.from_settings(self.settings, self.limiter)
        chat_task = asyncio.create_task(chat.run()) if chat else None
        if self.pause:
            await self.pause.start()
        watch_tasks = self._start_watch()
        self.source.start(self._accept, self._source_failed, loop)
        await stop
        if chat_task:
            chat_task.cancel()
        await self._drain()
        for task in watch_tasks:
            task.cancel()  # after the drain: paused answers may still resume in it
        if self.pause:
            await self.pause.close()
        if self._failure is not None:
            raise SourceFailed(str(self._failure)) from self._failure

    def _start_watch(self) -> list[asyncio.Task[None]]:
        url = self.settings.chat_metrics_url
        if self.chat_watch is None or url is None:
            return []
        tasks = [asyncio.create_task(self.chat_watch.run(url, self.settings.chat_poll_interval()))]
        if self.pause:
            tasks.append(asyncio.create_task(self.pause.run()))
        return tasks

    async def _drain(self) -> None:
        self._stopping = True
        self.source.drain()
        grace = self.settings.shutdown_grace_s
        pending: set[asyncio.Task[Outcome]] = set(self._tasks)
        if pending:
            log.info("draining", in_flight=len(pending), grace_s=grace)
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()  # the job nacks its message: held until the stream is closed
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        returned = await self.source.close()
        await self.sink.close()
        await self.engine.close()
        log.info("shutdown_complete", cancelled=len(pending), returned=returned)
