"""Before vLLM starts: is this the planned card, and is the whole server's memory free?"""

from __future__ import annotations

import math

from cohost import gpus, nvml
from cohost.launch.exits import (
    EXIT_CONFIG,
    EXIT_NO_MEMORY,
    EXIT_UNPLANNED_SHARE,
    EXIT_WRONG_GPU,
    Refusal,
)
from cohost.launch.settings import EngineSettings
from cohost.plan import memory, sharing
from cohost.plan.envfile import prefix
from cohost.units import MIB


def check_card(settings: EngineSettings, reading: nvml.GpuReading) -> None:
    planned = settings.planned_gpu_total_bytes
    if planned is None or settings.allow_other_gpu:
        return
    if not gpus.same_card(reading.total_bytes, planned):
        raise Refusal(
            EXIT_WRONG_GPU,
            f"this GPU is {reading.name} with {reading.total_bytes // MIB:,} MiB, but the plan "
            f"is for {settings.planned_gpu_name or 'another card'} with {planned // MIB:,} MiB. "
            "Re-plan for this card (`cohost plan --gpu ...` or without --gpu to detect it), or "
            "set COHOST_ALLOW_OTHER_GPU=1 when emulating the planned card on a bigger one.",
        )


def utilization(settings: EngineSettings, reading: nvml.GpuReading) -> float:
    """The planned budget as a fraction of THIS card's CUDA total (vLLM's denominator)."""
    if settings.budget_bytes is None:
        assert settings.gpu_memory_utilization is not None  # settings.load checks it on a GPU
        return settings.gpu_memory_utilization
    return memory.utilization(settings.budget_bytes, reading.cuda_total_bytes)


def check_memory(
    service: str, settings: EngineSettings, reading: nvml.GpuReading, util: float
) -> None:
    needed = settings.expected_process_bytes or math.ceil(util * reading.cuda_total_bytes)
    if reading.free_bytes >= needed:
        return
    holders = sorted(reading.processes, key=lambda p: -p.used_bytes)
    lines = [
        f"  pid {p.pid:>7}  {p.used_bytes // MIB:>8,} MiB  {p.name or '(in another container)'}"
        for p in holders
    ] or ["  (NVML lists no processes: memory may be held outside this container's view)"]
    raise Refusal(
        EXIT_NO_MEMORY,
        f"refusing to start {service}: GPU {reading.index} ({reading.name}) has "
        f"{reading.free_bytes // MIB:,} MiB free, this server needs {needed // MIB:,} MiB "
        "(its planned process memory).\nHolding GPU memory now:\n"
        + "\n".join(lines)
        + "\nStop what should not be there, or re-plan for what is free: "
        f"cohost plan --gpu-memory-mib {reading.total_bytes // MIB} --service ...",
    )


def check_mps_cap(service: str, settings: EngineSettings) -> None:
    """A memory cap below the server's planned memory would only make vLLM refuse later,
    with "Free memory on device ... is less than desired GPU memory utilization" (seen on
    an H200: under a cap, CUDA reports the cap minus what the process holds as free)."""
    cap, needed = settings.mps_pinned_memory_bytes, settings.expected_process_bytes
    if settings.sharing != "mps" or cap is None or needed is None or cap >= needed:
        return
    raise Refusal(
        EXIT_CONFIG,
        f"the plan caps {service} at {cap // MIB:,} MiB under MPS, but the server needs "
        f"{needed // MIB:,} MiB (its planned process memory): vLLM would not start. "
        "Re-plan (`cohost plan`) rather than editing the cap by hand.",
    )


def check_mps_share(service: str, settings: EngineSettings) -> None:
    """The share must be the one the plan sized this server's memory for: a client's memory
    grows with its share of the SMs, so a share raised by hand outgrows the plan (and its
    cap) at run time, and any hand edit is a plan nobody checked."""
    if settings.sharing != "mps":
        return
    sm, priority = settings.mps_active_thread_percentage, settings.mps_client_priority
    limit = settings.mps_pinned_memory_bytes
    # settings.load refuses an MPS plan without them
    assert sm is not None
    assert priority is not None
    assert limit is not None
    given = sharing.share_check(sm, priority, limit, settings.expected_process_bytes)
    if given == settings.mps_share_check:
        return
    p = prefix(service)
    name = sharing.PRIORITY_NAMES.get(priority, str(priority))
    raise Refusal(
        EXIT_UNPLANNED_SHARE,
        f"{service}'s MPS share ({p}MPS_ACTIVE_THREAD_PERCENTAGE={sm}, "
        f"{p}MPS_CLIENT_PRIORITY={priority}, {p}MPS_PINNED_MEMORY_BYTES={limit}) is not the "
        f"one its plan sized memory for ({p}MPS_SHARE_CHECK does not match): a client's "
        "memory depends on its share of the SMs. Re-plan with the share you want, e.g. "
        f"`cohost plan ... --service {service}=MODEL,...,sm={sm},priority={name}`, "
        "rather than editing the plan by hand.",
    )
