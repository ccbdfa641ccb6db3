"""The GPU's start gate: one vLLM server starts at a time.

vLLM measures free memory while it starts, so two servers starting at once both
misjudge it and crash. The gate is an flock on `$COHOST_LOCK_DIR/<gpu uuid>.lock`, a file
on a volume every vLLM container of that GPU shares, held from before vLLM starts until
its /health answers. It outlives the exec in a small detached keeper process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from cohost import nvml
from cohost.launch import backoff, watchdog
from cohost.launch.exits import EXIT_GATE_TIMEOUT, Refusal, say
from cohost.launch.settings import EngineSettings
from cohost.processes import http_ok


def name_of(reading: nvml.GpuReading) -> str:
    """The gate's name for a GPU: its UUID, the same in every container that sees it."""
    return reading.uuid or f"gpu{reading.index}"


def take(service: str, settings: EngineSettings, name: str) -> int:
    """Block until start gate `name` is ours; returns the locked file descriptor."""
    settings.lock_dir.mkdir(parents=True, exist_ok=True)
    path = settings.lock_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    started = time.monotonic()
    next_note = started
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            now = time.monotonic()
            if now - started > settings.gate_timeout_s:
                os.close(fd)
                raise Refusal(
                    EXIT_GATE_TIMEOUT,
                    f"another server has held the start gate {path} for over "
                    f"{settings.gate_timeout_s:.0f} s ({_holder(path)}); is it stuck starting?",
                ) from None
            if now >= next_note:
                say(service, f"waiting for the start gate, held by {_holder(path)}")
                next_note = now + 15
            time.sleep(0.5)
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, json.dumps({"service": service, "pid": os.getpid(), "since": time.time()}).encode(), 0
    )
    waited = time.monotonic() - started
    say(service, f"start gate taken after {waited:.1f} s ({path})")
    return fd


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text() or "{}")
        if data:
            age = time.time() - float(data.get("since", time.time()))
            return f"{data.get('service')} (pid {data.get('pid')}, starting for {age:.0f} s)"
    return "another server"


def keep_until_healthy(
    fd: int, service: str, port: int, timeout: float, watchdog_s: float = 0.0
) -> None:
    """Hand the gate to a detached keeper that releases it once the server is healthy,
    then (with `watchdog_s`) watches the server (cohost.launch.watchdog).

    Double fork: the keeper is not our child, so vLLM (which this process becomes)
    never has to reap it.
    """
    server_pid = os.getpid()
    first = os.fork()
    if first:
        os.waitpid(first, 0)
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    code = 0
    try:
        healthy = _release_when_healthy(fd, service, server_pid, port, timeout)
        if healthy:
            backoff.clear(service)
        if healthy and watchdog_s > 0:
            watchdog.watch(server_pid, service, port, watchdog_s)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _release_when_healthy(
    fd: int, service: str, server_pid: int, port: int, timeout: float
) -> bool:
    """Hold the gate until /health answers, the server dies or `timeout`; True if healthy."""
    started = time.monotonic()
    healthy = http_ok(f"http://127.0.0.1:{port}/health", timeout=2)
    try:
        while True:
            if not watchdog.pid_alive(server_pid):
                say(service, "server exited before it was healthy; start gate released")
                return False
            if healthy():
                say(
                    service,
                    f"healthy after {time.monotonic() - started:.0f} s; start gate released",
                )
                return True
            if time.monotonic() - started > timeout:
                say(service, f"not healthy after {timeout:.0f} s; start gate released")
                return False
            time.sleep(1)
    finally:
        os.close(fd)
