"""An in-process request source and sink with Pub/Sub's delivery semantics.

For running the worker's real pipeline where no Pub/Sub exists (the GPU benchmark
host): at most `max_outstanding` messages are out at once, a nack redelivers with
the attempt count raised, and every result and dead letter is kept.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from cohost_shared.messages import FeedbackResult

from feedback.jobs import Delivery


@dataclass
class InProcessDelivery:
    data: bytes
    message_id: str
    delivery_attempt: int | None
    _source: InProcessSource = field(repr=False)
    _settled: bool = field(default=False, repr=False)

    def ack(self) -> None:
        if not self._settled:
            self._settled = True
            self._source._settle(self, requeue=False)

    def nack(self) -> None:
        if not self._settled:
            self._settled = True
            self._source._settle(self, requeue=True)


class InProcessSource:
    def __init__(self, payloads: Iterable[bytes], *, max_outstanding: int) -> None:
        self._pending: deque[tuple[str, bytes, int]] = deque(
            (f"local-{i}", data, 1) for i, data in enumerate(payloads)
        )
        self._total = len(self._pending)
        self._max_outstanding = max_outstanding
        self._outstanding = 0
        self.acked = 0
        self.nacked = 0
        self.drained = asyncio.Event()
        self._deliver: Callable[[Delivery], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def start(
        self,
        on_message: Callable[[Delivery], None],
        on_failure: Callable[[BaseException], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._deliver = on_message
        self._loop = loop
        self._pump()

    def _pump(self) -> None:
        if self._closed or self._deliver is None:
            return
        while self._pending and self._outstanding < self._max_outstanding:
            message_id, data, attempt = self._pending.popleft()
            self._outstanding += 1
            self._deliver(InProcessDelivery(data, message_id, attempt, self))
        if not self._pending and self._outstanding == 0:
            self.drained.set()

    def _settle(self, delivery: InProcessDelivery, *, requeue: bool) -> None:
        self._outstanding -= 1
        if requeue:
            self.nacked += 1
            attempt = (delivery.delivery_attempt or 1) + 1
            self._pending.append((delivery.message_id, delivery.data, attempt))
        else:
            self.acked += 1
        if self._loop is not None:
            self._loop.call_soon(self._pump)

    def drain(self) -> None:
        self._closed = True

    async def close(self) -> int:
        """Nothing to return: a nack here requeues at once, and no stream can bounce it."""
        self._closed = True
        return 0


class InProcessSink:
    def __init__(self) -> None:
        self.results: list[FeedbackResult] = []
        self.dead_letters: list[tuple[bytes, dict[str, str]]] = []

    async def publish_result(self, result: FeedbackResult) -> None:
        self.results.append(result)

    async def publish_dead_letter(self, data: bytes, attributes: Mapping[str, str]) -> None:
        self.dead_letters.append((data, dict(attributes)))

    async def close(self) -> None:
        return None
