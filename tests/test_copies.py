"""Copies of one message: Pub/Sub delivers at least once, and the emulator sends a whole
backlog at once, so messages wait unread behind a full worker and come again once the
stream's ack deadline passes (FEEDBACK_ACK_DEADLINE_S). The worker answers each message
once all the same: a copy of one it is answering is settled with it, a copy of one it
answered is acked at once."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.engine import CpuServer
from harness.pubsub import Project, worker_events


@pytest.mark.engine
@pytest.mark.emulator
def test_a_backlog_older_than_the_ack_deadline_is_answered_once(
    project: Project, engine: CpuServer
) -> None:
    # Two long answers at a time and a 10 s deadline: most of the backlog waits unread
    # for longer than that, and the emulator sends it again.
    worker = project.start_worker(
        engine,
        FEEDBACK_MAX_IN_FLIGHT="2",
        FEEDBACK_ACK_DEADLINE_S="10",
        FEEDBACK_DEFAULT_MAX_TOKENS="600",
    )
    publisher, collector = project.publisher(), project.collector()
    wanted = {f"copy-{i}" for i in range(10)}
    try:
        for rid in sorted(wanted):
            publisher.request(rid, f"Please review {rid}, a text about waiting politely.")
        collector.wait(results=wanted, timeout=900)
        for _ in range(3):
            collector.wait(timeout=5)  # a doubled result comes after the last awaited one
    finally:
        assert worker.stop(timeout=60) == 0
    counts = Counter(r.attributes["request_id"] for r in collector.results)
    assert set(counts) == wanted
    doubled = {rid: n for rid, n in counts.items() if n > 1}
    copies = worker_events(worker.log_path, "copy_received")
    print(f"{len(copies)} copies received, doubled results {doubled}")
    assert not doubled
    assert copies, "the emulator sent no copy: the test showed nothing"
