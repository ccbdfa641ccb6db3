"""How a platform's device plugin gives the engines of one unit one shared GPU.

Every engine container requests `nvidia.com/gpu` shares of the same physical GPU: a GPU
(or a share of one) can only be requested by one container, and two vLLM servers need two
containers. What a share is worth differs by platform (read in the plugins' sources):

- GKE (container-engine-accelerators, pkg/gpu/nvidia/manager.go `Envs`, gpusharing.go):
  with `gpu-sharing-strategy=mps` and `max-shared-clients-per-gpu=N`, a container that
  requests k shares gets CUDA_MPS_PINNED_DEVICE_MEM_LIMIT = k * total / N and
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = k * 100 / N; k > 1 is allowed only on nodes with
  one physical GPU. With `time-sharing`, one share per container and no memory limit.
  So an unequal plan (chatbot 12 GiB, feedback 10 GiB on an L4) needs N > 2: the smallest
  N where every engine's cap fits its k shares.
- NVIDIA device plugin (GPU Operator; k8s-device-plugin cmd/mps-control-daemon): MPS limits
  are the daemon's defaults, total / replicas and 100 / replicas for every client whatever
  it requested, and a client can only lower them. An unequal plan does not fit; time-slicing
  (replicas = engines, no memory limit) does, as the plan itself sizes each server.

Both share the GPU only if the Pod's containers get the same physical GPU and no other Pod
gets a share of it: the unit requests all N shares, on nodes with exactly one GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from cohost.k8s.unit import Unit, UnitError
from cohost.units import MIB

Platform = Literal["gke", "gpu-operator"]
PLATFORMS: tuple[Platform, ...] = ("gke", "gpu-operator")

# MPS serves at most 48 client contexts per device (MPS guide, Volta MPS), and GKE takes
# up to 48 for max-shared-clients-per-gpu.
MAX_CLIENTS_PER_GPU = 48

# GKE's accelerator name and the machine types that carry exactly one such GPU
# (Compute Engine GPU machine types: g2-standard-24/48/96 carry 2, 4 and 8 L4s). The first
# is the one the node-pool command suggests: g2-standard-8 has 32 GB of host memory, room
# for two vLLM servers' CPU side and the worker (requests in deploy/k8s/base/unit).
GKE_ACCELERATORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "NVIDIA L4": (
        "nvidia-l4",
        ("g2-standard-8", "g2-standard-12", "g2-standard-16", "g2-standard-32", "g2-standard-4"),
    ),
    "NVIDIA A100-SXM4-40GB": ("nvidia-tesla-a100", ("a2-highgpu-1g",)),
    "NVIDIA A100-SXM4-80GB": ("nvidia-a100-80gb", ("a2-ultragpu-1g",)),
    "NVIDIA H100 80GB HBM3": ("nvidia-h100-80gb", ("a3-highgpu-1g",)),
}


@dataclass(frozen=True)
class GpuRequest:
    platform: Platform
    strategy: str  # the platform's word for the sharing mode
    clients_per_gpu: int  # N: shares the platform cuts one GPU into
    shares: dict[str, int]  # container -> nvidia.com/gpu it requests
    node_labels: dict[str, str]  # what a node must carry (nodeSelector)
    machine_types: tuple[str, ...] = ()  # single-GPU machine types (GKE)
    # GPU memory the platform lets each container's MPS clients pin (MPS only)
    memory_limit_bytes: dict[str, int] = field(default_factory=dict)


def gke_mps_limit(shares: int, total: int, clients: int) -> int:
    """GKE's limit in bytes: k * total / N, then truncated to whole MiB (manager.go)."""
    return (shares * total // clients) // MIB * MIB


def gke(unit: Unit) -> GpuRequest:
    try:
        accelerator, machine_types = GKE_ACCELERATORS[unit.gpu_name]
    except KeyError:
        raise UnitError(
            f"GKE offers no {unit.gpu_name or 'unnamed GPU'!r}; known: "
            + ", ".join(GKE_ACCELERATORS)
        ) from None
    labels = {"cloud.google.com/gke-accelerator": accelerator}
    if unit.sharing == "time-slicing":
        clients = len(unit.engines)
        shares = {e.container: 1 for e in unit.engines}
        limits: dict[str, int] = {}
        strategy = "time-sharing"
    else:
        clients, shares = _gke_mps_shares(unit)
        limits = {
            e.container: gke_mps_limit(shares[e.container], unit.gpu_total_bytes, clients)
            for e in unit.engines
        }
        strategy = "mps"
    labels["cloud.google.com/gke-gpu-sharing-strategy"] = strategy
    labels["cloud.google.com/gke-max-shared-clients-per-gpu"] = str(clients)
    return GpuRequest("gke", strategy, clients, shares, labels, machine_types, limits)


def _gke_mps_shares(unit: Unit) -> tuple[int, dict[str, int]]:
    """The smallest N whose shares hold every engine's cap; shares left over go to the
    engine of highest MPS priority (the chatbot), which then also gets more SMs."""
    total = unit.gpu_total_bytes
    for clients in range(len(unit.engines), MAX_CLIENTS_PER_GPU + 1):
        shares: dict[str, int] = {}
        for e in unit.engines:
            k = 1
            while k <= clients and gke_mps_limit(k, total, clients) < e.cap_bytes:
                k += 1
            shares[e.container] = k
        if sum(shares.values()) <= clients:
            first = min(unit.engines, key=lambda e: e.priority)  # stable: plan order on ties
            shares[first.container] += clients - sum(shares.values())
            return clients, shares
    caps = ", ".join(f"{e.service} {e.cap_bytes // MIB:,} MiB" for e in unit.engines)
    raise UnitError(
        f"no GKE MPS split of {total // MIB:,} MiB into at most {MAX_CLIENTS_PER_GPU} "
        f"shares holds {caps}; re-plan with smaller servers"
    )


def product_label(gpu_name: str, shared: bool) -> str:
    """GPU Feature Discovery's nvidia.com/gpu.product (k8s-device-plugin internal/lm)."""
    name = "-".join(re.sub(r"[^A-Za-z0-9-_. ]", "", gpu_name).split())
    return f"{name}-SHARED" if shared else name


def gpu_operator(unit: Unit) -> GpuRequest:
    replicas = len(unit.engines)
    if unit.sharing == "mps":
        equal = unit.gpu_total_bytes // replicas // MIB * MIB
        too_big = [
            e for e in unit.engines if e.cap_bytes > equal or e.thread_percentage > 100 // replicas
        ]
        if too_big:
            names = ", ".join(
                f"{e.service} ({e.cap_bytes // MIB:,} MiB, {e.thread_percentage} %)"
                for e in too_big
            )
            raise UnitError(
                f"the NVIDIA device plugin's MPS gives each of {replicas} clients "
                f"{equal // MIB:,} MiB and {100 // replicas} % of the SMs (daemon defaults a "
                f"client can only lower); {names} need more. Use this plan on GKE, or "
                "re-plan with `cohost plan --sharing time-slicing` for this cluster."
            )
        limits = {e.container: equal for e in unit.engines}
    else:
        limits = {}
    labels = {
        # One GPU per node: the two containers' shares are then shares of the same GPU.
        "nvidia.com/gpu.count": "1",
        "nvidia.com/gpu.product": product_label(unit.gpu_name, shared=True),
        "nvidia.com/gpu.replicas": str(replicas),
        "nvidia.com/gpu.sharing-strategy": unit.sharing,
    }
    shares = {e.container: 1 for e in unit.engines}
    return GpuRequest("gpu-operator", unit.sharing, replicas, shares, labels, (), limits)


def request(unit: Unit, platform: Platform) -> GpuRequest:
    return gke(unit) if platform == "gke" else gpu_operator(unit)
