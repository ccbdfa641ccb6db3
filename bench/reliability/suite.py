"""The driver: one run of all three phases on a fresh emulator and Pub/Sub project."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.processes import free_port

from harness.engine import TEST_MODEL, CpuServer

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
from .stack import Stack, SuiteError, environment
from .supervisor import Supervisor
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
    logs.mkdir(parents=True, exist_ok=True)
    report = Report(
        cfg=cfg,
        started_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        machine=machine_line(),
        software=software(),
    )
    t0 = time.monotonic()
    own_engine = engine is None
    if engine is None:
        ensure_engine(log=say)
        model = ensure_model(TEST_MODEL, log=say)
        engine = CpuServer(model, free_port(), logs / "engine.log")
        say("starting the engine")
        engine.start()
    stack = Stack(cfg, logs, engine)
    supervisor: Supervisor | None = None
    collector: Tolerant | None = None
    try:
        with environment(
            PUBSUB_EMULATOR_HOST=stack.emulator_host, GOOGLE_CLOUD_PROJECT=stack.project.project_id
        ):
            stack.start_emulator()
            stack.setup()
            supervisor = Supervisor(stack, free_port())
            supervisor.start()
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
        if supervisor is not None:
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
        stack.stop_emulator()
        if own_engine:
            engine.stop()
    report.seconds = time.monotonic() - t0
    report.check()
    return report
