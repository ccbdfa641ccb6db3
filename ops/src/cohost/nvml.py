"""The one place that reads the GPU through NVML (pynvml, from nvidia-ml-py).

Tests without a GPU point COHOST_FAKE_NVML at a JSON file holding a `GpuReading`;
nothing else in the project knows the difference.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


class NvmlError(RuntimeError):
    """No NVIDIA driver, no such GPU, or NVML failed."""


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int
    name: str = ""


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    total_bytes: int  # NVML total
    reserved_bytes: int  # held by the driver; CUDA's total is total - reserved
    free_bytes: int
    used_bytes: int
    processes: list[GpuProcess] = field(default_factory=list)

    @property
    def cuda_total_bytes(self) -> int:
        return self.total_bytes - self.reserved_bytes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> GpuReading:
        data = json.loads(text)
        data["processes"] = [GpuProcess(**p) for p in data.get("processes", [])]
        return cls(**data)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120].strip()
    except OSError:
        return ""  # another container's process: NVML knows its pid, we cannot see it


def read(index: int = 0) -> GpuReading:
    fake = os.environ.get("COHOST_FAKE_NVML")
    if fake:
        return GpuReading.from_json(Path(fake).read_text())
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NvmlError("nvidia-ml-py is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlError(f"no NVIDIA driver reachable through NVML ({exc})") from exc
    try:
        count = pynvml.nvmlDeviceGetCount()
        if index >= count:
            raise NvmlError(f"GPU {index} does not exist ({count} visible)")
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            reserved = int(mem.reserved)
        except pynvml.NVMLError:
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            reserved = 0
        procs = []
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else 0
            procs.append(GpuProcess(pid=int(p.pid), used_bytes=used, name=_process_name(p.pid)))
        name = pynvml.nvmlDeviceGetName(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        return GpuReading(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            total_bytes=int(mem.total),
            reserved_bytes=reserved,
            free_bytes=int(mem.free),
            used_bytes=int(mem.used),
            processes=procs,
        )
    except pynvml.NVMLError as exc:
        raise NvmlError(f"NVML failed: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()
