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
  variant        the feedback engine restarted with other MPS settings, then phases
  over-cap       the feedback engine started with a memory cap below its plan

The time-slicing pair runs the same services planned with --sharing time-slicing; the MPS
pair runs the shipped plan. A file OUT/skip-optional makes the run skip optional steps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/sharing.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # harness (CPU smoke runs)

import gpuhost
import sharing
from cohost import cli, gpus, vllm_log
from cohost.plan import envfile
from cohost.plan.envfile import prefix
from cohost.processes import Child, http_ok
from cohost_shared import logs

ROOT = gpuhost.ROOT
SERVICES = ("chatbot", "feedback")
PORTS = {"chatbot": 8001, "feedback": 8002}


def url(name: str) -> str:
    return f"http://127.0.0.1:{PORTS[name]}/v1"


@dataclass
class Run:
    out: Path
    cpu: bool
    duration: float
    warmup: float
    shape: sharing.Shape
    started: float = field(default_factory=time.monotonic)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def record(self, row: dict[str, Any]) -> None:
        row = {"at_s": round(time.monotonic() - self.started, 1), **row}
        with (self.out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        short = {k: v for k, v in row.items() if k not in ("timeline", "vllm", "tail")}
        print(json.dumps(short)[:1500], flush=True)

    def note(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {text}", flush=True)

    def skip_optional(self) -> bool:
        return (self.out / "skip-optional").exists()


# --------------------------------------------------------------------------- the servers


class Pair:
    """Both servers of one plan, each through `cohost launch`, restartable one by one."""

    def __init__(
        self, run: Run, profile: str, plan: Path, base: dict[str, str], engines: dict[str, str]
    ) -> None:
        self.run, self.profile, self.plan = run, profile, plan
        self.values = envfile.read(plan)
        self.sharing = self.values.get("COHOST_SHARING", "time-slicing")
        # The plan, then what this host runs instead of the real model (dummy weights, the
        # bundle's vLLM, local ports).
        self.env = {**base, **self.values, **engines}
        for key in [k for k, v in engines.items() if not v]:
            del self.env[key]
        self.children: dict[str, Child] = {}
        self.starts = 0

    def launcher(self, name: str, **overrides: str) -> Child:
        self.starts += 1
        log = self.run.logs / f"{self.profile}-{self.sharing}-{name}-{self.starts}.log"
        env = {**self.env, **{prefix(name) + k: v for k, v in overrides.items()}}
        return Child(
            name, [sys.executable, "-m", "cohost.cli", "launch", name], log_path=log, env=env
        )

    def start(self, names: tuple[str, ...] = SERVICES, **overrides: str) -> dict[str, float | None]:
        """Start `names` at the same moment; seconds until each answered /health (None: failed)."""
        began = time.monotonic()
        for name in names:
            self.children[name] = self.launcher(name, **overrides).start()
        healthy: dict[str, float | None] = {}
        while len(healthy) < len(names) and time.monotonic() - began < 900:
            for name in names:
                child = self.children[name]
                if name in healthy:
                    continue
                if not child.alive():
                    healthy[name] = None
                elif http_ok(f"http://127.0.0.1:{PORTS[name]}/health")():
                    healthy[name] = round(time.monotonic() - began, 1)
            time.sleep(0.5)
        return healthy

    def stop(self, names: tuple[str, ...] = SERVICES) -> None:
        for name in names:
            child = self.children.pop(name, None)
            if child is not None:
                child.stop(timeout=60)

    def memory(self) -> dict[str, Any]:
        if self.run.cpu:
            return {}
        pids = {n: c.pid for n, c in self.children.items()}
        per: dict[str, int] = dict.fromkeys(pids, 0)
        others: dict[str, int] = {}
        for row in gpuhost.gpu_processes():
            chain = ancestors(row["pid"])
            owner = next((n for n, pid in pids.items() if pid in chain), None)
            if owner:
                per[owner] += row["used_mib"]
            else:  # the ballast, the MPS server
                key = f"{row['pid']} {comm(row['pid'])}"
                others[key] = others.get(key, 0) + row["used_mib"]
        return {"nvidia_smi_mib": per, "others_mib": others, "nvml": gpuhost.nvml_memory()}

    def describe(self, name: str) -> dict[str, Any]:
        child = self.children.get(name)
        text = child.log_path.read_text(errors="replace") if child else ""
        return {
            "launcher": [line for line in text.splitlines() if " cohost launch " in line][-8:],
            "vllm": vllm_log.parse(text).as_dict(),
        }


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        chain.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return chain


# --------------------------------------------------------------------------- the steps


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
        victim = pair.children["feedback"]
        os.killpg(victim.pid, signal.SIGKILL)
        victim.proc.wait()  # type: ignore[union-attr]
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
                os.killpg(child.pid, signal.SIGKILL)
        exited: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        while len(exited) < 2 and time.monotonic() < deadline:
            for name, child in pair.children.items():
                if name not in exited and child.proc is not None and child.proc.poll() is not None:
                    exited[name] = {"code": child.proc.returncode,
                                    "after_s": round(90 - (deadline - time.monotonic()), 1),
                                    "tail": gpuhost.tail(child.log_path, 12)}  # fmt: skip
            time.sleep(0.5)
        hung = [n for n in SERVICES if n not in exited]
        for name in hung:  # what a health check would do next: replace it
            os.killpg(pair.children[name].pid, signal.SIGKILL)
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


def variant(run: Run, pair: Pair, label: str, **overrides: str) -> None:
    pair.stop(("feedback",))
    healthy = pair.start(("feedback",), **overrides)
    run.record({"step": "variant", "profile": pair.profile, "setting": label,
                "overrides": overrides, "healthy_s": healthy, **pair.describe("feedback")})  # fmt: skip
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
                "tail": gpuhost.tail(child.log_path, 40)})  # fmt: skip
    pair.stop(("feedback",))
    pair.start(("feedback",))


