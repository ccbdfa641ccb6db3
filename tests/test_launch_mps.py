"""`cohost launch` under an MPS plan, with real processes: vLLM started as a client of the
daemon with its planned share, refused without a daemon, without its shares, with a share
or a cap its plan did not size; kept out of a running daemon under time-slicing.

The daemon is harness.mps.FakeMpsDaemon (a socket at the pipe directory: the launcher only
checks that one answers), NVML is faked, and vLLM is the recorder; the real daemon was run
on the GPU (bench/gpu).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from cohost.launch.exits import EXIT_CONFIG, EXIT_NO_MPS, EXIT_UNPLANNED_SHARE
from cohost.launch.mps import NO_MPS_PIPE
from cohost.plan import envfile, sharing
from cohost.processes import console_script
from cohost.units import MIB

from harness.launcher import l4_reading, launch, recorded, recorder
from harness.mps import FakeMpsDaemon
from tests.deployfiles import mps_plan

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
        [console_script("cohost"), "launch", "chatbot"],
        env=mps_env,
        stderr=subprocess.PIPE,
        text=True,
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
    fake.write_text(l4_reading(free_mib=free // MIB).to_json())
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
