"""The worker's Pub/Sub source on the real emulator: what a graceful stop hands back."""

from __future__ import annotations

import asyncio
import time

import pytest
from feedback.jobs import Delivery
from feedback.pubsub import PubSubSource
from feedback.settings import WorkerSettings
from google.api_core.exceptions import DeadlineExceeded
from google.cloud import pubsub_v1

from harness.pubsub import Project

pytestmark = pytest.mark.emulator

HELD = 16  # the worker's FEEDBACK_MAX_IN_FLIGHT in the e2e tests
SENT = 40


def test_drain_then_close_returns_everything_at_once(project: Project) -> None:
    """The shutdown of a worker with 16 requests in flight and the rest held back by flow
    control: every message comes back to the next subscriber at once, none waits out its
    ack deadline, none is lost. Nacked while the stream was still open (the worker
    before), the emulator lost about half of the 16 (bench/emulator_nack.py)."""
    publisher = project.publisher()
    sent = {publisher.request(f"drain-{i}", "text") for i in range(SENT)}
    settings = WorkerSettings(max_in_flight=HELD, ack_deadline_s=60)

    async def worker_stops() -> tuple[list[Delivery], int]:
        source = PubSubSource(settings)
        handed: list[Delivery] = []
        source.start(handed.append, lambda exc: None, asyncio.get_running_loop())
        deadline = time.monotonic() + 60
        while len(handed) < HELD:
            assert time.monotonic() < deadline, f"only {len(handed)} handed over"
            await asyncio.sleep(0.05)
        source.drain()
        for delivery in handed:
            delivery.nack()  # what the worker's cancelled jobs do
        await asyncio.sleep(1)  # the grace period: nothing may bounce back meanwhile
        return handed, await source.close()

    handed, returned = asyncio.run(worker_stops())
    assert returned == len(handed) == HELD

    client = pubsub_v1.SubscriberClient()
    path = client.subscription_path(project.project_id, settings.requests_subscription)
    back: dict[str, int] = {}
    started = time.monotonic()
    # Well inside the 60 s ack deadline (and the retry policy's 10 s backoff): a message
    # that comes back only when its lease runs out would miss this window.
    while len(back) < SENT and time.monotonic() - started < 8:
        try:
            response = client.pull(subscription=path, max_messages=100, timeout=2)
        except DeadlineExceeded:  # nothing to pull within the long-poll
            continue
        if response.received_messages:
            client.acknowledge(
                subscription=path, ack_ids=[m.ack_id for m in response.received_messages]
            )
        for m in response.received_messages:
            back[m.message.message_id] = m.delivery_attempt
    client.close()
    assert set(back) == sent, f"{len(sent - set(back))} of {SENT} did not come back in 8 s"
    for delivery in handed:
        assert back[delivery.message_id] == 2, "handed over once, then returned"
