"""The plan env files, and what compose gives each container from them (no Docker engine).

- every env file in deploy/ (the CPU plan's included) against a fresh run of the `cohost
  plan` command it records, and read the same by a shell as by compose and the launcher;
- the launcher and the worker fed exactly what compose would give their containers;
- nothing in the compose files overriding a planned variable.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cohost import gpus
from cohost.launch.mps import NO_MPS_PIPE
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
    ENGINE_PORT,
    ENGINES,
    ENV_FILES,
    LOCAL,
    MPS,
    PROFILES,
    ROOT,
    TEST_KEY,
    WORKER,
    MissingVariable,
    container_env,
    env_files,
    environment,
    load,
    mps_plan,
    shell_for,
)

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


def test_replan_command_plans_the_same_services_again(tmp_path: Path) -> None:
    """envfile.replan_command, what the tests and the GPU benches re-plan with: the shipped
    plan's services, another sharing, a feedback option added, the file where it is asked."""
    shipped = ROOT / "deploy" / "l4.env"
    out = tmp_path / "l4-mps-sm50.env"
    argv = envfile.replan_command(shipped, out, sharing_mode="mps", feedback="sm=50")
    result = subprocess.run(
        [BIN / "cohost", *argv], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    values, before = envfile.read(out), envfile.read(shipped)
    assert envfile.sharing_of(values) == "mps"
    share = envfile.mps_share(values, "feedback")
    assert share is not None
    assert share.sm_percent == 50
    for key in ("CHATBOT_ENGINE_MODEL", "FEEDBACK_ENGINE_MODEL", "FEEDBACK_MAX_IN_FLIGHT"):
        assert values[key] == before[key]
    assert envfile.command(out) == argv
    assert envfile.replan_command(out, out) == argv  # nothing asked: the same command
    bad = tmp_path / "bad.env"
    bad.write_text("# cohost x\n#   cohost launch chatbot\n")
    with pytest.raises(ValueError, match="not `cohost plan`"):
        envfile.replan_command(bad, out)


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


# ================================================================ the CPU plan


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


# ================================================================ what each container gets


@pytest.mark.parametrize("sharing", ["shipped", "mps"])
@pytest.mark.parametrize("profile", PROFILES)
def test_launcher_starts_both_servers_from_the_compose_environment(
    profile: str, sharing: str, services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """`cohost launch` run with exactly what compose gives each engine container, on the
    planned card (NVML faked): the chatbot on an empty GPU, then the feedback server in
    what the chatbot leaves. Both pass the preflight and exec vLLM with the plan's flags:
    the shipped plan time-sliced, out of MPS; the same plan made for MPS (compose.mps.yml,
    its daemon listening) with each server's share."""
    shell = shell_for(profile)
    plan = envfile.read(ROOT / "deploy" / f"{profile}.env")
    if sharing == "mps":
        plan = envfile.read(mps_plan(profile, tmp_path / f"{profile}-mps.env"))
    daemon = FakeMpsDaemon(tmp_path / "mps")
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    free = total - gpus.DEFAULT_RESERVED
    for compose_name, service in ENGINES.items():
        # compose's `environment` sets no planned key (test_engine_settings_are_not_hand...),
        # so the MPS plan's values over the shipped one's are what its env file would give.
        env = {**container_env(services[compose_name], shell), **plan}
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
        mps_env = started["mps"]
        if sharing == "shipped":
            # Time-sliced: kept out of MPS even with a daemon listening.
            assert plan["COHOST_SHARING"] == "time-slicing"
            assert mps_env == {"CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE}
            free -= int(plan[p + "EXPECTED_PROCESS_BYTES"])
            continue
        # The plan's MPS share, as CUDA reads it when vLLM starts.
        assert plan["COHOST_SHARING"] == "mps"
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
    # Chat first: preemption on, reading the chatbot's /load (docs/sharing.md).
    assert settings.chat_metrics_url == f"http://chatbot:{ENGINE_PORT}/load"
    assert settings.preempting()
    assert settings.metrics_port == 9100
    # Production: no emulator, the project comes from GOOGLE_CLOUD_PROJECT.
    assert settings.pubsub_emulator_host is None


def test_engine_settings_are_not_hand_tuned(services: dict[str, dict[str, Any]]) -> None:
    """Nothing in the compose files overrides a planned variable."""
    planned: set[str] = set()
    for path in ENV_FILES:
        planned |= envfile.read(path).keys()
    fields = {name.upper() for name in EngineSettings.model_fields}
    for path in (COMPOSE, LOCAL, CPU, MPS):
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
