"""Launcher trials: two vLLM servers launched at the same moment by `cohost launch`.

    python3 bench/gpu/trials.py OUT PLAN.env --gpu N --trials 1-3 [--emulate] [--bench] [--raw]

On GPU N (vLLM 0.26 bundle on PYTHONPATH), with dummy-weight copies of the plan's
models: a ballast process holds the memory a bigger card has beyond the planned
one (--emulate), then for each trial both launchers start at once; the start gate
must make them come up one after the other, both healthy. Per trial it records
when each took and released the gate, vLLM's own memory accounting and
nvidia-smi's per-process memory. --bench runs bench/sharing.py against the last
trial's servers; --raw then starts both servers at once without the launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for sub in ("ops/src", "shared/src"):
    sys.path.insert(0, str(ROOT / sub))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dummy  # noqa: E402
import gpuhost  # noqa: E402
from cohost import gpus, vllm_log  # noqa: E402
from cohost.plan import envfile  # noqa: E402
from cohost.plan.envfile import prefix  # noqa: E402

SERVICES = ("chatbot", "feedback")
BALLAST = """
import sys, time, torch
target = int(sys.argv[1])
free, total = torch.cuda.mem_get_info()
n = free - target
x = torch.empty(max(n, 0), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("held", n, "free now", torch.cuda.mem_get_info()[0], flush=True)
while True:
    time.sleep(3600)
"""


def smi(gpu: int) -> list[dict[str, int]]:
    return gpuhost.gpu_processes(gpu)


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


def service_memory(gpu: int, pids: dict[str, int]) -> dict[str, int]:
    """MiB per service: a server's GPU memory sits in its EngineCore child."""
    out = dict.fromkeys(pids, 0)
    for row in smi(gpu):
        chain = ancestors(row["pid"])
        for name, pid in pids.items():
            if pid in chain:
                out[name] += row["used_mib"]
    return out


def launcher_events(text: str) -> dict[str, str | float | None]:
    def stamp(pattern: str) -> str | None:
        m = re.search(r"^(\S+) cohost launch \S+: " + pattern, text, re.MULTILINE)
        return m.group(1) if m else None

    waited = re.search(r"start gate taken after ([0-9.]+) s", text)
    return {
        "gate_taken_at": stamp("start gate taken"),
        "gate_wait_s": float(waited.group(1)) if waited else None,
        "exec_at": stamp("GPU .*starting:"),
        "healthy_at": stamp("healthy after"),
        "refused": "refusing" in text,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("plan", type=Path)
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--trials", default="1-5")
    p.add_argument("--emulate", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--bench-args", default="")
    p.add_argument("--raw", action="store_true")
    p.add_argument(
        "--local-test", metavar="CMD|MODEL", help="smoke test on CPU: vLLM command|model dir"
    )
    args = p.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    first, _, last = args.trials.partition("-")
    trials = range(int(first), int(last or first) + 1)
    plan = envfile.read(args.plan)
    ports = {"chatbot": 8001 + 10 * args.gpu, "feedback": 8002 + 10 * args.gpu}

    base = dict(os.environ)
    base["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    base["PYTHONPATH"] = (
        f"{ROOT / 'ops' / 'src'}:{ROOT / 'shared' / 'src'}:{base.get('PYTHONPATH', '')}"
    )
    base.update(plan)
    base["COHOST_LOCK_DIR"] = "/tmp/cohost-locks"
    if args.emulate:
        base["COHOST_ALLOW_OTHER_GPU"] = "1"
    for name in SERVICES:
        pre = prefix(name)
        config = ROOT / "deploy" / "models" / plan[pre + "MODEL"].replace("/", "--") / "config.json"
        if args.local_test:
            command, model = args.local_test.split("|")
            base[pre + "MODEL"], base[pre + "COMMAND"] = model, command
            base[pre + "EXTRA_ARGS"] = "--enforce-eager"
            base[pre + "MAX_MODEL_LEN"] = "1024"
        else:
            base[pre + "MODEL"] = str(dummy.make(config, Path(f"/tmp/models-gpu{args.gpu}/{name}")))
            base[pre + "EXTRA_ARGS"] = "--load-format dummy"
            base[pre + "COMMAND"] = f'{sys.executable} -c "{gpuhost.VLLM_MAIN}" serve'
        base[pre + "PORT"] = str(ports[name])
        base[pre + "HOST"] = "127.0.0.1"
        base[pre + "GPU_INDEX"] = str(args.gpu)

    results = out / "trials.jsonl"
    ballast = None
    if args.emulate:
        planned = int(plan["COHOST_GPU_TOTAL_BYTES"])
        target = planned - gpus.DEFAULT_RESERVED
        ballast = subprocess.Popen(
            [sys.executable, "-c", BALLAST, str(target)],
            env=base,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert ballast.stdout is not None
        print("ballast:", ballast.stdout.readline().strip(), flush=True)
    baseline = sum(r["used_mib"] for r in smi(args.gpu))

    procs: dict[str, subprocess.Popen[bytes]] = {}
    for trial in trials:
        started = time.monotonic()
        logs = {n: out / f"trial{trial}-{n}.log" for n in SERVICES}
        # Both at the same moment: the start gate has to order them.
        procs = {
            n: gpuhost.start([sys.executable, "-m", "cohost.cli", "launch", n], logs[n], env=base)
            for n in SERVICES
        }
        healthy: dict[str, float | None] = {}
        while len(healthy) < len(SERVICES) and time.monotonic() - started < 600:
            for n, proc in procs.items():
                if n in healthy:
                    continue
                if proc.poll() is not None:
                    healthy[n] = None
                elif gpuhost.healthy(ports[n]):
                    healthy[n] = round(time.monotonic() - started, 1)
            time.sleep(0.5)
        time.sleep(2)
        row: dict[str, object] = {
            "trial": trial,
            "gpu": args.gpu,
            "plan": str(args.plan),
            "healthy_s": healthy,
            "both_healthy": all(v is not None for v in healthy.values()) and len(healthy) == 2,
            "nvidia_smi_mib": service_memory(args.gpu, {n: p.pid for n, p in procs.items()}),
            "gpu_used_mib": sum(r["used_mib"] for r in smi(args.gpu)) - baseline,
        }
        for n in SERVICES:
            text = logs[n].read_text(errors="replace")
            row[n] = {"launcher": launcher_events(text), "vllm": vllm_log.parse(text).as_dict()}
            if healthy.get(n) is None:
                row[n]["tail"] = gpuhost.tail(logs[n], 25)  # type: ignore[index]
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        last_trial = trial == trials[-1]
        if last_trial and args.bench and row["both_healthy"]:
            bench = [
                sys.executable,
                str(ROOT / "bench" / "sharing.py"),
                "--chat-url",
                f"http://127.0.0.1:{ports['chatbot']}/v1",
                "--feedback-url",
                f"http://127.0.0.1:{ports['feedback']}/v1",
                "--feedback-in-flight",
                plan["FEEDBACK_MAX_IN_FLIGHT"],
                "--prompt-kind",
                "letters",
                "--out",
                str(out / "sharing.json"),
                *args.bench_args.split(),
            ]
            subprocess.run(bench, env=base, check=False)
        for proc in procs.values():
            gpuhost.stop(proc)
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline
            and sum(r["used_mib"] for r in smi(args.gpu)) > baseline + 50
        ):
            time.sleep(0.5)
        print(f"--- trial {trial}: {time.monotonic() - started:.0f} s", flush=True)
        if not row["both_healthy"]:
            break

    if args.raw:
        raw_logs = {n: out / f"raw-{n}.log" for n in SERVICES}
        raw_env = dict(base)
        argvs = {}
        for n in SERVICES:
            pre = prefix(n)
            flags = [
                "--load-format",
                "dummy",
                "--served-model-name",
                n,
                "--port",
                raw_env[pre + "PORT"],
                "--host",
                "127.0.0.1",
                "--gpu-memory-utilization",
                raw_env[pre + "GPU_MEMORY_UTILIZATION"],
                "--max-model-len",
                raw_env[pre + "MAX_MODEL_LEN"],
                "--max-num-seqs",
                raw_env[pre + "MAX_NUM_SEQS"],
                "--max-num-batched-tokens",
                raw_env[pre + "MAX_NUM_BATCHED_TOKENS"],
            ]
            argvs[n] = [
                *raw_env[pre + "COMMAND"].split(" -c ")[0].split(),
                "-c",
                gpuhost.VLLM_MAIN,
                "serve",
                raw_env[pre + "MODEL"],
                *flags,
            ]
        started = time.monotonic()
        raw = {n: gpuhost.start(argvs[n], raw_logs[n], env=raw_env) for n in SERVICES}
        outcome: dict[str, object] = {}
        while len(outcome) < 2 and time.monotonic() - started < 300:
            for n, proc in raw.items():
                if n in outcome:
                    continue
                if proc.poll() is not None:
                    outcome[n] = {
                        "exited": proc.returncode,
                        "after_s": round(time.monotonic() - started, 1),
                        "tail": gpuhost.tail(raw_logs[n], 12),
                    }
                elif gpuhost.healthy(int(raw_env[prefix(n) + "PORT"])):
                    outcome[n] = {"healthy_after_s": round(time.monotonic() - started, 1)}
            time.sleep(0.5)
        for proc in raw.values():
            gpuhost.stop(proc)
        (out / "raw.json").write_text(json.dumps(outcome, indent=1))
        print("raw:", json.dumps(outcome)[:2000], flush=True)

    if ballast is not None:
        ballast.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
