"""What the Kubernetes deployment's tests read (tests/test_k8s.py, tests/test_k8s_unit.py,
tests/test_capacity.py): deploy/k8s's overlays rendered by kubectl's kustomize, the plan each
overlay's generated/ files record, and the units' Pods, containers and environments in the
rendered objects. Helpers only; no tests here (the `overlay` and `rendered` fixtures made
with them are in tests/conftest.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cohost.plan import envfile, sharing

from tests.deployfiles import ROOT, TEST_KEY

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
CRDS = sorted((K8S / "crds").glob("*.yaml"))
CHECKOV = ROOT / "tools" / "checkov" / ".venv" / "bin" / "checkov"
ENGINE_SERVICES = ("chatbot", "feedback")


# ---------------------------------------------------------------- rendering


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed: .ci/run checks for it"
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


# ---------------------------------------------------------------- the plans


def overlay_plan(overlay: Path) -> Path:
    """The env file the overlay's generated/ files record (absolute for a re-planned copy)."""
    return ROOT / envfile.command(overlay / "generated" / "plan.yaml")[1]


def sharing_of(plan: Path) -> str:
    return envfile.sharing_of(envfile.read(plan))


def other_sharing(plan: Path) -> str:
    (other,) = set(sharing.MODES) - {sharing_of(plan)}
    return other


def overlay_sharing(overlay: Path) -> str:
    return sharing_of(overlay_plan(overlay))


# Each overlay as shipped (None), and with its plan re-planned for the other kind of sharing:
# whatever the shipped plans use, a time-slicing and an MPS unit are both checked.
def overlay_cases() -> list[Any]:
    cases = []
    for o in OVERLAYS:
        other = other_sharing(overlay_plan(o))
        cases += [
            pytest.param((o, None), id=o.name),
            pytest.param((o, other), id=f"{o.name}-{other}"),
        ]
    return cases


# ---------------------------------------------------------------- the rendered objects


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def units(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in objects(docs, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/name") == "cohost-unit"
    }


def pod_containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def gpu_shares(deployment: dict[str, Any]) -> dict[str, int]:
    """Container -> nvidia.com/gpu, for every container that requests the GPU."""
    return {
        name: int(c["resources"]["limits"]["nvidia.com/gpu"])
        for name, c in pod_containers(deployment).items()
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
    }


def volume_at(container: dict[str, Any], path: str) -> str | None:
    """The Pod volume that `path` lives in, inside `container` (its mount), if any."""
    mounts = [
        m for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]  # fmt: skip
    return max(mounts, key=lambda m: len(m["mountPath"]))["name"] if mounts else None


def env_value(container: dict[str, Any], name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def run_as_user(deployment: dict[str, Any], container: dict[str, Any]) -> int:
    pod = deployment["spec"]["template"]["spec"].get("securityContext", {})
    uid: int = container.get("securityContext", {}).get("runAsUser", pod.get("runAsUser"))
    return uid


def container_env(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """What the container starts with: envFrom ConfigMaps, then env (Secrets given the
    test key; optional Secrets left out, as when they do not exist)."""
    maps = objects(docs, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        secret = item["valueFrom"]["secretKeyRef"]
        if not secret.get("optional"):
            env[item["name"]] = TEST_KEY
    return env
