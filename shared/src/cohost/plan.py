"""Fit two (or more) vLLM servers on one GPU: settings that fit, or what to change.

For each service the planner adds up what vLLM will use (cohost.memory), gives
each service the KV cache its concurrency needs (max_num_seqs sequences of
max_model_len tokens), keeps a headroom free, and shares what is left between
the KV caches. Services started one after the other (the launcher's order) must
each find their budget free at start, which the plan checks too.

A service with a fixed `util` is not sized: the planner predicts what vLLM will do
with it (KV cache, tokens, process memory), as for a hand-tuned setup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from cohost import memory, models
from cohost.gpus import Gpu
from cohost.memory import MIB, Footprint
from cohost.models import ModelShape

DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_BATCHED_TOKENS = 2048
DEFAULT_HEADROOM_FRACTION = 0.03


class PlanError(ValueError):
    """Input the planner cannot work with (the message says what to change)."""


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    model: str
    max_model_len: int | None = None
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS
    util: float | None = None
    weights: str | None = None
    kv_cache_dtype: str = "auto"
    serve: str | None = None  # what vLLM loads (HF id or path); default: model

    @classmethod
    def parse(cls, text: str) -> ServiceSpec:
        """NAME=MODEL[,max_model_len=N][,max_num_seqs=N][,util=F][,weights=W][,kv=fp8]..."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise PlanError(f"--service {text!r}: expected NAME=MODEL[,key=value...]")
        model, *options = rest.split(",")
        values: dict[str, str] = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or not value:
                raise PlanError(f"--service {name}: {option!r} is not key=value")
            values[key.strip()] = value.strip()
        fields: dict[str, object] = {"name": name.strip(), "model": model.strip()}
        ints = {
            "max_model_len": "max_model_len",
            "max_num_seqs": "max_num_seqs",
            "max_num_batched_tokens": "max_num_batched_tokens",
            "batched_tokens": "max_num_batched_tokens",
        }
        for key, value in values.items():
            try:
                if key in ints:
                    fields[ints[key]] = int(value)
                elif key == "util":
                    fields["util"] = float(value)
                elif key == "weights":
                    fields["weights"] = value
                elif key in ("kv", "kv_cache_dtype"):
                    fields["kv_cache_dtype"] = value
                elif key == "serve":
                    fields["serve"] = value
                else:
                    raise PlanError(
                        f"--service {name}: unknown key {key!r} (max_model_len, max_num_seqs, "
                        "util, weights, kv, batched_tokens, serve)"
                    )
            except ValueError as exc:
                if isinstance(exc, PlanError):
                    raise
                raise PlanError(f"--service {name}: {key}={value!r} is not a number") from None
        return cls(**fields)  # type: ignore[arg-type]

    def describe(self) -> str:
        parts = [f"{self.name}={self.model}"]
        if self.max_model_len:
            parts.append(f"max_model_len={self.max_model_len}")
        parts.append(f"max_num_seqs={self.max_num_seqs}")
        if self.max_num_batched_tokens != DEFAULT_BATCHED_TOKENS:
            parts.append(f"batched_tokens={self.max_num_batched_tokens}")
        if self.util is not None:
            parts.append(f"util={self.util}")
        if self.weights:
            parts.append(f"weights={self.weights}")
        if self.kv_cache_dtype != "auto":
            parts.append(f"kv={self.kv_cache_dtype}")
        if self.serve:
            parts.append(f"serve={self.serve}")
        return ",".join(parts)


@dataclass
class ServicePlan:
    spec: ServiceSpec
    shape: ModelShape
    weights: str
    max_model_len: int
    footprint: Footprint
    kv_required_bytes: int  # max_num_seqs sequences of max_model_len tokens
    gpu_memory_utilization: float = 0.0
    kv_pinned: bool = True
    fits: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def kv_cache_tokens(self) -> int:
        return memory.kv_tokens(
            self.shape,
            self.footprint.kv_cache,
            self.max_model_len,
            self.spec.max_num_batched_tokens,
            self.spec.kv_cache_dtype,
        )

    @property
    def concurrency(self) -> float:
        """Sequences of max_model_len the KV cache holds at once."""
        return self.kv_cache_tokens / self.max_model_len

    def to_json(self) -> dict[str, object]:
        fp = self.footprint
        return {
            "name": self.spec.name,
            "model": self.spec.model,
            "serve": self.spec.serve or self.spec.model,
            "architecture": self.shape.architecture,
            "weights": self.weights,
            "kv_cache_dtype": self.spec.kv_cache_dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_memory_bytes": fp.kv_cache,
            "kv_cache_pinned": self.kv_pinned,
            "kv_cache_tokens": self.kv_cache_tokens,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.spec.max_num_seqs,
            "max_num_batched_tokens": self.spec.max_num_batched_tokens,
            "weights_bytes": fp.weights,
            "activation_peak_bytes": fp.activation_peak,
            "cuda_graph_bytes": fp.cuda_graphs,
            "non_torch_bytes": fp.non_torch,
            "sampler_state_bytes": fp.sampler_state,
            "cuda_context_bytes": fp.context,
            "budget_bytes": fp.budget,
            "process_bytes": fp.process,
            "fits": self.fits,
            "problems": self.problems,
        }


