"""The trace replayer (bench/chat_trace): the clock scaling and size capping on known cases
and on the real trace, the idle fraction, and a short replay against a real CPU vLLM server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bench.chat_trace import replay, trace
from bench.chat_trace.replay import Outcome
from bench.chat_trace.trace import Request
from harness.engine import SERVED_NAME, CpuServer


def write_trace(path: Path, lines: list[str]) -> Path:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(lines) + "\n")
    return path


def test_load_reads_times_relative_to_the_first_with_seven_digit_fractions(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.csv", [
        "2023-11-16 18:15:47.5000000,20,2",
        "2023-11-16 18:15:46.2500000,10,1",
        "2023-11-16 18:16:46.2500001,30,3",
    ])  # fmt: skip
    requests = trace.load(path)
    assert [(r.context_tokens, r.generated_tokens) for r in requests] == [(10, 1), (20, 2), (30, 3)]
    assert requests[0].at_s == 0
    assert requests[1].at_s == pytest.approx(1.25)
    assert requests[2].at_s == pytest.approx(60.0000001, abs=1e-6)


def test_load_names_a_bad_line_and_a_missing_file(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.csv", ["2023-11-16 18:15:47.5,20,2", "2023-11-16 18:15:48,x,2"]
    )
    with pytest.raises(ValueError, match=r"t\.csv:3: not TIMESTAMP"):
        trace.load(path)
    with pytest.raises(ValueError, match="no trace at"):
        trace.load(tmp_path / "missing.csv")


def test_schedule_scales_the_clock_to_the_wanted_rate() -> None:
    # 11 requests 1 s apart. At 4/s the same arrivals come 4x as fast: 1 s holds 4.
    requests = [Request(float(t), 100, 10) for t in range(11)]
    assert [r.at_s for r in trace.schedule(requests, 4.0, duration_s=1.0)] == [0, 0.25, 0.5, 0.75]
    # Bounded by count; a trace too short for the duration gives what it has, at the rate.
    assert len(trace.schedule(requests, 4.0, duration_s=100, max_requests=3)) == 3
    short = trace.schedule(requests, 4.0, duration_s=100)
    assert [r.at_s for r in short] == pytest.approx([t / 4 for t in range(10)])
    # A start point shifts the trace's origin.
    assert [r.at_s for r in trace.schedule(requests, 1.0, duration_s=3, start_s=5)] == [0, 1, 2]
    with pytest.raises(ValueError, match="above 0"):
        trace.schedule(requests, 0, duration_s=10)


def test_schedule_keeps_a_slices_burstiness_at_the_wanted_mean() -> None:
    # Two bursts: 0, 0.1, 0.2 and 10, 10.1, 10.2; the next at 20. At 0.3/s for 20 s: six
    # requests over 20 s, the bursts stretched by the same factor (20 / 20 trace s).
    times = [0, 0.1, 0.2, 10, 10.1, 10.2, 20]
    plan = trace.schedule([Request(t, 1, 1) for t in times], 0.3, duration_s=20)
    assert [r.at_s for r in plan] == pytest.approx(times[:6])


def test_cap_keeps_context_and_generated_within_max_model_len() -> None:
    assert trace.cap(Request(0, 100, 10), 1024) == Request(0, 100, 10)
    # Too long a context: cut to what the generated tokens and the template leave.
    assert trace.cap(Request(0, 4000, 200), 1024) == Request(0, 1024 - 32 - 200, 200)
    # Too long an answer: it keeps at least one token of context.
    assert trace.cap(Request(0, 50, 5000), 1024) == Request(0, 1, 1024 - 32 - 1)
    with pytest.raises(ValueError, match="no room"):
        trace.cap(Request(0, 5, 5), 33)


def test_the_real_trace_keeps_its_rate_and_fits_when_capped() -> None:
    requests = trace.load()
    assert len(requests) == 19_366
    assert 5.0 < trace.mean_rate(requests) < 6.0  # the README's "about 5.5 requests/s"
    plan = trace.schedule(requests, 2.0, duration_s=600, max_model_len=4096)
    assert len(plan) == 1200
    assert 590 < plan[-1].at_s < 600
    # The trace's first minute is slow (191 requests), its 27th busy (480): either slice,
    # scaled, arrives at the wanted rate.
    busy = trace.schedule(requests, 2.0, duration_s=60, start_s=27 * 60)
    assert len(busy) == 120
    assert 55 < busy[-1].at_s < 60
    assert all(r.context_tokens + r.generated_tokens <= 4096 - 32 for r in plan)
    assert max(r.context_tokens for r in plan) > 2048  # long contexts are kept, not dropped


def outcome(start: float, end: float) -> Outcome:
    return Outcome(0, start, start, end, 1, 1)


def test_idle_fraction_is_the_time_with_nothing_in_flight() -> None:
    assert replay.idle_fraction([], 10) == 1.0
    # Busy 1-3 and 2-4 (overlapping: 1-4) and 6-7: 4 s of 10.
    busy = [outcome(1, 3), outcome(2, 4), outcome(6, 7)]
    assert replay.idle_fraction(busy, 10) == pytest.approx(0.6)
    # A request past the window counts only inside it; one inside another adds nothing.
    assert replay.idle_fraction([outcome(0, 8), outcome(2, 3), outcome(9, 20)], 10) == (
        pytest.approx(0.1)
    )
    assert replay.idle_gaps(busy, 10) == [(0, 1), (4, 6), (7, 10)]
    assert replay.idle_gaps([outcome(0, 8), outcome(2, 3), outcome(9, 20)], 10) == [(8, 9)]


@pytest.mark.engine
def test_a_short_replay_against_a_real_cpu_server(engine: CpuServer) -> None:
    prompts = replay.PromptMaker(engine.root, SERVED_NAME)
    requests = [Request(0.0, 120, 6), Request(0.3, 40, 3), Request(4.0, 300, 8)]

    async def go() -> tuple[list[Outcome], float]:
        await prompts.calibrate()
        await prompts.prepare(requests)
        return await replay.replay(engine.base_url, SERVED_NAME, requests, prompts, drain_s=120)

    outcomes, window = asyncio.run(go())
    assert [o.error for o in outcomes] == [None, None, None]
    # Exactly the trace's output lengths; prompts within a token or two of the asked length.
    assert [o.completion_tokens for o in outcomes] == [6, 3, 8]
    for o in outcomes:
        assert o.prompt_tokens is not None
        assert abs(o.prompt_tokens - o.context_tokens) <= 2, o
        assert o.ttft_s is not None
        assert o.tpot_s is not None
        assert o.ttft_s > 0
    assert outcomes[2].started_s >= 4.0
    s = replay.summary(outcomes, window)
    # The third request came after the first two had ended: some idle time, not all.
    assert 0 < s["idle_fraction"] < 1
    assert s["requests"] == 3
    assert s["errors"] == 0


@pytest.mark.engine
def test_a_replay_apart_starts_at_the_instant_given(engine: CpuServer) -> None:
    """`Apart` replays in a spawned process (chat's client off the worker's event loop) on
    the same monotonic clock: `start_at` is this process's instant, and the outcomes are
    relative to it, as the shared steps' timeline needs."""
    prompts = replay.PromptMaker(engine.root, SERVED_NAME)
    requests = [Request(0.0, 60, 4), Request(0.5, 40, 3)]

    async def go() -> tuple[list[Outcome], float, float, float]:
        await prompts.calibrate()
        await prompts.prepare(requests)
        with replay.Apart() as apart:
            start_at = time.monotonic() + 1.5  # past the process's start: it waits
            outcomes, window = await apart.replay(
                engine.base_url, SERVED_NAME, requests, prompts, start_at=start_at
            )
        return outcomes, window, start_at, time.monotonic()

    outcomes, window, start_at, done = asyncio.run(go())
    assert [o.error for o in outcomes] == [None, None]
    assert [o.completion_tokens for o in outcomes] == [4, 3]
    assert outcomes[0].started_s == pytest.approx(0.0, abs=0.2)
    assert outcomes[1].started_s == pytest.approx(0.5, abs=0.2)
    assert 0 < window <= done - start_at
