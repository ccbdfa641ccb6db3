"""What the trace run does on a running pair: the chatbot's capacity, chat alone, feedback
alone, both (feedback through the worker, with or without preemption), and a GPU fault
while both run. Each step appends its row to the run's results (servers.Run.record).

Chat is the trace replayer (bench/chat_trace) at a fraction of the capacity, in a process
of its own (`replay.Apart`, since the runs after trace-2026-12-03e; before, it shared the
worker's event loop); the same fraction always replays the same arrivals and sizes.
Feedback is the worker's real pipeline fed by an in-process source (bench/sharing.py's
FeedbackLoad), enough requests to stay saturated; with preemption it gets
FEEDBACK_PREEMPT=true and FEEDBACK_CHAT_METRICS_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import sharing
import trace_timeline
from cohost.plan.envfile import prefix
from cohost.processes import Child, tail
from feedback.settings import WorkerSettings
from prometheus_client import REGISTRY
from servers import PORTS, SERVICES, Pair, Run, url

from bench.chat_trace import replay, trace

# Worker counters (the preemption branch's names); None where this worker has none.
COUNTERS = ("feedback_preemptions_total", "feedback_resumes_total", "feedback_engine_pauses_total")


@dataclass(frozen=True)
class Chat:
    """The chat side of a run: the trace and how it is replayed."""

    requests: list[trace.Request]
    replay_s: float
    prompt_kind: str
    max_requests: int | None = None

    def schedule(self, rate: float, max_model_len: int) -> list[trace.Request]:
        return trace.schedule(self.requests, rate, duration_s=self.replay_s,
                              max_requests=self.max_requests, max_model_len=max_model_len)  # fmt: skip


def chatbot_len(pair: Pair) -> int:
    return int(pair.env[prefix("chatbot") + "MAX_MODEL_LEN"])


def chatbot_seqs(pair: Pair) -> int:
    return int(pair.env[prefix("chatbot") + "MAX_NUM_SEQS"])


def root(name: str) -> str:
    return f"http://127.0.0.1:{PORTS[name]}"


async def _prompts(chat: Chat, requests: list[trace.Request]) -> replay.PromptMaker:
    prompts = replay.PromptMaker(root("chatbot"), "chatbot", chat.prompt_kind)
    await prompts.calibrate()
    await prompts.prepare(requests)
    return prompts


def capacity(run: Run, pair: Pair, chat: Chat, seconds: float) -> float:
    sizes = trace.sizes(chat.requests[:2000], chatbot_len(pair))

    async def go() -> dict[str, Any]:
        prompts = await _prompts(chat, [])
        return await replay.capacity(url("chatbot"), "chatbot", sizes, prompts,
                                     concurrency=chatbot_seqs(pair), duration_s=seconds,
                                     warmup_s=min(5.0, seconds / 2))  # fmt: skip

    result = asyncio.run(go())
    run.record({"step": "capacity", "profile": pair.profile, "sharing": pair.sharing, **result})
    return float(result["requests_per_s"])


def counters() -> dict[str, float | None]:
    return {name: REGISTRY.get_sample_value(name) for name in COUNTERS}


def feedback_load(
    run: Run, tag: str, seconds: float, preempt: str | None, count: int | None = None
) -> sharing.FeedbackLoad:
    """The worker against the feedback engine, `count` requests (default: more than it can
    answer in `seconds`). preempt None: no chat signal at all (raw sharing); "abort" or
    "pause": preemption in that FEEDBACK_PREEMPT_MODE, on the chatbot's /load."""
    for name in ("FEEDBACK_PREEMPT", "FEEDBACK_PREEMPT_MODE"):
        os.environ.pop(name, None)
    if preempt is not None:
        os.environ["FEEDBACK_PREEMPT"] = "true"
        os.environ["FEEDBACK_PREEMPT_MODE"] = preempt
    count = count or int(seconds + 60) * run.shape.feedback_in_flight * 4
    metrics = None if preempt is None else f"{root('chatbot')}/load"
    return sharing.FeedbackLoad(url("feedback"), "feedback", run.shape, count=count, tag=tag,
                                chat_metrics_url=metrics)  # fmt: skip


def worker_has_preemption() -> bool:
    return "preempt" in WorkerSettings.model_fields


