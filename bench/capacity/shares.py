"""How a unit's two engines share its GPU under each COHOST_SHARING, from the measured table
of that name in measured.toml: what the feedback engine keeps of its whole-GPU throughput
(on a unit without chat, in its chatbot's idle time, beside its busy chatbot) and how much
slower chat steps while feedback has work. Every ratio is taken against the whole-GPU figure
of the same run, so each sharing's ratios stay those of one measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

SHARINGS = ("time-slicing", "mps")  # as COHOST_SHARING names them


@dataclass(frozen=True)
class Shares:
    sharing: str
    measured: str  # which run, in a few words
    alone: float  # a unit whose chatbot takes no requests (every burst unit)
    idle: float  # a chat unit, while its chatbot has no request in flight
    busy: float  # a chat unit, while its chatbot has requests
    chat_slowdown: float  # chat's TPOT while the unit's feedback engine has work, over alone

    def chat_unit(self, in_flight: float) -> float:
        """A chat unit's share with `in_flight` chat requests on average: its chatbot busy
        with probability 1 - exp(-in_flight), and without any chat a unit like a burst one."""
        if in_flight <= 0:
            return self.alone
        busy = 1 - math.exp(-in_flight)
        return busy * self.busy + (1 - busy) * self.idle


def shares(m: Mapping[str, Mapping[str, float]], sharing: str) -> Shares:
    """The shares under `sharing` (a COHOST_SHARING value), from measured.toml's table of
    that name."""
    if sharing not in SHARINGS:
        raise ValueError(f"sharing {sharing!r}: expected one of {', '.join(SHARINGS)}")
    t = m[sharing]
    whole = t["feedback_whole_gpu_tokens_per_s"]
    slowdown = t["chat_tpot_ms_feedback_busy"] / t["chat_whole_gpu_tpot_ms"]
    if sharing == "mps":
        # Feedback runs beside chat on its share of the SMs, and has only that share with
        # chat idle: a burst unit keeps what a chat unit keeps in chat's idle time.
        idle = t["feedback_tokens_per_s_chat_idle"] / whole
        return Shares(
            sharing, "2026-11-29 run: chat never pauses, worker without preemption",
            alone=idle, idle=idle, busy=t["feedback_tokens_per_s_chat_busy"] / whole,
            chat_slowdown=slowdown,
        )  # fmt: skip
    # Time-slicing with the worker's preemption: feedback runs only while chat is idle. A
    # burst unit's worker never preempts (no chat), so it runs as feedback alone; a chat
    # unit's feedback makes tokens at the measured rate inside chat's idle gaps (each gap
    # starts with the worker seeing chat idle and the engine resuming), and what slipped
    # through in chat's busy time (before the worker saw chat return).
    busy_s = t["chat_window_s"] - t["chat_idle_s"]
    return Shares(
        sharing, f"2026-12-03 trace run at {t['chat_load']:.0%} chat load, worker preempting",
        alone=1.0, idle=t["feedback_tokens_per_s_chat_idle"] / whole,
        busy=t["feedback_tokens_chat_busy"] / busy_s / whole, chat_slowdown=slowdown,
    )  # fmt: skip
