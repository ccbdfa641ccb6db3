"""Helpers for scripts that run on the GPU host (vLLM 0.26 bundle on PYTHONPATH).

Standard library plus nvidia-ml-py (present on the host). Servers are started
the way the bundle README says, with their log in a file, and waiting for /health
stops as soon as the server process has exited.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dummy

VLLM_MAIN = (
    "import sys; from vllm.entrypoints.cli.main import main; sys.argv=['vllm']+sys.argv[1:]; main()"
)
ROOT = Path(__file__).resolve().parents[2]
# Real config.json files of the architectures the calibration runs use.
CONFIGS = ROOT / "deploy" / "calibration" / "models"


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


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float) -> float | None:
    """Seconds to healthy, or None if the process exited or time ran out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            return None
        if healthy(port):
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


def wait_gpu_idle(baseline_mib: int, timeout: float = 60) -> None:
    """Wait until no process holds more than the baseline (the last server's memory is back)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if sum(p["used_mib"] for p in gpu_processes()) <= baseline_mib:
            return
        time.sleep(0.5)


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
