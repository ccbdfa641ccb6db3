"""One MPS client's illegal-address store: does it take another client down? And without MPS?

    python3 bench/gpu/mps_fault.py OUT.json [--watch 20]

Bare torch and Triton, no vLLM (about a minute of device time). For each mode:

  mps        an MPS control daemon with its own pipe directory; a victim process running a
             CUDA matmul loop under it; a second client of the same daemon launches a Triton
             kernel that stores to `ptr + (1 << 40)`; the victim is watched for --watch s.
             Then, once every client has exited, a fresh client: how long until the MPS
             server takes work again.
  no-mps     the same two processes with no daemon (time-slicing, the driver's default).

Prints one line per mode and writes everything to OUT.json: the faulting process's exit
and error, whether and when the victim died (seconds after the faulting kernel's launch),
its last lines, its matmul rate before and after the fault.

Standard library only (torch and Triton run in the child processes), so it runs on the
bare GPU host in one call, before or without the vLLM bundle and the project's packages
(gpuhost.MpsDaemon needs those); `device.sh fault` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MPS_BIN = "/usr/local/nvidia/bin"

# The victim prints one line per 0.2 s: wall time and matmuls done, so a stall shows too.
VICTIM = """
import time, torch
a = torch.randn(4096, 4096, device="cuda")
b = torch.randn(4096, 4096, device="cuda")
torch.cuda.synchronize()
print("ready", time.time(), flush=True)
done, last = 0, time.time()
while True:
    (a @ b).sum().item()
    done += 1
    if time.time() - last >= 0.2:
        last = time.time()
        print("beat", last, done, flush=True)
"""

# A file, not `-c`: triton.jit reads the kernel's source. The kernel is compiled before
# "launching" is printed (warmup compiles without running), so that time is the fault's.
FAULTER = """
import time, torch, triton, triton.language as tl

@triton.jit
def store_far(ptr):
    tl.store(ptr + (1 << 40), 1.0)

x = torch.zeros(16, device="cuda")
torch.cuda.synchronize()
try:
    store_far.warmup(x, grid=(1,))
except Exception as exc:  # an older or newer Triton: it compiles at the launch instead
    print("warmup failed", type(exc).__name__, exc, flush=True)
print("launching", time.time(), flush=True)
try:
    store_far[(1,)](x)
    torch.cuda.synchronize()
    print("no fault", time.time(), flush=True)
except Exception as exc:
    print("fault", time.time(), type(exc).__name__, str(exc)[:300], flush=True)
    raise
"""


class Proc:
    """A child process with its output in a log file, in its own process group."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        with log.open("ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"not ready (exit {self.proc.poll()}): {tail(self.log_path)}")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Daemon:
    """nvidia-cuda-mps-control -d with its own pipe and log directories."""

    def __init__(self, pipe: Path, logs: Path) -> None:
        self.pipe, self.logs = pipe, logs
        path = f"{MPS_BIN}:{os.environ.get('PATH', '')}"
        self.binary = (
            shutil.which("nvidia-cuda-mps-control", path=path) or "nvidia-cuda-mps-control"
        )
        self.env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
                    "CUDA_MPS_LOG_DIRECTORY": str(logs), "PATH": path}  # fmt: skip

    def start(self) -> None:
        self.pipe.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        subprocess.run([self.binary, "-d"], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while not (self.pipe / "control").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the MPS daemon made no {self.pipe / 'control'} in 30 s")
            time.sleep(0.2)

    def quit(self) -> None:
        subprocess.run([self.binary], input="quit\n", env=self.env, text=True, timeout=30,
                       capture_output=True, check=False)  # fmt: skip
        deadline = time.monotonic() + 30
        while self.server_pids() and time.monotonic() < deadline:
            time.sleep(0.5)

    def server_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "nvidia-cuda-mps-server"], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
        return [int(p) for p in out.split()]

    def log_tail(self, name: str = "control.log") -> str:
        path = self.logs / name
        return tail(path, 40) if path.exists() else f"(no {name})"


def gpu_processes() -> str:
    return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                           "--format=csv,noheader"], capture_output=True, text=True,
                          check=False).stdout  # fmt: skip


