"""Where the harvest goes: a fine timeline of a replay and what it shows.

`Sampler` runs beside the replay. A thread of its own (so a stalled event loop cannot
delay it) reads, every `interval_s`: the chatbot's requests as its /load counts them
(from arrival: what the worker polls) and as its /metrics gauges show them (running +
waiting, moved at engine steps), the worker's own gauges (chat seen busy,
answers paused, requests in flight) and the feedback engine's generated tokens and
running requests. A 10 ms ticker on the event loop records how late the loop woke it: the
worker and the replayer share that loop, so a stall delays the worker's chat poll and its
streams, and the replayer's clock.

`analyse` lays that over chat's client-side idle gaps (no chat request in flight:
`replay.idle_gaps` of the replay's outcomes): the feedback tokens made inside the gaps and
while chat was busy; from a gap's start, when the chatbot's /load and gauge read idle, the
worker saw it idle and the engine was generating again; from chat's return, when /load, the
gauge and the worker saw it busy and when the engine stood still (`still_after_return`); and
the loop's lag.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx2
from cohost_shared.metrics import VLLM_LOAD, VLLM_RUNNING, Metrics
from feedback.chatload import chat_load
from prometheus_client import REGISTRY

from bench.chat_trace import replay
from bench.sharing import pct

GENERATED = "vllm:generation_tokens_total"
GAUGES = {"busy": "feedback_chat_busy", "paused": "feedback_paused", "in_flight": "feedback_in_flight"}  # fmt: skip
COLUMNS = ("t", "chat_http", "chat_load", *GAUGES, "fb_generated", "fb_running")


class Sampler:
    """`with Sampler(...):` samples from a thread and ticks on the running loop."""

    def __init__(self, chat_root: str, feedback_metrics_url: str,
                 interval_s: float = 0.05) -> None:  # fmt: skip
        self.chat_root, self.feedback_url = chat_root, feedback_metrics_url
        self.interval_s = interval_s
        self.cols: dict[str, list[float | None]] = {c: [] for c in COLUMNS}
        self.lag: list[tuple[float, float]] = []  # (monotonic, ms late)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._ticker: asyncio.Task[None] | None = None

    def __enter__(self) -> Sampler:
        self._thread.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.cancel()
        self._thread.join(timeout=5)

    async def _tick(self) -> None:
        while True:
            due = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.lag.append((now, round(max(0.0, now - due) * 1000, 2)))

    def _sample(self) -> None:
        with httpx2.Client(timeout=1.0) as client:
            while not self._stop.wait(0 if not self.cols["t"] else self._next()):
                now = time.monotonic()
                self.cols["t"].append(now)
                # /load read as the worker reads it (None where it says nothing).
                try:
                    http = chat_load(client.get(f"{self.chat_root}/load").text)
                except httpx2.HTTPError:
                    http = None
                self.cols["chat_http"].append(http)
                chat = self._read(client, f"{self.chat_root}/metrics", VLLM_LOAD)
                self.cols["chat_load"].append(chat.vllm_load() if chat else None)
                for key, name in GAUGES.items():
                    self.cols[key].append(REGISTRY.get_sample_value(name))
                fb = self._read(client, self.feedback_url, (GENERATED, VLLM_RUNNING))
                self.cols["fb_generated"].append(fb.value(GENERATED) if fb else None)
                self.cols["fb_running"].append(fb.value(VLLM_RUNNING) if fb else None)

    def _next(self) -> float:
        last = self.cols["t"][-1]
        assert last is not None
        return max(0.0, last + self.interval_s - time.monotonic())

    @staticmethod
    def _read(client: httpx2.Client, url: str, names: tuple[str, ...]) -> Metrics | None:
        try:
            return Metrics.parse(client.get(url).text, names)
        except httpx2.HTTPError:
            return None

    def columns(self, t0: float) -> dict[str, list[float | None]]:
        """The samples with `t` relative to `t0` (the replay's start), and the loop's lag
        as `lag_t` / `lag_ms` columns of their own."""
        return {
            **self.cols,
            "t": [round(t - t0, 3) for t in self.cols["t"] if t is not None],
            "lag_t": [round(t - t0, 3) for t, _ in self.lag],
            "lag_ms": [ms for _, ms in self.lag],
        }


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


def _first(ts: Sequence[float], flags: list[bool], start: float, end: float) -> float | None:
    """Seconds from `start` to the first sample in [start, end) whose flag is set."""
    for t, flag in zip(ts, flags, strict=True):
        if start <= t < end and flag:
            return t - start
    return None


def _ms(seconds: list[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    ms = [x * 1000 for x in seconds]
    return {"p50": round(pct(ms, 0.5) or 0, 1), "p90": round(pct(ms, 0.9) or 0, 1), "n": len(ms)}


def _lag(lags: list[float]) -> dict[str, float] | None:
    if not lags:
        return None
    return {"p50": pct(lags, 0.5) or 0, "p99": pct(lags, 0.99) or 0, "max": max(lags)}


def _engine(timeline: dict[str, list[Any]]) -> tuple[list[float], list[float]]:
    """The samples that read the feedback engine: their times and its generated tokens."""
    keep = [i for i, g in enumerate(timeline["fb_generated"]) if g is not None]
    return [timeline["t"][i] for i in keep], [float(timeline["fb_generated"][i]) for i in keep]


def _gaps(
    outcomes: Sequence[replay.Outcome], window_s: float, ts: list[float]
) -> list[tuple[float, float]]:
    """Chat's idle gaps (client side) that the samples cover."""
    return [(a, b) for a, b in replay.idle_gaps(outcomes, window_s) if b > ts[0] and a < ts[-1]]


def _after(
    times: Sequence[float], flags: list[bool], starts: list[float]
) -> dict[str, float] | None:
    """From each start, how long until the first sample with its flag set (within 5 s)."""
    found = [_first(times, flags, t, t + 5.0) for t in starts]
    return _ms([x for x in found if x is not None])


def still_after_return(
    timeline: dict[str, list[Any]], outcomes: Sequence[replay.Outcome], window_s: float
) -> dict[str, float] | None:
    """How long the feedback engine went on generating beside chat: from each of chat's
    returns (a gap's end before the window's), to the start of the first sample interval
    (50 ms) in which its token counter did not move, 0 where that began before the return.
    Its last token came no later: an upper bound, within one interval. None where the
    engine never stood still within 5 s of a return, as without preemption."""
    ts, gen = _engine(timeline)
    if len(ts) < 2:
        return None
    return _last_token(ts, gen, [b for _, b in _gaps(outcomes, window_s, ts) if b < window_s])


def _last_token(ts: list[float], gen: list[float], back: list[float]) -> dict[str, float] | None:
    """`still_after_return` from the engine's samples and chat's returns."""
    found = []
    for b in back:
        still = (i for i in range(1, len(ts)) if b <= ts[i] < b + 5.0 and gen[i] == gen[i - 1])
        first = next(still, None)
        if first is not None:
            found.append(max(0.0, ts[first - 1] - b))
    return _ms(found)


def analyse(
    timeline: dict[str, list[Any]], outcomes: Sequence[replay.Outcome], window_s: float
) -> dict[str, Any]:
    """What one `shared` step's timeline shows (see the module's docstring)."""
    ts, gen = _engine(timeline)
    if len(ts) < 2:
        return {"error": "no feedback engine samples"}
    gaps = _gaps(outcomes, window_s, ts)
    total = _at(ts, gen, window_s) - _at(ts, gen, 0.0)
    in_gaps = sum(_at(ts, gen, b) - _at(ts, gen, a) for a, b in gaps)
    idle_s = sum(b - a for a, b in gaps)
    t_all = timeline["t"]
    busy = [b == 1 for b in timeline["busy"]]
    gauge = [c is not None and c >= 1 for c in timeline["chat_load"]]
    http = [c is not None and c >= 1 for c in timeline["chat_http"]]
    # Generating: the engine's counter moved since the previous sample.
    moving = [False] + [later > earlier for earlier, later in itertools.pairwise(gen)]
    back = [b for _, b in gaps if b < window_s]  # chat's returns (not the window's end)
    starts = [a for a, _ in gaps]
    return {
        "gaps": len(gaps),
        "idle_s": round(idle_s, 2),
        "feedback_tokens": round(total),
        "tokens_in_idle": round(in_gaps),
        "tokens_while_chat_busy": round(total - in_gaps),
        "idle_tok_s": round(in_gaps / idle_s) if idle_s else None,
        # From a gap's start: the chatbot's /load and gauge, the worker, the engine.
        "load_idle_after_ms": _after(t_all, [not h for h in http], starts),
        "gauge_idle_after_ms": _after(t_all, [not g for g in gauge], starts),
        "idle_seen_after_ms": _after(t_all, [not b for b in busy], starts),
        "generating_after_ms": _after(ts, moving, starts),
        # From chat's return: /load, the gauge, the worker, the engine.
        "load_busy_after_ms": _after(t_all, http, back),
        "gauge_busy_after_ms": _after(t_all, gauge, back),
        "busy_seen_after_ms": _after(t_all, busy, back),
        "still_after_ms": _last_token(ts, gen, back),
        "loop_lag_ms": _lag([x for x in timeline["lag_ms"] if x is not None]),
    }
