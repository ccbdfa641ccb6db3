"""A SIGKILLed worker's messages redelivered, as a burst, to a worker that stops meanwhile.

What failed CI on 2026-12-02 (docs/reliability.md): the test in tests/test_pubsub_source.py
and bench/emulator_flood.py both run it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from feedback.jobs import Delivery
from feedback.pubsub import PubSubSource
from feedback.settings import WorkerSettings

# A subscriber like the worker's (16 at once, 10 s leases) that takes what it is pushed.
HOLDER = """
import sys, time
from google.cloud import pubsub_v1
flow = pubsub_v1.types.FlowControl(max_messages=16, min_duration_per_lease_extension=10,
                                   max_duration_per_lease_extension=10)
pubsub_v1.SubscriberClient().subscribe(sys.argv[1], callback=lambda m: None, flow_control=flow)
time.sleep(600)
"""


def hold_then_kill(subscription_path: str, hold_s: float = 4.0) -> None:
    """A subscriber process takes the backlog (the emulator pushes all of it), then is
    SIGKILLed: its messages come back when their ack deadline runs out."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, subscription_path])
    time.sleep(hold_s)
    holder.kill()
    holder.wait()


async def stop_mid_flood(settings: WorkerSettings, acks_before_stop: int) -> tuple[set[str], int]:
    """A source that acks each delivery after 0.2 s, up to `settings.max_in_flight` at once,
    and after `acks_before_stop` acks drains, nacks what it holds (a cancelled job's nack)
    and closes. Returns the acked message ids and how many `close` returned."""
    source = PubSubSource(settings)
    loop = asyncio.get_running_loop()
    acked: set[str] = set()
    enough = asyncio.Event()
    jobs: list[asyncio.Task[None]] = []

    async def job(delivery: Delivery) -> None:
        await asyncio.sleep(0.2)
        if enough.is_set():
            delivery.nack()  # held until the stream is closed
            return
        delivery.ack()
        acked.add(delivery.message_id)
        if len(acked) >= acks_before_stop:
            enough.set()

    def on_message(delivery: Delivery) -> None:
        jobs.append(loop.create_task(job(delivery)))

    source.start(on_message, lambda exc: None, loop)
    await asyncio.wait_for(enough.wait(), timeout=120)
    source.drain()
    await asyncio.sleep(1)  # the worker's grace period in the reliability suite
    return acked, await source.close()
