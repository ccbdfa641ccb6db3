"""Each part's health, from what it already publishes; nothing here raises on a part that
is down: every check ends in a `Check` with a state and a one-line reason.

- each vLLM engine: GET /health, and GET /metrics for vllm:num_requests_running,
  vllm:num_requests_waiting and vllm:kv_cache_usage_perc; a launcher that refused to start
  the server answers /health with the refusal while it waits (cohost.launch.refusing);
- the feedback worker: its Prometheus endpoint (feedback_in_flight,
  feedback_succeeded_total, feedback_dead_lettered_total{reason},
  feedback_nacked_total{cause}, feedback_concurrency_limit, ...);
- the GPU: NVML through `cohost.nvml.read()` (COHOST_FAKE_NVML in tests), compared
  with the plan's env file (<SERVICE>_ENGINE_EXPECTED_PROCESS_BYTES, COHOST_GPU_*), and
  how the plan shares it (COHOST_SHARING, each <SERVICE>_ENGINE_MPS_* share).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx2
from cohost_shared.metrics import VLLM_RUNNING, VLLM_WAITING, Metrics

from cohost import gpus, nvml
from cohost.launch import refusing
from cohost.plan import envfile, sharing
from cohost.units import MIB

# A GPU process may use this much more than its plan before status calls it over.
OVER_PLAN_TOLERANCE = 0.05

State = Literal["ok", "down", "unhealthy", "absent"]


def fetch_metrics(url: str, *, timeout: float = 3.0) -> Metrics:
    """GET a /metrics page (raises httpx2.HTTPError)."""
    response = httpx2.get(url, timeout=timeout)
    response.raise_for_status()
    return Metrics.parse(response.text)


@dataclass
class Check:
    name: str
    state: State
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state in ("ok", "absent")


def _why(exc: Exception) -> str:
    if isinstance(exc, httpx2.ConnectError):
        return "not reachable (connection refused)"
    if isinstance(exc, httpx2.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"answered HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}"


def _root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def check_engine(name: str, url: str, *, timeout: float = 3.0) -> Check:
    """A vLLM server: /health must answer 200; /metrics gives its load."""
    root = _root(url)
    try:
        health = httpx2.get(f"{root}/health", timeout=timeout)
    except httpx2.HTTPError as exc:
        return Check(name, "down", _why(exc), {"url": root})
    details: dict[str, Any] = {"url": root, "health_status": health.status_code}
    refused = _refused(health)
    if refused is not None:
        details["refused"] = refused
        return Check(name, "down", _refusal_summary(refused), details)
    try:
        m = fetch_metrics(f"{root}/metrics", timeout=timeout)
    except httpx2.HTTPError as exc:
        details["metrics_error"] = _why(exc)
        m = Metrics([])
    running = m.value(VLLM_RUNNING)
    waiting = m.value(VLLM_WAITING)
    kv = m.value("vllm:kv_cache_usage_perc")
    if kv is None:  # older vLLM
        kv = m.value("vllm:gpu_cache_usage_perc")
    models = sorted({s.labels["model_name"] for s in m.samples if "model_name" in s.labels})
    details.update(
        running=running,
        waiting=waiting,
        kv_cache_usage=kv,
        models=models,
        preemptions=m.value("vllm:num_preemptions_total"),
    )
    load = (
        f"running {_n(running)}, waiting {_n(waiting)}, KV cache {_pct(kv)}"
        if running is not None or waiting is not None
        else "no vLLM metrics"
    )
    model = f"model {', '.join(models)}; " if models else ""
    if health.status_code != 200:
        return Check(name, "unhealthy", f"/health answered {health.status_code}; {load}", details)
    return Check(name, "ok", f"healthy; {model}{load}", details)


def _refused(health: httpx2.Response) -> dict[str, Any] | None:
    """The refusal a launcher answers with while it waits to exit, if this is one."""
    if health.status_code == 200:
        return None
    try:
        body = health.json()
    except ValueError:
        return None
    refused = body.get(refusing.KEY) if isinstance(body, dict) else None
    return refused if isinstance(refused, dict) else None


def _refusal_summary(refused: Mapping[str, Any]) -> str:
    lines = str(refused.get("reason") or "no reason given").splitlines() or ["?"]
    # A memory refusal begins with these words, which the summary says already.
    reason = lines[0].removeprefix(f"refusing to start {refused.get('service')}: ").rstrip(".")
    left = refused.get("exits_in_s")
    left_s = f"{left:.0f} s" if isinstance(left, int | float) else "?"
    return (
        f"refusing to start (exit {refused.get('code', '?')}): {reason}; refusal "
        f"{refused.get('refusals_in_a_row', '?')} in a row, exits in {left_s}, then restarts"
    )


def check_worker(url: str, *, timeout: float = 3.0) -> Check:
    """The feedback worker's Prometheus endpoint."""
    root = url.rstrip("/").removesuffix("/metrics")
    try:
        m = fetch_metrics(f"{root}/metrics", timeout=timeout)
    except httpx2.HTTPError as exc:
        return Check("worker", "down", _why(exc), {"url": root})
    if not m.has("feedback_received_total"):
        return Check(
            "worker", "unhealthy", "answers, but not with the worker's metrics", {"url": root}
        )
    dead = {k: v for k, v in m.by_label("feedback_dead_lettered_total", "reason").items() if v}
    nacked = {k: v for k, v in m.by_label("feedback_nacked_total", "cause").items() if v}
    started = m.value("process_start_time_seconds")
    details: dict[str, Any] = {
        "url": root,
        "in_flight": m.value("feedback_in_flight"),
        "concurrency_limit": m.value("feedback_concurrency_limit"),
        "received": m.value("feedback_received_total"),
        "succeeded": m.value("feedback_succeeded_total"),
        "dead_lettered": sum(dead.values()),
        "dead_lettered_by_reason": dead,
        "nacked": sum(nacked.values()),
        "nacked_by_cause": nacked,
        "retried": m.value("feedback_retried_total"),
        "engine_errors": m.by_label("feedback_engine_errors_total", "kind"),
        # Preemption by pause: its engine held while chat is busy (feedback/pause.py).
        "engine_paused": m.value("feedback_engine_paused"),
        "engine_pauses": m.value("feedback_engine_pauses_total"),
        "rss_bytes": m.value("process_resident_memory_bytes"),
        "uptime_s": None if started is None else max(0.0, time.time() - started),
    }
    limit = details["concurrency_limit"]
    # 0 until the engine first answers, and while chat-first sharing pauses feedback.
    shown = _n(limit) if limit else "0: paused for chat, or not pulling yet"
    parts = [
        f"in flight {_n(details['in_flight'])} (limit {shown})",
        f"done {_n(details['succeeded'])}",
        f"dead-lettered {_n(details['dead_lettered'])}{_breakdown(dead)}",
        f"nacked {_n(details['nacked'])}{_breakdown(nacked)}",
    ]
    if details["engine_paused"]:
        parts.insert(1, "its engine paused for chat")
    if details["uptime_s"] is not None:
        parts.insert(0, f"up {_duration(details['uptime_s'])}")
    if details["rss_bytes"] is not None:
        parts.append(f"RSS {details['rss_bytes'] / MIB:,.0f} MiB")
    return Check("worker", "ok", "; ".join(parts), details)


