"""`cohost launch`: the planned flags, preflight refusals, the start gate and the watchdog,
with real processes (under an MPS plan: test_launch_mps.py).

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
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.cpu_engine.server import server_env
from cohost.cpu_engine.venv import engine_python
from cohost.launch import watchdog
from cohost.launch.exits import (
    EXIT_CONFIG,
    EXIT_GATE_TIMEOUT,
    EXIT_NO_MEMORY,
    EXIT_WRONG_GPU,
)
from cohost.plan import envfile
from cohost.processes import Child, console_script, free_port, http_ok, log_contains, port_free
from cohost.units import MIB

from harness.launcher import L4_TOTAL, l4_reading, launch, recorded, recorder

ROOT = Path(__file__).resolve().parents[1]


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
    # vLLM's development endpoints (/pause among them) take no key: never on the chatbot.
    assert started["dev_mode"] is None
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
    started = recorded(tmp_path / "started.json")
    argv = started["argv"]
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    # The feedback engine serves /pause and /resume, its worker's preemption.
    assert started["dev_mode"] == "1"
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--model"] == plan["FEEDBACK_ENGINE_MODEL"]
    assert flags["--max-model-len"] == plan["FEEDBACK_ENGINE_MAX_MODEL_LEN"]
    assert flags["--max-num-seqs"] == plan["FEEDBACK_ENGINE_MAX_NUM_SEQS"]
    assert flags["--max-num-batched-tokens"] == plan["FEEDBACK_ENGINE_MAX_NUM_BATCHED_TOKENS"]
    assert argv[argv.index("--stream-interval") + 1] == plan["FEEDBACK_ENGINE_STREAM_INTERVAL"]
    assert "--enable-server-load-tracking" in argv
    assert "--gpu-memory-utilization" not in argv


def test_refuses_when_the_server_would_not_fit(gpu_env: dict[str, str], tmp_path: Path) -> None:
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(l4_reading(free_mib=9000).to_json())
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
    h100 = l4_reading(free_mib=70000, total=81559 * MIB)
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


def test_an_invalid_backoff_setting_is_said_and_the_refusal_still_exits_with_its_code(
    gpu_env: dict[str, str],
) -> None:
    """A bad COHOST_REFUSAL_BACKOFF_S must not turn a refusal into a crash (exit 1 and a
    traceback, which the restart policy retries without waiting): it is named, its default
    used, and the refusal's own code comes out. The valid COHOST_LOCK_DIR is still read: the
    count lands there, not in the default directory."""
    env = {k: v for k, v in gpu_env.items() if not k.startswith("CHATBOT_ENGINE_MAX")}
    env["COHOST_REFUSAL_BACKOFF_S"] = "soon"
    result = launch("chatbot", env)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "CHATBOT_ENGINE_MAX_MODEL_LEN" in result.stderr
    assert "COHOST_REFUSAL_BACKOFF_S" in result.stderr
    assert "using the default" in result.stderr
    assert "Traceback" not in result.stderr
    count = Path(env["COHOST_LOCK_DIR"]) / f"refusals-{socket.gethostname()}-chatbot"
    assert count.read_text() == "1"


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
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(l4_reading(free_mib=9000).to_json())
    port = int(gpu_env["CHATBOT_ENGINE_PORT"])
    env = {
        **gpu_env,
        "CHATBOT_ENGINE_COMMAND": recorder(tmp_path / "started.json"),
        "COHOST_REFUSAL_BACKOFF_S": "15",
    }
    _one_refusal_so_far(env)
    started = time.monotonic()
    proc = subprocess.Popen(
        [console_script("cohost"), "launch", "chatbot"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _until_it_answers(proc, f"http://127.0.0.1:{port}/health")
        status = subprocess.run(
            [console_script("cohost"), "status", "--json", "--chatbot", f"http://127.0.0.1:{port}/v1",
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
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(l4_reading(free_mib=9000).to_json())
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


def test_a_refusal_on_an_ipv6_host_is_answered_there(gpu_env: dict[str, str]) -> None:
    """A server planned on an IPv6 address (`--host ::1`) is answered there while its
    launcher waits, as on IPv4."""
    Path(gpu_env["COHOST_FAKE_NVML"]).write_text(l4_reading(free_mib=9000).to_json())
    port = int(gpu_env["CHATBOT_ENGINE_PORT"])
    env = {**gpu_env, "CHATBOT_ENGINE_HOST": "::1", "COHOST_REFUSAL_BACKOFF_S": "5"}
    _one_refusal_so_far(env)
    proc = subprocess.Popen(
        [console_script("cohost"), "launch", "chatbot"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        _until_it_answers(proc, f"http://[::1]:{port}/health")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_NO_MEMORY, err
    assert f"answering on ::1:{port} with 503" in err


def _until_it_answers(proc: subprocess.Popen[str], url: str) -> None:
    """Until the refused launcher `proc`, waiting out its backoff, answers 503 at `url`."""
    deadline = time.monotonic() + 60
    while not _answers(url, 503):
        assert proc.poll() is None, "exited before its wait"
        assert time.monotonic() < deadline, f"no answer at {url} within 60 s"
        time.sleep(0.2)


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
            name,
            [console_script("cohost"), "launch", name],
            log_path=tmp_path / f"{name}.log",
            env=env,
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
    child = Child(
        "chatbot",
        [console_script("cohost"), "launch", "chatbot"],
        log_path=tmp_path / "c.log",
        env=env,
    )
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
