"""What runs inside a unit's Pod (deploy/k8s), from the rendered manifests; no cluster here.

Each overlay as shipped and re-planned for the other kind of sharing (the `overlay` and
`rendered` fixtures, tests/conftest.py), so both a time-slicing and an MPS unit are checked:

- `cohost launch` run with exactly what each engine container gets execs vLLM with the
  plan's flags and, under MPS, as a client of the Pod's own MPS daemon with the plan's share,
  priority and cap, and refuses to start without that daemon;
- the daemon is wired as compose's `mps` service (first, the engines' uid, their pipe
  directory and /dev/shm); a time-slicing unit runs no daemon and nothing in it waits for one;
- the worker talks to its own engines and pauses its engine on the chatbot's /load;
- the engines start in order, as native sidecars, and share one gate.

The manifests themselves (schemas, checkov, generated files, Services, Secrets, GPU shares)
are tests/test_k8s.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cohost import gpus
from cohost.k8s.unit import MPS_CONTAINER
from cohost.launch.exits import EXIT_NO_MPS
from cohost.launch.mps import MPS_VARIABLES, NO_MPS_PIPE
from cohost.plan import envfile
from cohost.units import MIB
from feedback.settings import WorkerSettings

from harness.launcher import clean_env, fake_card, recorded, recorder
from harness.mps import FakeMpsDaemon
from tests.deployfiles import BIN, MPS, TEST_KEY, load
from tests.k8sfiles import (
    ENGINE_SERVICES,
    container_env,
    env_value,
    gpu_shares,
    overlay_plan,
    overlay_sharing,
    pod_containers,
    run_as_user,
    units,
    volume_at,
)


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, Path]:
    """A directory for each emptyDir of the unit Pod, made on first use: what a container
    sees at a mount, the others see at theirs."""

    class Dirs(dict[str, Path]):
        def __missing__(self, name: str) -> Path:
            path = tmp_path / "volumes" / name
            path.mkdir(parents=True)
            self[name] = path
            return path

    return Dirs()


@pytest.fixture
def mps_daemon(rendered: list[dict[str, Any]], volumes: dict[str, Path]) -> Iterator[Path | None]:
    """The unit's MPS daemon, as its clients find it: its control socket in the volume at
    the daemon container's CUDA_MPS_PIPE_DIRECTORY. Yields that volume's directory, or None
    when the units run no daemon (a time-slicing plan)."""
    daemons = [pod_containers(d).get(MPS_CONTAINER) for d in units(rendered).values()]
    if not any(daemons):
        yield None
        return
    (same,) = {json.dumps(d, sort_keys=True) for d in daemons}  # the same in every unit
    container = json.loads(same)
    pipe = env_value(container, "CUDA_MPS_PIPE_DIRECTORY")
    assert pipe, "the daemon names no pipe directory"
    volume = volume_at(container, pipe)
    assert volume, f"the daemon's pipe directory {pipe} is on no volume"
    with FakeMpsDaemon(volumes[volume]) as fake:
        yield fake.pipe


def launch(
    container: dict[str, Any],
    docs: list[dict[str, Any]],
    volumes: dict[str, Path],
    tmp_path: Path,
    **extra: str,
) -> subprocess.CompletedProcess[str]:
    """`cohost launch` with exactly the container's environment, its pipe directory
    where its volume is here."""
    env = container_env(container, docs)
    pipe = env.get("CUDA_MPS_PIPE_DIRECTORY")
    if pipe is not None:
        volume = volume_at(container, pipe)
        assert volume, f"{container['name']}: {pipe} is on no volume"
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(volumes[volume])
    return subprocess.run(
        [BIN / "cohost", "launch", *container["args"]],
        env={
            **clean_env(),
            **env,
            "COHOST_LOCK_DIR": str(tmp_path / "locks"),  # the gpu-locks emptyDir
            **extra,
        },
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_engines_start_with_their_planned_flags(
    overlay: Path,
    rendered: list[dict[str, Any]],
    tmp_path: Path,
    volumes: dict[str, Path],
    mps_daemon: Path | None,
) -> None:
    """`cohost launch` with exactly each engine container's environment, on the planned
    card (NVML faked): chatbot first on an empty GPU, then the feedback engine in what it
    leaves. Both exec vLLM with the plan's flags; the key reaches vLLM's environment only.
    Under MPS each is a client of the Pod's own daemon (its pipe directory is the daemon's
    volume) with the plan's share of the SMs, priority and memory cap; under time-slicing
    the Pod has no daemon and each starts without one, kept out of MPS."""
    plan = envfile.read(overlay_plan(overlay))
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    free = total - gpus.DEFAULT_RESERVED
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        for service in ENGINE_SERVICES:
            container = containers[f"{service}-engine"]
            assert container["args"] == [service]
            fake = fake_card(plan, free, tmp_path / f"{service}-nvml.json", uuid="GPU-k8s-test")
            record = tmp_path / f"{service}-started.json"
            p = envfile.prefix(service)
            result = launch(
                container, rendered, volumes, tmp_path,
                COHOST_FAKE_NVML=str(fake),
                COHOST_MPS_WAIT_S="5",  # the daemon is there: a wrong directory fails fast
                **{p + "COMMAND": recorder(record)},
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            started = recorded(record)
            flags = dict(zip(started["argv"][0::2], started["argv"][1::2], strict=False))
            assert flags["--model"] == plan[p + "MODEL"]
            assert flags["--served-model-name"] == plan[p + "SERVED_MODEL_NAME"]
            assert flags["--max-model-len"] == plan[p + "MAX_MODEL_LEN"]
            assert flags["--max-num-seqs"] == plan[p + "MAX_NUM_SEQS"]
            assert flags["--max-num-batched-tokens"] == plan[p + "MAX_NUM_BATCHED_TOKENS"]
            if p + "KV_CACHE_MEMORY_BYTES" in plan:
                assert flags["--kv-cache-memory-bytes"] == plan[p + "KV_CACHE_MEMORY_BYTES"]
            if service == "chatbot":
                assert (flags["--host"], flags["--port"]) == ("0.0.0.0", "8000")
                assert started["key"] == TEST_KEY
                assert TEST_KEY not in " ".join(started["argv"]) + result.stderr
            else:
                # Loopback only: the feedback engine cannot be reached from outside its Pod.
                assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "8002")
                assert started["key"] is None
            mps = started["mps"]
            if plan.get("COHOST_SHARING") == "mps":
                assert mps_daemon is not None, "an MPS unit without its daemon"
                assert mps == {
                    "CUDA_MPS_PIPE_DIRECTORY": str(mps_daemon),  # the daemon's volume
                    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": plan[p + "MPS_ACTIVE_THREAD_PERCENTAGE"],
                    "CUDA_MPS_CLIENT_PRIORITY": plan[p + "MPS_CLIENT_PRIORITY"],
                    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT":
                        f"0={int(plan[p + 'MPS_PINNED_MEMORY_BYTES']) // MIB}M",
                }, service  # fmt: skip
            else:
                assert mps_daemon is None, "a time-slicing unit runs no MPS daemon"
                assert mps == {"CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE}
            free -= int(plan[p + "EXPECTED_PROCESS_BYTES"])
        free = total - gpus.DEFAULT_RESERVED
        assert free >= 0


def test_engines_refuse_to_start_without_the_daemon(
    overlay: Path, rendered: list[dict[str, Any]], tmp_path: Path, volumes: dict[str, Path]
) -> None:
    """Under MPS an engine whose pipe directory holds no daemon does not start vLLM (which
    would run without its share and cap, silently): `cohost launch` refuses, exit 6."""
    plan = envfile.read(overlay_plan(overlay))
    if plan.get("COHOST_SHARING") != "mps":
        pytest.skip("a time-slicing plan uses no daemon")
    half = int(plan["COHOST_GPU_TOTAL_BYTES"]) // 2
    fake = fake_card(plan, half, tmp_path / "nvml.json", uuid="GPU-k8s-test")
    marker = tmp_path / "vllm-ran"
    for name, deployment in units(rendered).items():
        for service in ENGINE_SERVICES:
            container = pod_containers(deployment)[f"{service}-engine"]
            result = launch(
                container, rendered, volumes, tmp_path,
                COHOST_FAKE_NVML=str(fake), COHOST_MPS_WAIT_S="0",
                # Each Pod has its own gpu-locks emptyDir, where the launcher counts its
                # refusals in a row (a second one would wait before exiting).
                COHOST_LOCK_DIR=str(tmp_path / "locks" / name),
                **{envfile.prefix(service) + "COMMAND": f"touch {marker}"},
            )  # fmt: skip
            assert result.returncode == EXIT_NO_MPS, result.stderr
            assert "no MPS control daemon" in result.stderr
            assert not marker.exists()


def test_only_an_mps_unit_runs_the_daemon(overlay: Path, rendered: list[dict[str, Any]]) -> None:
    """An MPS plan's unit runs the daemon, with a GPU share; a time-slicing plan's runs none,
    requests no share for it, and nothing in its Pod still refers to it: the chatbot engine
    is the first container to start, and no command or probe talks to a daemon."""
    mps = overlay_sharing(overlay) == "mps"
    for name, deployment in units(rendered).items():
        containers = pod_containers(deployment)
        assert (MPS_CONTAINER in containers) == mps, name
        assert (MPS_CONTAINER in gpu_shares(deployment)) == mps, name
        first = deployment["spec"]["template"]["spec"]["initContainers"][0]["name"]
        assert first == (MPS_CONTAINER if mps else "chatbot-engine"), name
        if not mps:
            assert "nvidia-cuda-mps-control" not in json.dumps(deployment), name


def test_mps_daemon_is_wired_like_compose(overlay: Path, rendered: list[dict[str, Any]]) -> None:
    """The unit's own MPS daemon, as compose's `mps` service: a native sidecar started
    before every other container, from the engine image, as the engines' uid, with a
    startup probe that asks the daemon itself. Every other container that opens the GPU
    shares its pipe directory (at its own CUDA_MPS_PIPE_DIRECTORY) and its /dev/shm: none
    can reach the GPU but through the daemon's directory."""
    if overlay_sharing(overlay) != "mps":
        pytest.skip("a time-slicing unit runs no daemon (test_only_an_mps_unit_runs_the_daemon)")
    compose_mps = load(MPS)["services"]["mps"]  # compose.mps.yml, for MPS plans
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        daemon = spec["initContainers"][0]
        assert daemon["name"] == MPS_CONTAINER
        assert daemon["restartPolicy"] == "Always"
        assert " ".join(daemon["command"]).endswith("exec nvidia-cuda-mps-control -f")
        probe = " ".join(daemon["startupProbe"]["exec"]["command"])
        assert probe.endswith(" ".join(compose_mps["healthcheck"]["test"][1:]))
        assert "quit" in " ".join(daemon["lifecycle"]["preStop"]["exec"]["command"])
        engines = {n: c for n, c in pod_containers(deployment).items() if n.endswith("-engine")}
        assert {daemon["image"]} == {c["image"] for c in engines.values()}
        # The MPS server runs as its clients' uid and the daemon starts it: one uid.
        uids = {run_as_user(deployment, c) for c in [daemon, *engines.values()]}
        assert len(uids) == 1, uids
        assert uids.pop() >= 10000

        volumes = {v["name"]: v for v in spec["volumes"]}
        pipe_dir = env_value(daemon, "CUDA_MPS_PIPE_DIRECTORY")
        assert pipe_dir
        pipe = volume_at(daemon, pipe_dir)
        assert pipe
        assert "emptyDir" in volumes[pipe]
        log_dir = env_value(daemon, "CUDA_MPS_LOG_DIRECTORY")
        assert log_dir
        assert volume_at(daemon, log_dir) == pipe
        shm = volume_at(daemon, "/dev/shm")
        assert shm
        assert volumes[shm]["emptyDir"]["medium"] == "Memory"
        # Sized as compose sizes the /dev/shm the daemon shares with the engines.
        size = compose_mps["shm_size"].lower()
        assert size.endswith("gb"), size
        assert volumes[shm]["emptyDir"]["sizeLimit"] == f"{size[:-2]}Gi"

        shares = gpu_shares(deployment)
        assert MPS_CONTAINER in shares, "the daemon must see the GPU its clients use"
        order = [c["name"] for c in [*spec["initContainers"], *spec["containers"]]]
        for name in set(shares) - {MPS_CONTAINER}:
            container = pod_containers(deployment)[name]
            client_dir = env_value(container, "CUDA_MPS_PIPE_DIRECTORY")
            assert client_dir, name
            assert volume_at(container, client_dir) == pipe, name
            assert volume_at(container, "/dev/shm") == shm, name
            assert order.index(name) > order.index(MPS_CONTAINER), name
        # The daemon holds no plan and no MPS limits of its own: each client sets its own.
        assert not any(e["name"] in MPS_VARIABLES for e in daemon.get("env", []))


