"""Fixtures that start the real parts: the Pub/Sub emulator, CPU vLLM servers, workers.

Nothing here is mocked. The emulator and one engine are started once per session;
each test gets its own Pub/Sub project (so topics never leak between tests) and its
own worker processes.

The compose file as read (`compose`, `services`) is here too, because the static compose
tests of more than one module (test_compose.py, test_compose_plans.py) read it; and so is
each Kubernetes overlay as rendered (`overlay`, `rendered`), which the manifests' tests
(test_k8s.py) and the unit Pod's (test_k8s_unit.py) both check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cohost import emulator
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.plan import envfile
from cohost.processes import feedback_setup, free_port

from harness.engine import TEST_MODEL, CpuServer
from harness.launcher import l4_chatbot_env
from harness.pubsub import Project
from tests.deployfiles import BIN, COMPOSE, ROOT, load, replan
from tests.k8sfiles import K8S, kustomize, overlay_cases, overlay_plan


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def emulator_host(logs: Path) -> Iterator[str]:
    port = free_port()
    child = emulator.emulator_child("127.0.0.1", port, log_path=logs / "emulator.log").start()
    try:
        emulator.wait_until_started(child)
        yield f"127.0.0.1:{port}"
    finally:
        child.stop()


@pytest.fixture(scope="session")
def engine(logs: Path) -> Iterator[CpuServer]:
    ensure_engine(log=lambda line: print(line, file=sys.stderr))
    model = ensure_model(TEST_MODEL, log=lambda line: print(line, file=sys.stderr))
    server = CpuServer(model, free_port(), logs / "engine.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def project(emulator_host: str, logs: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    project_id = f"test-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, PUBSUB_EMULATOR_HOST=emulator_host, GOOGLE_CLOUD_PROJECT=project_id)
    # The test process talks to the emulator too (publishing, collecting).
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", project_id)
    feedback_setup(env)
    return Project(emulator_host, project_id, logs, env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as written (not interpolated); each module reads its own."""
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


# Session-scoped: both Kubernetes test modules read the same overlays, built once per case.
@pytest.fixture(scope="session", params=overlay_cases())
def overlay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The overlay's folder: the shipped one, or a copy of deploy/k8s whose overlay has
    generated/ written by the command it records from the re-planned env file."""
    shipped: Path
    mode: str | None
    shipped, mode = request.param
    if mode is None:
        return shipped
    root = tmp_path_factory.mktemp(f"{shipped.name}-{mode}")
    shutil.copytree(K8S, root / "k8s")
    copy = root / "k8s" / "overlays" / shipped.name
    plan = replan(overlay_plan(shipped), mode, root / f"{mode}.env")
    argv = envfile.command(shipped / "generated" / "plan.yaml")
    assert argv[0] == "k8s", argv
    argv[1] = str(plan)
    argv[argv.index("--write") + 1] = str(copy / "generated")
    shutil.rmtree(copy / "generated")
    result = subprocess.run(
        [BIN / "cohost", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return copy


@pytest.fixture(scope="session")
def rendered(overlay: Path) -> list[dict[str, Any]]:
    return kustomize(overlay)


@pytest.fixture
def gpu_env(tmp_path: Path) -> dict[str, str]:
    """A chatbot's plan on an L4 (NVML faked): the launcher tests' starting point
    (test_launch.py, test_launch_mps.py)."""
    return l4_chatbot_env(tmp_path)
