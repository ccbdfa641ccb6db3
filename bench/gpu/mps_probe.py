"""What a CUDA process sees under MPS: free/total memory and SMs under a share and a memory
cap, what allocating past the cap gives, and whether the launcher's daemon check (a connect
to the control socket) disturbs the daemon.

    python3 bench/gpu/mps_probe.py OUT.json

Needs torch and the MPS binaries (/usr/local/nvidia/bin); no vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpuhost
from cohost.launch.mps import NO_MPS_PIPE, daemon_problem

CLIENT = """
import json, sys, torch
free, total = torch.cuda.mem_get_info()
props = torch.cuda.get_device_properties(0)
out = {"free": free, "total": total, "sms": props.multi_processor_count, "name": props.name}
held = []
for gib in (1, 1, 1, 1, 1, 1, 1, 1):
    try:
        held.append(torch.empty(gib << 30, dtype=torch.uint8, device="cuda"))
        torch.cuda.synchronize()
    except Exception as exc:
        out["failed_after_gib"] = len(held)
        out["error"] = f"{type(exc).__name__}: {exc}"[:600]
        break
out["free_after"] = torch.cuda.mem_get_info()[0]
print(json.dumps(out))
"""


def client(env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"exit": done.returncode, "stderr": done.stderr[-1500:]}
    result: dict[str, object] = json.loads(lines[-1])
    return result


def main() -> int:
    out = Path(sys.argv[1])
    work = Path(tempfile.mkdtemp(prefix="mps-probe-"))
    daemon = gpuhost.MpsDaemon(work / "pipe", work / "log")
    report: dict[str, object] = {"nvml_before": gpuhost.nvml_memory()}
    no_mps = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE}
    report["without_mps"] = client(no_mps)
    daemon.start()
    try:
        report["daemon_check_before_any_client"] = daemon_problem(daemon.pipe)
        mps = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe)}
        report["mps_no_limits"] = client(mps)
        report["mps_30pct_cap_3g"] = client(
            {
                **mps,
                "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
                "CUDA_MPS_CLIENT_PRIORITY": "1",
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=3072M",
            }
        )
        report["daemon_check_after"] = daemon_problem(daemon.pipe)
        report["server_pids"] = daemon.server_pids()
        report["smi_with_server"] = gpuhost.gpu_processes()
        report["server_list"] = daemon.control("get_server_list").stdout
        report["control_log"] = daemon.log_tail(n=30)
        report["server_log"] = daemon.log_tail("server.log", n=30)
    finally:
        daemon.quit()
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
