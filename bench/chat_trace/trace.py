"""The trace's requests, and the schedule a replay sends: pure functions, no I/O but `load`.

The trace is one hour of a cluster's conversation requests (about 5.5/s). One chatbot
gets its burstiness and sizes with its clock stretched: a slice of consecutive arrivals
scaled so their mean rate is the wanted one (a fraction of the chatbot's measured
capacity, `replay.capacity`).
Each request's context + generated tokens are capped to the chatbot's max_model_len.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ../shared/traces beside the repository (CI and the agents' machines have it there).
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "azure-llm-2023-conv.csv"
# What the chat template adds around the user's text: the prompt's context is cut by it,
# so that context + generated stays within max_model_len (measured: `replay.PromptMaker`).
TEMPLATE_MARGIN = 32


@dataclass(frozen=True)
class Request:
    at_s: float  # seconds after the trace's (or the schedule's) first request
    context_tokens: int
    generated_tokens: int


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> POSIX seconds (7 fractional digits: more than
    datetime parses, so the fraction is read apart)."""
    whole, _, fraction = stamp.strip().partition(".")
    base = datetime.fromisoformat(whole).timestamp()
    return base + (float(f"0.{fraction}") if fraction else 0.0)


def load(path: Path = DEFAULT_TRACE) -> list[Request]:
    """The trace's requests in time order, times relative to the first. ValueError names a
    file that is missing or a line that is not TIMESTAMP,ContextTokens,GeneratedTokens."""
    if not path.exists():
        raise ValueError(f"no trace at {path} (see ../shared/traces/README.md, or --trace)")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append(
                    (_seconds(row["TIMESTAMP"]), int(row["ContextTokens"]),
                     int(row["GeneratedTokens"]))
                )  # fmt: skip
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not TIMESTAMP,ContextTokens,"
                                 f"GeneratedTokens ({exc})") from None  # fmt: skip
    if not rows:
        raise ValueError(f"{path} holds no requests")
    rows.sort()
    t0 = rows[0][0]
    return [Request(t - t0, c, g) for t, c, g in rows]


def mean_rate(requests: Sequence[Request]) -> float:
    """Requests per second over the span from the first to the last arrival."""
    span = requests[-1].at_s - requests[0].at_s
    if len(requests) < 2 or span <= 0:
        raise ValueError("a rate needs at least two requests at different times")
    return (len(requests) - 1) / span


def cap(request: Request, max_model_len: int, margin: int = TEMPLATE_MARGIN) -> Request:
    """Sizes that fit one sequence of `max_model_len`: generated first (at most what is
    left after the template and one token of text), then the context in what remains."""
    room = max_model_len - margin
    if room < 2:
        raise ValueError(f"max_model_len {max_model_len} leaves no room past a {margin}-token "
                         "chat template")  # fmt: skip
    generated = max(1, min(request.generated_tokens, room - 1))
    context = max(1, min(request.context_tokens, room - generated))
    return Request(request.at_s, context, generated)


def schedule(
    requests: Sequence[Request],
    rate: float,
    *,
    duration_s: float,
    max_requests: int | None = None,
    start_s: float = 0.0,
    max_model_len: int | None = None,
    margin: int = TEMPLATE_MARGIN,
) -> list[Request]:
    """The requests a replay sends: `rate` x `duration_s` of them (at most `max_requests`),
    consecutive in the trace from `start_s` (trace time) on, their clock scaled so that they
    arrive at exactly `rate` per second on average (the trace's rate varies over its hour:
    its first minute has 3.2/s, its busiest 8/s; scaling the slice, not the whole trace,
    keeps the wanted load) with the slice's own burstiness; sizes capped."""
    if rate <= 0:
        raise ValueError(f"rate {rate} must be above 0")
    first = next((i for i, r in enumerate(requests) if r.at_s >= start_s), len(requests))
    wanted = max(1, round(rate * duration_s))
    if max_requests is not None:
        wanted = min(wanted, max_requests)
    # One more than sent: the next arrival closes the slice's span (n gaps for n requests).
    chosen = requests[first : first + wanted + 1]
    if len(chosen) < 2:
        raise ValueError(f"the trace has fewer than 2 requests after {start_s} s")
    n = min(wanted, len(chosen) - 1)
    span = chosen[n].at_s - chosen[0].at_s
    stretch = (n / rate) / span if span > 0 else 1.0  # replay seconds per trace second
    out = []
    for r in chosen[:n]:
        scaled = Request((r.at_s - chosen[0].at_s) * stretch, r.context_tokens, r.generated_tokens)
        out.append(cap(scaled, max_model_len, margin) if max_model_len else scaled)
    return out


def sizes(
    requests: Iterable[Request], max_model_len: int, margin: int = TEMPLATE_MARGIN
) -> list[Request]:
    """The trace's sizes in order, capped, arrival times kept (for the capacity run)."""
    return [cap(r, max_model_len, margin) for r in requests]
