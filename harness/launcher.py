"""What `cohost launch` meets on a machine without a GPU, faked only at its boundaries.

fake_card  the planned card as NVML would report it, for COHOST_FAKE_NVML
l4_reading an L4 with another server on it, as NVML would report it
l4_chatbot_env  a chatbot's plan on that L4 (NVML faked), what the launcher tests start from
recorder   a stand-in for vLLM that records how the launcher started it, then exits
clean_env  this process's environment without any setting the launcher or vLLM would read
launch     `cohost launch SERVICE` run to its end
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cohost import gpus, nvml
from cohost.processes import console_script, free_port
from cohost.units import MIB

L4_TOTAL = 23034 * MIB

# The prefixes of every setting the launcher, the worker or CUDA's MPS client reads.
SETTING_PREFIXES = ("CHATBOT_", "FEEDBACK_", "COHOST_", "PUBSUB_", "GOOGLE_", "CUDA_MPS_")


def fake_card(plan: Mapping[str, str], free_bytes: int, path: Path, uuid: str) -> Path:
    """Write the plan's card (COHOST_GPU_NAME, COHOST_GPU_TOTAL_BYTES) with `free_bytes`
    free and no processes to `path`, the file COHOST_FAKE_NVML names."""
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    reading = nvml.GpuReading(
        index=0,
        name=plan["COHOST_GPU_NAME"],
        uuid=uuid,
        total_bytes=total,
        reserved_bytes=gpus.DEFAULT_RESERVED,
        free_bytes=free_bytes,
        used_bytes=total - free_bytes,
    )
    path.write_text(reading.to_json())
    return path


def recorder(record: Path) -> str:
    """A command for <SERVICE>_ENGINE_COMMAND: it writes the arguments it got, VLLM_API_KEY,
    VLLM_SERVER_DEV_MODE and every CUDA_MPS_* variable of its environment to `record` as
    JSON, then exits 0."""
    script = record.with_suffix(".py")
    script.write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY'), "
        "'dev_mode': os.environ.get('VLLM_SERVER_DEV_MODE'), "
        "'mps': {k: v for k, v in os.environ.items() if k.startswith('CUDA_MPS_')}}, "
        f"open({str(record)!r}, 'w'))\n"
    )
    return f"{sys.executable} {script}"


def recorded(record: Path) -> dict[str, Any]:
    """What the recorder wrote: argv, key, dev_mode and mps."""
    data: dict[str, Any] = json.loads(record.read_text())
    return data


def clean_env() -> dict[str, str]:
    """os.environ without project or MPS settings (nor VIRTUAL_ENV), so a test gives the
    launcher exactly what a container would get."""
    prefixes = (*SETTING_PREFIXES, "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def l4_reading(free_mib: int, total: int = L4_TOTAL, uuid: str = "GPU-test-0") -> nvml.GpuReading:
    return nvml.GpuReading(
        index=0,
        name="NVIDIA L4",
        uuid=uuid,
        total_bytes=total,
        reserved_bytes=480 * MIB,
        free_bytes=free_mib * MIB,
        used_bytes=total - free_mib * MIB,
        processes=[nvml.GpuProcess(pid=4242, used_bytes=9000 * MIB, name="vllm serve other")],
    )


def l4_chatbot_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with a chatbot's plan for an L4 that has 22,000 MiB free
    (NVML faked), and a lock directory of its own."""
    fake = tmp_path / "nvml.json"
    fake.write_text(l4_reading(free_mib=22000).to_json())
    return {
        **os.environ,
        "COHOST_FAKE_NVML": str(fake),
        "COHOST_LOCK_DIR": str(tmp_path / "locks"),
        # A refusal that waits answers on the server's port: one of its own, not 8000.
        "CHATBOT_ENGINE_HOST": "127.0.0.1",
        "CHATBOT_ENGINE_PORT": str(free_port()),
        "COHOST_GPU_NAME": "NVIDIA L4",
        "COHOST_GPU_TOTAL_BYTES": str(L4_TOTAL),
        "CHATBOT_ENGINE_MODEL": "/models/chat",
        "CHATBOT_ENGINE_GPU_MEMORY_UTILIZATION": "0.5",
        "CHATBOT_ENGINE_BUDGET_BYTES": str(11_000 * MIB),
        "CHATBOT_ENGINE_EXPECTED_PROCESS_BYTES": str(12_000 * MIB),
        "CHATBOT_ENGINE_KV_CACHE_MEMORY_BYTES": str(5_000 * MIB),
        "CHATBOT_ENGINE_MAX_MODEL_LEN": "8192",
        "CHATBOT_ENGINE_MAX_NUM_SEQS": "8",
        "CHATBOT_ENGINE_MAX_NUM_BATCHED_TOKENS": "2048",
    }


def launch(
    service: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Looked up here, not at import: the GPU benches import fake_card on a host without
        # the console script (tests/test_gpu_scripts.py).
        [console_script("cohost"), "launch", service],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
