"""The feedback path end to end on real parts: emulator -> worker -> CPU vLLM -> results."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from cohost.processes import console_script
from cohost_shared.messages import FeedbackResult

from harness.engine import ENGINE_MAX_MODEL_LEN, CpuServer
from harness.pubsub import Project

pytestmark = [pytest.mark.engine, pytest.mark.emulator]

LONG_TEXT = "The essay argues its point at length. " * (ENGINE_MAX_MODEL_LEN // 2)
NEAR_LIMIT_TEXT = "The essay argues its point at length. " * (ENGINE_MAX_MODEL_LEN // 12)


def test_valid_and_malformed_requests(project: Project, engine: CpuServer) -> None:
    worker = project.start_worker(engine)
    publisher, collector = project.publisher(), project.collector()
    try:
        valid = {f"ok-{i}" for i in range(30)}
        for i, rid in enumerate(sorted(valid)):
            publisher.request(
                rid, f"Essay number {i}: the sky is blue because of Rayleigh scattering."
            )
        # Fits, but not with its max_tokens: answered with a shorter completion.
        publisher.request("near-limit", NEAR_LIMIT_TEXT, max_tokens=512)
        valid.add("near-limit")
        malformed = [
            (b"this is not json", "invalid_json"),
            (b'{"request_id": "no-text"}', "invalid_schema"),
            (
                json.dumps({"request_id": "zero", "text": "x", "max_tokens": 0}).encode(),
                "invalid_schema",
            ),
            (json.dumps({"request_id": "long", "text": LONG_TEXT}).encode(), "text_too_long"),
            (b'{"text": "caf\xe9"}', "invalid_utf8"),
            (b"[1, 2, 3]", "not_an_object"),
            (json.dumps({"text": "x", "max_tokens": 4096}).encode(), "invalid_schema"),
            (json.dumps({"text": "   "}).encode(), "invalid_schema"),
            (json.dumps({"text": "x", "colour": "red"}).encode(), "invalid_schema"),
            (b"[" * 50_000 + b"]" * 50_000, "invalid_json"),
        ]
        sent = {publisher.publish(data): (data, reason) for data, reason in malformed}

        collector.wait(results=valid, dead=len(malformed), timeout=300)

        assert collector.result_ids() >= valid
        for received in collector.results:
            result = FeedbackResult.model_validate_json(received.data)
            assert result.request_id == received.attributes["request_id"]
            assert result.model == "feedback"
            assert result.usage.prompt_tokens > 0
            assert result.usage.completion_tokens > 0
            assert result.latency_ms > 0
            assert result.created_at.utcoffset() is not None

        assert len(collector.dead_letters) == len(malformed)
        by_message = {d.attributes["message_id"]: d for d in collector.dead_letters}
        for message_id, (data, reason) in sent.items():
            dead = by_message[message_id]
            assert dead.data == data, "dead letters carry the original bytes"
            assert dead.attributes["error"] == reason, dead.attributes
            assert dead.attributes["error_detail"]
        assert (
            by_message[next(m for m, (_, r) in sent.items() if r == "text_too_long")].attributes[
                "request_id"
            ]
            == "long"
        )

        # Still serving after all that.
        publisher.request("after", "One more short text.")
        collector.wait(results={"after"}, timeout=120)
        assert worker.alive()
    finally:
        assert worker.stop(timeout=60) == 0


def test_engine_killed_and_restarted_mid_run(project: Project, engine: CpuServer) -> None:
    worker = project.start_worker(engine, FEEDBACK_DEFAULT_MAX_TOKENS="64")
    publisher, collector = project.publisher(), project.collector()
    try:
        text = "Give feedback on this paragraph about engines restarting."
        before = {f"restart-{i}" for i in range(30)}
        for rid in sorted(before):
            publisher.request(rid, text)
        # Kill the engine once some results are out, while others may be in flight; the
        # requests published during the outage are sure to meet it.
        collector.wait(results={min(before)}, timeout=120)
        engine.kill()
        during = {f"outage-{i}" for i in range(10)}
        for rid in sorted(during):
            publisher.request(rid, text)
        deadline = time.monotonic() + 120
        while '"engine_retry"' not in worker.log_path.read_text():
            assert time.monotonic() < deadline, "the worker never retried the dead engine"
            assert worker.alive()
            time.sleep(0.5)
        engine.start()
        collector.wait(results=before | during, timeout=600)
        assert worker.alive()
    finally:
        assert worker.stop(timeout=60) == 0
    assert not collector.dead_letters, "an outage is transient: nothing is dead-lettered"


def test_sigterm_mid_run_loses_nothing(project: Project, engine: CpuServer) -> None:
    # Slow generations and a short grace period, so SIGTERM finds work in flight.
    slow = {"FEEDBACK_DEFAULT_MAX_TOKENS": "256", "FEEDBACK_SHUTDOWN_GRACE_S": "1"}
    first = project.start_worker(engine, "worker-1", **slow)
    publisher, collector = project.publisher(), project.collector()
    wanted = {f"term-{i}" for i in range(40)}
    for rid in sorted(wanted):
        publisher.request(rid, "Please review this text about graceful shutdown.")
    time.sleep(3)
    first.send_signal(signal.SIGTERM)
    assert first.proc is not None
    assert first.proc.wait(timeout=60) == 0
    log = first.log_path.read_text()
    assert '"shutdown_complete"' in log
    second = project.start_worker(engine, "worker-2", FEEDBACK_DEFAULT_MAX_TOKENS="16")
    try:
        collector.wait(results=wanted, timeout=600)
    finally:
        assert second.stop(timeout=60) == 0
    assert not collector.dead_letters


def test_submit_prints_result_and_reports_dead_letters(project: Project, engine: CpuServer) -> None:
    worker = project.start_worker(engine)
    script = console_script("feedback-worker")
    try:
        ok = subprocess.run(
            [script, "submit", "A short essay on tea.", "--max-tokens", "8", "--timeout", "120"],
            env=project.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        result = FeedbackResult.model_validate_json(ok.stdout)
        assert result.usage.completion_tokens > 0

        rejected = subprocess.run(
            [script, "submit", LONG_TEXT, "--timeout", "120"],
            env=project.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert rejected.returncode == 3
        assert "text_too_long" in rejected.stderr
    finally:
        assert worker.stop(timeout=60) == 0


def test_submit_times_out_clearly_without_a_worker(project: Project) -> None:
    script = console_script("feedback-worker")
    started = time.monotonic()
    run = subprocess.run(
        [script, "submit", "Nobody is listening.", "--timeout", "3"],
        env=project.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "no result for request" in run.stderr
    assert time.monotonic() - started < 30
