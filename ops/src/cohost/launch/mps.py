"""vLLM as a CUDA MPS client with the planned share, or kept out of MPS under time-slicing.

A CUDA process joins MPS when, at its first CUDA call, it finds the control daemon's socket
at $CUDA_MPS_PIPE_DIRECTORY/control. One that finds none runs *without* MPS and says
nothing (NVIDIA's MPS documentation): no share of the SMs, no memory cap, time-sliced
against everything else. So under MPS the launcher waits for the daemon to accept a
connection before it starts vLLM, and refuses when it does not within COHOST_MPS_WAIT_S
(a restarted daemon container gets that long to come back). Under time-slicing it points
vLLM at a directory where no daemon listens, so a daemon running for other processes cannot
pull it in.

The MPS server runs as its clients' user, and a client of another uid waits until the
current server's clients are gone: both engines of a GPU must run as one uid (the engine
image's).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from cohost.launch.exits import EXIT_NO_MPS, Refusal, say
from cohost.launch.settings import EngineSettings
from cohost.units import MIB

# Under time-slicing: a pipe directory that holds no daemon, so CUDA runs vLLM without MPS.
NO_MPS_PIPE = "/nonexistent/cohost-time-slicing"

MPS_VARIABLES = (
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "CUDA_MPS_CLIENT_PRIORITY",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
)


def daemon_problem(pipe: Path) -> str | None:
    """Why no MPS control daemon answers at `pipe`, or None when one does."""
    control = pipe / "control"
    if not control.exists():
        return f"{control} does not exist"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(control))
        except OSError as exc:
            return f"{control} does not accept connections ({exc.strerror or exc})"
    return None


def wait_for_daemon(service: str, settings: EngineSettings) -> None:
    """Return once the daemon answers; refuse (exit 6) if it does not in time."""
    pipe = settings.mps_pipe_directory
    started = time.monotonic()
    next_note = started
    while (problem := daemon_problem(pipe)) is not None:
        now = time.monotonic()
        if now - started >= settings.mps_wait_s:
            raise Refusal(
                EXIT_NO_MPS,
                f"the plan shares the GPU through CUDA MPS, but no MPS control daemon "
                f"answers: {problem} (waited {settings.mps_wait_s:.0f} s). Without it vLLM "
                "would run without its SM share and memory cap. Start the daemon with the "
                f"same pipe directory: `CUDA_MPS_PIPE_DIRECTORY={pipe} nvidia-cuda-mps-control "
                "-d` (docker compose: add `-f compose.mps.yml`), as the uid the engines run as "
                f"({os.getuid()}), or re-plan with `cohost plan ... --sharing time-slicing`.",
            )
        if now >= next_note:
            say(service, f"waiting for the MPS control daemon: {problem}")
            next_note = now + 15
        time.sleep(1)


def _limit_mib(value: str, ordinal: int) -> int | None:
    """The MiB a CUDA_MPS_PINNED_DEVICE_MEM_LIMIT value gives `ordinal` (`0=10G,1=512M`)."""
    for entry in value.split(","):
        device, _, amount = entry.strip().partition("=")
        if device.strip() != str(ordinal) or amount[-1:].upper() not in ("M", "G"):
            continue
        try:
            number = int(amount[:-1])
        except ValueError:
            return None
        return number * 1024 if amount[-1:].upper() == "G" else number
    return None


def client_env(settings: EngineSettings, base: Mapping[str, str]) -> dict[str, str]:
    """vLLM's environment for the plan's sharing. A platform that gives the container its
    own MPS share (GKE's device plugin does, through these variables) keeps it where it is
    stricter than the plan: a client's variables can only lower what the platform allows."""
    env = dict(base)
    if settings.sharing != "mps":
        for name in MPS_VARIABLES:
            env.pop(name, None)
        env["CUDA_MPS_PIPE_DIRECTORY"] = NO_MPS_PIPE
        return env
    assert settings.mps_active_thread_percentage is not None
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(settings.mps_pipe_directory)
    threads = settings.mps_active_thread_percentage
    given = base.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "")
    if given.isdigit() and int(given) < threads:
        threads = int(given)
    env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(threads)
    env["CUDA_MPS_CLIENT_PRIORITY"] = str(settings.mps_client_priority)
    # CUDA_MPS_PINNED_DEVICE_MEM_LIMIT is `<ordinal>=<MiB>M`, the ordinal the GPU as the
    # client's CUDA numbers it: 0 where CUDA_VISIBLE_DEVICES picks it (a container's one GPU).
    assert settings.mps_pinned_memory_bytes is not None
    ordinal = 0 if base.get("CUDA_VISIBLE_DEVICES") else settings.gpu_index
    limit_mib = settings.mps_pinned_memory_bytes // MIB
    platform = _limit_mib(base.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", ""), ordinal)
    if platform is not None and platform < limit_mib:
        limit_mib = platform
    env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"{ordinal}={limit_mib}M"
    return env


def describe(settings: EngineSettings, env: Mapping[str, str]) -> str:
    if settings.sharing != "mps":
        return "sharing: time-slicing (not an MPS client)"
    return (
        f"sharing: CUDA MPS client of {settings.mps_pipe_directory} as uid {os.getuid()}: "
        + ", ".join(f"{k}={env[k]}" for k in MPS_VARIABLES)
    )