def test_worker_talks_to_its_own_engines(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for deployment in units(rendered).values():
        containers = pod_containers(deployment)
        for key in list(os.environ):
            if key.startswith(("FEEDBACK_", "PUBSUB_", "GOOGLE_")):
                monkeypatch.delenv(key)
        for key, value in container_env(containers["feedback-worker"], rendered).items():
            monkeypatch.setenv(key, value)
        settings = WorkerSettings()
        engine = container_env(containers["feedback-engine"], rendered)
        chatbot = container_env(containers["chatbot-engine"], rendered)
        assert settings.llm_base_url == (
            f"http://{engine['FEEDBACK_ENGINE_HOST']}:{engine['FEEDBACK_ENGINE_PORT']}/v1"
        )
        # Chat first, under either kind of plan, as in compose: the worker reads the chatbot
        # engine's /load on its port in this Pod and pauses its engine while chat
        # has requests (docs/sharing.md).
        port = chatbot["CHATBOT_ENGINE_PORT"]
        assert port == "8000"
        assert str(containers["chatbot-engine"]["ports"][0]["containerPort"]) == port
        assert settings.chat_metrics_url == f"http://127.0.0.1:{port}/load"
        assert settings.preempting()
        assert settings.llm_model == engine["FEEDBACK_ENGINE_SERVED_MODEL_NAME"]
        assert settings.max_in_flight == int(engine["FEEDBACK_ENGINE_MAX_NUM_SEQS"])
        assert settings.project_id() == "my-project"
        assert settings.pubsub_emulator_host is None


def test_engines_start_in_order_and_share_the_gate(
    overlay: Path, rendered: list[dict[str, Any]]
) -> None:
    """The MPS daemon (MPS plans) and every engine but the last are native sidecars with a
    startupProbe (Kubernetes starts the next container only once it passed); the engines
    share one gate emptyDir."""
    daemon = [MPS_CONTAINER] if overlay_sharing(overlay) == "mps" else []
    for deployment in units(rendered).values():
        spec = deployment["spec"]["template"]["spec"]
        sidecars = spec["initContainers"]
        assert [c["name"] for c in sidecars] == [*daemon, "chatbot-engine"]
        assert {c["restartPolicy"] for c in sidecars} == {"Always"}
        assert all("startupProbe" in c for c in sidecars)
        chatbot = sidecars[-1]
        probe = chatbot["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 1800  # the gate's hold
        assert chatbot["readinessProbe"]["httpGet"]["path"] == "/health"
        engines = [c for c in pod_containers(deployment).values() if c["name"].endswith("-engine")]
        assert len(engines) == len(ENGINE_SERVICES)
        gates = {
            m["name"]
            for c in engines
            for m in c["volumeMounts"]
            if m["mountPath"] == "/var/lock/cohost"
        }
        assert len(gates) == 1
        (gate,) = gates
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == gate)
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