def beats(log: Path) -> list[tuple[float, int]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "beat":
            out.append((float(parts[1]), int(parts[2])))
    return out


def rate(points: list[tuple[float, int]], t0: float, t1: float) -> float | None:
    """Matmuls per second between two wall-clock instants."""
    inside = [p for p in points if t0 <= p[0] <= t1]
    if len(inside) < 2:
        return None
    return (inside[-1][1] - inside[0][1]) / max(inside[-1][0] - inside[0][0], 1e-9)


def launched_at(log: Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("launching "):
            return float(line.split()[1])
    return None


def one_mode(mode: str, out: Path, watch: float) -> dict[str, Any]:
    logs = out.parent / f"{out.stem}-logs"
    pipe = Path(f"/tmp/mps-fault-pipe-{os.getpid()}")  # the daemon of this run only
    daemon = None
    # No daemon listens there: CUDA runs the processes without MPS.
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": f"{pipe}-none"}
    if mode == "mps":
        daemon = Daemon(pipe, logs / "mps-log")
        daemon.start()
        env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe)}
    scripts = logs / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "faulter.py").write_text(FAULTER)
    result: dict[str, Any] = {"mode": mode}
    try:
        result.update(fault(env, logs, scripts / "faulter.py", mode, watch))
        if daemon is not None:
            result["recovery"] = recovery(env, logs)
    finally:
        if daemon is not None:
            result["daemon_log"] = daemon.log_tail()
            result["server_log"] = daemon.log_tail("server.log")
            result["mps_servers_at_end"] = daemon.server_pids()
            daemon.quit()
    return result


def fault(env: dict[str, str], logs: Path, script: Path, mode: str, watch: float) -> dict[str, Any]:
    """The victim's matmul loop, then the faulting client; both watched together until the
    faulter has exited (60 s at most) and the victim has died or lived `watch` s more."""
    out: dict[str, Any] = {}
    victim = Proc([sys.executable, "-c", VICTIM], logs / f"{mode}-victim.log", env)
    faulter = None
    try:
        victim.wait_ready(lambda: len(beats(victim.log_path)) >= 10, timeout=120)
        out["gpu_processes"] = gpu_processes()
        faulter = Proc([sys.executable, str(script)], logs / f"{mode}-faulter.log", env)
        started = time.monotonic()
        faulter_done = died_at = None
        while True:
            now = time.monotonic()
            if faulter_done is None and (not faulter.alive() or now - started > 60):
                faulter_done = now
            if died_at is None and not victim.alive():
                died_at = time.time()
            if faulter_done is not None and (died_at is not None or now - faulter_done > watch):
                break
            time.sleep(0.05)
        faulter.kill()  # if it still runs (hung after its fault)
        t_launch = launched_at(faulter.log_path)
        points = beats(victim.log_path)
        out["faulter"] = {"exit": faulter.proc.returncode, "launched": t_launch is not None,
                          "tail": tail(faulter.log_path, 15)}  # fmt: skip
        t0 = t_launch or time.time()
        out["victim"] = {
            "died": died_at is not None,
            "exit": victim.proc.returncode if died_at is not None else None,
            # Seen dead (polled every 50 ms), and its last sign of life, after the launch.
            "died_after_s": round(died_at - t0, 2) if died_at is not None else None,
            "last_beat_after_s": round(points[-1][0] - t0, 2) if points else None,
            "matmul_per_s_before": rate(points, t0 - 3, t0),
            "matmul_per_s_after": rate(points, t0 + 1, t0 + watch),
            "tail": tail(victim.log_path, 15),
        }
    finally:
        victim.kill()
        if faulter is not None:
            faulter.kill()
    return out


def recovery(env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Every client has exited: how long until a new client runs under the same daemon."""
    began = time.monotonic()
    fresh = Proc([sys.executable, "-c", VICTIM], logs / "mps-fresh.log", env)
    try:
        fresh.wait_ready(lambda: len(beats(fresh.log_path)) >= 3, timeout=60)
        return {"serving_after_s": round(time.monotonic() - began, 1)}
    except Exception as exc:  # what happened is the result
        return {"serving_after_s": None, "error": str(exc)[-1500:]}
    finally:
        fresh.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--watch", type=float, default=20.0, help="seconds to watch the victim")
    p.add_argument("--modes", default="mps,no-mps")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes.split(","):
        try:
            row = one_mode(mode, args.out, args.watch)
        except Exception as exc:  # record it, then the other mode
            row = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"[-3000:]}
        results.append(row)
        short = {k: v for k, v in row.items() if k not in ("daemon_log", "server_log")}
        print(json.dumps(short)[:3000], flush=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
