"""A concurrency limit that can change while requests wait on it.

asyncio.Semaphore has a fixed size; chat-first sharing lowers and raises the
number of engine calls the worker makes at once. Lowering never cancels calls in
flight: new calls wait until the count drops under the new limit. A limit of 0
pauses admission altogether. Waiters are served first come, first served.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class Limiter:
    def __init__(self, limit: int) -> None:
        self._check(limit)
        self._limit = limit
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @staticmethod
    def _check(limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def set_limit(self, limit: int) -> None:
        self._check(limit)
        self._limit = limit
        self._wake()

    def _wake(self) -> None:
        # Waking a waiter hands it the slot, so a late arrival cannot overtake it.
        while self._waiters and self._in_use < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use += 1
                waiter.set_result(None)

    def _release(self) -> None:
        self._in_use -= 1
        self._wake()

    async def __aenter__(self) -> Limiter:
        if self._in_use < self._limit and not self._waiters:
            self._in_use += 1
            return self
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted a slot just as we were cancelled: pass it on
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()
