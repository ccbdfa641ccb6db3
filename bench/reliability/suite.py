"""The driver: one run of all three phases on a fresh emulator and Pub/Sub project."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from harness.engine import CpuServer

from .bad_input import generate_bad_input, run_bad_input
from .config import Config
from .hostile import run_hostile
from .load import account_load, run_load
from .report import (
    Report,
    machine_line,
    memory_summary,
    software,
    summarize_incarnations,
    worker_counters,
)
from .running import running
from .stack import SuiteError
from .traffic import Producer, Tolerant


def run_suite(
    cfg: Config,
    *,
    logs: Path,
    engine: CpuServer | None = None,
    command: str = "",
    say: Callable[[str], None] = print,
) -> Report:
    """Run all three phases on a fresh emulator and project. With `engine`, use (and
    kill and restart) that server, else start one. Never raises for a failed invariant:
    see `Report.failures`."""
    report = Report(
        cfg=cfg,
        started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        machine=machine_line(),
        software=software(),
    )
    t0 = time.monotonic()
    with running(cfg, logs, engine=engine, say=say, say_engine_start=True) as parts:
        stack = parts.stack
        collector: Tolerant | None = None
        try:
            supervisor = parts.start()
            producer, collector = Producer(stack.project), Tolerant(stack.project)
            say(f"phase 1: {cfg.requests:,} requests with faults (logs: {logs})")
            report.load = run_load(cfg, stack, supervisor, producer, collector, say)
            say(f"phase 2: {cfg.malformed:,} malformed + {cfg.mixed_valid:,} valid")
            payloads = generate_bad_input(cfg)
            say(f"  generated in {payloads.generation_s:.0f} s")
            report.bad = run_bad_input(cfg, payloads, supervisor, producer, collector, say)
            # The same payloads again: the first pass may raise RSS to the high-water mark
            # its message mix needs; a leak keeps growing in the second one.
            say("phase 2b: the same bad input again (memory)")
            report.phase_started["bad_again"] = time.time()
            report.bad_again = run_bad_input(
                cfg, payloads.renamed("again"), supervisor, producer, collector, say
            )
            say("phase 3: hostile input")
            report.phase_started["hostile"] = time.time()
            report.hostile = run_hostile(stack, supervisor, producer, collector, say)
            report.worker_metrics = worker_counters(supervisor.metrics_url)
            # Last chance for late redeliveries of load requests to show up as duplicates.
            drain_until = time.monotonic() + 5
            while time.monotonic() < drain_until:
                collector.poll()
        except (SuiteError, OSError, RuntimeError) as exc:
            report.error = f"{type(exc).__name__}: {exc}"
            say(f"aborted: {report.error[:2000]}")
        finally:
            # Stopped here, before `running` takes the parts down, to account the load
            # and report how the last worker ended (also when it never came up).
            if parts.supervisor is not None:
                supervisor = parts.supervisor
                if report.load is not None and collector is not None:
                    account_load(report.load, collector, supervisor)
                last = supervisor.stop()
                report.final_exit = last.exit_code
                report.incarnations = summarize_incarnations(supervisor)
                report.crash_loop = supervisor.crash_loop
                report.memory = memory_summary(
                    supervisor,
                    warm_at=report.phase_started.get("bad_again"),
                    until=report.phase_started.get("hostile"),
                )
    report.seconds = time.monotonic() - t0
    report.check()
    return report
