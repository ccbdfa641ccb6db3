"""How a platform's device plugin gives every GPU container of a unit the same GPU.

A unit shares its GPU the way the plan says, exactly as compose does. Under time-slicing
(the shipped plans) the engines are plain CUDA processes: the driver switches between them
and the feedback worker keeps chat first by preempting its own engine calls while chat has
requests (docs/sharing.md). Under MPS the Pod runs its own CUDA MPS control daemon
(unit.MPS_CONTAINER) and each engine's `cohost launch` gives vLLM the plan's share of the
SMs, priority and memory cap (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, CUDA_MPS_CLIENT_PRIORITY,
CUDA_MPS_PINNED_DEVICE_MEM_LIMIT). Those are unequal and overlapping (chatbot 100 % of the
SMs at normal priority, feedback 30 % at low priority, each with its own cap): thread
percentages are limits, not reservations. Either way all the platform has to do is let
every GPU container (both engines, and the daemon under MPS) open one and the same GPU, and
nothing more. What each platform's own MPS would do instead (read in the plugins' sources):

- GKE (container-engine-accelerators, pkg/gpu/nvidia/manager.go `Envs`): with
  `gpu-sharing-strategy=mps` a container requesting k of N shares gets
  CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = k * 100 / N *and* a memory limit of k * total / N,
  coupled; a client can only lower them. The L4 plan's memory split needs N = 7, which
  would leave the chatbot 4/7 = 57 % of the SMs: a configuration nobody measured.
- NVIDIA device plugin (GPU Operator; k8s-device-plugin cmd/mps-control-daemon): the
  daemon's defaults give every client total / replicas and 100 / replicas %: equal halves,
  which the L4 plan's chatbot does not fit.

Time-slicing on both does exactly what the unit needs: one share per container, no
environment, no limits (GKE `Envs` returns nothing for time-sharing; the NVIDIA plugin's
timeSlicing only advertises replicas). Under an MPS plan the unit's MPS server is then the
one CUDA process that holds a context on the GPU, and the plan's shares and caps apply as
measured. The unit requests all N shares (N = its GPU containers: 2 under time-slicing, 3
under MPS), on nodes with exactly one GPU, so that every share is of the same GPU and no
other Pod gets one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cohost.k8s.unit import Unit, UnitError

Platform = Literal["gke", "gpu-operator"]
PLATFORMS: tuple[Platform, ...] = ("gke", "gpu-operator")

# GKE takes at most 48 for max-shared-clients-per-gpu (and MPS serves at most 48 client
# contexts per device: MPS guide, Volta MPS).
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
    strategy: str  # the platform's word for its sharing mode (always time-slicing)
    clients_per_gpu: int  # N: shares the platform cuts one GPU into, one per GPU container
    shares: dict[str, int]  # container -> nvidia.com/gpu it requests
    node_labels: dict[str, str]  # what a node must carry (nodeSelector)
    machine_types: tuple[str, ...] = ()  # single-GPU machine types (GKE)


def _one_share_each(unit: Unit) -> tuple[int, dict[str, int]]:
    containers = unit.gpu_containers
    if len(containers) > MAX_CLIENTS_PER_GPU:
        raise UnitError(
            f"{len(containers)} GPU containers ({', '.join(containers)}) exceed the "
            f"{MAX_CLIENTS_PER_GPU} clients a GPU can be shared by"
        )
    return len(containers), dict.fromkeys(containers, 1)


def gke(unit: Unit) -> GpuRequest:
    try:
        accelerator, machine_types = GKE_ACCELERATORS[unit.gpu_name]
    except KeyError:
        raise UnitError(
            f"GKE offers no {unit.gpu_name or 'unnamed GPU'!r}; known: "
            + ", ".join(GKE_ACCELERATORS)
        ) from None
    clients, shares = _one_share_each(unit)
    strategy = "time-sharing"
    labels = {
        "cloud.google.com/gke-accelerator": accelerator,
        "cloud.google.com/gke-gpu-sharing-strategy": strategy,
        "cloud.google.com/gke-max-shared-clients-per-gpu": str(clients),
    }
    return GpuRequest(strategy, clients, shares, labels, machine_types)


def product_label(gpu_name: str, shared: bool) -> str:
    """GPU Feature Discovery's nvidia.com/gpu.product (k8s-device-plugin internal/lm)."""
    name = "-".join(re.sub(r"[^A-Za-z0-9-_. ]", "", gpu_name).split())
    return f"{name}-SHARED" if shared else name


def gpu_operator(unit: Unit) -> GpuRequest:
    clients, shares = _one_share_each(unit)
    strategy = "time-slicing"
    labels = {
        # One GPU per node: the containers' shares are then shares of the same GPU.
        "nvidia.com/gpu.count": "1",
        "nvidia.com/gpu.product": product_label(unit.gpu_name, shared=True),
        "nvidia.com/gpu.replicas": str(clients),
        "nvidia.com/gpu.sharing-strategy": strategy,
    }
    return GpuRequest(strategy, clients, shares, labels)


def request(unit: Unit, platform: Platform) -> GpuRequest:
    return gke(unit) if platform == "gke" else gpu_operator(unit)
