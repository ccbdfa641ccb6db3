"""Read what a vLLM 0.26 server says about its memory at startup.

vLLM logs its own accounting: weights, peak activation, non-torch memory, CUDA
graphs, the KV cache it got and the `--kv-cache-memory` it would suggest. The
calibration runs, the launcher and `cohost status` read those lines rather than
guess. Values logged in GiB carry two decimals (+-5 MiB).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?)"
_PATTERNS = {
    "weights_load_gib": rf"Model loading took {_NUM} GiB",
    "available_kv_gib": rf"Available KV cache memory: {_NUM} GiB",
    "kv_cache_tokens": rf"GPU KV cache size: {_NUM} tokens",
    "max_concurrency": rf"Maximum concurrency for {_NUM} tokens per request: {_NUM}x",
    "graph_capture_gib": rf"Graph capturing finished in {_NUM} secs, took {_NUM} GiB",
    "startup_free": rf"Free memory on device \({_NUM}/{_NUM} GiB\) on startup",
    "requested": rf"Desired GPU memory utilization is \({_NUM}, {_NUM} GiB\)",
    "actual": (
        rf"Actual usage is {_NUM} GiB for weight, {_NUM} GiB for peak activation, "
        rf"{_NUM} GiB for non-torch memory, and {_NUM} GiB for CUDAGraph memory"
    ),
    "suggested_kv": (
        rf"`--kv-cache-memory={_NUM}`.*?to fit into requested memory, "
        rf"or `--kv-cache-memory={_NUM}`"
    ),
    "kv_in_use_gib": rf"Current kv cache memory in use is {_NUM} GiB",
    "pinned_kv_gib": (
        rf"reserved {_NUM} GiB memory for KV Cache as specified by kv_cache_memory_bytes"
    ),
    "init_free_gib": rf"Initial free memory {_NUM} GiB, reserved",
}
_COMPILED = {key: re.compile(p) for key, p in _PATTERNS.items()}


def _f(text: str) -> float:
    return float(text.replace(",", ""))


@dataclass
class StartupMemory:
    """What one server's startup log says; None where the line was not logged."""

    runner: str | None = None  # "V2" or "V1"
    total_gib: float | None = None  # cudaMemGetInfo total
    free_at_start_gib: float | None = None
    gpu_memory_utilization: float | None = None
    requested_gib: float | None = None
    weights_gib: float | None = None
    peak_activation_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_gib: float | None = None
    available_kv_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    max_concurrency: float | None = None
    suggested_kv_to_requested_bytes: int | None = None
    suggested_kv_to_gpu_bytes: int | None = None
    pinned_kv_gib: float | None = None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def parse(text: str) -> StartupMemory:
    m = StartupMemory()
    if "Using V2 Model Runner" in text:
        m.runner = "V2"
    elif "Model loading took" in text:
        m.runner = "V1"
    found = {key: rx.search(text) for key, rx in _COMPILED.items()}
    if (g := found["weights_load_gib"]) is not None:
        m.weights_gib = _f(g.group(1))
    if (g := found["available_kv_gib"]) is not None:
        m.available_kv_gib = _f(g.group(1))
    if (g := found["kv_cache_tokens"]) is not None:
        m.kv_cache_tokens = int(_f(g.group(1)))
    if (g := found["max_concurrency"]) is not None:
        m.max_model_len = int(_f(g.group(1)))
        m.max_concurrency = _f(g.group(2))
    if (g := found["graph_capture_gib"]) is not None:
        m.cuda_graph_gib = _f(g.group(2))
    if (g := found["startup_free"]) is not None:
        m.free_at_start_gib, m.total_gib = _f(g.group(1)), _f(g.group(2))
    if (g := found["requested"]) is not None:
        m.gpu_memory_utilization, m.requested_gib = _f(g.group(1)), _f(g.group(2))
    if (g := found["actual"]) is not None:
        m.weights_gib = _f(g.group(1))
        m.peak_activation_gib = _f(g.group(2))
        m.non_torch_gib = _f(g.group(3))
        m.cuda_graph_gib = _f(g.group(4))
    if (g := found["suggested_kv"]) is not None:
        m.suggested_kv_to_requested_bytes = int(_f(g.group(1)))
        m.suggested_kv_to_gpu_bytes = int(_f(g.group(2)))
    if (g := found["kv_in_use_gib"]) is not None and m.available_kv_gib is None:
        m.available_kv_gib = _f(g.group(1))
    if (g := found["pinned_kv_gib"]) is not None:
        m.pinned_kv_gib = _f(g.group(1))
    return m
