"""A unit as the plan describes it: the GPU, its engines in start order, the sharing mode.

Read generically from the env file: every `<SVC>_ENGINE_MODEL` names an engine, so a plan
with other or more services needs no change here.

Under an MPS plan a unit Pod also runs the CUDA MPS control daemon of its GPU in a
container of its own (`MPS_CONTAINER`, deploy/k8s/base/unit), as compose runs its `mps`
service with compose.mps.yml: the GPU's containers are then that daemon and one per engine.
Under a time-slicing plan the unit runs no daemon (render.py deletes the container from the
base) and the GPU's containers are the engines alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cohost.plan import envfile, sharing
from cohost.plan.envfile import prefix
from cohost.units import MIB

# The unit's MPS control daemon (`nvidia-cuda-mps-control -f`), under an MPS plan only: it
# uses the GPU too, so the platform must give it the engines' GPU.
MPS_CONTAINER = "mps"


class UnitError(ValueError):
    pass


@dataclass(frozen=True)
class Engine:
    service: str  # as `cohost launch SERVICE` takes it: "chatbot", "feedback"
    process_bytes: int  # the planned process
    max_num_seqs: int
    mps: sharing.MpsShare | None  # its MPS share, when the plan shares through MPS

    @property
    def container(self) -> str:
        """The container that runs it in a unit Pod."""
        return f"{self.service}-engine"

    @property
    def cap_bytes(self) -> int:
        """GPU memory this server may hold: its MPS cap, else its planned process."""
        return self.process_bytes if self.mps is None else self.mps.memory_limit_bytes

    def describe(self) -> str:
        if self.mps is None:
            return f"planned process {self.process_bytes / MIB:,.0f} MiB"
        return f"MPS {self.mps.describe()}"


@dataclass(frozen=True)
class Unit:
    gpu_name: str
    gpu_total_bytes: int  # NVML total (the plan's card)
    sharing: sharing.Sharing
    engines: tuple[Engine, ...]  # in start order (the order of the env file)

    @property
    def runs_mps_daemon(self) -> bool:
        """Whether the Pod runs the MPS daemon (`MPS_CONTAINER`): under an MPS plan only."""
        return self.sharing == "mps"

    @property
    def gpu_containers(self) -> tuple[str, ...]:
        """Every container of the Pod that opens the GPU, in start order: the MPS daemon
        first when the plan shares through MPS, then the engines."""
        engines = tuple(e.container for e in self.engines)
        return (MPS_CONTAINER, *engines) if self.runs_mps_daemon else engines

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
    mode = envfile.sharing_of(values)
    if mode not in sharing.MODES:
        raise UnitError(f"COHOST_SHARING={mode!r}: expected one of {', '.join(sharing.MODES)}")
    engines = []
    for service in envfile.engines(values):
        p = prefix(service)
        try:
            share = envfile.mps_share(values, service)
        except ValueError as exc:
            raise UnitError(
                f"{exc}: `cohost launch` would refuse to start this server. "
                "Re-plan with `cohost plan ... --sharing mps`."
            ) from None
        engines.append(
            Engine(
                service=service,
                process_bytes=_int(values, p + "EXPECTED_PROCESS_BYTES"),
                max_num_seqs=_int(values, p + "MAX_NUM_SEQS"),
                mps=share,
            )
        )
    if not engines:
        raise UnitError("the plan names no engine (no <SERVICE>_ENGINE_MODEL)")
    return Unit(
        gpu_name=values.get("COHOST_GPU_NAME", ""),
        gpu_total_bytes=_int(values, "COHOST_GPU_TOTAL_BYTES"),
        sharing="mps" if mode == "mps" else "time-slicing",  # checked against MODES above
        engines=tuple(engines),
    )
