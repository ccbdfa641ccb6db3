"""When a plan does not fit: the smallest changes that make it fit, each checked by
re-planning, cheapest first (fp8 KV cache, 4-bit weights, a shorter context, fewer
sequences)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from cohost.gpus import Gpu
from cohost.plan import models, sharing
from cohost.plan.fit import Plan, Suggestion, fit, max_model_len
from cohost.plan.spec import PlanError, ServiceSpec


def make_plan(
    gpu: Gpu,
    specs: Sequence[ServiceSpec],
    headroom_bytes: int | None = None,
    mode: str = sharing.DEFAULT_MODE,
) -> Plan:
    """A plan; when it does not fit, with the smallest changes that make it fit, ranked."""
    plan = fit(gpu, specs, headroom_bytes, mode)
    if not plan.fits:
        plan.suggestions = suggest(gpu, list(specs), headroom_bytes, mode)
    return plan


def _fits(gpu: Gpu, specs: Sequence[ServiceSpec], headroom: int | None, mode: str) -> bool:
    try:
        return fit(gpu, specs, headroom, mode).fits
    except PlanError:
        return False


def _largest(lo: int, hi: int, check: Callable[[int], bool]) -> int | None:
    """Largest n in [lo, hi] with check(n), assuming it is monotone (True below a bound)."""
    if not check(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if check(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _single_changes(
    gpu: Gpu, specs: list[ServiceSpec], headroom: int | None, mode: str
) -> list[Suggestion]:
    out: list[Suggestion] = []
    for i, spec in enumerate(specs):
        if spec.util is not None:
            continue

        def with_(index: int = i, **changes: object) -> list[ServiceSpec]:
            changed = list(specs)
            changed[index] = replace(changed[index], **changes)  # type: ignore[arg-type]
            return changed

        shape = models.load(spec.model)
        if spec.kv_cache_dtype == "auto":
            cand = with_(kv_cache_dtype="fp8")
            if _fits(gpu, cand, headroom, mode):
                out.append(Suggestion(spec.name, "fp8 KV cache (kv=fp8)", 0.05, tuple(cand)))
        if (spec.weights or shape.weights) in ("bf16", "fp16"):
            cand = with_(weights="awq")
            if _fits(gpu, cand, headroom, mode):
                out.append(
                    Suggestion(
                        spec.name, "4-bit weights (an AWQ/GPTQ checkpoint)", 0.25, tuple(cand)
                    )
                )
        max_len = max_model_len(spec, shape)
        steps = max_len // 256
        best = _largest(
            1, steps - 1, lambda n: _fits(gpu, with_(max_model_len=n * 256), headroom, mode)
        )
        if best:
            new = best * 256
            out.append(
                Suggestion(
                    spec.name,
                    f"max_model_len {max_len} -> {new}",
                    1 - new / max_len,
                    tuple(with_(max_model_len=new)),
                )
            )
        seqs = _largest(
            1, spec.max_num_seqs - 1, lambda n: _fits(gpu, with_(max_num_seqs=n), headroom, mode)
        )
        if seqs:
            out.append(
                Suggestion(
                    spec.name,
                    f"max_num_seqs {spec.max_num_seqs} -> {seqs}",
                    1 - seqs / spec.max_num_seqs,
                    tuple(with_(max_num_seqs=seqs)),
                )
            )
    return sorted(out, key=lambda s: s.cost)


def suggest(
    gpu: Gpu, specs: list[ServiceSpec], headroom: int | None, mode: str
) -> list[Suggestion]:
    singles = _single_changes(gpu, specs, headroom, mode)
    if singles:
        return singles
    # No single change is enough: apply the cheapest kinds greedily, then size the rest.
    current = list(specs)
    steps: list[str] = []
    for i, spec in enumerate(current):
        if spec.util is not None:
            continue
        shape = models.load(spec.model)
        for change, field_, value in (
            ("kv=fp8", "kv_cache_dtype", "fp8"),
            ("4-bit weights", "weights", "awq"),
        ):
            if field_ == "weights" and (spec.weights or shape.weights) not in ("bf16", "fp16"):
                continue
            if field_ == "kv_cache_dtype" and spec.kv_cache_dtype != "auto":
                continue
            current[i] = replace(current[i], **{field_: value})  # type: ignore[arg-type]
            steps.append(f"{spec.name}: {change}")
            if _fits(gpu, current, headroom, mode):
                return [Suggestion("all", "; ".join(steps), 1.0, tuple(current))]
    rest = _single_changes(gpu, current, headroom, mode)
    if rest:
        best = rest[0]
        return [
            Suggestion(
                "all", "; ".join([*steps, f"{best.service}: {best.change}"]), 2.0, best.specs
            )
        ]
    return []
