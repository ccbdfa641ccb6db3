"""How the servers share the GPU's compute: time-slicing (the default) or CUDA MPS.

Time-slicing is the driver's default: the GPU runs one process's kernels at a time and
switches between processes, so while the feedback server is busy each of the chatbot's
steps waits its turn (chat's time per output token doubled under feedback that never
paused). The feedback worker's preemption is what keeps chat first: it stops feedback's
engine calls while chat has requests and resumes them when chat is idle (docs/sharing.md).

Under MPS both servers are clients of one MPS server and their kernels run at the same
time. When a client starts, CUDA reads its share of the SMs
(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), its priority (CUDA_MPS_CLIENT_PRIORITY: 0 normal,
1 below normal) and a cap on the memory it may allocate (CUDA_MPS_PINNED_DEVICE_MEM_LIMIT).

The plan's defaults: the first service (the interactive one, started first) gets every SM
at normal priority; each other service is a batch client with BATCH_SM_PERCENT of the SMs
at low priority. Each server's memory cap is its planned memory plus an equal share of the
plan's headroom, so a server that outgrows its plan fails alone, with an out-of-memory error,
instead of taking the other's memory.

A client's memory depends on its share of the SMs (a feedback server at 100% under a plan
sized for 30% ran out of memory: docs/sharing.md), so a share is only ever what a plan sized.
The plan writes a check of each server's share with the memory sized for it
(`share_check`), and `cohost launch` refuses a share whose check does not match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from cohost.plan.memory import MPS_SERVER_BYTES
from cohost.plan.spec import PlanError, ServiceSpec
from cohost.units import MIB

Sharing = Literal["mps", "time-slicing"]
MODES: tuple[Sharing, ...] = ("mps", "time-slicing")
# Time-slicing: with the worker's preemption it kept chat within its goals on a real chat
# trace, and a kernel fault in one server costs the other nothing; under MPS the same fault
# failed most chat requests (docs/sharing.md).
DEFAULT_MODE: Sharing = "time-slicing"
# A plan written before `cohost plan --sharing` existed carries no COHOST_SHARING: its
# servers were started as plain CUDA processes, which time-slice the GPU.
UNSTATED_MODE: Sharing = "time-slicing"

INTERACTIVE_SM_PERCENT = 100
# The batch (feedback) server's share of the SMs: measured in docs/sharing.md.
BATCH_SM_PERCENT = 30
PRIORITIES = {"normal": 0, "low": 1}
PRIORITY_NAMES = {number: name for name, number in PRIORITIES.items()}


@dataclass(frozen=True)
class MpsShare:
    """One MPS client's share: what `cohost launch` puts in vLLM's environment."""

    sm_percent: int
    priority: str  # a key of PRIORITIES
    memory_limit_bytes: int  # a whole number of MiB (CUDA takes the limit in M or G)

    @property
    def client_priority(self) -> int:
        return PRIORITIES[self.priority]

    def describe(self) -> str:
        return (
            f"{self.sm_percent}% of SMs, {self.priority} priority, "
            f"limit {self.memory_limit_bytes / MIB:,.0f} MiB"
        )


def server_bytes(mode: str) -> int:
    """The MPS server process, once per GPU under MPS (it holds its clients' context)."""
    return MPS_SERVER_BYTES if mode == "mps" else 0


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PlanError(f"--sharing {mode!r}: use one of {', '.join(MODES)}")


def check_spec(spec: ServiceSpec, mode: str) -> None:
    """sm= and priority= are MPS settings: refuse them where they would mean nothing."""
    given = [k for k, v in (("sm", spec.sm_percent), ("priority", spec.priority)) if v is not None]
    if given and mode != "mps":
        raise PlanError(
            f"{spec.name}: {' and '.join(given)} set how MPS shares the GPU; "
            f"--sharing {mode} has no shares (use --sharing mps or drop them)"
        )
    if spec.sm_percent is not None and not 1 <= spec.sm_percent <= 100:
        raise PlanError(f"{spec.name}: sm={spec.sm_percent} must be a percentage from 1 to 100")
    if spec.priority is not None and spec.priority not in PRIORITIES:
        raise PlanError(
            f"{spec.name}: priority={spec.priority!r}; use one of {', '.join(PRIORITIES)}"
        )


def sm_percent(spec: ServiceSpec, index: int) -> int:
    """The service's share of the SMs: its spec's, else the default for its place in the
    order (the first is interactive, the others batch)."""
    if spec.sm_percent is not None:
        return spec.sm_percent
    return INTERACTIVE_SM_PERCENT if index == 0 else BATCH_SM_PERCENT


def share(spec: ServiceSpec, index: int, memory_limit_bytes: int) -> MpsShare:
    return MpsShare(
        sm_percent=sm_percent(spec, index),
        priority=spec.priority or ("normal" if index == 0 else "low"),
        memory_limit_bytes=memory_limit_bytes // MIB * MIB,
    )


def share_check(
    sm_percent: int, client_priority: int, memory_limit_bytes: int, process_bytes: int | None
) -> str:
    """A short digest of an MPS share and the process memory the plan sized for it: the
    plan writes it beside the share, the launcher recomputes it from what it was given."""
    text = f"sm={sm_percent};priority={client_priority};limit={memory_limit_bytes};" + (
        f"process={process_bytes}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
