"""The compose files' own shape, checked statically (no Docker engine here).

- docker-compose.yml and compose.local.yml against the Compose specification's JSON schema
  (check-jsonschema), and every `$` in the compose files a well-formed interpolation;
- the start order, health gates, GPU sharing (compose.mps.yml for an MPS plan), key
  handling and restart policies;
- the worker's service, and the local override that points it at the emulator.

The plan env files and what each container gets from them: test_compose_plans.py; the files
as the real Compose CLI resolves them: test_compose_cli.py; the stack running:
test_compose_up.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cohost.launch.settings import EngineSettings
from cohost.plan import envfile
from feedback.settings import WorkerSettings

from tests.deployfiles import (
    BIN,
    COMPOSE,
    CPU,
    ENGINE_DOCKERFILE,
    ENGINE_PORT,
    ENGINES,
    INTERPOLATION,
    LOCAL,
    MPS,
    ROOT,
    WORKER,
    WORKER_DOCKERFILE,
    MissingVariable,
    Tagged,
    depends_on,
    duration_s,
    environment,
    interpolate,
    load,
    parse_dockerfile,
    strings,
)

# ================================================================ schema and linters


# compose.cpu.yml and compose.mps.yml use compose's own `!reset` tag, which the schema's YAML
# reader does not know: compose itself resolves them (test_compose_cli.py).
@pytest.mark.parametrize("path", [COMPOSE, LOCAL], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_interpolations_are_well_formed() -> None:
    """Every `$` in the compose files is `$$` or a complete ${...}: anything else would be
    read by compose as a variable (a `$` in a health-check command, say)."""
    for path in (COMPOSE, LOCAL, CPU, MPS):
        for text in strings(load(path)):
            assert "$" not in INTERPOLATION.sub("", text), f"{path.name}: stray $ in {text!r}"


# ================================================================ order and health


def test_start_order_is_gated_on_health(services: dict[str, dict[str, Any]]) -> None:
    assert "depends_on" not in services["chatbot"], "the chatbot starts first"
    feedback = depends_on(services["feedback-engine"])
    assert feedback["chatbot"]["condition"] == "service_healthy"
    assert feedback["chatbot"].get("required", True) is True
    worker = depends_on(services[WORKER])
    assert worker["feedback-engine"]["condition"] == "service_healthy"
    assert worker["feedback-engine"].get("required", True) is True


@pytest.mark.parametrize("path", [COMPOSE, LOCAL, MPS], ids=lambda p: p.name)
def test_every_dependency_has_a_condition(path: Path) -> None:
    for name, service in load(path)["services"].items():
        for target, how in depends_on(service).items():
            assert isinstance(how, dict), f"{name} -> {target}"
            assert how.get("condition") in {
                "service_healthy",
                "service_completed_successfully",
                "service_started",
            }, f"{name} -> {target}"
            assert how["condition"] != "service_started", f"{name} -> {target}: not a gate"


def test_local_services_are_optional_for_the_default_stack(
    services: dict[str, dict[str, Any]],
) -> None:
    """A service that always runs may depend on a profile's service only with
    required: false; on Google Cloud the emulator and its init do not exist."""
    assert services["pubsub-emulator"]["profiles"] == ["local"]
    assert services["pubsub-init"]["profiles"] == ["local"]
    for name, service in services.items():
        if service.get("profiles"):
            continue
        for target, how in depends_on(service).items():
            if services[target].get("profiles"):
                assert how.get("required") is False, f"{name} -> {target}"
    init = services["pubsub-init"]
    assert init["command"] == ["setup"]
    assert depends_on(init)["pubsub-emulator"]["condition"] == "service_healthy"
    assert depends_on(services[WORKER])["pubsub-init"]["condition"] == (
        "service_completed_successfully"
    )
    assert init["restart"] == "no"


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_health_check(name: str, services: dict[str, dict[str, Any]]) -> None:
    service = services[name]
    check = service["healthcheck"]
    command = " ".join(check["test"])
    assert check["test"][0] == "CMD"
    assert f"http://127.0.0.1:{ENGINE_PORT}/health" in command
    assert environment(service)[envfile.prefix(ENGINES[name]) + "PORT"] == str(ENGINE_PORT)
    # Long enough for a cold start (download, load, compile): at least the time the
    # launcher lets a start hold the gate; first probes frequent so warm starts are quick.
    gate_hold = EngineSettings.model_fields["health_timeout_s"].default
    assert duration_s(check["start_period"]) >= gate_hold
    # No start_interval: Compose refuses it on Docker Engines older than 25 (20.10 here).
    assert "start_interval" not in check
    assert duration_s(check["interval"]) <= 10
    assert duration_s(check["timeout"]) < duration_s(check["interval"])
    assert check["retries"] >= 2


def test_probes_use_only_what_the_images_have(services: dict[str, dict[str, Any]]) -> None:
    engine = parse_dockerfile(ENGINE_DOCKERFILE)
    venv = engine.stage("build").env()["UV_PROJECT_ENVIRONMENT"]
    for name in ENGINES:
        assert services[name]["healthcheck"]["test"][1] == f"{venv}/bin/python"
    worker_check = services[WORKER]["healthcheck"]["test"]
    assert worker_check[1] == "python"  # the worker venv's, first on PATH
    assert "9100/metrics" in worker_check[-1]


# ================================================================ GPU, caches, gate


def test_engines_share_one_gpu_its_gate_and_the_caches(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    env = parse_dockerfile(ENGINE_DOCKERFILE).stages[-1].env()
    wanted = {
        env["COHOST_LOCK_DIR"]: "gate",
        env["HF_HOME"]: "hugging face cache",
        env["VLLM_CACHE_ROOT"]: "vLLM compile cache",
    }
    mounts: dict[str, list[str]] = {}
    devices = []
    for name in ENGINES:
        service = services[name]
        assert service["image"] == services["chatbot"]["image"], "one engine image"
        assert service["build"]["dockerfile"] == ENGINE_DOCKERFILE.relative_to(ROOT).as_posix()
        reservations = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(reservations) == 1
        assert reservations[0]["driver"] == "nvidia"
        assert "gpu" in reservations[0]["capabilities"]
        devices.append(reservations[0]["device_ids"])
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            assert source in compose["volumes"], f"{source}: a named volume"
            mounts.setdefault(target, []).append(source)
        # Room in /dev/shm for vLLM's own tensor exchange, in the engine's own namespace.
        assert "ipc" not in service
        assert parse_bytes(service["shm_size"]) >= 4 * 1024**3, "4 GiB of /dev/shm"
        assert service.get("init") is True
    assert devices[0] == devices[1], "both on the same GPU"
    assert len(devices[0]) == 1, "one GPU"
    for target, what in wanted.items():
        assert target in mounts, f"no volume for the {what} at {target}"
        assert len(mounts[target]) == 2, what
        assert len(set(mounts[target])) == 1, what
    # The gate volume has a fixed name: every compose project of this host shares it.
    gate_volume = mounts[env["COHOST_LOCK_DIR"]][0]
    assert compose["volumes"][gate_volume]["name"]


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)b?", str(text).lower())
    assert match is not None, f"not a size: {text!r}"
    number, unit = match.groups()
    return int(number) << (10 * "_kmg".index(unit or "_"))


def test_mps_override_adds_the_daemon_on_the_engines_gpu(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    """compose.mps.yml, for a plan made with --sharing mps: the GPU's MPS daemon, and both
    engines as its clients (its IPC namespace, its /dev/shm, its pipe directory)."""
    mps_file = load(MPS)
    assert set(mps_file["services"]) == {"mps", *ENGINES}, "the daemon and the engines only"
    pipe = parse_dockerfile(ENGINE_DOCKERFILE).stages[-1].env()["CUDA_MPS_PIPE_DIRECTORY"]
    mps = mps_file["services"]["mps"]
    gpu = services["chatbot"]["deploy"]["resources"]["reservations"]["devices"][0]
    daemon_gpu = mps["deploy"]["resources"]["reservations"]["devices"][0]
    assert daemon_gpu["device_ids"] == gpu["device_ids"], "the engines' GPU"
    assert mps["volumes"] == [f"mps-pipe:{pipe}"]
    assert "mps-pipe" in mps_file["volumes"]
    assert mps["ipc"] == "shareable"
    assert parse_bytes(mps["shm_size"]) >= 2 * 4 * 1024**3, "4 GiB of /dev/shm per engine"
    for name in ENGINES:
        engine = mps_file["services"][name]
        assert engine["ipc"] == "service:mps", "MPS clients share their server's /dev/shm"
        assert engine["shm_size"] == Tagged("!reset", "null"), "the daemon's /dev/shm, not its own"
        assert engine["volumes"] == [f"mps-pipe:{pipe}"]
    # The MPS server runs as its clients' uid and a client of another uid waits: the daemon
    # runs as the engines do (the image's user, no override), from the engine image.
    assert mps["image"] == services["chatbot"]["image"]
    assert mps["build"] == services["chatbot"]["build"]
    assert "user" not in mps
    for name in ENGINES:
        assert "user" not in services[name]
    assert mps["entrypoint"] == ["nvidia-cuda-mps-control", "-f"], "foreground, as PID 1's child"
    assert "nvidia-cuda-mps-control" in " ".join(mps["healthcheck"]["test"])
    assert mps["restart"] == "unless-stopped"
    assert mps["ulimits"] == services["chatbot"]["ulimits"]


def test_feedback_engine_is_not_published(services: dict[str, dict[str, Any]]) -> None:
    assert "ports" not in services["feedback-engine"]
    assert services["feedback-engine"].get("network_mode") is None
    published = services["chatbot"]["ports"]
    assert len(published) == 1
    assert interpolate(published[0], {}).endswith(f":{ENGINE_PORT}")


def test_chatbot_key_comes_from_the_environment(services: dict[str, dict[str, Any]]) -> None:
    value = environment(services["chatbot"])["CHATBOT_ENGINE_API_KEY"]
    assert re.fullmatch(r"\$\{CHATBOT_API_KEY:\?[^}]+\}", value), value
    with pytest.raises(MissingVariable, match="CHATBOT_API_KEY"):
        interpolate(value, {})
    with pytest.raises(MissingVariable):
        interpolate(value, {"CHATBOT_API_KEY": ""})
    # No key, token or password is written in any compose file.
    for path in (COMPOSE, LOCAL, CPU, MPS):
        for name, service in load(path)["services"].items():
            for key, val in environment(service).items():
                if key.endswith(("API_KEY", "TOKEN", "SECRET", "PASSWORD")):
                    assert val is None or re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", val), (
                        f"{path.name}: {name}.{key} = {val!r}"
                    )


def test_restart_policies_bring_every_crash_back(
    services: dict[str, dict[str, Any]],
) -> None:
    """on-failure:N counts failures over a container's whole life and never resets: three
    faults (a watchdog kill, an MPS fault, an out-of-memory) would leave chat down for good.
    The engines restart unless stopped; the launcher's own back-off keeps a plan that can
    never fit from looping (test_launch.py::test_refusals_in_a_row_back_off...)."""
    mps = load(MPS)["services"]["mps"]
    for name, service in {**services, "mps": mps}.items():
        if name in (*ENGINES, "mps", WORKER):
            assert service["restart"] == "unless-stopped", name
        assert service.get("restart") != "always", name
        assert not str(service.get("restart", "")).startswith("on-failure"), name
        assert "restart_policy" not in (service.get("deploy") or {}), name


# ================================================================ the worker


def test_worker_service(services: dict[str, dict[str, Any]]) -> None:
    worker = services[WORKER]
    env = environment(worker)
    assert env["FEEDBACK_LLM_BASE_URL"] == f"http://feedback-engine:{ENGINE_PORT}/v1"
    # Chat first: the worker pauses its engine while the chatbot's /load counts one.
    assert env["FEEDBACK_CHAT_METRICS_URL"] == f"http://chatbot:{ENGINE_PORT}/load"
    assert env["FEEDBACK_METRICS_PORT"] == "9100"
    assert "GOOGLE_CLOUD_PROJECT" in env
    assert "PUBSUB_EMULATOR_HOST" not in env, "the emulator only in local use"
    assert worker["build"]["dockerfile"] == WORKER_DOCKERFILE.relative_to(ROOT).as_posix()
    grace = float(
        interpolate(str(env["FEEDBACK_SHUTDOWN_GRACE_S"]), {})
        if env.get("FEEDBACK_SHUTDOWN_GRACE_S")
        else WorkerSettings.model_fields["shutdown_grace_s"].default
    )
    assert duration_s(worker["stop_grace_period"]) >= grace + 10


def test_local_override_points_the_worker_at_the_emulator(
    services: dict[str, dict[str, Any]],
) -> None:
    override = load(LOCAL)["services"]
    assert set(override) == {WORKER}
    env = environment(override[WORKER])
    emulator = services["pubsub-emulator"]
    port = re.search(r"--port=(\d+)", " ".join(emulator["command"]))
    assert port
    assert env["PUBSUB_EMULATOR_HOST"] == f"pubsub-emulator:{port.group(1)}"
    assert (
        environment(services["pubsub-init"])["PUBSUB_EMULATOR_HOST"]
        == (env["PUBSUB_EMULATOR_HOST"])
    )
    assert interpolate(env["GOOGLE_CLOUD_PROJECT"], {}) == interpolate(
        environment(services["pubsub-init"])["GOOGLE_CLOUD_PROJECT"], {}
    )
    # With the override but without the profile, compose must refuse, not run a worker
    # pointed at an emulator that is not there.
    assert depends_on(override[WORKER])["pubsub-init"]["required"] is True
