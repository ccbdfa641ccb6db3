"""Calibration runs: real vLLM 0.26 servers, one at a time, memory as vLLM and nvidia-smi see it.

    python3 bench/gpu/calibrate.py OUT CASE [CASE ...]
    CASE = arch:max_model_len:max_num_seqs:max_num_batched_tokens:util[:kv_cache_memory_bytes]

Each case starts `vllm serve` on a dummy-weight model of that architecture, waits
for /health, records nvidia-smi's per-process memory, NVML totals and vLLM's own
startup accounting (parsed by cohost.vllm_log), then stops it. One JSON line per
case goes to OUT/calibration.jsonl; logs to OUT/logs/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpuhost  # also puts the project's sources on sys.path
from cohost import vllm_log
from cohost.processes import Child, tail


def main() -> int:
    out = Path(sys.argv[1])
    cases = [c.split(":") for c in sys.argv[2:]]
    models = gpuhost.make_models(Path("/tmp/models"), sorted({c[0] for c in cases}))
    port = 8100
    results = out / "calibration.jsonl"
    baseline = sum(p["used_mib"] for p in gpuhost.gpu_processes())
    for arch, mml, mns, mnbt, util, *pinned in cases:
        tag = f"{arch}-L{mml}-S{mns}-T{mnbt}-u{util}" + (f"-kv{pinned[0]}" if pinned else "")
        log = out / "logs" / f"{tag}.log"
        flags = [
            "--load-format",
            "dummy",
            "--max-model-len",
            mml,
            "--max-num-seqs",
            mns,
            "--max-num-batched-tokens",
            mnbt,
            "--gpu-memory-utilization",
            util,
            "--served-model-name",
            arch,
        ]
        if pinned:
            flags += ["--kv-cache-memory-bytes", pinned[0]]
        started = time.monotonic()
        server = Child(tag, gpuhost.vllm_serve_argv(models[arch], port, *flags), log_path=log)
        took = gpuhost.wait_healthy(server.start(), port, timeout=420)
        row: dict[str, object] = {
            "case": tag,
            "arch": arch,
            "max_model_len": int(mml),
            "max_num_seqs": int(mns),
            "max_num_batched_tokens": int(mnbt),
            "util": float(util),
            "kv_cache_memory_bytes": int(pinned[0]) if pinned else None,
            "healthy_s": None if took is None else round(took, 1),
        }
        if took is not None:
            time.sleep(2)
            row["nvidia_smi_mib"] = sum(p["used_mib"] for p in gpuhost.gpu_processes()) - baseline
            row["nvml"] = gpuhost.nvml_memory()
        else:
            row["error_tail"] = tail(log, 40)
        server.stop()
        row["vllm"] = vllm_log.parse(log.read_text(errors="replace")).as_dict()
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        print(f"--- {tag}: {time.monotonic() - started:.0f} s", flush=True)
        gpuhost.wait_gpu_idle(baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
