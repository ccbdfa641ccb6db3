"""The two servers of a plan on the GPU host, each started through `cohost launch` with
what this host runs instead of the plan's models (dummy weights, the bundle's vLLM, local
ports), and the run's context they log to. Also used on CPU (`--cpu-smoke`): CPU vLLM
servers and a stand-in MPS daemon socket."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dummy
import gpuhost
import sharing
from cohost import cli, vllm_log
from cohost.plan import envfile
from cohost.plan.envfile import prefix
from cohost.processes import Child, http_ok
from cohost_shared import endpoints

from harness.mps import FakeMpsDaemon

ROOT = gpuhost.ROOT
SERVICES = ("chatbot", "feedback")
PORTS = {"chatbot": endpoints.CHATBOT_PORT, "feedback": endpoints.FEEDBACK_ENGINE_PORT}


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
        short = {k: v for k, v in row.items() if k not in ("timeline", "vllm", "tail", "outcomes")}
        print(json.dumps(short)[:1500], flush=True)

    def note(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {text}", flush=True)

    def skip_optional(self) -> bool:
        return (self.out / "skip-optional").exists()

    def each_profile(self, profiles: Iterable[str], steps: Callable[[str], None]) -> None:
        """`steps` for each profile: a profile that fails is recorded and the next one runs.
        First the machine is recorded (`host`: runs on different hosts are compared), last
        the run is marked done (`done`, which `device.sh wait` looks for)."""
        self.record({"step": "host", **gpuhost.host_facts()})
        for profile in profiles:
            try:
                steps(profile)
            except Exception:
                self.record(
                    {"step": "profile", "profile": profile, "error": traceback.format_exc()}
                )
        self.note("done")
        (self.out / "done").write_text("done\n")


# --------------------------------------------------------------------------- the servers


class Pair:
    """Both servers of one plan, each through `cohost launch`, restartable one by one."""

    def __init__(
        self, run: Run, profile: str, plan: Path, base: dict[str, str], engines: dict[str, str]
    ) -> None:
        self.run, self.profile, self.plan = run, profile, plan
        self.values = envfile.read(plan)
        self.sharing = envfile.sharing_of(self.values)
        self.engines = engines
        # The plan, then what this host runs instead of the real model (dummy weights, the
        # bundle's vLLM, local ports).
        self.env = self._with_engines({**base, **self.values})
        self.children: dict[str, Child] = {}
        self.starts = 0

    def _with_engines(self, env: dict[str, str]) -> dict[str, str]:
        env.update(self.engines)
        for key in [k for k, v in self.engines.items() if not v]:
            del env[key]
        return env

    def adopt(self, plan: Path, name: str) -> None:
        """Take service `name`'s settings from another plan (re-planned with another share),
        for its next start."""
        p = prefix(name)
        values = envfile.read(plan)
        kept = {k: v for k, v in self.env.items() if not k.startswith(p)}
        self.env = self._with_engines(
            {**kept, **{k: v for k, v in values.items() if k.startswith(p)}}
        )

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


def replan(
    run: Run, shipped: Path, label: str, *, sharing_mode: str = "mps", feedback: str = ""
) -> Path:
    """The shipped plan's command run again (`cohost plan`, never a hand edit: the launcher
    refuses an MPS share its plan did not size): another sharing, or `feedback` options
    (`sm=50`, `priority=normal`) added to the feedback service."""
    out = run.out / "plans" / f"{shipped.stem}-{label}.env"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = envfile.replan_command(shipped, out, sharing_mode=sharing_mode, feedback=feedback)
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        if cli.main(argv) != 0:
            raise RuntimeError(f"cohost plan {' '.join(argv)} did not fit")
    finally:
        os.chdir(cwd)
    return out


def sharing_plan(run: Run, shipped: Path, mode: str) -> Path:
    """The shipped plan's services, planned again with --sharing MODE."""
    return replan(run, shipped, mode, sharing_mode=mode)


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
            env[p + "MODEL"] = str(dummy.make(config, models / name))
            env[p + "EXTRA_ARGS"] = "--load-format dummy"
            env[p + "COMMAND"] = gpuhost.VLLM_COMMAND
    return env


class FakeDaemon:
    """On CPU there is no MPS: a socket where the daemon's would be, so the launcher's
    MPS path runs (harness.mps)."""

    def __init__(self, run: Run) -> None:
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