@dataclass(frozen=True)
class PlannedService:
    name: str
    expected_bytes: int
    served_model_name: str
    model: str
    mps: sharing.MpsShare | None = None


def read_plan(path: Path) -> tuple[dict[str, str], list[PlannedService]]:
    values = envfile.read(path)
    services: list[PlannedService] = []
    for name in envfile.engines(values):
        p = envfile.prefix(name)
        services.append(
            PlannedService(
                name=name,
                expected_bytes=int(values[p + "EXPECTED_PROCESS_BYTES"]),
                served_model_name=values.get(p + "SERVED_MODEL_NAME", name),
                model=values[p + "MODEL"],
                mps=envfile.mps_share(values, name),
            )
        )
    return values, services


# How an MPS server process shows up (nvidia-smi, /proc): it holds the GPU context of its
# clients, so it is part of a plan that shares through MPS.
MPS_SERVER = "nvidia-cuda-mps-server"


def _owner(process: nvml.GpuProcess, services: list[PlannedService]) -> PlannedService | None:
    """The planned service a GPU process belongs to, by its command line (when visible)."""
    argv = process.name.split()
    for s in services:
        if "--served-model-name" in argv:
            i = argv.index("--served-model-name")
            if i + 1 < len(argv) and argv[i + 1] == s.served_model_name:
                return s
    for s in services:
        if s.model and s.model in argv:
            return s
    return None


