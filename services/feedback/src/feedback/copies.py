"""One answer per message, however many times Pub/Sub delivers it to this worker.

Pub/Sub delivers at least once. A copy comes, under the same message id, when a message's
ack deadline passed before the worker settled it: the emulator sends a whole backlog at
once, and what waits unread behind a full worker (flow control) is sent again once the
stream's ack deadline (FEEDBACK_ACK_DEADLINE_S) passes; tests/test_copies.py doubled 4 of
10 results that way before this module. Here:

- a copy of a message the worker is answering waits for that answer and is settled with
  it: acked once the result is published, returned if the answer is;
- a copy of a message the worker acked lately (the last `remember` of them) is acked at
  once: its result is out.

Copies delivered to another worker are not seen here; results carry `request_id` so a
consumer can drop those (docs/messages.md).
"""

from __future__ import annotations

from collections import OrderedDict

import structlog

from feedback import metrics
from feedback.jobs import Delivery

log = structlog.get_logger(__name__)


class Copies:
    def __init__(self, remember: int = 10_000) -> None:
        self._remember = remember
        self._answering: dict[str, list[Delivery]] = {}  # message id -> copies waiting
        self._acked: OrderedDict[str, None] = OrderedDict()

    def first(self, delivery: Delivery) -> Delivery | None:
        """The delivery to answer, or None for a copy (held or acked here)."""
        mid = delivery.message_id
        if mid in self._acked:
            delivery.ack()
            self._note(mid, "answered")
            return None
        held = self._answering.get(mid)
        if held is not None:
            held.append(delivery)
            self._note(mid, "answering")
            return None
        self._answering[mid] = []
        return _Tracked(delivery, self)

    def _settled(self, mid: str, acked: bool) -> None:
        for copy in self._answering.pop(mid, []):
            if acked:
                copy.ack()
            else:
                copy.nack()
        if acked:
            self._acked[mid] = None
            while len(self._acked) > self._remember:
                self._acked.popitem(last=False)

    @staticmethod
    def _note(mid: str, state: str) -> None:
        metrics.COPIES.labels(state).inc()
        log.info("copy_received", message_id=mid, original=state)


class _Tracked:
    """The first delivery of a message; its ack or nack settles the copies too."""

    __slots__ = ("_copies", "_delivery")

    def __init__(self, delivery: Delivery, copies: Copies) -> None:
        self._delivery = delivery
        self._copies = copies

    @property
    def data(self) -> bytes:
        return self._delivery.data

    @property
    def message_id(self) -> str:
        return self._delivery.message_id

    @property
    def delivery_attempt(self) -> int | None:
        return self._delivery.delivery_attempt

    def ack(self) -> None:
        self._delivery.ack()
        self._copies._settled(self.message_id, acked=True)

    def nack(self) -> None:
        self._delivery.nack()
        self._copies._settled(self.message_id, acked=False)
