"""What the scripts on the GPU host share: vLLM from the offline bundle, weightless models,
the ballast that shrinks the card, the CUDA MPS control daemon and nvidia-smi readings.

The host has Python 3.12, torch and nvidia-ml-py; vLLM 0.26 comes from the bundle on
PYTHONPATH (shared/gpu/README.md). Processes are `cohost.processes.Child`, as everywhere in
the project: their log in a file, and waiting for /health stops as soon as one has exited.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The repository root too: harness/ (what the CPU smoke run fakes) lives there.
for sub in ("", "ops/src", "shared/src", "services/feedback/src"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

import dummy  # noqa: E402
from cohost.launch.mps import NO_MPS_PIPE  # noqa: E402
from cohost.processes import Child, ChildFailed, http_ok, tail  # noqa: E402

VLLM_MAIN = (
    "import sys; from vllm.entrypoints.cli.main import main; sys.argv=['vllm']+sys.argv[1:]; main()"
)
# `cohost launch`'s <SERVICE>_ENGINE_COMMAND for the bundle (it has no `vllm` script).
VLLM_COMMAND = f'{sys.executable} -c "{VLLM_MAIN}" serve'
# Real config.json files of the architectures the calibration runs use.
CONFIGS = ROOT / "deploy" / "calibration" / "models"
MPS_BIN = Path("/usr/local/nvidia/bin")


def vllm_serve_argv(model_dir: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-c", VLLM_MAIN, "serve", str(model_dir), "--port", str(port), *flags]


def make_models(root: Path, archs: list[str]) -> dict[str, Path]:
    """Weightless model folders (real shapes, from deploy/calibration/models/ARCH) for
    --load-format dummy; an '-awq' suffix makes the AWQ variant of ARCH."""
    out = {}
    for arch in archs:
        folder = dummy.make(CONFIGS / arch.removesuffix("-awq") / "config.json", root / arch)
        if arch.endswith("-awq"):
            cfg = json.loads((folder / "config.json").read_text())
            cfg["torch_dtype"] = "float16"
            cfg["quantization_config"] = {
                "quant_method": "awq",
                "bits": 4,
                "group_size": 128,
                "zero_point": True,
                "version": "gemm",
            }
            (folder / "config.json").write_text(json.dumps(cfg, indent=1))
        out[arch] = folder
    return out


def wait_healthy(child: Child, port: int, timeout: float) -> float | None:
    """Seconds until /health answered, or None if the process exited or time ran out."""
    try:
        return child.wait_ready(http_ok(f"http://127.0.0.1:{port}/health"), timeout=timeout)
    except ChildFailed:
        return None


def gpu_processes(gpu: int | None = None) -> list[dict[str, int]]:
    """[{pid, used_mib}] of compute processes (of one GPU, if given), as nvidia-smi reports them."""
    which = [] if gpu is None else [f"--id={gpu}"]
    out = subprocess.run(
        [
            "nvidia-smi",
            *which,
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            rows.append({"pid": int(parts[0]), "used_mib": int(parts[1])})
    return rows


def nvml_memory() -> dict[str, int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return {
            "total": int(info.total),
            "reserved": int(info.reserved),
            "free": int(info.free),
            "used": int(info.used),
        }
    finally:
        pynvml.nvmlShutdown()


def host_facts() -> dict[str, Any]:
    """What tells two machines of one kind apart where it moves the CPU-side timings (the
    worker's resumes, both API servers): the CPU, how many, how busy, a fixed piece of
    Python work, and the GPU's clocks (idle, at the run's start). Runs of different
    sessions, same code and plans, differed 2x in the time from chat idle to feedback
    generating (docs/sharing.md), and recorded nothing that could say why."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    facts: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "probe_ms": _probe_ms(),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no NVML (the CPU smoke run): the CPU facts alone
        facts["gpu"] = f"no NVML: {type(exc).__name__}"
        return facts
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        clock = pynvml.nvmlDeviceGetClockInfo
        facts["gpu"] = {
            "name": pynvml.nvmlDeviceGetName(handle),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_mhz": clock(handle, pynvml.NVML_CLOCK_SM),
            "sm_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "mem_mhz": clock(handle, pynvml.NVML_CLOCK_MEM),
        }
    except pynvml.NVMLError as exc:  # a fact missing must not cost the run
        facts["gpu"] = f"NVML: {exc}"
    finally:
        pynvml.nvmlShutdown()
    return facts


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _probe_ms() -> float:
    """Best of 5: encode and decode the bodies of 32 resumed answers of 2,000 token ids each
    (what the worker and the feedback server parse at every resume), in milliseconds."""
    body = [{"prompt": list(range(i, i + 2000)), "max_tokens": 256} for i in range(32)]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for one in body:
            json.loads(json.dumps(one))
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def wait_gpu_idle(baseline_mib: int, timeout: float = 60) -> None:
    """Wait until no process holds more than the baseline (the last server's memory is back)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if sum(p["used_mib"] for p in gpu_processes()) <= baseline_mib:
            return
        time.sleep(0.5)


# A process that holds the memory a bigger card has beyond the emulated one. It is never
# an MPS client (no kernels, only an allocation), so it does not take part in the sharing.
_BALLAST = """
import sys, time, torch
target = int(sys.argv[1])
free, total = torch.cuda.mem_get_info()
x = torch.empty(max(free - target, 0), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("held", max(free - target, 0), "free now", torch.cuda.mem_get_info()[0], flush=True)
while True:
    time.sleep(3600)
"""


def ballast(free_bytes: int, log: Path) -> Child:
    """Leave `free_bytes` of the card free (the planned card's CUDA total, on a bigger one)."""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE}
    child = Child(
        "ballast", [sys.executable, "-c", _BALLAST, str(free_bytes)], log_path=log, env=env
    )
    child.start()
    child.wait_ready(lambda: "held" in log.read_text(errors="replace"), timeout=120)
    return child


class MpsDaemon:
    """nvidia-cuda-mps-control -d with its own pipe and log directories."""

    def __init__(self, pipe: Path, logs: Path) -> None:
        self.pipe, self.logs = pipe, logs
        self.env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(logs),
            "PATH": f"{MPS_BIN}:{os.environ.get('PATH', '')}",
        }

    def control(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                shutil.which("nvidia-cuda-mps-control", path=self.env["PATH"])
                or "nvidia-cuda-mps-control"
            ],
            input=command + "\n",
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        self.pipe.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("nvidia-cuda-mps-control", path=self.env["PATH"])
        if binary is None:
            raise RuntimeError(f"nvidia-cuda-mps-control not found (PATH {self.env['PATH']})")
        subprocess.run([binary, "-d"], env=self.env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while not (self.pipe / "control").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"MPS daemon made no {self.pipe / 'control'} in 30 s")
            time.sleep(0.2)

    def quit(self) -> None:
        self.control("quit")
        deadline = time.monotonic() + 30
        while self.server_pids() and time.monotonic() < deadline:
            time.sleep(0.5)

    def server_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", "nvidia-cuda-mps-server"], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def log_tail(self, name: str = "control.log", n: int = 40) -> str:
        path = self.logs / name
        return tail(path, n) if path.exists() else f"(no {name})"
