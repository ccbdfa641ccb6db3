"""What the Pub/Sub emulator does with messages nacked around a stream's close.

    uv run python bench/emulator_nack.py [--wait 40]

No worker and no engine: one streaming-pull subscriber takes 16 of 40 messages (flow
control, like the worker), returns them and closes its stream, in one of two orders;
then a second client pulls synchronously for `--wait` seconds (four ack deadlines) and
counts what comes back. Each order runs on a subscription with and without the worker's
retry policy (minimum backoff 10 s). Prints one line per case; docs/reliability.md
explains the result.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from cohost import emulator
from cohost.processes import free_port
from google.api_core.exceptions import DeadlineExceeded

MESSAGES, HELD, ACK_DEADLINE_S = 40, 16, 10


@contextmanager
def running_emulator() -> Iterator[str]:
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "emulator.log"
    child = emulator.emulator_child("127.0.0.1", port, log_path=log).start()
    try:
        emulator.wait_until_started(child)
        yield f"127.0.0.1:{port}"
    finally:
        child.stop()


def case(project: str, order: str, retry_policy: bool, wait_s: float) -> str:
    from google.cloud import pubsub_v1
    from google.pubsub_v1 import types

    publisher, client = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, "requests")
    path = client.subscription_path(project, "requests")
    publisher.create_topic(name=topic)
    extra: dict[str, Any] = {}
    if retry_policy:
        extra["retry_policy"] = types.RetryPolicy(
            minimum_backoff=timedelta(seconds=10), maximum_backoff=timedelta(seconds=600)
        )
    client.create_subscription(
        request=types.Subscription(
            name=path, topic=topic, ack_deadline_seconds=ACK_DEADLINE_S, **extra
        )
    )
    for i in range(MESSAGES):
        publisher.publish(topic, f"m{i}".encode()).result()

    held: list[Any] = []
    lock = threading.Lock()

    def callback(message: Any) -> None:
        with lock:
            held.append(message)

    flow = pubsub_v1.types.FlowControl(
        max_messages=HELD,
        min_duration_per_lease_extension=ACK_DEADLINE_S,
        max_duration_per_lease_extension=ACK_DEADLINE_S,
    )
    stream_client = pubsub_v1.SubscriberClient()
    future = stream_client.subscribe(
        path, callback=callback, flow_control=flow, await_callbacks_on_shutdown=True
    )
    while len(held) < HELD:
        time.sleep(0.05)
    time.sleep(1)
    with lock:
        first = list(held)
    if order == "nack, then close":  # the worker before the fix, its grace period 1 s
        for message in first:
            message.nack()
        time.sleep(1)
    future.cancel()
    future.result(timeout=30)
    # Whatever else the stream handed over goes back the same way in both orders, after
    # the close, so the two differ only in when the first 16 were nacked.
    with lock:
        rest = [m.ack_id for m in held if order != "nack, then close" or m not in first]
    if rest:
        client.modify_ack_deadline(subscription=path, ack_ids=rest, ack_deadline_seconds=0)
    stream_client.close()

    closed = time.monotonic()
    back: dict[str, float] = {}
    while time.monotonic() - closed < wait_s and len(back) < MESSAGES:
        try:
            response = client.pull(subscription=path, max_messages=100, timeout=2)
        except DeadlineExceeded:  # an empty long-poll
            continue
        if response.received_messages:
            client.acknowledge(
                subscription=path, ack_ids=[m.ack_id for m in response.received_messages]
            )
        for m in response.received_messages:
            back.setdefault(m.message.data.decode(), time.monotonic() - closed)
    returned = [back[m.data.decode()] for m in first if m.data.decode() in back]
    client.close()
    publisher.stop()
    policy = "retry policy" if retry_policy else "no retry policy"
    slowest = f"{max(returned):.1f} s" if returned else "-"
    return (
        f"| {order} | {policy} | {len(returned)}/{HELD} | {HELD - len(returned)} | {slowest} "
        f"| {len(back)}/{MESSAGES} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--wait", type=float, default=4.0 * ACK_DEADLINE_S)
    args = p.parse_args()
    print(
        "| order | subscription | nacked messages back | never back | slowest back "
        "(after the close) | all messages back |"
    )
    print("|---|---|---|---|---|---|")
    with running_emulator() as host:
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        n = 0
        for order in ("nack, then close", "close, then nack"):
            for retry_policy in (True, False):
                n += 1
                print(case(f"probe-{n}", order, retry_policy, args.wait), flush=True)


if __name__ == "__main__":
    main()
