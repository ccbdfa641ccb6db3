"""After the start: kill a server that stopped answering, so its container restarts.

Measured on an H200 (docs/sharing.md): when the CUDA MPS server dies, both vLLM servers
neither exit nor answer; their requests hang until the client gives up. A container
runtime restarts only what exits, so the launcher's keeper stays on as a watchdog once the
server is healthy: when /health has not answered 200 for COHOST_WATCHDOG_S, it kills the
server and every process under it. The container then exits, its restart policy starts
the launcher again, and that waits for the MPS daemon and the start gate as at first start.
(Kubernetes' liveness probe does the same job where there is one.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from cohost.launch.exits import say
from cohost.processes import http_ok

INTERVAL_S = 5.0


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children first found, then theirs), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and everything under it (found first: orphans would be lost)."""
    victims = [pid, *descendants(pid)]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)
    return victims


def watch(server_pid: int, service: str, port: int, limit_s: float) -> None:
    """Return when the server is gone; kill it when it stops answering for `limit_s`."""
    healthy = http_ok(f"http://127.0.0.1:{port}/health", timeout=INTERVAL_S)
    last_ok = time.monotonic()
    while pid_alive(server_pid):
        if healthy():
            last_ok = time.monotonic()
        silent = time.monotonic() - last_ok
        if silent >= limit_s:
            victims = kill_tree(server_pid)
            say(
                service,
                f"watchdog: /health has not answered for {silent:.0f} s "
                f"(COHOST_WATCHDOG_S={limit_s:.0f}); killed the server and its processes "
                f"{victims} so that the container restarts",
            )
            return
        time.sleep(INTERVAL_S)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead too (reading its state avoids waiting on a pid we do not own).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    return True