# --------------------------------------------------------------------------- profiles


def time_slicing_plan(run: Run, shipped: Path) -> Path:
    """The shipped plan's services, planned again with --sharing time-slicing."""
    argv = envfile.command(shipped)
    out = run.out / "plans" / f"{shipped.stem}-time-slicing.env"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [a for a in argv if a not in ("mps", "--sharing")]
    argv[argv.index("--write-env") + 1] = str(out)
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        cli.main([*argv, "--sharing", "time-slicing"])
    finally:
        os.chdir(cwd)
    return out


def base_env(run: Run) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ":".join(
        [str(ROOT / "ops" / "src"), str(ROOT / "shared" / "src"), env.get("PYTHONPATH", "")]
    )
    env["COHOST_LOCK_DIR"] = str(run.out / "locks")
    env["COHOST_ALLOW_OTHER_GPU"] = "1"
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(run.out / "mps-pipe")
    if run.cpu:
        from cohost.cpu_engine.server import server_env

        env = server_env(env)
    return env


def engine_env(run: Run, plan: dict[str, str], models: Path) -> dict[str, str]:
    """What this host runs in place of the plan's models; an empty value drops the key."""
    env: dict[str, str] = {}
    for name in SERVICES:
        p = prefix(name)
        env[p + "PORT"] = str(PORTS[name])
        env[p + "HOST"] = "127.0.0.1"
        if run.cpu:
            from cohost.cpu_engine.venv import engine_python

            env[p + "MODEL"] = str(models)
            env[p + "COMMAND"] = f"{engine_python()} -m vllm.entrypoints.openai.api_server"
            env[p + "EXTRA_ARGS"] = "--enforce-eager"
            env[p + "MAX_MODEL_LEN"] = "1024"
            env[p + "MAX_NUM_SEQS"] = "4"
            env[p + "KV_CACHE_MEMORY_BYTES"] = ""  # the CPU engine sizes its KV cache in RAM
        else:
            config = (
                ROOT / "deploy" / "models" / plan[p + "MODEL"].replace("/", "--") / "config.json"
            )
            env[p + "MODEL"] = str(dummy_model(config, models / name))
            env[p + "EXTRA_ARGS"] = "--load-format dummy"
            env[p + "COMMAND"] = gpuhost.VLLM_COMMAND
    return env


