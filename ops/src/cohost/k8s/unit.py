"""A unit as the plan describes it: the GPU, its engines in start order, the sharing mode.

Read generically from the env file: every `<SVC>_ENGINE_MODEL` names an engine, so a plan
with other or more services needs no change here.

Besides its engines, a unit Pod runs the CUDA MPS control daemon of its GPU in a container
of its own (`MPS_CONTAINER`, deploy/k8s/base/unit), as compose runs its `mps` service: the
GPU's containers are that daemon and one per engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from cohost.plan.envfile import prefix

Sharing = Literal["mps", "time-slicing"]
SHARING_MODES: tuple[Sharing, ...] = ("mps", "time-slicing")
# Plans written before `cohost plan --sharing` existed carry no COHOST_SHARING; their
# launcher starts plain CUDA processes, which time-slice the GPU.
DEFAULT_SHARING: Sharing = "time-slicing"

_ENGINE_MODEL = re.compile(r"^(?P<svc>[A-Z][A-Z0-9_]*)_ENGINE_MODEL$")
# The unit's MPS control daemon (`nvidia-cuda-mps-control -f`): it uses the GPU too, so the
# platform must give it the engines' GPU. It is rendered for every plan; under time-slicing
# `cohost launch` keeps vLLM out of it and the idle daemon holds no GPU memory.
MPS_CONTAINER = "mps"
# What an MPS plan gives each engine (`cohost launch` refuses to start without them).
MPS_KEYS = ("MPS_ACTIVE_THREAD_PERCENTAGE", "MPS_CLIENT_PRIORITY", "MPS_PINNED_MEMORY_BYTES")


class UnitError(ValueError):
    pass


@dataclass(frozen=True)
class Engine:
    service: str  # as `cohost launch SERVICE` takes it: "chatbot", "feedback"
    cap_bytes: int  # GPU memory this server may hold: its MPS cap, else its planned process
    max_num_seqs: int
    thread_percentage: int  # MPS active thread percentage asked for (100 when not planned)
    priority: int  # MPS client priority (0 normal, 1 below normal)

    @property
    def container(self) -> str:
        """The container that runs it in a unit Pod."""
        return f"{self.service}-engine"


@dataclass(frozen=True)
class Unit:
    gpu_name: str
    gpu_total_bytes: int  # NVML total (the plan's card)
    sharing: Sharing
    engines: tuple[Engine, ...]  # in start order (the order of the env file)

    @property
    def gpu_containers(self) -> tuple[str, ...]:
        """Every container of the Pod that opens the GPU, in start order: the daemon first."""
        return (MPS_CONTAINER, *(e.container for e in self.engines))

    def engine(self, service: str) -> Engine:
        for e in self.engines:
            if e.service == service:
                return e
        raise UnitError(f"the plan has no {service!r} engine")


def _int(values: Mapping[str, str], key: str) -> int:
    try:
        return int(values[key])
    except KeyError:
        raise UnitError(f"the plan lacks {key}") from None
    except ValueError:
        raise UnitError(f"{key}={values[key]!r} is not an integer") from None


def from_plan(values: Mapping[str, str]) -> Unit:
    """The unit a plan env file describes (values as `cohost.plan.envfile.read` returns)."""
    sharing = values.get("COHOST_SHARING", DEFAULT_SHARING)
    if sharing not in SHARING_MODES:
        raise UnitError(f"COHOST_SHARING={sharing!r}: expected one of {', '.join(SHARING_MODES)}")
    engines = []
    for key in values:  # dicts keep the file's order: the start order
        match = _ENGINE_MODEL.match(key)
        if not match:
            continue
        service = match.group("svc").lower().replace("_", "-")
        p = prefix(service)
        missing = [p + k for k in MPS_KEYS if p + k not in values]
        if sharing == "mps" and missing:
            raise UnitError(
                f"COHOST_SHARING=mps, but the plan lacks {', '.join(missing)}: `cohost launch` "
                "would refuse to start this server. Re-plan with `cohost plan ... --sharing mps`."
            )
        cap_key = p + "MPS_PINNED_MEMORY_BYTES"
        engines.append(
            Engine(
                service=service,
                cap_bytes=_int(
                    values, cap_key if cap_key in values else p + "EXPECTED_PROCESS_BYTES"
                ),
                max_num_seqs=_int(values, p + "MAX_NUM_SEQS"),
                thread_percentage=int(values.get(p + "MPS_ACTIVE_THREAD_PERCENTAGE", "100")),
                priority=int(values.get(p + "MPS_CLIENT_PRIORITY", "0")),
            )
        )
    if not engines:
        raise UnitError("the plan names no engine (no <SERVICE>_ENGINE_MODEL)")
    return Unit(
        gpu_name=values.get("COHOST_GPU_NAME", ""),
        gpu_total_bytes=_int(values, "COHOST_GPU_TOTAL_BYTES"),
        sharing=sharing,  # checked against SHARING_MODES above
        engines=tuple(engines),
    )