def check_gpu_memory(
    plan_path: Path | None, read: Callable[[], nvml.GpuReading] = nvml.read
) -> Check:
    """GPU memory in use against the plan. No GPU is fine without a plan (the CPU stack)."""
    plan_values: dict[str, str] = {}
    services: list[PlannedService] = []
    if plan_path is not None:
        try:
            plan_values, services = read_plan(plan_path)
        except (OSError, ValueError, KeyError) as exc:
            return Check("gpu", "unhealthy", f"cannot read the plan {plan_path}: {exc}")
    try:
        reading = read()
    except nvml.NvmlError as exc:
        if plan_path is None:
            return Check("gpu", "absent", f"no GPU ({exc}); nothing to compare")
        return Check("gpu", "unhealthy", f"the plan is for a GPU, but NVML says: {exc}")
    except (OSError, ValueError, TypeError, KeyError) as exc:  # a broken COHOST_FAKE_NVML
        return Check("gpu", "unhealthy", f"cannot read the GPU: {type(exc).__name__}: {exc}")

    problems: list[str] = []
    processes: list[dict[str, Any]] = []
    by_service: dict[str, int] = {}
    for p in sorted(reading.processes, key=lambda p: -p.used_bytes):
        owner = _owner(p, services)
        row: dict[str, Any] = {
            "pid": p.pid,
            "used_bytes": p.used_bytes,
            "service": owner.name if owner else ("mps-server" if MPS_SERVER in p.name else None),
            "name": p.name,
        }
        processes.append(row)
        if owner:
            by_service[owner.name] = by_service.get(owner.name, 0) + p.used_bytes
    # Under MPS the plan holds one MPS server too (it keeps the clients' GPU context).
    mps_server = sharing.server_bytes(envfile.sharing_of(plan_values)) if services else 0
    planned_total = sum(s.expected_bytes for s in services) + mps_server
    per_service: list[dict[str, Any]] = []
    for s in services:
        used = by_service.get(s.name)
        over = used is not None and used > s.expected_bytes * (1 + OVER_PLAN_TOLERANCE)
        per_service.append(
            {
                "service": s.name,
                "used_bytes": used,
                "expected_bytes": s.expected_bytes,
                "mps": None if s.mps is None else _share_json(s.mps),
            }
        )
        if over and used is not None:
            problems.append(
                f"{s.name} uses {used / MIB:,.0f} MiB, over its plan of "
                f"{s.expected_bytes / MIB:,.0f} MiB"
            )
    # Processes of other containers show no command line: then compare the total only.
    unattributed = services and not by_service and reading.processes
    allowed = planned_total * (1 + OVER_PLAN_TOLERANCE) + _context_slack(reading)
    if unattributed and reading.used_bytes > allowed:
        problems.append(
            f"{reading.used_bytes / MIB:,.0f} MiB in use, over the plan's "
            f"{planned_total / MIB:,.0f} MiB"
        )
    planned_gpu = plan_values.get("COHOST_GPU_TOTAL_BYTES")
    if planned_gpu and not gpus.same_card(reading.total_bytes, int(planned_gpu)):
        problems.append(
            f"the plan is for {plan_values.get('COHOST_GPU_NAME', 'another GPU')} "
            f"({int(planned_gpu) / MIB:,.0f} MiB), this is {reading.name} "
            f"({reading.total_bytes / MIB:,.0f} MiB)"
        )
    details: dict[str, Any] = {
        "index": reading.index,
        "name": reading.name,
        "total_bytes": reading.total_bytes,
        "cuda_total_bytes": reading.cuda_total_bytes,
        "used_bytes": reading.used_bytes,
        "free_bytes": reading.free_bytes,
        "plan": str(plan_path) if plan_path else None,
        "sharing": envfile.sharing_of(plan_values) if services else None,
        "planned_bytes": planned_total or None,
        "services": per_service,
        "processes": processes,
        "problems": problems,
    }
    summary = (
        f"GPU {reading.index} {reading.name}: {reading.used_bytes / MIB:,.0f} of "
        f"{reading.cuda_total_bytes / MIB:,.0f} MiB used, {reading.free_bytes / MIB:,.0f} free"
    )
    if services:
        summary += f"; plan {planned_total / MIB:,.0f} MiB, {_sharing_summary(services)}"
    if problems:
        return Check("gpu", "unhealthy", summary + "; " + "; ".join(problems), details)
    return Check("gpu", "ok", summary, details)


def _sharing_summary(services: list[PlannedService]) -> str:
    if not any(s.mps for s in services):
        return "time-slicing"
    return "MPS: " + "; ".join(f"{s.name} {s.mps.describe()}" for s in services if s.mps)


def _context_slack(reading: nvml.GpuReading) -> int:
    # NVML's "used" also counts memory no process owns (driver, other users): allow
    # what the listed processes do not account for.
    return max(0, reading.used_bytes - sum(p.used_bytes for p in reading.processes))


def _n(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if math.isfinite(value) else str(value)


def _pct(value: float | None) -> str:
    # vLLM reports kv_cache_usage_perc as a fraction (0..1).
    return "?" if value is None else f"{value * 100:.1f}%"


def _breakdown(counts: Mapping[str, float]) -> str:
    if not counts:
        return ""
    inner = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f" ({inner})"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _share_json(share: sharing.MpsShare) -> dict[str, int]:
    return {
        "sm_percent": share.sm_percent,
        "client_priority": share.client_priority,
        "memory_limit_bytes": share.memory_limit_bytes,
    }
