"""One-off probe: CUDA's total vs NVML's (total - reserved) and a bare CUDA context's size."""

import json
import subprocess

import pynvml
import torch

free, total = torch.cuda.mem_get_info()
props = torch.cuda.get_device_properties(0)
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
print(
    json.dumps(
        {
            "name": pynvml.nvmlDeviceGetName(h),
            "torch_free": free,
            "torch_total": total,
            "props_total": props.total_memory,
            "nvml_v2": {
                "total": v2.total,
                "reserved": v2.reserved,
                "free": v2.free,
                "used": v2.used,
            },
            "nvml_v1": {"total": v1.total, "free": v1.free, "used": v1.used},
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "torch": torch.__version__,
        }
    )
)
x = torch.empty(1, device="cuda")
torch.cuda.synchronize()

print(
    subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv"],
        capture_output=True,
        text=True,
    ).stdout
)
f2, t2 = torch.cuda.mem_get_info()
print(
    "after ctx: used by this process (free delta MiB)",
    (free - f2) / 2**20,
    "torch reserved",
    torch.cuda.memory_reserved() / 2**20,
)