def dummy_model(config: Path, out: Path) -> Path:
    import dummy

    return dummy.make(config, out)


def profile_run(run: Run, name: str, steps: list[str], models: Path) -> None:
    shipped = ROOT / "deploy" / f"{name}.env"
    plan = envfile.read(shipped)
    base = base_env(run)
    engines = engine_env(run, plan, models if run.cpu else models / name)
    if run.cpu:
        base["COHOST_FAKE_NVML"] = str(fake_nvml(run, plan))
    ballast = None
    if not run.cpu:
        card = int(plan["COHOST_GPU_TOTAL_BYTES"]) - gpus.DEFAULT_RESERVED
        ballast = gpuhost.ballast(card, run.logs / f"{name}-ballast.log")
        run.note(f"{name}: ballast: {gpuhost.tail(ballast.log_path, 1)}")
    daemon: gpuhost.MpsDaemon | None = None
    try:
        for sharing_mode in ("time-slicing", "mps"):
            plan_path = (
                time_slicing_plan(run, shipped) if sharing_mode == "time-slicing" else shipped
            )
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


class FakeDaemon:
    """On CPU there is no MPS: a socket where the daemon's would be, so the launcher's
    MPS path runs (harness.mps)."""

    def __init__(self, run: Run) -> None:
        from harness.mps import FakeMpsDaemon

        self.fake = FakeMpsDaemon(run.out / "mps-pipe")

    def quit(self) -> None:
        self.fake.close()

    def server_pids(self) -> list[int]:
        return []

    def log_tail(self, name: str = "control.log", n: int = 40) -> str:
        return "(CPU smoke run: no MPS)"


def start_daemon(run: Run) -> Any:
    if run.cpu:
        return FakeDaemon(run)
    daemon = gpuhost.MpsDaemon(run.out / "mps-pipe", run.out / "mps-log")
    daemon.start()
    return daemon


def fake_nvml(run: Run, plan: dict[str, str]) -> Path:
    from cohost import nvml

    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    path = run.out / "fake-nvml.json"
    path.write_text(
        nvml.GpuReading(
            0,
            str(plan["COHOST_GPU_NAME"]),
            "GPU-cpu-smoke",
            total,
            gpus.DEFAULT_RESERVED,
            total - gpus.DEFAULT_RESERVED,
            0,
        ).to_json()
    )
    return path


STEPS: dict[str, Callable[[Run, Pair, Any], None]] = {
    "feedback-kill": lambda run, pair, daemon: feedback_kill(run, pair),
    "mps-kill": mps_kill,
    "priority-normal": lambda run, pair, daemon: variant(
        run, pair, "feedback priority normal", MPS_CLIENT_PRIORITY="0"
    ),
    "sm-50": lambda run, pair, daemon: variant(
        run, pair, "feedback 50% of SMs", MPS_ACTIVE_THREAD_PERCENTAGE="50"
    ),
    "sm-20": lambda run, pair, daemon: variant(
        run, pair, "feedback 20% of SMs", MPS_ACTIVE_THREAD_PERCENTAGE="20"
    ),
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
    for profile in split(args.profiles):
        steps = list(split(per_profile.get(profile, "")))
        try:
            profile_run(run, profile, steps, models)
        except Exception:
            run.record({"step": "profile", "profile": profile, "error": traceback.format_exc()})
    run.note("done")
    (args.out / "done").write_text("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
