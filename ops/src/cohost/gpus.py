"""The GPUs the planner knows, by name, by memory size, or as NVML reports them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cohost import nvml
from cohost.units import MIB

# A card within this fraction of the planned total counts as the planned card.
SIZE_TOLERANCE = 0.01
# Driver-reserved memory (NVML total - CUDA total): 480 MiB measured on an H100
# with driver 580; used for cards we could not measure.
DEFAULT_RESERVED = 480 * MIB


class GpuError(ValueError):
    pass


@dataclass(frozen=True)
class Gpu:
    name: str
    total_bytes: int  # NVML total, as nvidia-smi prints it
    reserved_bytes: int = DEFAULT_RESERVED

    @property
    def cuda_total_bytes(self) -> int:
        """What vLLM calls total memory: `--gpu-memory-utilization` is a fraction of this."""
        return self.total_bytes - self.reserved_bytes

    @property
    def total_mib(self) -> int:
        return self.total_bytes // MIB


# NVML totals of common cards (nvidia-smi's "MiB" column).
KNOWN: dict[str, Gpu] = {
    "L4": Gpu("NVIDIA L4", 23034 * MIB),
    "A10G": Gpu("NVIDIA A10G", 23028 * MIB),
    "RTX4090": Gpu("NVIDIA GeForce RTX 4090", 24564 * MIB),
    "RTX5090": Gpu("NVIDIA GeForce RTX 5090", 32607 * MIB),
    "A100-40GB": Gpu("NVIDIA A100-SXM4-40GB", 40960 * MIB),
    "A100-80GB": Gpu("NVIDIA A100-SXM4-80GB", 81920 * MIB),
    "H100-80GB": Gpu("NVIDIA H100 80GB HBM3", 81559 * MIB, 503_316_480),
    "H200": Gpu("NVIDIA H200", 143771 * MIB),
}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("nvidia", "").replace("geforce", ""))


def by_name(name: str) -> Gpu:
    """A known card: "L4", "RTX 5090", "rtx-5090", "h100", "A100-80GB" all work."""
    wanted = _norm(name)
    for key, gpu in KNOWN.items():
        if wanted in (_norm(key), _norm(gpu.name)):
            return gpu
    prefix = [gpu for key, gpu in KNOWN.items() if _norm(key).startswith(wanted)]
    if len(prefix) == 1:
        return prefix[0]
    raise GpuError(
        f"unknown GPU {name!r}; known: {', '.join(KNOWN)} "
        "(or give --gpu-memory-mib with the total nvidia-smi shows)"
    )


def by_memory(mib: int) -> Gpu:
    if mib < 1024:
        raise GpuError(f"--gpu-memory-mib {mib} is too small for any LLM server")
    return Gpu(f"GPU with {mib} MiB", mib * MIB)


def same_card(total_bytes: int, planned_bytes: int) -> bool:
    """Whether a card of `total_bytes` (NVML total) is the one a plan was made for."""
    return abs(total_bytes - planned_bytes) <= SIZE_TOLERANCE * planned_bytes


def detect(index: int = 0) -> Gpu:
    try:
        reading = nvml.read(index)
    except nvml.NvmlError as exc:
        raise GpuError(
            f"cannot detect the GPU: {exc}; name it with --gpu or --gpu-memory-mib"
        ) from exc
    return Gpu(reading.name, reading.total_bytes, reading.reserved_bytes or DEFAULT_RESERVED)
