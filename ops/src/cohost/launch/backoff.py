"""Waiting between refusals, so an engine's `restart: unless-stopped` never loops tightly.

A crashed server must come back every time (a watchdog kill, an MPS fault, an out-of-memory
kill over a server's lifetime), so the engines restart unless stopped. A refusal (a plan that
cannot fit, another card, no MPS daemon) would then restart forever: the launcher waits
before it exits with its code, longer with each refusal in a row of this container. The
count is a file in `$COHOST_LOCK_DIR` named for the container (its hostname), so it survives
the container's restarts but not a re-create, and a start that reaches /health clears it.
The first refusal exits at once; then `$COHOST_REFUSAL_BACKOFF_S` (30 s), doubling, up to
30 minutes. Each wait is said in the log with its reason, and answered meanwhile on the
server's port (`refusing`), so `cohost status` shows it too. These two settings are read
apart from the engine's (a refusal can be of the engine's settings themselves), and an
invalid one is said and its default used: a crash here would exit 1 at once, the tight
loop this module exists to prevent.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

from cohost_shared.settings import env_errors
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cohost.launch import refusing
from cohost.launch.exits import Refusal, say
from cohost.launch.settings import EngineSettings

CAP_S = 1800.0
FIX = "fix the cause, then `docker compose up -d --force-recreate` (a re-create counts afresh)"


class BackoffSettings(BaseSettings):
    """`COHOST_LOCK_DIR` (where the count is kept) and `COHOST_REFUSAL_BACKOFF_S`."""

    model_config = SettingsConfigDict(env_prefix="COHOST_", extra="ignore", frozen=True)

    # The gate's own default, so the count sits beside the gate's lock files.
    lock_dir: Path = EngineSettings.model_fields["lock_dir"].default
    refusal_backoff_s: float = Field(default=30.0, ge=0)


def _settings(service: str, *, quiet: bool = False) -> BackoffSettings:
    """The settings, each invalid one replaced by its default (said unless `quiet`)."""
    try:
        return BackoffSettings()
    except ValidationError as exc:
        if not quiet:
            lines = "\n".join(env_errors(exc, "COHOST_"))
            say(service, f"ignoring invalid setting(s), using the default:\n{lines}")
        # Only the invalid ones: init values win over the environment, which still gives
        # the valid ones (a good COHOST_LOCK_DIR must keep the count where it belongs).
        fields = BackoffSettings.model_fields
        invalid = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        return BackoffSettings(**{name: fields[name].default for name in invalid & set(fields)})


def _count_file(settings: BackoffSettings, service: str) -> Path:
    return settings.lock_dir / f"refusals-{socket.gethostname()}-{service}"


def delay_s(settings: BackoffSettings, refusals: int) -> float:
    """The wait before exiting after the `refusals`-th refusal in a row."""
    base = settings.refusal_backoff_s
    return 0.0 if refusals <= 1 else min(base * 2 ** (refusals - 2), CAP_S)


def refuse(service: str, refusal: Refusal, address: tuple[str, int] | None = None) -> NoReturn:
    """Say why, wait as long as this run of refusals asks, exit with the refusal's code.

    While it waits, every request to `address` (the server's host and port) is answered
    with the refusal."""
    say(service, refusal.message)
    settings = _settings(service)
    path = _count_file(settings, service)
    refusals = 1
    with contextlib.suppress(OSError, ValueError):
        refusals = int(path.read_text()) + 1
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(refusals))
    wait = delay_s(settings, refusals)
    if wait:
        say(
            service,
            f"refusal {refusals} in a row (exit {refusal.code}): waiting {wait:.0f} s before "
            "exiting, so the restart policy does not retry in a tight loop; fix the cause "
            "(above), then `docker compose up -d --force-recreate`",
        )
        next_wait = delay_s(settings, refusals + 1)
        waiting = refusing.Waiting(
            service, refusal, refusals, wait, next_wait, FIX, time.monotonic() + wait
        )
        with refusing.answering(address, waiting):
            time.sleep(wait)
    sys.exit(refusal.code)


def clear(service: str) -> None:
    """The server became healthy: the next refusal is a first one again."""
    with contextlib.suppress(OSError):
        _count_file(_settings(service, quiet=True), service).unlink(missing_ok=True)