@dataclass(frozen=True)
class Suggestion:
    service: str
    change: str
    cost: float  # how much the user gives up; suggestions are ranked by it
    specs: tuple[ServiceSpec, ...]


@dataclass
class Plan:
    gpu: Gpu
    services: list[ServicePlan]
    headroom_bytes: int
    fits: bool
    shortfall_bytes: int
    problems: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(s.footprint.process for s in self.services)

    @property
    def free_bytes(self) -> int:
        return self.gpu.cuda_total_bytes - self.used_bytes

    def to_json(self) -> dict[str, object]:
        return {
            "gpu": {
                "name": self.gpu.name,
                "total_bytes": self.gpu.total_bytes,
                "cuda_total_bytes": self.gpu.cuda_total_bytes,
                "headroom_bytes": self.headroom_bytes,
                "planned_use_bytes": self.used_bytes,
                "free_bytes": self.free_bytes,
            },
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes,
            "problems": self.problems,
            "services": [s.to_json() for s in self.services],
            "suggestions": [
                {
                    "service": s.service,
                    "change": s.change,
                    "services": [x.describe() for x in s.specs],
                }
                for s in self.suggestions
            ],
        }


def _prepare(spec: ServiceSpec) -> ServicePlan:
    shape = models.load(spec.model)
    weights = spec.weights or shape.weights
    if weights not in models.WEIGHT_FORMATS:
        raise PlanError(
            f"{spec.name}: weights={weights!r}; use one of {', '.join(models.WEIGHT_FORMATS)}"
        )
    max_len = spec.max_model_len or min(shape.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if max_len < 16:
        raise PlanError(f"{spec.name}: max_model_len {max_len} is too small")
    if max_len > shape.max_position_embeddings:
        raise PlanError(
            f"{spec.name}: max_model_len {max_len} is longer than the model supports "
            f"(max_position_embeddings={shape.max_position_embeddings} in {shape.source}); "
            "vLLM would refuse to start"
        )
    if spec.max_num_seqs < 1:
        raise PlanError(f"{spec.name}: max_num_seqs must be >= 1")
    if spec.max_num_batched_tokens < spec.max_num_seqs:
        raise PlanError(
            f"{spec.name}: batched_tokens ({spec.max_num_batched_tokens}) must be >= "
            f"max_num_seqs ({spec.max_num_seqs}), as vLLM requires"
        )
    if spec.util is not None and not 0 < spec.util <= 1:
        raise PlanError(f"{spec.name}: util={spec.util} must be in (0, 1]")
    try:
        memory.kv_dtype_bytes(spec.kv_cache_dtype)
    except ValueError as exc:
        raise PlanError(f"{spec.name}: {exc}") from None
    fixed = memory.fixed_costs(
        shape,
        weights=weights,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
    )
    required = memory.kv_bytes_for(
        shape, spec.max_num_seqs, max_len, spec.max_num_batched_tokens, spec.kv_cache_dtype
    )
    return ServicePlan(spec, shape, weights, max_len, fixed, required)


def _util(budget: int, gpu: Gpu) -> float:
    # vLLM requests ceil(util * total); round up so that covers the budget.
    return math.ceil(budget / gpu.cuda_total_bytes * 10_000) / 10_000


def _whole_blocks(service: ServicePlan, kv_bytes: int) -> int:
    per_block = memory.kv_bytes_per_block(service.shape, service.spec.kv_cache_dtype)
    return max(0, kv_bytes // per_block * per_block)


def _one_sequence(service: ServicePlan) -> int:
    return memory.kv_bytes_for(
        service.shape,
        1,
        service.max_model_len,
        service.spec.max_num_batched_tokens,
        service.spec.kv_cache_dtype,
    )


def fit(gpu: Gpu, specs: Sequence[ServiceSpec], headroom_bytes: int | None = None) -> Plan:
    """Plan without suggestions (see `make_plan`)."""
    if not specs:
        raise PlanError("name at least one --service")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PlanError(f"service names must differ: {names}")
    headroom = (
        round(gpu.cuda_total_bytes * DEFAULT_HEADROOM_FRACTION)
        if headroom_bytes is None
        else headroom_bytes
    )
    services = [_prepare(spec) for spec in specs]
    total = gpu.cuda_total_bytes
    problems: list[str] = []

    fixed_util = [s for s in services if s.spec.util is not None]
    sized = [s for s in services if s.spec.util is None]
    for s in fixed_util:
        assert s.spec.util is not None
        budget = math.ceil(s.spec.util * total)
        fp = s.footprint
        kv = _whole_blocks(s, budget - fp.weights - fp.activation_peak - fp.non_torch)
        s.footprint = replace(fp, kv_cache=kv)
        s.gpu_memory_utilization = s.spec.util
        s.kv_pinned = False
        if kv < _one_sequence(s):
            s.fits = False
            s.problems.append(
                f"util={s.spec.util} leaves {max(kv, 0) / MIB:,.0f} MiB for the KV cache; one "
                f"{s.max_model_len}-token sequence needs {_one_sequence(s) / MIB:,.0f} MiB "
                "(vLLM: 'To serve at least one request with the model's max seq len ...')"
            )

    available = total - headroom - sum(s.footprint.process for s in services)
    required = sum(s.kv_required_bytes for s in sized)
    shortfall = max(0, required - available)
    if sized:
        if available >= required:
            extra = available - required
            for s in sized:
                share = extra * s.kv_required_bytes // required
                s.footprint = replace(
                    s.footprint, kv_cache=_whole_blocks(s, s.kv_required_bytes + share)
                )
        else:
            # Not enough: show what each would get, scaled down, for the report.
            for s in sized:
                scaled = max(0, available) * s.kv_required_bytes // max(required, 1)
                s.footprint = replace(s.footprint, kv_cache=_whole_blocks(s, scaled))
                s.fits = False
        for s in sized:
            s.gpu_memory_utilization = _util(s.footprint.budget, gpu)
            if s.footprint.kv_cache < _one_sequence(s):
                s.fits = False

    if sized and shortfall:
        problems.append(
            f"the KV caches need {required / MIB:,.0f} MiB for the wanted concurrency; "
            f"{max(available, 0) / MIB:,.0f} MiB are left after weights, activations, CUDA "
            f"graphs, contexts and {headroom / MIB:,.0f} MiB headroom: short by "
            f"{shortfall / MIB:,.0f} MiB"
        )
    over = sum(s.footprint.process for s in services) + headroom - total
    if not sized and over > 0:
        shortfall = over
        problems.append(
            f"together the servers need {over / MIB:,.0f} MiB more than the GPU has "
            f"(keeping {headroom / MIB:,.0f} MiB headroom)"
        )

    # Started in order, each server must find ceil(util * total) free at its start,
    # after the ones before it and its own CUDA context.
    started = 0
    for s in services:
        needed = math.ceil(s.gpu_memory_utilization * total)
        free = total - started - s.footprint.context
        if needed > free:
            s.fits = False
            s.problems.append(
                f"at its start {free / MIB:,.0f} MiB are free but vLLM wants "
                f"{needed / MIB:,.0f} MiB (util {s.gpu_memory_utilization})"
            )
        started += s.footprint.process

    fits = not problems and all(s.fits for s in services)
    return Plan(gpu, services, headroom, fits, shortfall, problems)


def make_plan(gpu: Gpu, specs: Sequence[ServiceSpec], headroom_bytes: int | None = None) -> Plan:
    """A plan; when it does not fit, with the smallest changes that make it fit, ranked."""
    plan = fit(gpu, specs, headroom_bytes)
    if not plan.fits:
        plan.suggestions = suggest(gpu, list(specs), headroom_bytes)
    return plan


def _fits(gpu: Gpu, specs: Sequence[ServiceSpec], headroom: int | None) -> bool:
    try:
        return fit(gpu, specs, headroom).fits
    except PlanError:
        return False


def _largest(lo: int, hi: int, ok: object) -> int | None:
    """Largest n in [lo, hi] with ok(n), assuming ok is monotone (True below a bound)."""
    check = ok  # for mypy: a callable
    assert callable(check)
    if not check(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if check(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _single_changes(gpu: Gpu, specs: list[ServiceSpec], headroom: int | None) -> list[Suggestion]:
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
            if _fits(gpu, cand, headroom):
                out.append(Suggestion(spec.name, "fp8 KV cache (kv=fp8)", 0.05, tuple(cand)))
        if (spec.weights or shape.weights) in ("bf16", "fp16"):
            cand = with_(weights="awq")
            if _fits(gpu, cand, headroom):
                out.append(
                    Suggestion(
                        spec.name, "4-bit weights (an AWQ/GPTQ checkpoint)", 0.25, tuple(cand)
                    )
                )
        max_len = spec.max_model_len or min(shape.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        steps = max_len // 256
        best = _largest(1, steps - 1, lambda n: _fits(gpu, with_(max_model_len=n * 256), headroom))
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
            1, spec.max_num_seqs - 1, lambda n: _fits(gpu, with_(max_num_seqs=n), headroom)
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


def suggest(gpu: Gpu, specs: list[ServiceSpec], headroom: int | None) -> list[Suggestion]:
    singles = _single_changes(gpu, specs, headroom)
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
            if _fits(gpu, current, headroom):
                return [Suggestion("all", "; ".join(steps), 1.0, tuple(current))]
    rest = _single_changes(gpu, current, headroom)
    if rest:
        best = rest[0]
        return [
            Suggestion(
                "all", "; ".join([*steps, f"{best.service}: {best.change}"]), 2.0, best.specs
            )
        ]
    return []


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def render_text(plan: Plan) -> str:
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
    out.append(row("KV cache tokens", [f"{s.kv_cache_tokens:,}" for s in plan.services]))
    out.append(
        row("  = full-length sequences at once", [f"{s.concurrency:.1f}" for s in plan.services])
    )
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
    out.append(
        f"predicted use {_mib(plan.used_bytes)} MiB of {_mib(gpu.cuda_total_bytes)} MiB; "
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
