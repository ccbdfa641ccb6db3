"""What the Pub/Sub emulator does with messages nacked around a stream's close.

    uv run python bench/emulator_nack.py [--wait 40] [--trace]

No worker and no engine: one streaming-pull subscriber takes 16 of 40 messages (flow
control, like the worker), returns them and closes its stream, in one of two orders;
then a second client pulls synchronously for `--wait` seconds (four ack deadlines) and
counts what comes back. Each order runs on a subscription with and without the worker's
retry policy (minimum backoff 10 s). Prints one line per case; docs/reliability.md
explains the result. With --trace, also what crossed the first subscriber's wire for each
of the 16 in the first case: every StreamingPull response that carried it (and its
delivery attempt), every ModifyAckDeadline request that named it and whether the
emulator answered OK, and when the second client got it.
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


class Wire:
    """The first subscriber's side of the wire, read where the client library sends its
    unary ModifyAckDeadline requests and where it takes in StreamingPull responses."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, str]] = []  # (seconds, ack id or data, what)
        self.data_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def note(self, key: str, what: str) -> None:
        with self._lock:
            self.events.append((time.monotonic() - self.t0, key, what))

    def attach(self, stream_client: Any) -> None:
        from google.cloud.pubsub_v1.subscriber._protocol import streaming_pull_manager as spm

        original_on_response = spm.StreamingPullManager._on_response
        wire = self

        def on_response(manager: Any, response: Any) -> None:
            if response is not None:
                for m in response._pb.received_messages:
                    data = m.message.data.decode()
                    wire.data_of[m.ack_id] = data
                    wire.note(data, f"StreamingPull response, attempt {m.delivery_attempt}")
            original_on_response(manager, response)

        spm.StreamingPullManager._on_response = on_response  # type: ignore[method-assign,assignment]
        original_modack = stream_client.modify_ack_deadline

        def modify_ack_deadline(*args: Any, **kwargs: Any) -> Any:
            ack_ids, seconds = kwargs["ack_ids"], kwargs["ack_deadline_seconds"]
            try:
                result = original_modack(*args, **kwargs)
            except Exception as exc:
                for ack_id in ack_ids:
                    wire.note(
                        wire.data_of.get(ack_id, ack_id), f"ModifyAckDeadline {seconds} s: {exc}"
                    )
                raise
            for ack_id in ack_ids:
                wire.note(wire.data_of.get(ack_id, ack_id), f"ModifyAckDeadline {seconds} s: OK")
            return result

        stream_client.modify_ack_deadline = modify_ack_deadline

    def timeline(self, data: str) -> str:
        return "; ".join(f"{t:.1f} s {what}" for t, key, what in self.events if key == data)


def case(
    project: str, order: str, retry_policy: bool, wait_s: float, wire: Wire | None = None
) -> str:
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
    if wire is not None:
        wire.attach(stream_client)
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
    if wire is not None:
        wire.note("close", "stream closed")
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
            if wire is not None:
                wire.note(m.message.data.decode(), f"second client, attempt {m.delivery_attempt}")
    returned = [back[m.data.decode()] for m in first if m.data.decode() in back]
    client.close()
    publisher.stop()
    policy = "retry policy" if retry_policy else "no retry policy"
    slowest = f"{max(returned):.1f} s" if returned else "-"
    if wire is not None:
        print(
            f"wire, first subscriber ({order}, {policy}); stream closed at "
            f"{wire.timeline('close').split(' s ')[0]} s:",
            flush=True,
        )
        for m in first:
            data = m.data.decode()
            mark = "back" if data in back else "NEVER BACK"
            print(f"  {data:4s} {mark:10s} {wire.timeline(data)}", flush=True)
    return (
        f"| {order} | {policy} | {len(returned)}/{HELD} | {HELD - len(returned)} | {slowest} "
        f"| {len(back)}/{MESSAGES} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--wait", type=float, default=4.0 * ACK_DEADLINE_S)
    p.add_argument("--trace", action="store_true", help="the first case's wire, per message")
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
                wire = Wire() if args.trace and n == 1 else None
                print(case(f"probe-{n}", order, retry_policy, args.wait, wire), flush=True)


if __name__ == "__main__":
    main()
