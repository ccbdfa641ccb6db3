"""All checks at once, as a table or JSON, once or every few seconds until Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cohost_shared import endpoints

from cohost import nvml
from cohost.status.checks import Check, check_engine, check_gpu_memory, check_worker
from cohost.units import MIB


@dataclass
class Status:
    checked_at: str
    checks: list[Check]

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at,
            "healthy": self.healthy,
            "problems": [f"{c.name}: {c.summary}" for c in self.checks if not c.ok],
            "checks": {c.name: asdict(c) for c in self.checks},
        }


def collect(
    *,
    chatbot: str = endpoints.CHATBOT_URL,
    feedback: str = endpoints.FEEDBACK_ENGINE_URL,
    worker: str = endpoints.WORKER_METRICS_URL,
    plan: Path | None = None,
    timeout: float = 3.0,
    read_gpu: Callable[[], nvml.GpuReading] = nvml.read,
) -> Status:
    checks = [
        check_engine("chatbot", chatbot, timeout=timeout),
        check_engine("feedback", feedback, timeout=timeout),
        check_worker(worker, timeout=timeout),
        check_gpu_memory(plan, read_gpu),
    ]
    return Status(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"), checks)


_MARK = {"ok": "ok", "absent": "--", "down": "DOWN", "unhealthy": "BAD"}


def render(status: Status) -> str:
    width = max(len(c.name) for c in status.checks)
    lines = [f"cohost status at {status.checked_at}"]
    for c in status.checks:
        url = c.details.get("url")
        where = f"{url}  " if url else ""
        lines.append(f"  {_MARK[c.state]:<4}  {c.name:<{width}}  {where}{c.summary}")
        refused = c.details.get("refused")
        if isinstance(refused, dict):
            # The summary has the reason's first line; the rest says what holds what.
            rest = str(refused.get("reason", "")).splitlines()[1:]
            for line in [*rest, str(refused.get("fix", ""))]:
                if line:
                    lines.append(f"{'':>{width + 10}}{line}")
        if c.name == "gpu":
            planned = {x["service"]: x["expected_bytes"] for x in c.details.get("services", [])}
            for p in c.details.get("processes", []):
                owner = p["service"] or "not in the plan"
                if p["service"] in planned:
                    owner += f" (plan {planned[p['service']] / MIB:,.0f} MiB)"
                label = p["name"][:60] or "(command line not visible here)"
                lines.append(
                    f"{'':>{width + 10}}pid {p['pid']:>7} {p['used_bytes'] / MIB:>9,.0f} MiB"
                    f"  {owner}: {label}"
                )
    bad = [c.name for c in status.checks if not c.ok]
    lines.append("healthy" if not bad else f"NOT HEALTHY: {', '.join(bad)}")
    return "\n".join(lines)


def run(
    *,
    chatbot: str,
    feedback: str,
    worker: str,
    plan: Path | None,
    as_json: bool,
    watch: float | None,
    timeout: float = 3.0,
) -> int:
    """Print the status once, or every `watch` seconds until Ctrl-C; 0 when healthy.

    With --watch the exit code is that of the last status printed.
    """
    code = 0
    frame = 0
    stopped = threading.Event()
    if watch:
        # Ctrl-C ends the watch wherever it lands: a KeyboardInterrupt that some library
        # swallowed mid-check still leaves the flag set for the loop.
        def interrupt(_signum: int, _frame: object) -> None:
            stopped.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)
    try:
        while not stopped.is_set():
            status = collect(
                chatbot=chatbot, feedback=feedback, worker=worker, plan=plan, timeout=timeout
            )
            text = json.dumps(status.to_json(), indent=2) if as_json else render(status)
            if watch and frame and not as_json:
                # Clear the screen between frames on a terminal; a blank line otherwise.
                sys.stdout.write("\x1b[2J\x1b[H" if sys.stdout.isatty() else "\n")
            print(text, flush=True)
            code = 0 if status.healthy else 1
            if not watch:
                return code
            frame += 1
            stopped.wait(watch)
    except KeyboardInterrupt:
        pass
    return code
