"""Fit two (or more) vLLM servers on one GPU: settings that fit, or what does not.

For each service the planner adds up what vLLM will use (`memory`), gives each
service the KV cache its concurrency needs (max_num_seqs sequences of max_model_len
tokens), keeps a headroom free, and shares what is left between the KV caches.
Services started one after the other (the launcher's order) must each find their
budget free at start, which the plan checks too.

A service with a fixed `util` is not sized: the planner predicts what vLLM will do
with it (KV cache, tokens, process memory), as for a hand-tuned setup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cohost.gpus import Gpu
from cohost.plan import memory, models, sharing
from cohost.plan.memory import Footprint
from cohost.plan.models import ModelShape
from cohost.plan.spec import DEFAULT_MAX_MODEL_LEN, PlanError, ServiceSpec
from cohost.units import MIB

DEFAULT_HEADROOM_FRACTION = 0.03


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
    mps: sharing.MpsShare | None = None  # None: time-slicing
    stream_interval: int = 1  # vLLM's --stream-interval (ServiceSpec.stream_interval_at)
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
            "mps": None
            if self.mps is None
            else {
                "active_thread_percentage": self.mps.sm_percent,
                "client_priority": self.mps.client_priority,
                "pinned_memory_limit_bytes": self.mps.memory_limit_bytes,
            },
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
    sharing: str  # one of sharing.MODES
    services: list[ServicePlan]
    headroom_bytes: int
    fits: bool
    shortfall_bytes: int
    problems: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def mps_server_bytes(self) -> int:
        """The MPS server process, once per GPU (0 under time-slicing)."""
        return sharing.server_bytes(self.sharing)

    @property
    def used_bytes(self) -> int:
        return sum(s.footprint.process for s in self.services) + self.mps_server_bytes

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
            "sharing": self.sharing,
            "mps_server_bytes": self.mps_server_bytes,
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


def max_model_len(spec: ServiceSpec, shape: ModelShape) -> int:
    """The spec's max_model_len, else the model's own limit up to DEFAULT_MAX_MODEL_LEN."""
    return spec.max_model_len or min(shape.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)


def _prepare(spec: ServiceSpec, mode: str, index: int) -> ServicePlan:
    shape = models.load(spec.model)
    weights = spec.weights or shape.weights
    if weights not in models.WEIGHT_FORMATS:
        raise PlanError(
            f"{spec.name}: weights={weights!r}; use one of {', '.join(models.WEIGHT_FORMATS)}"
        )
    max_len = max_model_len(spec, shape)
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
    sharing.check_spec(spec, mode)
    try:
        memory.kv_dtype_bytes(spec.kv_cache_dtype)
    except ValueError as exc:
        raise PlanError(f"{spec.name}: {exc}") from None
    fixed = memory.fixed_costs(
        shape,
        weights=weights,
        max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens,
        context=memory.mps_context_bytes(sharing.sm_percent(spec, index))
        if mode == "mps"
        else memory.CONTEXT_BYTES,
    )
    required = memory.kv_bytes_for(
        shape, spec.max_num_seqs, max_len, spec.max_num_batched_tokens, spec.kv_cache_dtype
    )
    return ServicePlan(
        spec, shape, weights, max_len, fixed, required,
        stream_interval=spec.stream_interval_at(index),
    )  # fmt: skip


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


def fit(
    gpu: Gpu,
    specs: Sequence[ServiceSpec],
    headroom_bytes: int | None = None,
    mode: str = sharing.DEFAULT_MODE,
) -> Plan:
    """Plan without suggestions (see `make_plan`); `mode`: how the servers share the GPU."""
    sharing.check_mode(mode)
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
    services = [_prepare(spec, mode, i) for i, spec in enumerate(specs)]
    total = gpu.cuda_total_bytes
    mps_server = sharing.server_bytes(mode)
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

    available = total - headroom - mps_server - sum(s.footprint.process for s in services)
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
            s.gpu_memory_utilization = memory.utilization(s.footprint.budget, gpu.cuda_total_bytes)
            if s.footprint.kv_cache < _one_sequence(s):
                s.fits = False

    if sized and shortfall:
        problems.append(
            f"the KV caches need {required / MIB:,.0f} MiB for the wanted concurrency; "
            f"{max(available, 0) / MIB:,.0f} MiB are left after weights, activations, CUDA "
            f"graphs, contexts{', the MPS server' if mps_server else ''} and "
            f"{headroom / MIB:,.0f} MiB headroom: short by "
            f"{shortfall / MIB:,.0f} MiB"
        )
    over = sum(s.footprint.process for s in services) + mps_server + headroom - total
    if not sized and over > 0:
        shortfall = over
        problems.append(
            f"together the servers need {over / MIB:,.0f} MiB more than the GPU has "
            f"(keeping {headroom / MIB:,.0f} MiB headroom)"
        )

    # Started in order, each server must find ceil(util * total) free at its start,
    # after the ones before it and its own CUDA context.
    started = mps_server
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

    if mode == "mps":
        # Each server's cap: its plan plus an equal share of the headroom (never more
        # than the card has left, so the caps together fit the card).
        slack = max(0, total - mps_server - sum(s.footprint.process for s in services))
        for i, s in enumerate(services):
            limit = s.footprint.process + min(headroom, slack) // len(services)
            s.mps = sharing.share(s.spec, i, limit)

    fits = not problems and all(s.fits for s in services)
    return Plan(gpu, mode, services, headroom, fits, shortfall, problems)
