"""Where the harvest goes: a fine timeline of a `shared` step and what it shows.

`sample` runs beside the replay and, every `interval_s`, reads the worker's own gauges
(chat seen busy, answers paused, requests in flight), the feedback engine's generated
tokens and running requests (its /metrics), and how late the event loop woke (the worker
and the replayer share it, so a loop that cannot keep up slows both).

`analyse` lays that over chat's client-side idle gaps (no chat request in flight:
`replay.idle_gaps` of the replay's outcomes): the feedback tokens made inside the gaps and while chat was busy, how
long after a gap began the worker saw chat idle and the engine was generating again, how
long after chat came back the worker saw it busy, and the loop's lag.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Sequence
from typing import Any

import httpx2
from cohost_shared.metrics import VLLM_RUNNING, Metrics
from prometheus_client import REGISTRY

from bench.chat_trace import replay

GENERATED = "vllm:generation_tokens_total"
GAUGES = {"busy": "feedback_chat_busy", "paused": "feedback_paused", "in_flight": "feedback_in_flight"}  # fmt: skip
COLUMNS = ("t", "lag_ms", *GAUGES, "fb_generated", "fb_running")


async def sample(
    feedback_metrics_url: str, stop: asyncio.Event, interval_s: float = 0.05
) -> dict[str, list[float | None]]:
    """Columns of samples until `stop`; `t` is monotonic (the caller shifts it)."""
    cols: dict[str, list[float | None]] = {c: [] for c in COLUMNS}
    async with httpx2.AsyncClient(timeout=1.0) as client:
        due = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            cols["t"].append(now)
            cols["lag_ms"].append(round((now - due) * 1000, 2))
            for key, name in GAUGES.items():
                cols[key].append(REGISTRY.get_sample_value(name))
            generated = running = None
            try:
                page = Metrics.parse((await client.get(feedback_metrics_url)).text,
                                     (GENERATED, VLLM_RUNNING))  # fmt: skip
                generated, running = page.value(GENERATED), page.value(VLLM_RUNNING)
            except httpx2.HTTPError:
                pass
            cols["fb_generated"].append(generated)
            cols["fb_running"].append(running)
            due = max(due + interval_s, time.monotonic())
            await asyncio.sleep(due - time.monotonic())
    return cols


def shifted(cols: dict[str, list[float | None]], t0: float) -> dict[str, list[float | None]]:
    """`t` relative to `t0` (the replay's start), rounded for the results file."""
    return {**cols, "t": [round(t - t0, 3) for t in cols["t"] if t is not None]}


def _at(ts: list[float], values: list[float], t: float) -> float:
    """`values` linearly interpolated at `t` (clamped at the ends)."""
    if t <= ts[0]:
        return values[0]
    if t >= ts[-1]:
        return values[-1]
    lo, hi = 0, len(ts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ts[mid] <= t else (lo, mid)
    span = ts[hi] - ts[lo]
    return values[lo] + (values[hi] - values[lo]) * ((t - ts[lo]) / span if span else 0.0)


def _first(ts: list[float], flags: list[bool], start: float, end: float) -> float | None:
    """Seconds from `start` to the first sample in [start, end) whose flag is set."""
    for t, flag in zip(ts, flags, strict=True):
        if start <= t < end and flag:
            return t - start
    return None


def _ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    return {"p50": round(statistics.median(values) * 1000, 1),
            "p90": round(values[int(0.9 * (len(values) - 1))] * 1000, 1), "n": len(values)}  # fmt: skip


def _lag(lags: list[float]) -> dict[str, float] | None:
    if not lags:
        return None
    ordered = sorted(lags)
    return {"p50": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))],
            "max": ordered[-1]}  # fmt: skip


def analyse(
    timeline: dict[str, list[Any]], outcomes: Sequence[replay.Outcome], window_s: float
) -> dict[str, Any]:
    """What one `shared` step's timeline shows (see the module's docstring)."""
    keep = [i for i, g in enumerate(timeline["fb_generated"]) if g is not None]
    ts = [timeline["t"][i] for i in keep]
    gen = [float(timeline["fb_generated"][i]) for i in keep]
    if len(ts) < 2:
        return {"error": "no feedback engine samples"}
    gaps = [(a, b) for a, b in replay.idle_gaps(outcomes, window_s) if b > ts[0] and a < ts[-1]]
    total = _at(ts, gen, window_s) - _at(ts, gen, 0.0)
    in_gaps = sum(_at(ts, gen, b) - _at(ts, gen, a) for a, b in gaps)
    idle_s = sum(b - a for a, b in gaps)
    t_all = timeline["t"]
    busy = [b == 1 for b in timeline["busy"]]
    # Generating: the engine's counter moved since the previous sample.
    moving = [False] + [later > earlier for earlier, later in itertools.pairwise(gen)]
    seen_idle = [_first(t_all, [not b for b in busy], a, b) for a, b in gaps]
    resumed = [_first(ts, moving, a, b) for a, b in gaps]
    # Chat back: each gap's end (but the window's); the worker's busy flag after it.
    seen_busy = [_first(t_all, busy, b, b + 5.0) for _, b in gaps if b < window_s]
    lags = [x for x in timeline["lag_ms"] if x is not None]
    out: dict[str, Any] = {
        "gaps": len(gaps),
        "idle_s": round(idle_s, 2),
        "feedback_tokens": round(total),
        "tokens_in_idle": round(in_gaps),
        "tokens_while_chat_busy": round(total - in_gaps),
        "idle_tok_s": round(in_gaps / idle_s) if idle_s else None,
        "idle_seen_after_ms": _ms([x for x in seen_idle if x is not None]),
        "generating_after_ms": _ms([x for x in resumed if x is not None]),
        "busy_seen_after_ms": _ms([x for x in seen_busy if x is not None]),
        "loop_lag_ms": _lag(lags),
    }
    return out
