"""The worker's Pub/Sub source on the real emulator: what a graceful stop hands back."""

from __future__ import annotations

import asyncio
import time

import pytest
from feedback.jobs import Delivery
from feedback.pubsub import PubSubSource, ensure_topology
from feedback.settings import WorkerSettings
from google.cloud import pubsub_v1

from harness.flood import hold_then_kill, stop_mid_flood
from harness.pubsub import Project, pull_back

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

    path = pubsub_v1.SubscriberClient.subscription_path(
        project.project_id, settings.requests_subscription
    )
    # Well inside the 60 s ack deadline: a message that comes back only when its lease
    # runs out would miss this window.
    back = pull_back(path, SENT, within_s=8)
    assert set(back) == sent, f"{len(sent - set(back))} of {SENT} did not come back in 8 s"
    for delivery in handed:
        assert back[delivery.message_id][1] == 2, "handed over once, then returned"


def test_a_stop_during_a_redelivery_flood_loses_nothing(project: Project) -> None:
    """What failed CI (the reliability suite's SIGTERM just as a SIGKILLed worker's
    messages ran out their ack deadline): a worker stopped while those messages are being
    redelivered to it. Under the retry policy the subscription used to have, the emulator
    lost the ones still waiting out their backoff for the closing stream (bench/
    emulator_flood.py); without it, each is back within seconds."""
    settings = WorkerSettings(max_in_flight=HELD, ack_deadline_s=10, requests_subscription="flood")
    ensure_topology(settings)
    path = pubsub_v1.SubscriberClient.subscription_path(project.project_id, "flood")
    publisher = project.publisher()
    sent = {publisher.request(f"flood-{i}", "text") for i in range(150)}
    hold_then_kill(path)
    acked, _ = asyncio.run(stop_mid_flood(settings, acks_before_stop=20))
    back = pull_back(path, len(sent - acked), within_s=60)
    missing = sent - acked - set(back)
    assert not missing, f"{len(missing)} of {len(sent)} never came back within 60 s"


def test_a_nack_comes_back_after_its_backoff(project: Project) -> None:
    """A nacked message (an engine outage past the retry budget) waits out
    FEEDBACK_NACK_BACKOFF_S, doubling per attempt, on its lease: not back at once, back soon
    after, and the subscription itself has no retry policy adding to it."""
    settings = WorkerSettings(
        max_in_flight=HELD, ack_deadline_s=10, requests_subscription="backoff", nack_backoff_s=4
    )
    ensure_topology(settings)
    path = pubsub_v1.SubscriberClient.subscription_path(project.project_id, "backoff")
    subscription = pubsub_v1.SubscriberClient().get_subscription(subscription=path)
    assert not type(subscription).pb(subscription).HasField("retry_policy")
    sent = project.publisher().request("backoff-0", "text")

    async def nack_once() -> float:
        source = PubSubSource(settings)
        handed: asyncio.Queue[Delivery] = asyncio.Queue()
        source.start(handed.put_nowait, lambda exc: None, asyncio.get_running_loop())
        delivery = await asyncio.wait_for(handed.get(), timeout=30)
        assert delivery.delivery_attempt == 1
        delivery.nack()
        nacked = time.monotonic()
        await asyncio.sleep(0.5)  # the modack goes out on the open stream
        await source.close()
        return nacked

    nacked = asyncio.run(nack_once())
    back = pull_back(path, 1, within_s=20)
    assert sent in back, "the nacked message did not come back within 20 s"
    pulled, attempt = back[sent]
    assert attempt == 2
    assert pulled - nacked >= 3.5, f"back {pulled - nacked:.1f} s after the nack, before 4 s"
