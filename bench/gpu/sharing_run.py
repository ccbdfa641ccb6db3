"""The GPU sharing run: both shipped profiles under time-slicing and under MPS, levers, faults.

    python3 bench/gpu/sharing_run.py OUT [--profiles l4,rtx5090] [--duration 10] [--warmup 2]
    python3 bench/gpu/sharing_run.py OUT --cpu-smoke      # the same steps on CPU vLLM servers

On one GPU (vLLM 0.26 from the offline bundle on PYTHONPATH), for each profile: a ballast
shrinks the card to the planned one; both servers are started by `cohost launch` at the
same moment (the start gate orders them), from dummy-weight models of the plan's shapes;
chat load is 4 streaming users, feedback load is the worker's real pipeline
(bench/sharing.py). Steps, in order of what matters most, each appending one JSON line to
OUT/results.jsonl (logs under OUT/logs/):

  pair           both servers started at once: gate order, start times, memory per server
  phases         chat alone, feedback alone, both, chat-first, chat-first while chat is idle
  feedback-kill  the feedback engine SIGKILLed under load: chat errors meanwhile; restart
  mps-kill       the MPS server SIGKILLed under load: what the engines do, both restarted
  variant        the feedback engine restarted from a re-made plan with another MPS share
                 (sm=, priority=: `cohost plan`, as an operator would), then phases
  over-cap       the feedback engine started with a memory cap below its plan

The time-slicing pair runs the same services planned with --sharing time-slicing; the MPS
pair runs the shipped plan. A file OUT/skip-optional makes the run skip optional steps.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/sharing.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # harness (CPU smoke runs)

import gpuhost
import sharing
from cohost import gpus
from cohost.plan import envfile
from cohost.processes import tail
from cohost_shared import logs
from faults import feedback_kill, mps_kill, over_cap, phases, variant
from servers import (
    ROOT,
    SERVICES,
    Pair,
    Run,
    base_env,
    engine_env,
    sharing_plan,
    start_daemon,
)

from harness.launcher import fake_card


def profile_run(run: Run, name: str, steps: list[str], models: Path) -> None:
    shipped = ROOT / "deploy" / f"{name}.env"
    plan = envfile.read(shipped)
    base = base_env(run)
    engines = engine_env(run, plan, models if run.cpu else models / name)
    if run.cpu:
        free = int(plan["COHOST_GPU_TOTAL_BYTES"]) - gpus.DEFAULT_RESERVED
        fake = fake_card(plan, free, run.out / "fake-nvml.json", uuid="GPU-cpu-smoke")
        base["COHOST_FAKE_NVML"] = str(fake)
    ballast = None
    if not run.cpu:
        card = int(plan["COHOST_GPU_TOTAL_BYTES"]) - gpus.DEFAULT_RESERVED
        ballast = gpuhost.ballast(card, run.logs / f"{name}-ballast.log")
        run.note(f"{name}: ballast: {tail(ballast.log_path, 1)}")
    daemon: gpuhost.MpsDaemon | None = None
    try:
        for sharing_mode in ("time-slicing", "mps"):
            plan_path = sharing_plan(run, shipped, sharing_mode)
            if sharing_mode == "mps":
                daemon = start_daemon(run)
            pair = Pair(run, name, plan_path, base, engines)
            run.note(f"{name}/{sharing_mode}: starting both servers")
            healthy = pair.start()
            run.record({"step": "pair", "profile": name, "sharing": sharing_mode,
                        "healthy_s": healthy, **pair.memory(),
                        **{n: pair.describe(n) for n in SERVICES}})  # fmt: skip
            if None in healthy.values():
                pair.stop()
                continue
            first = name == FIRST_PROFILE
            names = list(sharing.PHASES) if first or sharing_mode == "mps" else LATER_TIME_SLICING
            phases(run, pair, "planned", names)
            if sharing_mode == "mps":
                for step in steps:
                    if step in OPTIONAL and run.skip_optional():
                        run.note(f"skipping optional step {step}")
                        continue
                    try:
                        STEPS[step](run, pair, daemon)
                    except Exception:
                        run.record({"step": step, "profile": name, "error": traceback.format_exc()})
            pair.stop()
            if daemon is not None:
                daemon.quit()
                daemon = None
    finally:
        if daemon is not None:
            daemon.quit()
        if ballast is not None:
            ballast.stop(timeout=10)


STEPS: dict[str, Callable[[Run, Pair, Any], None]] = {
    "feedback-kill": lambda run, pair, daemon: feedback_kill(run, pair),
    "mps-kill": mps_kill,
    "priority-normal": lambda run, pair, daemon: variant(
        run, pair, "feedback priority normal", "priority=normal"
    ),
    "sm-50": lambda run, pair, daemon: variant(run, pair, "feedback 50% of SMs", "sm=50"),
    "sm-20": lambda run, pair, daemon: variant(run, pair, "feedback 20% of SMs", "sm=20"),
    "over-cap": lambda run, pair, daemon: over_cap(run, pair),
}
OPTIONAL = {"priority-normal", "sm-50", "sm-20", "over-cap"}
# Time-slicing on the profiles after the first: the baselines and what time-slicing costs.
FIRST_PROFILE = "l4"
LATER_TIME_SLICING = ["chat_alone", "feedback_alone", "raw_sharing"]


def split(text: str) -> Iterator[str]:
    yield from (s for s in text.split(",") if s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--profiles", default="l4,rtx5090")
    p.add_argument("--steps", default="l4:feedback-kill,mps-kill;rtx5090:over-cap,priority-normal,sm-50",
                   help="PROFILE:STEP,...;... after each profile's planned phases under MPS")  # fmt: skip
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    logs.configure("WARNING")
    shape = sharing.Shape(prompt_kind="letters")
    if args.cpu_smoke:
        shape = sharing.Shape(users=2, chat_prompt_tokens=16, chat_max_tokens=8,
                              feedback_prompt_tokens=16, feedback_max_tokens=8,
                              feedback_in_flight=4, busy_in_flight=1, prompt_kind="words")  # fmt: skip
    run = Run(args.out, args.cpu_smoke, args.duration, args.warmup, shape)
    models = Path("/tmp/cohost-run-models")
    if args.cpu_smoke:
        from cohost.cpu_engine.models import ensure_model

        models = ensure_model("tiny-llama")
    per_profile = dict(item.split(":", 1) for item in args.steps.split(";") if ":" in item)

    def steps(profile: str) -> None:
        profile_run(run, profile, list(split(per_profile.get(profile, ""))), models)

    run.each_profile(split(args.profiles), steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
