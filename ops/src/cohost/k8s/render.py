"""The files a kustomize overlay includes, generated from a plan's env file.

- `plan.yaml`: ConfigMap `cohost-plan`, every key of the env file with its quotes removed
  (kustomize's configMapGenerator would keep `'NVIDIA L4'` quoted). The engines and the
  worker read it with envFrom, as compose's env_file gives them the whole file.
- `unit-gpu.yaml`: a patch for every unit Deployment: the GPU share of each container that
  opens the GPU (the engines, and the MPS daemon under an MPS plan), the node labels and
  machine types those shares need, and the plan's hash on the Pod template, so a new plan
  rolls the units. Under a time-slicing plan it also deletes the base's MPS daemon
  container (strategic merge `$patch: delete`): the unit runs no daemon.
- `chat-scaling.yaml`: the chat trigger's target per unit, from the chatbot's max_num_seqs.
- `cluster/device-plugin-config.yaml` (GPU Operator only): the device plugin's sharing
  config for the cluster admin to apply.

Each file records the command that wrote it; tests re-run it and compare.
"""

from __future__ import annotations

import hashlib
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cohost.k8s import gpu as gpus
from cohost.k8s.unit import MPS_CONTAINER, Unit, from_plan
from cohost.plan import envfile

PLAN_CONFIGMAP = "cohost-plan"
# Chat units scale when their chatbots run this fraction of max_num_seqs on average: a new
# unit takes 5-15 minutes to serve (node, image, two servers one after the other), and the
# headroom keeps requests from queueing meanwhile (bench/capacity: at the full max_num_seqs
# a ramp of chat load queues for most of an hour).
CHAT_TARGET_FRACTION = 0.75
DEVICE_PLUGIN_CONFIG = "cohost-unit"  # the key nodes select with nvidia.com/device-plugin.config


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (an embedded config) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(header: Sequence[str], *documents: Any) -> str:
    body = "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for d in documents
    )
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in header) + body


def _header(argv: Sequence[str], what: str) -> list[str]:
    return [
        f"{what} Written by:",
        f"  {shlex.join(['cohost', *argv])}",
        "Generated from the plan: re-run that command (docs/kubernetes.md), do not edit.",
    ]


def plan_configmap(values: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": PLAN_CONFIGMAP},
        "data": dict(values),
    }


def plan_hash(values: dict[str, str]) -> str:
    text = "\n".join(f"{k}={v}" for k, v in values.items())
    return hashlib.sha256(text.encode()).hexdigest()


def unit_patch(unit: Unit, request: gpus.GpuRequest, values: dict[str, str]) -> dict[str, Any]:
    def gpu(container: str) -> dict[str, Any]:
        return {
            "name": container,
            "resources": {"limits": {"nvidia.com/gpu": request.shares[container]}},
        }

    # The MPS daemon (MPS plans) and every engine but the last are native sidecars (init
    # containers that keep running), in this order: Kubernetes starts the next one only when
    # the one before has passed its startupProbe, the order compose gets from its health gates.
    *sidecars, last = unit.gpu_containers
    spec: dict[str, Any] = {"nodeSelector": dict(request.node_labels)}
    if request.machine_types:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "node.kubernetes.io/instance-type",
                                    "operator": "In",
                                    "values": list(request.machine_types),
                                }
                            ]
                        }
                    ]
                }
            }
        }
    # The base runs the daemon for an MPS plan; a time-slicing plan has no use for it, so it
    # goes, and the chatbot engine is the first container to start.
    delete = [] if unit.runs_mps_daemon else [{"name": MPS_CONTAINER, "$patch": "delete"}]
    spec["initContainers"] = [*delete, *(gpu(c) for c in sidecars)]
    spec["containers"] = [gpu(last)]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "unit"},  # the overlay's patch target picks every unit
        "spec": {
            "template": {
                "metadata": {"annotations": {"cohost.dev/plan-sha256": plan_hash(values)}},
                "spec": spec,
            }
        },
    }


def chat_scaling(unit: Unit) -> list[dict[str, Any]]:
    # A chatbot runs at most max_num_seqs requests at once; more wait in its queue. The
    # target per unit leaves headroom below that for the time a new unit takes to start.
    target = max(1, math.floor(unit.engine("chatbot").max_num_seqs * CHAT_TARGET_FRACTION))
    return [{"op": "replace", "path": "/spec/triggers/0/metadata/threshold", "value": str(target)}]


