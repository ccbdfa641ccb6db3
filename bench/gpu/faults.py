"""What the run does to a running pair: load phases, faults under load, MPS variants and
an MPS cap below the plan. Each appends its row to the run's results."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import sharing
from cohost.plan.envfile import prefix
from cohost.processes import tail
from servers import SERVICES, Pair, Run, replan, url


def phases(run: Run, pair: Pair, label: str, names: list[str]) -> None:
    for name in names:
        result = asyncio.run(
            sharing.run_phase(
                name,
                chat_url=url("chatbot"),
                feedback_url=url("feedback"),
                shape=run.shape,
                warmup=run.warmup,
                duration=run.duration,
            )
        )
        run.record({"step": "phase", "profile": pair.profile, "sharing": pair.sharing,
                    "setting": label, **result})  # fmt: skip


async def under_load(
    run: Run, fault: Callable[[], dict[str, Any]], *, requests: int, settle_s: float
) -> dict[str, Any]:
    """Chat users and a finite feedback load; `fault` runs (in a thread) once both are busy.
    Ends once every feedback request is answered (or `settle_s` after the fault)."""
    chat = sharing.ChatLoad(url("chatbot"), "chatbot", run.shape)
    feedback = sharing.FeedbackLoad(
        url("feedback"), "feedback", run.shape, count=requests, tag=f"fault-{time.time():.0f}"
    )
    tasks = [asyncio.create_task(chat.run()), asyncio.create_task(feedback.run())]
    t0 = time.monotonic()
    await asyncio.sleep(run.warmup + 3)
    t_fault = time.monotonic()
    detail = await asyncio.to_thread(fault)
    t_back = time.monotonic()
    deadline = t_back + settle_s
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            feedback.source.drained.wait(), max(0.0, deadline - time.monotonic())
        )
    t_end = time.monotonic()
    chat.stop()
    feedback.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        **detail,
        "before": chat.summary(t0 + run.warmup, t_fault),
        "during": chat.summary(t_fault, t_back),
        "after": chat.summary(t_back, t_end),
        "chat_errors": [e for at, e in chat.errors if at >= t_fault][:10],
        "chat_error_count": len(chat.errors),
        # When chat turns failed, relative to the fault: how long chat was unavailable.
        "chat_errors_from_s": round(min((a for a, _ in chat.errors), default=t_fault) - t_fault, 1),
        "chat_errors_until_s": round(
            max((a for a, _ in chat.errors), default=t_fault) - t_fault, 1
        ),
        "fault_s": round(t_back - t_fault, 1),
        "drained": feedback.source.drained.is_set(),
        "feedback": feedback.accounting(),
    }


def feedback_kill(run: Run, pair: Pair) -> None:
    def fault() -> dict[str, Any]:
        pair.children["feedback"].kill()
        healthy = pair.start(("feedback",))
        return {"killed": "feedback", "restarted_healthy_s": healthy["feedback"]}

    result = asyncio.run(under_load(run, fault, requests=1500, settle_s=240))
    run.record({"step": "feedback-kill", "profile": pair.profile, "sharing": pair.sharing,
                **result, "restart": pair.describe("feedback")})  # fmt: skip


def mps_kill(run: Run, pair: Pair, daemon: Any) -> None:
    """Kill the MPS server (on CPU: both engines, which is what the GPU did not necessarily
    do); restart whatever exited, as a container runtime's restart policy would."""

    def fault() -> dict[str, Any]:
        servers = daemon.server_pids()
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        if run.cpu:
            for child in pair.children.values():
                child.kill()
        exited: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        while len(exited) < len(SERVICES) and time.monotonic() < deadline:
            for name, child in pair.children.items():
                if name not in exited and child.proc is not None and child.proc.poll() is not None:
                    exited[name] = {"code": child.proc.returncode,
                                    "after_s": round(90 - (deadline - time.monotonic()), 1),
                                    "tail": tail(child.log_path, 12)}  # fmt: skip
            time.sleep(0.5)
        hung = [n for n in SERVICES if n not in exited]
        for name in hung:  # what a health check would do next: replace it
            pair.children[name].kill()
        healthy = pair.start(SERVICES)
        return {
            "killed_mps_servers": servers,
            "engines_exited": exited,
            "engines_hung_then_killed": hung,
            "restarted_healthy_s": healthy,
            "daemon_log": daemon.log_tail(),
            "server_log": daemon.log_tail("server.log"),
        }

    result = asyncio.run(under_load(run, fault, requests=3000, settle_s=300))
    run.record({"step": "mps-kill", "profile": pair.profile, "sharing": pair.sharing, **result,
                "restart": {n: pair.describe(n) for n in SERVICES}})  # fmt: skip


def variant(run: Run, pair: Pair, label: str, feedback: str) -> None:
    """The feedback engine restarted from the plan re-made with `feedback` options (sm=,
    priority=): its memory sized for that share (the chatbot keeps its running plan)."""
    plan = replan(run, pair.plan, label.replace(" ", "-").replace("%", ""), feedback=feedback)
    pair.stop(("feedback",))
    pair.adopt(plan, "feedback")
    healthy = pair.start(("feedback",))
    run.record({"step": "variant", "profile": pair.profile, "setting": label,
                "replanned": feedback, "plan": plan.name, "healthy_s": healthy,
                **pair.describe("feedback")})  # fmt: skip
    if healthy["feedback"] is not None:
        phases(run, pair, label, ["raw_sharing", "feedback_alone"])


def over_cap(run: Run, pair: Pair) -> None:
    """A feedback server whose MPS memory cap is 2 GiB under its plan."""
    planned = int(pair.values[prefix("feedback") + "MPS_PINNED_MEMORY_BYTES"])
    pair.stop(("feedback",))
    capped = str(planned - (2 << 30))
    healthy = pair.start(("feedback",), MPS_PINNED_MEMORY_BYTES=capped)
    child = pair.children["feedback"]
    run.record({"step": "over-cap", "profile": pair.profile, "cap_bytes": int(capped),
                "healthy_s": healthy, "exit": child.proc.returncode if child.proc else None,
                "tail": tail(child.log_path, 40)})  # fmt: skip
    pair.stop(("feedback",))
    pair.start(("feedback",))
