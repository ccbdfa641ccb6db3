"""Chat from the Azure trace beside saturating feedback: time-slicing and MPS, with and
without the worker's preemption, at fractions of the chatbot's capacity.

    python3 bench/gpu/trace_run.py OUT [--profiles l4] [--sharing time-slicing,mps]
        [--loads 0.25,0.5,0.75] [--preempt off,pause,abort] [--steps capacity,chat_alone,...]
    python3 bench/gpu/trace_run.py OUT --cpu-smoke ...   # the same steps on CPU vLLM servers

On one GPU (vLLM 0.26 from the offline bundle on PYTHONPATH), per profile: a ballast
shrinks the card to the planned one; per sharing, both servers are started by `cohost
launch` from the plan (the shipped MPS plan, or its services re-planned with --sharing
time-slicing), dummy weights of the plan's shapes. Steps per pair, in this order, each one
JSON line in OUT/results.jsonl (bench/gpu/trace_steps.py):

  capacity        the chatbot's completed requests/s with the trace's sizes and max_num_seqs
                  in flight (once per profile, on its first pair; --capacity skips it)
  chat_alone      the replay at each load, nothing else running (the baseline)
  feedback_alone  the worker saturating the feedback engine, no chat (--feedback-s)
  shared          per load and preemption setting: feedback saturating, then the replay
  fault           under load: a third process stores to an illegal address (MPS: a client
                  of the pair's daemon); chat errors, engines back, the worker's accounting;
                  the worker preempts as --fault-preempt says (default pause; before
                  2026-12-04 this step ran it without preemption)

Report: `python3 bench/gpu/report.py trace OUT`. A file OUT/skip-optional skips `fault`.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/sharing.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench.chat_trace, harness

import gpuhost
import sharing
import trace_steps
from cohost import gpus
from cohost.plan import envfile
from cohost.processes import tail
from cohost_shared import logs
from servers import ROOT, Pair, Run, base_env, engine_env, sharing_plan, start_daemon

from bench.chat_trace import trace
from harness.launcher import fake_card

STEPS = ("capacity", "chat_alone", "feedback_alone", "shared", "fault")


def pair_steps(run: Run, pair: Pair, args: argparse.Namespace, chat: trace_steps.Chat) -> None:
    caps: dict[str, float] = args.capacities
    if "capacity" in args.steps and pair.profile not in caps:
        caps[pair.profile] = trace_steps.capacity(run, pair, chat, args.capacity_s)
    cap = caps.get(pair.profile)
    if cap is None or cap <= 0:
        run.note(f"{pair.profile}: no capacity (measure it or give --capacity): no replay")
        return
    for step in args.steps:
        try:
            if step == "chat_alone":
                for load in args.loads:
                    trace_steps.chat_alone(run, pair, chat, load, cap)
            elif step == "feedback_alone":
                trace_steps.feedback_alone(run, pair, args.feedback_s)
            elif step == "shared":
                for load in args.loads:
                    for preempt in args.preempt:
                        trace_steps.shared(run, pair, chat, load, cap, preempt)
            elif step == "fault":
                if run.skip_optional():
                    run.note("skipping the fault step")
                    continue
                fault_chat = trace_steps.Chat(chat.requests, args.fault_s, chat.prompt_kind)
                trace_steps.fault(run, pair, fault_chat, args.fault_load or args.loads[0], cap,
                                  args.fault_s, args.fault_preempt)  # fmt: skip
        except Exception:
            run.record({"step": step, "profile": pair.profile, "sharing": pair.sharing,
                        "error": traceback.format_exc()})  # fmt: skip


def profile_run(run: Run, name: str, args: argparse.Namespace, chat: trace_steps.Chat) -> None:
    shipped = ROOT / "deploy" / f"{name}.env"
    plan = envfile.read(shipped)
    base = base_env(run)
    engines = engine_env(run, plan, args.models if run.cpu else args.models / name)
    ballast = None
    if run.cpu:
        free = int(plan["COHOST_GPU_TOTAL_BYTES"]) - gpus.DEFAULT_RESERVED
        fake = fake_card(plan, free, run.out / "fake-nvml.json", uuid="GPU-cpu-smoke")
        base["COHOST_FAKE_NVML"] = str(fake)
    else:
        card = int(plan["COHOST_GPU_TOTAL_BYTES"]) - gpus.DEFAULT_RESERVED
        ballast = gpuhost.ballast(card, run.logs / f"{name}-ballast.log")
        run.note(f"{name}: ballast: {tail(ballast.log_path, 1)}")
    try:
        for mode in args.sharing:
            plan_path = sharing_plan(run, shipped, mode)
            daemon = start_daemon(run) if mode == "mps" else None
            pair = Pair(run, name, plan_path, base, engines)
            try:
                run.note(f"{name}/{mode}: starting both servers")
                healthy = pair.start()
                run.record({"step": "pair", "profile": name, "sharing": mode,
                            "plan": plan_path.name, "healthy_s": healthy, **pair.memory()})  # fmt: skip
                if None not in healthy.values():
                    pair_steps(run, pair, args, chat)
            finally:
                pair.stop()
                if daemon is not None:
                    daemon.quit()
    finally:
        if ballast is not None:
            ballast.stop(timeout=10)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--profiles", default="l4,rtx5090")
    p.add_argument("--sharing", default="time-slicing,mps")
    p.add_argument("--loads", default="0.25,0.5,0.75", help="fractions of the capacity")
    p.add_argument("--preempt", default="off,pause,abort",
                   help="the worker's preemption in `shared`: off, pause, abort (or on)")  # fmt: skip
    p.add_argument("--steps", default="capacity,chat_alone,feedback_alone,shared",
                   help=f"of {','.join(STEPS)}")  # fmt: skip
    p.add_argument("--capacity", default="", help="PROFILE=REQ_PER_S,... instead of measuring")
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--replay-s", type=float, default=60.0, help="each replay's arrivals")
    p.add_argument("--feedback-s", type=float, default=30.0)
    p.add_argument("--fault-s", type=float, default=180.0, help="replay and settle time")
    p.add_argument("--fault-load", type=float, default=0.0, help="chat load (default: the first)")
    p.add_argument("--fault-preempt", default="pause", help="the worker's preemption in `fault`")
    p.add_argument("--warmup", type=float, default=5.0, help="feedback runs this long first")
    p.add_argument("--trace", type=Path, default=trace.DEFAULT_TRACE)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    args.sharing = [s for s in args.sharing.split(",") if s]
    args.loads = floats(args.loads)
    modes = {"off": None, "on": "abort", "abort": "abort", "pause": "pause"}
    args.preempt = [modes[x] for x in args.preempt.split(",") if x]
    args.fault_preempt = modes[args.fault_preempt]
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; steps: {', '.join(STEPS)}")
    args.capacities = {k: float(v) for k, v in
                       (item.split("=", 1) for item in args.capacity.split(",") if item)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    logs.configure("WARNING")
    shape = sharing.Shape(prompt_kind="letters")
    if args.cpu_smoke:
        shape = sharing.Shape(feedback_prompt_tokens=16, feedback_max_tokens=8,
                              feedback_in_flight=4, busy_in_flight=1, prompt_kind="words")  # fmt: skip
    run = Run(args.out, args.cpu_smoke, args.replay_s, args.warmup, shape)
    args.models = Path("/tmp/cohost-run-models")
    if args.cpu_smoke:
        from cohost.cpu_engine.models import ensure_model

        args.models = ensure_model("tiny-llama")
    chat = trace_steps.Chat(trace.load(args.trace), args.replay_s, shape.prompt_kind)
    run.record({"step": "run", "args": {k: str(v) for k, v in vars(args).items()},
                "worker_has_preemption": trace_steps.worker_has_preemption()})  # fmt: skip
    profiles = (s for s in args.profiles.split(",") if s)
    run.each_profile(profiles, lambda profile: profile_run(run, profile, args, chat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
