"""What the GPU trace benchmark's timeline shows (bench/gpu/trace_timeline.py), on timelines
built here: how long the feedback engine went on generating after chat came back."""

from __future__ import annotations

from typing import Any

from bench.chat_trace.replay import Outcome
from bench.gpu.trace_timeline import still_after_return

STEP = 0.05  # the sampler's interval


def timeline(stops: float | None, resumes: float = 2.0) -> dict[str, list[Any]]:
    """The engine's counter every 50 ms for 3 s: 10 tokens a sample, none after `stops`
    until `resumes`."""
    t = [round(i * STEP, 3) for i in range(round(3.0 / STEP) + 1)]
    gen, made = [], 0.0
    for now in t:
        if stops is None or not stops < now <= resumes:
            made += 10
        gen.append(made)
    return {"t": t, "fb_generated": gen}


def chat(start: float, end: float) -> list[Outcome]:
    """One chat request in flight from `start` to `end`: chat returns at `start`."""
    return [Outcome(index=0, scheduled_s=start, started_s=start, ended_s=end,
                    context_tokens=100, generated_tokens=50)]  # fmt: skip


def test_the_engine_is_still_from_its_last_moving_sample() -> None:
    """Chat returns at 1.0 s; the counter moves up to the 1.10 s sample, not at 1.15 s."""
    found = still_after_return(timeline(stops=1.10), chat(1.0, 2.0), 3.0)
    assert found == {"p50": 100.0, "p90": 100.0, "n": 1}


def test_an_engine_already_still_when_chat_returns_counts_zero() -> None:
    found = still_after_return(timeline(stops=0.8), chat(1.0, 2.0), 3.0)
    assert found == {"p50": 0.0, "p90": 0.0, "n": 1}


def test_an_engine_that_never_stops_is_none() -> None:
    """Without preemption the engine generates through chat's turns."""
    assert still_after_return(timeline(stops=None), chat(1.0, 2.0), 3.0) is None


def test_the_window_end_is_no_return() -> None:
    """The last gap ends with the window, not with chat: an engine still there is not
    counted."""
    found = still_after_return(timeline(stops=1.10, resumes=9.0), chat(1.0, 2.0), 3.0)
    assert found == {"p50": 100.0, "p90": 100.0, "n": 1}