def device_plugin_config(request: gpus.GpuRequest) -> dict[str, Any]:
    # Time-slicing whatever the plan: the plugin only has to give every GPU container of the
    # unit the same GPU; an MPS plan's shares come from the unit's own daemon (gpu.py).
    config = {
        "version": "v1",
        "sharing": {
            "timeSlicing": {
                # Keep the resource name nvidia.com/gpu (GFD then adds -SHARED to the product).
                "renameByDefault": False,
                "failRequestsGreaterThanOne": True,
                "resources": [{"name": "nvidia.com/gpu", "replicas": request.clients_per_gpu}],
            }
        },
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cohost-device-plugin", "namespace": "gpu-operator"},
        "data": {DEVICE_PLUGIN_CONFIG: yaml.safe_dump(config, sort_keys=False)},
    }


def _sharing_lines(unit: Unit, request: gpus.GpuRequest) -> list[str]:
    how = (
        "the unit's own MPS daemon applies the plan's shares"
        if unit.runs_mps_daemon
        else "the engines time-slice, no MPS daemon in the unit"
    )
    lines = [
        f"{unit.gpu_name}, plan {unit.sharing}: {request.strategy}, "
        f"{request.clients_per_gpu} shares per GPU, one per container; {how}.",
    ]
    if unit.runs_mps_daemon:
        lines.append(
            f"  {MPS_CONTAINER}: {request.shares[MPS_CONTAINER]} share, the MPS control daemon"
        )
    for e in unit.engines:
        lines.append(f"  {e.container}: {request.shares[e.container]} share, {e.describe()}")
    return lines


def node_pool_command(unit: Unit, request: gpus.GpuRequest) -> str:
    accelerator = request.node_labels["cloud.google.com/gke-accelerator"]
    return shlex.join(
        [
            "gcloud", "container", "node-pools", "create", "cohost-units",
            "--cluster=CLUSTER", "--location=LOCATION",
            f"--machine-type={request.machine_types[0]}",
            f"--accelerator=type={accelerator},count=1,gpu-driver-version=latest,"
            f"gpu-sharing-strategy={request.strategy},"
            f"max-shared-clients-per-gpu={request.clients_per_gpu}",
            "--workload-metadata=GKE_METADATA",
            "--enable-autoscaling", "--min-nodes=0", "--max-nodes=MAX_UNITS",
        ]
    )  # fmt: skip


def files(plan: Path, platform: gpus.Platform, argv: Sequence[str]) -> dict[str, str]:
    """Relative path -> text, for one overlay's generated/ folder."""
    values = envfile.read(plan)
    unit = from_plan(values)
    request = gpus.request(unit, platform)
    out = {
        "plan.yaml": _dump(
            _header(argv, f"The plan {plan} as a ConfigMap."), plan_configmap(values)
        ),
    }
    gpu_header = _header(argv, "GPU shares and node placement of a unit.") + _sharing_lines(
        unit, request
    )
    if platform == "gke":
        gpu_header += ["The node pool these shares need:", f"  {node_pool_command(unit, request)}"]
    out["unit-gpu.yaml"] = _dump(gpu_header, unit_patch(unit, request, values))
    out["chat-scaling.yaml"] = _dump(
        _header(argv, "The chat units' scaling target (JSON patch)."), chat_scaling(unit)
    )
    if platform == "gpu-operator":
        out["cluster/device-plugin-config.yaml"] = _dump(
            [
                *_header(argv, "For the cluster admin: the NVIDIA device plugin's sharing config."),
                "kubectl apply -f this file; then",
                "  kubectl patch clusterpolicies.nvidia.com/cluster-policy --type merge -p "
                """'{"spec":{"devicePlugin":{"config":{"name":"cohost-device-plugin"}}}}'""",
                f"  kubectl label node NODE nvidia.com/device-plugin.config={DEVICE_PLUGIN_CONFIG}",
            ],
            device_plugin_config(request),
        )
    return out


def write(plan: Path, platform: gpus.Platform, directory: Path, argv: Sequence[str]) -> list[Path]:
    written = []
    for name, text in files(plan, platform, argv).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