async def _both(
    run: Run, chat: Chat, requests: list[trace.Request], preempt: str | None, tag: str
) -> dict[str, Any]:
    """Feedback saturating (after run.warmup), then the replay; feedback measured over the
    replay's window."""
    prompts = await _prompts(chat, requests)
    load = feedback_load(run, tag, chat.replay_s + 60, preempt)
    before = counters()
    with replay.Apart() as apart:
        worker = asyncio.create_task(load.run())
        sampler = trace_timeline.Sampler(root("chatbot"), f"{root('feedback')}/metrics")
        with sampler:
            t0 = time.monotonic() + run.warmup
            outcomes, window = await apart.replay(
                url("chatbot"), "chatbot", requests, prompts, duration_s=chat.replay_s,
                start_at=t0,
            )  # fmt: skip
            t1 = time.monotonic()
    load.stop()
    await asyncio.gather(worker, return_exceptions=True)
    after = counters()
    try:  # the step's own numbers are kept whatever befalls its timeline
        timeline = sampler.columns(t0)
        where = trace_timeline.analyse(timeline, outcomes, window)
    except Exception as exc:
        timeline, where = {}, {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "chat": replay.summary(outcomes, window),
        "feedback": load.summary(t0, t1),
        "worker": {"preempt": preempt, "has_preemption": worker_has_preemption(),
                   **{k: (after[k] or 0) - (before[k] or 0) if after[k] is not None else None
                      for k in COUNTERS}},
        "timeline_summary": where,
        "timeline": timeline,
        "outcomes": replay.rows(outcomes),
    }  # fmt: skip


def chat_alone(run: Run, pair: Pair, chat: Chat, load: float, cap: float) -> None:
    requests = chat.schedule(load * cap, chatbot_len(pair))

    async def go() -> dict[str, Any]:
        prompts = await _prompts(chat, requests)
        with replay.Apart() as apart:  # as in the shared steps, whose baseline this is
            outcomes, window = await apart.replay(
                url("chatbot"), "chatbot", requests, prompts, duration_s=chat.replay_s
            )
        return {"chat": replay.summary(outcomes, window), "outcomes": replay.rows(outcomes)}

    run.record({"step": "chat_alone", "profile": pair.profile, "sharing": pair.sharing,
                "load": load, "rate_per_s": load * cap, **asyncio.run(go())})  # fmt: skip


def feedback_alone(run: Run, pair: Pair, seconds: float) -> None:
    async def go() -> dict[str, Any]:
        load = feedback_load(run, f"alone-{time.time():.0f}", seconds + run.warmup, None)
        worker = asyncio.create_task(load.run())
        await asyncio.sleep(run.warmup)
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        t1 = time.monotonic()
        load.stop()
        await asyncio.gather(worker, return_exceptions=True)
        return {"feedback": load.summary(t0, t1)}

    run.record({"step": "feedback_alone", "profile": pair.profile, "sharing": pair.sharing,
                **asyncio.run(go())})  # fmt: skip


def shared(run: Run, pair: Pair, chat: Chat, load: float, cap: float, preempt: str | None) -> None:
    """preempt: None (off), "abort" or "pause" (FEEDBACK_PREEMPT_MODE)."""
    requests = chat.schedule(load * cap, chatbot_len(pair))
    tag = f"shared-{load}-{preempt}-{time.time():.0f}"
    result = asyncio.run(_both(run, chat, requests, preempt, tag))
    run.record({"step": "shared", "profile": pair.profile, "sharing": pair.sharing,
                "load": load, "rate_per_s": load * cap, "preempt": preempt is not None,
                "preempt_mode": preempt, **result})  # fmt: skip


# ----------------------------------------------------------------------------- a GPU fault


