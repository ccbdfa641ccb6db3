"""A worker stopped while a SIGKILLed worker's messages are redelivered to it: all back?

    uv run python -m bench.emulator_flood [--runs 2]

What failed CI on 2026-12-02 (docs/reliability.md), with no engine: 150 requests are
published to the worker's subscription (ack deadline 10 s); a subscriber process takes
them all (the emulator pushes the whole backlog) and is SIGKILLed; a `PubSubSource` like
the worker's starts, acks what is redelivered to it (0.2 s each, 16 at once) and, after 20
acks, drains, nacks what it holds and closes; then a plain client pulls for 100 s and
counts what comes back. Each run does this once on a subscription with a retry policy
(minimum backoff 10 s, what `feedback setup` used to create) and once without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import timedelta

from bench.emulator_nack import running_emulator
from harness.flood import hold_then_kill, stop_mid_flood
from harness.pubsub import pull_back

SENT, DEADLINE_S, ACKS_BEFORE_STOP, WAIT_S = 150, 10, 20, 100.0


def case(project: str, retry_policy: bool) -> str:
    from feedback.pubsub import ensure_topology
    from feedback.settings import WorkerSettings
    from google.cloud import pubsub_v1
    from google.pubsub_v1 import types

    os.environ["GOOGLE_CLOUD_PROJECT"] = project  # what the worker's settings read
    settings = WorkerSettings(max_in_flight=16, ack_deadline_s=DEADLINE_S)
    ensure_topology(settings)
    client = pubsub_v1.SubscriberClient()
    path = client.subscription_path(project, settings.requests_subscription)
    if retry_policy:
        policy = types.RetryPolicy(
            minimum_backoff=timedelta(seconds=10), maximum_backoff=timedelta(seconds=600)
        )
        client.update_subscription(
            request={
                "subscription": types.Subscription(name=path, retry_policy=policy),
                "update_mask": {"paths": ["retry_policy"]},
            }
        )
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(project, settings.requests_topic)
    sent = {publisher.publish(topic, f"m{i}".encode()).result() for i in range(SENT)}
    hold_then_kill(path)
    acked, returned = asyncio.run(stop_mid_flood(settings, ACKS_BEFORE_STOP))
    closed = time.monotonic()
    back = {m: at - closed for m, (at, _) in pull_back(path, SENT - len(acked), WAIT_S).items()}
    client.close()
    publisher.stop()
    missing = sent - acked - set(back)
    slowest = f"{max(back.values()):.1f} s" if back else "-"
    policy = "retry policy" if retry_policy else "no retry policy"
    return f"| {policy} | {len(acked)} | {returned} | {len(back)} | {len(missing)} | {slowest} |"


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    print(
        "| subscription | acked before the stop | returned by close | back after | "
        "never back (100 s) | slowest back (after the close) |"
    )
    print("|---|---|---|---|---|---|")
    with running_emulator() as host:
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        n = 0
        for _ in range(args.runs):
            for retry_policy in (True, False):
                n += 1
                print(case(f"flood-{n}", retry_policy), flush=True)


if __name__ == "__main__":
    main()
