"""Waiting between refusals, so an engine's `restart: unless-stopped` never loops tightly.

A crashed server must come back every time (a watchdog kill, an MPS fault, an out-of-memory
kill over a server's lifetime), so the engines restart unless stopped. A refusal (a plan that
cannot fit, another card, no MPS daemon) would then restart forever: the launcher waits
before it exits with its code, longer with each refusal in a row of this container. The
count is a file in `$COHOST_LOCK_DIR` named for the container (its hostname), so it survives
the container's restarts but not a re-create, and a start that reaches /health clears it.
The first refusal exits at once; then `$COHOST_REFUSAL_BACKOFF_S` (30 s), doubling, up to
30 minutes. Each wait is said in the log with its reason, and answered meanwhile on the
server's port (`refusing`), so `cohost status` shows it too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

from cohost.launch import refusing
from cohost.launch.exits import Refusal, say

CAP_S = 1800.0
FIX = "fix the cause, then `docker compose up -d --force-recreate` (a re-create counts afresh)"


def _count_file(service: str) -> Path:
    locks = Path(os.environ.get("COHOST_LOCK_DIR", "/var/lock/cohost"))
    return locks / f"refusals-{socket.gethostname()}-{service}"


def delay_s(refusals: int) -> float:
    """The wait before exiting after the `refusals`-th refusal in a row."""
    base = float(os.environ.get("COHOST_REFUSAL_BACKOFF_S", "30"))
    return 0.0 if refusals <= 1 else min(base * 2 ** (refusals - 2), CAP_S)


def refuse(service: str, refusal: Refusal, address: tuple[str, int] | None = None) -> NoReturn:
    """Say why, wait as long as this run of refusals asks, exit with the refusal's code.

    While it waits, every request to `address` (the server's host and port) is answered
    with the refusal."""
    say(service, refusal.message)
    path = _count_file(service)
    refusals = 1
    with contextlib.suppress(OSError, ValueError):
        refusals = int(path.read_text()) + 1
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(refusals))
    wait = delay_s(refusals)
    if wait:
        say(
            service,
            f"refusal {refusals} in a row (exit {refusal.code}): waiting {wait:.0f} s before "
            "exiting, so the restart policy does not retry in a tight loop; fix the cause "
            "(above), then `docker compose up -d --force-recreate`",
        )
        waiting = refusing.Waiting(
            service, refusal, refusals, wait, delay_s(refusals + 1), FIX, time.monotonic() + wait
        )
        with refusing.answering(address, waiting):
            time.sleep(wait)
    sys.exit(refusal.code)


def clear(service: str) -> None:
    """The server became healthy: the next refusal is a first one again."""
    with contextlib.suppress(OSError):
        _count_file(service).unlink(missing_ok=True)