def fault(
    run: Run,
    pair: Pair,
    chat: Chat,
    load: float,
    cap: float,
    settle_s: float,
    preempt: str | None,
) -> None:
    """While chat replays and feedback runs (the worker's preemption `preempt`, as in
    `shared`): a third process on the GPU (under MPS: a client of the pair's daemon) stores
    to an illegal address. Chat errors, when each engine served again (a launcher that
    exited is started again, as a container runtime would), and whether the worker lost a
    request."""
    requests = chat.schedule(load * cap, chatbot_len(pair))
    script = run.logs / "faulter.py"  # beside its log, not among the results
    script.write_text(_faulter_source())
    env = {**pair.env}  # the pair's CUDA_MPS_PIPE_DIRECTORY: the same daemon, or none
    if pair.sharing != "mps":
        from cohost.launch.mps import NO_MPS_PIPE

        env["CUDA_MPS_PIPE_DIRECTORY"] = NO_MPS_PIPE
    if run.cpu:  # no GPU: a process that fails the way the faulter does, without CUDA
        env["CUDA_VISIBLE_DEVICES"] = ""
    outcome: dict[str, Any] = {}

    def inject() -> None:
        faulter = Child("faulter", [sys.executable, str(script)], log_path=run.logs / "faulter.log",
                        env=env).start()  # fmt: skip
        assert faulter.proc is not None
        with contextlib.suppress(Exception):
            faulter.proc.wait(timeout=60)
        outcome["faulter_exit"] = faulter.proc.poll()
        outcome["faulter_tail"] = tail(faulter.log_path, 8)
        outcome["engines"] = watch_engines(pair, settle_s)

    async def go() -> dict[str, Any]:
        prompts = await _prompts(chat, requests)
        # A finite load (about a minute's work at the measured pace), so that every request's
        # fate can be told: answered, dead-lettered or lost.
        load_ = feedback_load(run, f"fault-{time.time():.0f}", 0, preempt,
                              count=run.shape.feedback_in_flight * 60)  # fmt: skip
        counted = counters()
        with replay.Apart() as apart:
            worker = asyncio.create_task(load_.run())
            t_start = time.monotonic()
            replayer = asyncio.create_task(
                apart.replay(url("chatbot"), "chatbot", requests, prompts, timeout_s=60,
                             duration_s=chat.replay_s, start_at=t_start)
            )  # fmt: skip
            await asyncio.sleep(run.warmup + 3)
            fault_at = time.monotonic() - t_start
            await asyncio.to_thread(inject)
            outcomes, window = await replayer
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load_.source.drained.wait(), settle_s)
        load_.stop()
        await asyncio.gather(worker, return_exceptions=True)
        now = counters()
        errors = [o for o in outcomes if o.error]
        before = [o for o in outcomes if o.ended_s < fault_at]
        return {
            "fault_at_s": round(fault_at, 1),
            "chat": replay.summary(outcomes, window),
            "chat_before_fault": replay.summary(before, fault_at),
            "chat_errors": len(errors),
            # When failed requests started and ended, from the fault (None: none failed).
            "chat_errors_from_s": round(min(o.started_s for o in errors) - fault_at, 1)
            if errors
            else None,
            "chat_errors_until_s": round(max(o.ended_s for o in errors) - fault_at, 1)
            if errors
            else None,
            "feedback": load_.accounting(),
            "feedback_drained": load_.source.drained.is_set(),
            "worker": {
                "preempt": preempt,
                **{
                    k: (now[k] or 0) - (counted[k] or 0) if now[k] is not None else None
                    for k in COUNTERS
                },
            },
            "outcomes": replay.rows(outcomes),
        }

    result = asyncio.run(go())
    run.record({"step": "fault", "profile": pair.profile, "sharing": pair.sharing, "load": load,
                "preempt_mode": preempt, **outcome, **result})  # fmt: skip


def watch_engines(pair: Pair, settle_s: float) -> dict[str, Any]:
    """For `settle_s`: an engine whose launcher exited is started again; one that stops
    answering /health is left to the launcher's watchdog (COHOST_WATCHDOG_S). Returns per
    engine: exited (after s), healthy again (after s)."""
    from cohost.processes import http_ok

    began = time.monotonic()
    seen: dict[str, dict[str, Any]] = {n: {} for n in SERVICES}
    while time.monotonic() - began < settle_s:
        for name in SERVICES:
            child = pair.children.get(name)
            if child is not None and not child.alive() and "exited_after_s" not in seen[name]:
                seen[name]["exited_after_s"] = round(time.monotonic() - began, 1)
                seen[name]["exit"] = child.proc.returncode if child.proc else None
                seen[name]["tail"] = tail(child.log_path, 10)
                healthy = pair.start((name,))
                seen[name]["healthy_after_s"] = (
                    None if healthy[name] is None else round(time.monotonic() - began, 1)
                )
        if all("exited_after_s" not in s or "healthy_after_s" in s for s in seen.values()) and (
            time.monotonic() - began > 20
        ):
            # Nothing exited in 20 s, or everything that did is back: are both answering?
            ok = {n: http_ok(f"{root(n)}/health")() for n in SERVICES}
            if all(ok.values()):
                break
        time.sleep(0.5)
    seen["checked_for_s"] = round(time.monotonic() - began, 1)  # type: ignore[assignment]
    return seen


def _faulter_source() -> str:
    import mps_fault

    return mps_fault.FAULTER
