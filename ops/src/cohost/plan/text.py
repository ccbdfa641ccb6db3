"""A plan as the operator reads it: flags, KV cache, memory breakdown, verdict."""

from __future__ import annotations

from collections.abc import Callable

from cohost.plan.fit import Plan
from cohost.plan.memory import Footprint
from cohost.units import MIB


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def render(plan: Plan) -> str:
    gpu = plan.gpu
    out = [
        f"GPU: {gpu.name}, {gpu.total_mib:,} MiB ({_mib(gpu.cuda_total_bytes)} MiB usable by CUDA)",
        "",
    ]
    names = [s.spec.name for s in plan.services]
    width = max(12, *(len(n) + 2 for n in names))

    def row(label: str, values: list[str]) -> str:
        return f"  {label:<34}" + "".join(f"{v:>{width}}" for v in values)

    for s in plan.services:
        fixed = f", util={s.spec.util} given" if s.spec.util is not None else ""
        out.append(
            f"  {s.spec.name}: {s.spec.serve or s.spec.model} ({s.shape.architecture}, "
            f"{s.weights} weights, KV cache {s.spec.kv_cache_dtype}{fixed})"
        )
    out.append("")
    out.append(row("", names))
    out.append(
        row("--gpu-memory-utilization", [f"{s.gpu_memory_utilization:.4f}" for s in plan.services])
    )
    out.append(
        row(
            "--kv-cache-memory-bytes",
            [
                _mib(s.footprint.kv_cache) + " MiB" if s.kv_pinned else "(profiled)"
                for s in plan.services
            ],
        )
    )
    out.append(row("--max-model-len", [str(s.max_model_len) for s in plan.services]))
    out.append(row("--max-num-seqs", [str(s.spec.max_num_seqs) for s in plan.services]))
    out.append(
        row("--max-num-batched-tokens", [str(s.spec.max_num_batched_tokens) for s in plan.services])
    )
    out.append(row("--stream-interval", [str(s.stream_interval) for s in plan.services]))
    out.append(row("KV cache tokens", [f"{s.kv_cache_tokens:,}" for s in plan.services]))
    out.append(
        row("  = full-length sequences at once", [f"{s.concurrency:.1f}" for s in plan.services])
    )
    out.append("")
    if plan.sharing == "mps":
        out.append(row("CUDA MPS (sharing)", names))
        shares = [s.mps for s in plan.services]
        out.append(row("share of the SMs", [f"{m.sm_percent}%" if m else "" for m in shares]))
        out.append(row("client priority", [m.priority if m else "" for m in shares]))
        out.append(
            row(
                "memory limit (MiB)",
                [_mib(m.memory_limit_bytes) if m else "" for m in shares],
            )
        )
    else:
        out.append("  sharing: time-slicing (the driver alternates the servers; no MPS)")
    out.append("")
    out.append(row("memory (MiB)", names))
    parts: list[tuple[str, Callable[[Footprint], int]]] = [
        ("weights", lambda f: f.weights),
        ("peak activation", lambda f: f.activation_peak),
        ("non-torch", lambda f: f.non_torch),
        ("KV cache", lambda f: f.kv_cache),
        ("= vLLM budget (util x total)", lambda f: f.budget),
        ("CUDA graphs (outside budget)", lambda f: f.cuda_graphs),
        ("sampler state (outside budget)", lambda f: f.sampler_state),
        ("CUDA context (outside budget)", lambda f: f.context),
        ("= process, as nvidia-smi shows", lambda f: f.process),
    ]
    for label, get in parts:
        out.append(row(label, [_mib(get(s.footprint)) for s in plan.services]))
    out.append("")
    server = (
        f" (with the MPS server, {_mib(plan.mps_server_bytes)} MiB)"
        if plan.mps_server_bytes
        else ""
    )
    out.append(
        f"predicted use {_mib(plan.used_bytes)} MiB of {_mib(gpu.cuda_total_bytes)} MiB{server}; "
        f"headroom kept {_mib(plan.headroom_bytes)} MiB; free {_mib(plan.free_bytes)} MiB"
    )
    for s in plan.services:
        for problem in s.problems:
            out.append(f"{s.spec.name}: {problem}")
    out.extend(plan.problems)
    if plan.fits:
        out.append("verdict: FITS (start the servers one after the other, in this order)")
    else:
        out.append(f"verdict: DOES NOT FIT (short by {_mib(plan.shortfall_bytes)} MiB)")
        if plan.suggestions:
            out.append("smallest changes that make it fit, best first:")
            for i, sug in enumerate(plan.suggestions, 1):
                target = "" if sug.service == "all" else f"{sug.service}: "
                out.append(f"  {i}. {target}{sug.change}")
        else:
            out.append(
                "no change of context, sequences, weights or KV dtype makes it fit: "
                "pick smaller models"
            )
    return "\n".join(out)
