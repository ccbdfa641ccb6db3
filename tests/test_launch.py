"""`cohost launch`: preflight refusals and the start gate, with real processes.

NVML is the only thing faked (COHOST_FAKE_NVML, a GpuReading as JSON); the launcher
runs as a real subprocess and execs a real command: a small recorder for the argv
checks, the real CPU vLLM server for the ordering test.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx2
import psutil
import pytest
from cohost import nvml
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.cpu_engine.server import server_env
from cohost.cpu_engine.venv import engine_python
from cohost.launch import watchdog
from cohost.launch.exits import (
    EXIT_CONFIG,
    EXIT_GATE_TIMEOUT,
    EXIT_NO_MEMORY,
    EXIT_NO_MPS,
    EXIT_UNPLANNED_SHARE,
    EXIT_WRONG_GPU,
)
from cohost.launch.mps import NO_MPS_PIPE
from cohost.plan import envfile, sharing
from cohost.processes import Child, console_script, free_port, http_ok, log_contains, port_free
from cohost.units import MIB

from harness.launcher import recorded, recorder
from harness.mps import FakeMpsDaemon
from tests.deployfiles import mps_plan

ROOT = Path(__file__).resolve().parents[1]
L4_TOTAL = 23034 * MIB
COHOST = console_script("cohost")


def reading(free_mib: int, total: int = L4_TOTAL, uuid: str = "GPU-test-0") -> nvml.GpuReading:
    return nvml.GpuReading(
        index=0,
        name="NVIDIA L4",
        uuid=uuid,
        total_bytes=total,
        reserved_bytes=480 * MIB,
        free_bytes=free_mib * MIB,
        used_bytes=total - free_mib * MIB,
        processes=[nvml.GpuProcess(pid=4242, used_bytes=9000 * MIB, name="vllm serve other")],
    )


@pytest.fixture
def gpu_env(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "nvml.json"
    fake.write_text(reading(free_mib=22000).to_json())
    return {
        **os.environ,
        "COHOST_FAKE_NVML": str(fake),
        "COHOST_LOCK_DIR": str(tmp_path / "locks"),
        # A refusal that waits answers on the server's port: one of its own, not 8000.
        "CHATBOT_ENGINE_HOST": "127.0.0.1",
        "CHATBOT_ENGINE_PORT": str(free_port()),
        "COHOST_GPU_NAME": "NVIDIA L4",
        "COHOST_GPU_TOTAL_BYTES": str(L4_TOTAL),
        "CHATBOT_ENGINE_MODEL": "/models/chat",
        "CHATBOT_ENGINE_GPU_MEMORY_UTILIZATION": "0.5",
        "CHATBOT_ENGINE_BUDGET_BYTES": str(11_000 * MIB),
        "CHATBOT_ENGINE_EXPECTED_PROCESS_BYTES": str(12_000 * MIB),
        "CHATBOT_ENGINE_KV_CACHE_MEMORY_BYTES": str(5_000 * MIB),
        "CHATBOT_ENGINE_MAX_MODEL_LEN": "8192",
        "CHATBOT_ENGINE_MAX_NUM_SEQS": "8",
        "CHATBOT_ENGINE_MAX_NUM_BATCHED_TOKENS": "2048",
    }


def launch(
    service: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COHOST, "launch", service],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_execs_vllm_with_the_planned_flags(gpu_env: dict[str, str], tmp_path: Path) -> None:
    env = {
        **gpu_env,
        "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
        "CHATBOT_ENGINE_API_KEY": "s3cret",
    }
    result = launch("chatbot", env)
    assert result.returncode == 0, result.stderr
    started = recorded(tmp_path / "started.json")
    argv = started["argv"]
    flags = dict(zip(argv[0::2], argv[1::2], strict=False))
    assert argv[0] == "--model"
    assert argv[1] == "/models/chat"
    assert flags["--served-model-name"] == "chatbot"
    assert flags["--kv-cache-memory-bytes"] == str(5_000 * MIB)
    assert flags["--max-model-len"] == "8192"
    assert flags["--max-num-batched-tokens"] == "2048"
    # The budget as a share of this card's CUDA total (NVML total - reserved), rounded up.
    util = float(flags["--gpu-memory-utilization"])
    assert util * (L4_TOTAL - 480 * MIB) >= 11_000 * MIB
    assert util < 0.5 + 0.001
    # The key reaches vLLM through its environment, never through argv (ps shows argv).
    assert started["key"] == "s3cret"
    assert "s3cret" not in " ".join(argv) + result.stderr
    # /load, the worker's chat signal, counts requests from their arrival.
    assert "--enable-server-load-tracking" in argv
    # One token a chunk is vLLM's own default; a plan's batch service streams in bigger ones.
    assert "--stream-interval" not in argv
    env["CHATBOT_ENGINE_STREAM_INTERVAL"] = "8"
    assert launch("chatbot", env).returncode == 0
    argv = recorded(tmp_path / "started.json")["argv"]
    assert argv[argv.index("--stream-interval") + 1] == "8"


def test_cpu_plan_starts_the_cpu_engine_with_its_planned_flags(tmp_path: Path) -> None:
    """deploy/cpu.env (compose.cpu.yml's plan): no GPU checked, the CPU engine (`python3 -m
    vllm...api_server`, as in the CPU engine image; here a recorder first on PATH) gets the
    flags the plan sized its memory for, as a GPU server would."""
    plan = envfile.read(ROOT / "deploy" / "cpu.env")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python3 = fake_bin / "python3"
    python3.write_text(f'#!/bin/sh\nexec {recorder(tmp_path / "started.json")} "$@"\n')
    python3.chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("CHATBOT_", "COHOST_"))},
        **plan,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "COHOST_LOCK_DIR": str(tmp_path / "locks"),
        "FEEDBACK_ENGINE_HOST": "127.0.0.1",
        "FEEDBACK_ENGINE_PORT": str(free_port()),
    }
    result = launch("feedback", env)
    assert result.returncode == 0, result.stderr
    argv = recorded(tmp_path / "started.json")["argv"]
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--model"] == plan["FEEDBACK_ENGINE_MODEL"]
    assert flags["--max-model-len"] == plan["FEEDBACK_ENGINE_MAX_MODEL_LEN"]
    assert flags["--max-num-seqs"] == plan["FEEDBACK_ENGINE_MAX_NUM_SEQS"]
    assert flags["--max-num-batched-tokens"] == plan["FEEDBACK_ENGINE_MAX_NUM_BATCHED_TOKENS"]
    assert argv[argv.index("--stream-interval") + 1] == plan["FEEDBACK_ENGINE_STREAM_INTERVAL"]
    assert "--enable-server-load-tracking" in argv
    assert "--gpu-memory-utilization" not in argv


def test_refuses_when_the_server_would_not_fit(gpu_env: dict[str, str], tmp_path: Path) -> None:
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(reading(free_mib=9000).to_json())
    env = {**gpu_env, "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json")}
    result = launch("chatbot", env)
    assert result.returncode == EXIT_NO_MEMORY
    assert "refusing to start chatbot" in result.stderr
    assert "9,000 MiB free" in result.stderr
    assert "needs 12,000 MiB" in result.stderr
    assert "pid    4242" in result.stderr
    assert "vllm serve other" in result.stderr
    assert "cohost plan --gpu-memory-mib 23034" in result.stderr
    assert not (tmp_path / "started.json").exists()


def test_refuses_another_card_unless_emulating(gpu_env: dict[str, str], tmp_path: Path) -> None:
    h100 = reading(free_mib=70000, total=81559 * MIB)
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(h100.to_json())
    env = {**gpu_env, "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json")}
    result = launch("chatbot", env)
    assert result.returncode == EXIT_WRONG_GPU
    assert "the plan is for NVIDIA L4" in result.stderr
    # Emulating the L4 on the big card: the budget becomes a smaller share of its total.
    result = launch("chatbot", {**env, "COHOST_ALLOW_OTHER_GPU": "1"})
    assert result.returncode == 0, result.stderr
    argv = recorded(tmp_path / "started.json")["argv"]
    util = float(argv[argv.index("--gpu-memory-utilization") + 1])
    assert util == pytest.approx(11_000 / (81559 - 480), abs=1e-4)


def test_refusals_in_a_row_back_off_and_a_healthy_start_would_reset_them(
    gpu_env: dict[str, str],
) -> None:
    """Engines restart unless stopped (a crash must always come back), so a plan that can
    never fit would restart in a tight loop: each refusal in a row of one container waits
    longer before exiting, and says why."""
    env = {k: v for k, v in gpu_env.items() if not k.startswith("CHATBOT_ENGINE_MAX")}
    env["COHOST_REFUSAL_BACKOFF_S"] = "2"
    took = []
    for _ in range(3):
        started = time.monotonic()
        result = launch("chatbot", env)
        took.append(time.monotonic() - started)
        assert result.returncode == EXIT_CONFIG
        assert "CHATBOT_ENGINE_MAX_MODEL_LEN" in result.stderr
    # The waits, over what a start costs on this machine (the first one's time).
    assert took[1] - took[0] > 1.5, took
    assert took[2] - took[0] > 3.5, took
    assert "refusal 3 in a row (exit 2): waiting 4 s" in result.stderr
    assert "tight loop" in result.stderr
    # An invalid plan still names its port: the wait is answered there.
    assert f"answering on 127.0.0.1:{env['CHATBOT_ENGINE_PORT']} with 503" in result.stderr
    # Another container (another hostname) starts counting afresh: the count is per container.
    counts = list(Path(gpu_env["COHOST_LOCK_DIR"]).glob("refusals-*-chatbot"))
    assert [p.read_text() for p in counts] == ["3"]


def _one_refusal_so_far(env: dict[str, str]) -> None:
    """This container has been refused once already: the next refusal waits."""
    locks = Path(env["COHOST_LOCK_DIR"])
    locks.mkdir(exist_ok=True)
    (locks / f"refusals-{socket.gethostname()}-chatbot").write_text("1")


def test_a_refusal_waiting_to_exit_shows_in_cohost_status(
    gpu_env: dict[str, str], tmp_path: Path
) -> None:
    """While a refused launcher waits out its backoff, the port its server would serve
    answers 503 with the refusal: the real `cohost status` says why, how many refusals in a
    row and when it exits. Then it exits with the refusal's code and the port is free."""
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(reading(free_mib=9000).to_json())
    port = int(gpu_env["CHATBOT_ENGINE_PORT"])
    env = {
        **gpu_env,
        "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
        "COHOST_REFUSAL_BACKOFF_S": "15",
    }
    _one_refusal_so_far(env)
    started = time.monotonic()
    proc = subprocess.Popen(
        [COHOST, "launch", "chatbot"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{port}/health", 503):
            assert proc.poll() is None, "exited before its wait"
            assert time.monotonic() < deadline, "no answer on the server's port within 60 s"
            time.sleep(0.2)
        status = subprocess.run(
            [COHOST, "status", "--json", "--chatbot", f"http://127.0.0.1:{port}/v1",
             "--feedback", f"http://127.0.0.1:{free_port()}",
             "--worker", f"http://127.0.0.1:{free_port()}", "--timeout", "5"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.poll() is None, "status was read while the launcher waited"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - started
    assert status.returncode == 1, status.stdout + status.stderr
    chatbot = json.loads(status.stdout)["checks"]["chatbot"]
    assert chatbot["state"] == "down"
    refused = chatbot["details"]["refused"]
    assert refused["service"] == "chatbot"
    assert refused["code"] == EXIT_NO_MEMORY
    assert refused["refusals_in_a_row"] == 2
    assert "9,000 MiB free" in refused["reason"]
    assert "pid    4242" in refused["reason"]
    assert 0 < refused["exits_in_s"] < 15
    assert refused["wait_s"] == 15
    assert refused["next_wait_s"] == 30
    assert "--force-recreate" in refused["fix"]
    summary = chatbot["summary"]
    assert summary.startswith("refusing to start (exit 5): GPU 0 (NVIDIA L4) has 9,000 MiB")
    assert "refusal 2 in a row, exits in " in summary
    # Then it exits with the refusal's code, after the whole wait, and lets go of the port.
    assert proc.returncode == EXIT_NO_MEMORY, err
    assert took >= 15
    assert f"answering on 127.0.0.1:{port} with 503" in err
    assert port_free("127.0.0.1", port)
    assert not (tmp_path / "started.json").exists()


def test_a_refusal_whose_port_is_taken_waits_and_exits_all_the_same(
    gpu_env: dict[str, str],
) -> None:
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(reading(free_mib=9000).to_json())
    env = {**gpu_env, "COHOST_REFUSAL_BACKOFF_S": "1"}
    _one_refusal_so_far(env)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch("chatbot", {**env, "CHATBOT_ENGINE_PORT": str(port)})
    assert result.returncode == EXIT_NO_MEMORY
    assert "refusal 2 in a row (exit 5): waiting 1 s" in result.stderr
    assert f"cannot answer on 127.0.0.1:{port} while waiting" in result.stderr
    assert "Traceback" not in result.stderr


def _answers(url: str, status: int) -> bool:
    try:
        return httpx2.get(url, timeout=2).status_code == status
    except httpx2.HTTPError:
        return False


def test_missing_plan_names_the_variables(gpu_env: dict[str, str]) -> None:
    env = {k: v for k, v in gpu_env.items() if not k.startswith("CHATBOT_ENGINE_MAX")}
    result = launch("chatbot", env)
    assert result.returncode == EXIT_CONFIG
    assert "CHATBOT_ENGINE_MAX_MODEL_LEN" in result.stderr
    assert "CHATBOT_ENGINE_MAX_NUM_SEQS" in result.stderr


def test_gives_up_on_a_gate_held_too_long(gpu_env: dict[str, str], tmp_path: Path) -> None:
    locks = Path(gpu_env["COHOST_LOCK_DIR"])
    locks.mkdir()
    with (locks / "GPU-test-0.lock").open("w") as held:
        held.write(json.dumps({"service": "feedback", "pid": 777, "since": time.time()}))
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        env = {
            **gpu_env,
            "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
            "COHOST_GATE_TIMEOUT_S": "2",
        }
        result = launch("chatbot", env)
    assert result.returncode == EXIT_GATE_TIMEOUT
    assert "feedback (pid 777" in result.stderr
    assert not (tmp_path / "started.json").exists()


def test_gate_is_released_when_the_server_dies(gpu_env: dict[str, str], tmp_path: Path) -> None:
    # The recorder exits at once: its keeper must let go, so the next start is not stuck.
    env = {
        **gpu_env,
        "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
        "COHOST_GATE_TIMEOUT_S": "20",
    }
    assert launch("chatbot", env).returncode == 0
    started = time.monotonic()
    second = launch("chatbot", env)
    assert second.returncode == 0, second.stderr
    assert time.monotonic() - started < 15


@pytest.mark.engine
def test_two_launches_at_once_start_one_after_the_other(
    gpu_env: dict[str, str], tmp_path: Path
) -> None:
    """Two real CPU vLLM servers launched at the same moment come up strictly in turn."""
    ensure_engine()
    model = ensure_model("tiny-llama")
    command = f"{engine_python()} -m vllm.entrypoints.openai.api_server"
    env = server_env(gpu_env)
    ports = {}
    for name in ("chatbot", "feedback"):
        p = f"{name.upper()}_ENGINE_"
        ports[name] = free_port()
        env.update({
            p + "MODEL": str(model), p + "COMMAND": command, p + "EXTRA_ARGS": "--enforce-eager",
            p + "HOST": "127.0.0.1", p + "PORT": str(ports[name]),
            p + "GPU_MEMORY_UTILIZATION": "0.3", p + "BUDGET_BYTES": str(6000 * MIB),
            p + "EXPECTED_PROCESS_BYTES": str(7000 * MIB), p + "MAX_MODEL_LEN": "1024",
            p + "MAX_NUM_SEQS": "4",
        })  # fmt: skip
    children = {
        name: Child(
            name, [COHOST, "launch", name], log_path=tmp_path / f"{name}.log", env=env
        ).start()
        for name in ports
    }
    try:
        for name, child in children.items():
            child.wait_ready(http_ok(f"http://127.0.0.1:{ports[name]}/health"), timeout=300)
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in ports}
        waited = [name for name, text in logs.items() if "waiting for the start gate" in text]
        assert len(waited) == 1, "exactly one launcher found the gate taken"
        second = waited[0]
        first = next(name for name in ports if name != second)

        def stamp(text: str, needle: str) -> str:
            line = next(line for line in text.splitlines() if needle in line)
            return line.split()[0]

        assert stamp(logs[second], "starting:") >= stamp(logs[first], "healthy after")
    finally:
        for child in children.values():
            child.stop(timeout=30)


# --------------------------------------------------------------------------- MPS sharing

LIMIT_MIB = 12_500


@pytest.fixture
def mps_env(gpu_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The chatbot's plan under MPS sharing; no daemon yet at the pipe directory."""
    return {
        **gpu_env,
        "COHOST_SHARING": "mps",
        "CHATBOT_ENGINE_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
        "CHATBOT_ENGINE_MPS_CLIENT_PRIORITY": "0",
        "CHATBOT_ENGINE_MPS_PINNED_MEMORY_BYTES": str(LIMIT_MIB * MIB),
        # What `cohost plan` writes beside a share (cohost.plan.sharing.share_check).
        "CHATBOT_ENGINE_MPS_SHARE_CHECK": sharing.share_check(
            100, 0, LIMIT_MIB * MIB, 12_000 * MIB
        ),
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps"),
        "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
    }


def test_starts_vllm_as_an_mps_client_with_the_planned_share(
    mps_env: dict[str, str], tmp_path: Path
) -> None:
    with FakeMpsDaemon(tmp_path / "mps") as daemon:
        result = launch("chatbot", mps_env)
    assert result.returncode == 0, result.stderr
    assert daemon.connections >= 1, "the launcher asked the daemon before starting vLLM"
    assert recorded(tmp_path / "started.json")["mps"] == {
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps"),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
        "CUDA_MPS_CLIENT_PRIORITY": "0",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={LIMIT_MIB}M",
    }
    assert "sharing: CUDA MPS client" in result.stderr


def test_refuses_when_no_mps_daemon_answers(mps_env: dict[str, str], tmp_path: Path) -> None:
    result = launch("chatbot", {**mps_env, "COHOST_MPS_WAIT_S": "2"})
    assert result.returncode == EXIT_NO_MPS
    pipe = tmp_path / "mps"
    assert f"{pipe / 'control'} does not exist" in result.stderr
    assert f"CUDA_MPS_PIPE_DIRECTORY={pipe} nvidia-cuda-mps-control -d" in result.stderr
    assert "--sharing time-slicing" in result.stderr
    assert not (tmp_path / "started.json").exists()
    # A socket nobody listens on (a daemon that died) is refused the same way.
    pipe.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(pipe / "control"))
    result = launch("chatbot", {**mps_env, "COHOST_MPS_WAIT_S": "1"})
    assert result.returncode == EXIT_NO_MPS
    assert "does not accept connections" in result.stderr


def test_waits_for_a_daemon_that_comes_up(mps_env: dict[str, str], tmp_path: Path) -> None:
    """A restarted daemon container comes back after the engines: they wait for it."""
    proc = subprocess.Popen(
        [COHOST, "launch", "chatbot"], env=mps_env, stderr=subprocess.PIPE, text=True
    )
    time.sleep(3)
    assert proc.poll() is None, "still waiting"
    with FakeMpsDaemon(tmp_path / "mps"):
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "waiting for the MPS control daemon" in err
    assert recorded(tmp_path / "started.json")["mps"]


def test_an_mps_plan_without_shares_names_what_is_missing(mps_env: dict[str, str]) -> None:
    env = {k: v for k, v in mps_env.items() if "MPS_CLIENT_PRIORITY" not in k}
    env.pop("CHATBOT_ENGINE_MPS_PINNED_MEMORY_BYTES")
    result = launch("chatbot", env)
    assert result.returncode == EXIT_CONFIG
    assert "CHATBOT_ENGINE_MPS_CLIENT_PRIORITY: required when COHOST_SHARING=mps" in result.stderr
    assert "CHATBOT_ENGINE_MPS_PINNED_MEMORY_BYTES" in result.stderr


def test_time_slicing_keeps_vllm_out_of_a_running_daemon(
    gpu_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **gpu_env,
        "COHOST_SHARING": "time-slicing",
        "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps"),
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",  # left over in the environment
        "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
    }
    with FakeMpsDaemon(tmp_path / "mps"):
        result = launch("chatbot", env)
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path / "started.json")["mps"] == {"CUDA_MPS_PIPE_DIRECTORY": NO_MPS_PIPE}
    assert not Path(NO_MPS_PIPE).exists()
    assert "time-slicing (not an MPS client)" in result.stderr


def test_a_stricter_share_given_by_the_platform_is_kept(
    mps_env: dict[str, str], tmp_path: Path
) -> None:
    """GKE's device plugin gives each container its MPS share in these variables; a client's
    own can only lower it, so the launcher keeps whichever is stricter."""
    platform = {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=11G",
        "CHATBOT_ENGINE_MPS_ACTIVE_THREAD_PERCENTAGE": "100",
    }
    with FakeMpsDaemon(tmp_path / "mps"):
        assert launch("chatbot", {**mps_env, **platform}).returncode == 0
        stricter = recorded(tmp_path / "started.json")["mps"]
        looser = {**platform, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=20000M"}
        assert launch("chatbot", {**mps_env, **looser}).returncode == 0
        planned = recorded(tmp_path / "started.json")["mps"]
    assert isinstance(stricter, dict)
    assert isinstance(planned, dict)
    assert stricter["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert stricter["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={11 * 1024}M"
    assert planned["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={LIMIT_MIB}M"


def test_refuses_a_cap_below_the_servers_plan(mps_env: dict[str, str], tmp_path: Path) -> None:
    with FakeMpsDaemon(tmp_path / "mps"):
        result = launch(
            "chatbot", {**mps_env, "CHATBOT_ENGINE_MPS_PINNED_MEMORY_BYTES": str(10_000 * MIB)}
        )
    assert result.returncode == EXIT_CONFIG
    assert "caps chatbot at 10,000 MiB under MPS, but the server needs 12,000 MiB" in result.stderr
    assert not (tmp_path / "started.json").exists()


def test_refuses_a_share_its_plan_did_not_size(mps_env: dict[str, str], tmp_path: Path) -> None:
    """The L4 plan made for MPS: its feedback server starts with the share it was planned
    with; the same plan with the share raised (or the priority changed) by hand is refused."""
    plan = envfile.read(mps_plan("l4", tmp_path / "l4-mps.env"))
    free = int(plan["COHOST_GPU_TOTAL_BYTES"]) - 480 * MIB
    fake = tmp_path / "l4.json"
    fake.write_text(reading(free_mib=free // MIB).to_json())
    env = {
        **{k: v for k, v in mps_env.items() if not k.startswith("CHATBOT_")},
        **plan,
        "COHOST_FAKE_NVML": str(fake),
        "FEEDBACK_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
        # Three refusals in a row of one container: no backoff between them here (it has
        # its own test), or the third would wait 60 s before exiting.
        "COHOST_REFUSAL_BACKOFF_S": "0",
    }
    with FakeMpsDaemon(tmp_path / "mps"):
        planned = launch("feedback", env)
        assert planned.returncode == 0, planned.stderr
        assert recorded(tmp_path / "started.json")["mps"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == (
            "30"
        )
        (tmp_path / "started.json").unlink()
        for key, value in (("MPS_ACTIVE_THREAD_PERCENTAGE", "100"), ("MPS_CLIENT_PRIORITY", "0")):
            result = launch("feedback", {**env, f"FEEDBACK_ENGINE_{key}": value})
            assert result.returncode == EXIT_UNPLANNED_SHARE, result.stderr
            assert "is not the one its plan sized memory for" in result.stderr
            assert "Re-plan with the share you want" in result.stderr
            assert not (tmp_path / "started.json").exists()
    missing = {k: v for k, v in env.items() if k != "FEEDBACK_ENGINE_MPS_SHARE_CHECK"}
    result = launch("feedback", missing)
    assert result.returncode == EXIT_CONFIG
    assert "FEEDBACK_ENGINE_MPS_SHARE_CHECK: required when COHOST_SHARING=mps" in result.stderr


def alive_after(pids: list[int], timeout: float) -> list[int]:
    """Those of `pids` still running (zombies count as gone) once `timeout` has passed."""

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.engine
def test_watchdog_kills_a_server_that_stopped_answering(
    gpu_env: dict[str, str], tmp_path: Path
) -> None:
    """What the MPS server's death did on the GPU: vLLM neither exits nor answers. Frozen
    here with SIGSTOP, a real CPU vLLM server is killed, with its engine process, once its
    /health stays silent for COHOST_WATCHDOG_S, so a container would exit and restart."""
    ensure_engine()
    model = ensure_model("tiny-llama")
    port = free_port()
    env = server_env(gpu_env)
    env.update({
        "CHATBOT_ENGINE_MODEL": str(model), "CHATBOT_ENGINE_EXTRA_ARGS": "--enforce-eager",
        "CHATBOT_ENGINE_COMMAND": f"{engine_python()} -m vllm.entrypoints.openai.api_server",
        "CHATBOT_ENGINE_HOST": "127.0.0.1", "CHATBOT_ENGINE_PORT": str(port),
        "CHATBOT_ENGINE_MAX_MODEL_LEN": "1024", "CHATBOT_ENGINE_MAX_NUM_SEQS": "4",
        "COHOST_WATCHDOG_S": "10",
    })  # fmt: skip
    env.pop("CHATBOT_ENGINE_KV_CACHE_MEMORY_BYTES")
    child = Child("chatbot", [COHOST, "launch", "chatbot"], log_path=tmp_path / "c.log", env=env)
    child.start()
    try:
        # Healthy as the launcher's keeper saw it: from then on it watches.
        child.wait_ready(log_contains(child.log_path, "start gate released"), timeout=300)
        tree = [child.pid, *(p.pid for p in psutil.Process(child.pid).children(recursive=True))]
        assert len(tree) >= 2, "vLLM runs its engine in a child process"
        os.kill(child.pid, signal.SIGSTOP)  # the API server stops answering; its engine runs on
        frozen = time.monotonic()
        assert child.proc is not None
        child.proc.wait(timeout=60)
        took = time.monotonic() - frozen
    finally:
        child.kill()
    # Silence counts from the last answered probe, up to one probe interval before the freeze.
    assert 10 - watchdog.INTERVAL_S <= took <= 40, took
    log = (tmp_path / "c.log").read_text()
    assert "watchdog: /health has not answered for" in log
    assert "killed the server and its processes" in log
    # SIGKILLed is not yet gone: a process that holds a model's memory takes a moment to exit.
    left = alive_after(tree, timeout=30)
    assert not left, [(p.pid, p.ppid(), p.cmdline()) for p in map(psutil.Process, left)]
