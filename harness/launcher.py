"""What `cohost launch` meets on a machine without a GPU, faked only at its boundaries.

fake_card  the planned card as NVML would report it, for COHOST_FAKE_NVML
recorder   a stand-in for vLLM that records how the launcher started it, then exits
clean_env  this process's environment without any setting the launcher or vLLM would read
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cohost import gpus, nvml

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
    """A command for <SERVICE>_ENGINE_COMMAND: it writes the arguments it got, VLLM_API_KEY
    and every CUDA_MPS_* variable of its environment to `record` as JSON, then exits 0."""
    script = record.with_suffix(".py")
    script.write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'key': os.environ.get('VLLM_API_KEY'), "
        "'mps': {k: v for k, v in os.environ.items() if k.startswith('CUDA_MPS_')}}, "
        f"open({str(record)!r}, 'w'))\n"
    )
    return f"{sys.executable} {script}"


def recorded(record: Path) -> dict[str, Any]:
    """What the recorder wrote: argv, key and mps."""
    data: dict[str, Any] = json.loads(record.read_text())
    return data


def clean_env() -> dict[str, str]:
    """os.environ without project or MPS settings (nor VIRTUAL_ENV), so a test gives the
    launcher exactly what a container would get."""
    prefixes = (*SETTING_PREFIXES, "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
