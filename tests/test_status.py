"""`cohost status` against real servers (CPU engine, worker metrics) and a fake NVML.

NVML is faked at its boundary only (COHOST_FAKE_NVML, read by cohost.nvml.read);
engines and the worker are the real processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from cohost import nvml
from cohost.launch import backoff, refusing
from cohost.launch.exits import EXIT_NO_MEMORY, Refusal
from cohost.processes import Child, console_script, free_port, http_ok
from cohost.status import checks, report
from cohost.units import MIB

from harness.engine import CpuServer
from harness.pubsub import Project
from tests.deployfiles import mps_plan

ROOT = Path(__file__).resolve().parents[1]
L4_PLAN = ROOT / "deploy" / "l4.env"


def cohost(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("cohost"), *args],
        env=env if env is not None else os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- GPU against the plan


def _reading(**changes: object) -> nvml.GpuReading:
    """An L4 as deploy/l4.env plans it, with both servers at their planned size."""
    plan = checks.read_plan(L4_PLAN)[0]
    chatbot = int(plan["CHATBOT_ENGINE_EXPECTED_PROCESS_BYTES"])
    feedback = int(plan["FEEDBACK_ENGINE_EXPECTED_PROCESS_BYTES"])
    processes = [
        nvml.GpuProcess(101, chatbot - 200 * MIB, "vllm serve Qwen/Qwen2.5-7B-Instruct-AWQ "
                        "--served-model-name chatbot --host 0.0.0.0"),
        nvml.GpuProcess(202, feedback - 100 * MIB, "vllm serve Qwen/Qwen2.5-1.5B-Instruct "
                        "--served-model-name feedback"),
    ]  # fmt: skip
    total = int(plan["COHOST_GPU_TOTAL_BYTES"])
    used = sum(p.used_bytes for p in processes) + 300 * MIB
    reading = nvml.GpuReading(
        index=0,
        name="NVIDIA L4",
        uuid="GPU-fake",
        total_bytes=total,
        reserved_bytes=470 * MIB,
        free_bytes=total - 470 * MIB - used,
        used_bytes=used,
        processes=processes,
    )
    return replace(reading, **changes)  # type: ignore[arg-type]


def _fake(tmp_path: Path, reading: nvml.GpuReading, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(reading.to_json())
    monkeypatch.setenv("COHOST_FAKE_NVML", str(path))


def test_gpu_within_plan_is_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(tmp_path, _reading(), monkeypatch)
    check = checks.check_gpu_memory(L4_PLAN)
    assert check.state == "ok", check.summary
    by_service = {s["service"]: s for s in check.details["services"]}
    assert set(by_service) == {"chatbot", "feedback"}
    assert by_service["feedback"]["used_bytes"] < by_service["feedback"]["expected_bytes"]
    assert "NVIDIA L4" in check.summary
    assert "plan 21,877 MiB" in check.summary


def test_gpu_shows_the_sharing_and_each_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _reading()
    server = nvml.GpuProcess(303, 66 * MIB, "nvidia-cuda-mps-server")
    _fake(tmp_path, _reading(processes=[*base.processes, server]), monkeypatch)
    l4_mps = mps_plan("l4", tmp_path / "l4-mps.env")
    check = checks.check_gpu_memory(l4_mps)
    assert check.state == "ok", check.summary
    plan = checks.read_plan(l4_mps)[0]
    chat_cap = int(plan["CHATBOT_ENGINE_MPS_PINNED_MEMORY_BYTES"])
    assert check.details["sharing"] == "mps"
    assert f"MPS: chatbot 100% of SMs, normal priority, limit {chat_cap / MIB:,.0f} MiB" in (
        check.summary
    )
    assert "feedback 30% of SMs, low priority" in check.summary
    feedback = next(s for s in check.details["services"] if s["service"] == "feedback")
    assert feedback["mps"] == {
        "sm_percent": 30, "client_priority": 1,
        "memory_limit_bytes": int(plan["FEEDBACK_ENGINE_MPS_PINNED_MEMORY_BYTES"]),
    }  # fmt: skip
    assert [p["service"] for p in check.details["processes"]][-1] == "mps-server"
    # The shipped plan time-slices: no shares.
    check = checks.check_gpu_memory(L4_PLAN)
    assert check.details["sharing"] == "time-slicing"
    assert all(s["mps"] is None for s in check.details["services"])
    # A plan made before MPS (no COHOST_SHARING) is a time-slicing plan.
    old = ROOT / "bench" / "gpu" / "results" / "plans-2026-11-22" / "l4.env"
    check = checks.check_gpu_memory(old)
    assert check.details["sharing"] == "time-slicing"
    assert "time-slicing" in check.summary
    assert all(s["mps"] is None for s in check.details["services"])


def test_gpu_process_over_its_plan_is_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _reading()
    fat = replace(base.processes[1], used_bytes=base.processes[1].used_bytes + 2048 * MIB)
    _fake(tmp_path, _reading(processes=[base.processes[0], fat]), monkeypatch)
    check = checks.check_gpu_memory(L4_PLAN)
    assert check.state == "unhealthy"
    assert "feedback uses" in check.summary
    assert "over its plan" in check.summary


def test_gpu_of_another_size_than_planned_is_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake(tmp_path, _reading(name="NVIDIA H100", total_bytes=80 * 1024 * MIB), monkeypatch)
    check = checks.check_gpu_memory(L4_PLAN)
    assert check.state == "unhealthy"
    assert "the plan is for NVIDIA L4" in check.summary


def test_gpu_processes_of_other_containers_compare_by_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another container's processes: NVML gives pids and bytes, no command line.
    base = _reading()
    hidden = [replace(p, name="") for p in base.processes]
    _fake(tmp_path, _reading(processes=hidden), monkeypatch)
    assert checks.check_gpu_memory(L4_PLAN).state == "ok"
    over = [replace(p, used_bytes=p.used_bytes + 3000 * MIB) for p in hidden]
    used = sum(p.used_bytes for p in over) + 300 * MIB
    _fake(tmp_path, _reading(processes=over, used_bytes=used), monkeypatch)
    check = checks.check_gpu_memory(L4_PLAN)
    assert check.state == "unhealthy"
    assert "over the plan's" in check.summary


def test_no_gpu_is_fine_without_a_plan_and_bad_with_one() -> None:
    def no_gpu() -> nvml.GpuReading:
        raise nvml.NvmlError("no NVIDIA driver reachable through NVML")

    without = checks.check_gpu_memory(None, no_gpu)
    assert without.state == "absent"
    assert without.ok
    assert "no GPU" in without.summary
    with_plan = checks.check_gpu_memory(L4_PLAN, no_gpu)
    assert with_plan.state == "unhealthy"


def test_broken_fake_nvml_file_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gpu.json"
    path.write_text("{not json")
    monkeypatch.setenv("COHOST_FAKE_NVML", str(path))
    check = checks.check_gpu_memory(None)
    assert check.state == "unhealthy"
    assert "cannot read the GPU" in check.summary


# --------------------------------------------------------------------------- the command


def test_status_says_what_is_down_without_a_traceback() -> None:
    env = os.environ.copy()
    env.pop("COHOST_FAKE_NVML", None)
    run = cohost(
        "status", "--chatbot", dead_url(), "--feedback", dead_url(), "--worker", dead_url(),
        "--timeout", "1", env=env,
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stdout + run.stderr
    lines = run.stdout.splitlines()
    for name in ("chatbot", "feedback", "worker"):
        line = next(ln for ln in lines if f" {name} " in ln)
        assert "DOWN" in line
        assert "connection refused" in line
    assert "NOT HEALTHY: chatbot, feedback, worker" in run.stdout


def test_status_json_when_down(tmp_path: Path) -> None:
    env = dict(os.environ, COHOST_FAKE_NVML=str(tmp_path / "gpu.json"))
    (tmp_path / "gpu.json").write_text(_reading().to_json())
    run = cohost(
        "status", "--chatbot", dead_url(), "--feedback", dead_url(), "--worker", dead_url(),
        "--plan", str(L4_PLAN), "--json", "--timeout", "1", env=env,
    )  # fmt: skip
    assert run.returncode == 1
    data = json.loads(run.stdout)
    assert data["healthy"] is False
    assert data["checks"]["gpu"]["state"] == "ok"
    assert data["checks"]["feedback"]["state"] == "down"
    assert any(p.startswith("worker:") for p in data["problems"])


def test_watch_repeats_until_ctrl_c() -> None:
    proc = subprocess.Popen(
        [console_script("cohost"), "status", "--watch", "0.3", "--timeout", "0.5",
         "--chatbot", dead_url(), "--feedback", dead_url(), "--worker", dead_url()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    # Signal only once two frames are out: on a busy machine the interpreter may still be
    # starting after a fixed sleep, and a SIGINT then is not what this test is about.
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")))
    reader.start()
    deadline = time.monotonic() + 120
    while sum("cohost status at" in line for line in lines) < 2:
        assert time.monotonic() < deadline, "no two status frames within 120 s"
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    reader.join(timeout=30)
    out, err = "".join(lines), proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1  # the last status printed was unhealthy
    assert out.count("cohost status at") >= 2
    assert "Traceback" not in out + err


def test_worker_metrics_of_a_real_worker_waiting_for_its_engine(tmp_path: Path) -> None:
    """A real `feedback-worker` serves its metrics before its engine answers."""
    port = free_port()
    env = dict(
        os.environ,
        GOOGLE_CLOUD_PROJECT="status-test",
        PUBSUB_EMULATOR_HOST=f"127.0.0.1:{free_port()}",
        FEEDBACK_LLM_BASE_URL=f"{dead_url()}/v1",
        FEEDBACK_METRICS_PORT=str(port),
    )
    worker = Child(
        "worker", [console_script("feedback-worker")], log_path=tmp_path / "w.log", env=env
    )
    worker.start()
    try:
        worker.wait_ready(http_ok(f"http://127.0.0.1:{port}/metrics"), timeout=60)
        check = checks.check_worker(f"http://127.0.0.1:{port}")
        assert check.state == "ok", check.summary
        assert check.details["received"] == 0
        assert check.details["in_flight"] == 0
        assert "not pulling yet" in check.summary
        assert check.details["rss_bytes"] > 10 * MIB
    finally:
        worker.stop()


def test_worker_with_its_metrics_port_taken_says_so_in_one_line() -> None:
    """The worker cannot serve its metrics: one line naming the port and the setting, a
    non-zero exit, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(
            os.environ,
            GOOGLE_CLOUD_PROJECT="status-test",
            PUBSUB_EMULATOR_HOST=f"127.0.0.1:{free_port()}",
            FEEDBACK_METRICS_HOST="127.0.0.1",
            FEEDBACK_METRICS_PORT=str(port),
        )
        done = subprocess.run(
            [console_script("feedback-worker")], env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    assert "FEEDBACK_METRICS_PORT" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.engine
@pytest.mark.emulator
def test_status_of_a_running_stack(project: Project, engine: CpuServer, tmp_path: Path) -> None:
    """Real engine (as both chatbot and feedback), real worker that has answered one
    request, fake NVML with the L4 plan: healthy, exit 0, and the numbers are there."""
    port = free_port()
    worker = project.start_worker(engine, FEEDBACK_METRICS_PORT=str(port))
    try:
        publisher, collector = project.publisher(), project.collector()
        publisher.request("status-1", "A short essay about status pages.")
        publisher.publish(b"not json")
        collector.wait(results={"status-1"}, dead=1, timeout=120)
        (tmp_path / "gpu.json").write_text(_reading().to_json())
        env = dict(os.environ, COHOST_FAKE_NVML=str(tmp_path / "gpu.json"))
        root = engine.base_url.removesuffix("/v1")
        run = cohost(
            "status", "--chatbot", root, "--feedback", engine.base_url,
            "--worker", f"http://127.0.0.1:{port}", "--plan", str(L4_PLAN), "--json", env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        data = json.loads(run.stdout)
        assert data["healthy"] is True
        checks = data["checks"]
        for name in ("chatbot", "feedback"):
            details = checks[name]["details"]
            assert checks[name]["state"] == "ok"
            assert details["running"] == 0
            assert details["waiting"] == 0
            assert 0.0 <= details["kv_cache_usage"] <= 1.0
            assert details["models"] == ["feedback"]
        w = checks["worker"]["details"]
        assert w["succeeded"] >= 1
        assert w["dead_lettered_by_reason"] == {"invalid_json": 1.0}
        assert w["concurrency_limit"] == 16
        assert w["in_flight"] == 0
        text = cohost(
            "status", "--chatbot", root, "--feedback", root,
            "--worker", f"http://127.0.0.1:{port}", env=env,
        ).stdout  # fmt: skip
        assert "healthy; model feedback; running 0, waiting 0, KV cache" in text
        assert "dead-lettered 1 (invalid_json 1)" in text
        assert text.rstrip().endswith("healthy")
    finally:
        assert worker.stop(timeout=60) == 0


class _Sick(BaseHTTPRequestHandler):
    """An engine whose /health fails while /metrics still answers (a wedged vLLM)."""

    def do_GET(self) -> None:
        if self.path == "/health":
            self.send_response(503)
            self.end_headers()
            return
        body = (
            b'vllm:num_requests_running{model_name="chatbot"} 2\n'
            b'vllm:num_requests_waiting{model_name="chatbot"} 5\n'
            b'vllm:kv_cache_usage_perc{model_name="chatbot"} 0.42\n'
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def test_engine_whose_health_fails_is_unhealthy_not_down() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sick)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check = checks.check_engine("chatbot", f"http://127.0.0.1:{server.server_port}/v1")
    finally:
        server.shutdown()
        server.server_close()
    assert check.state == "unhealthy"
    assert "/health answered 503" in check.summary
    assert "running 2, waiting 5, KV cache 42.0%" in check.summary
    assert check.details["url"] == f"http://127.0.0.1:{server.server_port}"


def test_engine_whose_launcher_refused_says_why_and_when_it_exits() -> None:
    """A refused launcher waiting to exit (cohost.launch.refusing, the real server): down,
    with the reason, the refusals in a row and the time left; the table shows the rest of
    the reason and the fix under the engine's line. A chat request gets the same 503."""
    reason = (
        "refusing to start chatbot: GPU 0 (NVIDIA L4) has 9,000 MiB free, this server needs "
        "12,000 MiB (its planned process memory).\nHolding GPU memory now:\n"
        "  pid    4242     9,000 MiB  vllm serve other\nStop what should not be there"
    )
    waiting = refusing.Waiting(
        "chatbot", Refusal(EXIT_NO_MEMORY, reason), refusals=4, wait_s=120.0,
        next_wait_s=240.0, fix=backoff.FIX, exits_at=time.monotonic() + 47.4,
    )  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with refusing.answering(("127.0.0.1", port), waiting):
        check = checks.check_engine("chatbot", f"{url}/v1")
        chat = httpx2.post(f"{url}/v1/chat/completions", json={"messages": []}, timeout=5)
    assert check.state == "down"
    assert not check.ok
    assert check.summary.startswith(
        "refusing to start (exit 5): GPU 0 (NVIDIA L4) has 9,000 MiB free, this server needs "
    )
    assert "; refusal 4 in a row, exits in 4" in check.summary  # 47 s, or 46 on a slow run
    assert check.summary.endswith(" s, then restarts")
    refused = check.details["refused"]
    assert refused["reason"] == reason
    assert refused["next_wait_s"] == 240.0
    assert 40 < refused["exits_in_s"] <= 47.4
    assert check.details["health_status"] == 503
    lines = report.render(report.Status("now", [check])).splitlines()
    at = next(i for i, line in enumerate(lines) if " chatbot " in line)
    assert "DOWN" in lines[at]
    assert lines[at + 1].strip() == "Holding GPU memory now:"
    assert lines[at + 2].strip().startswith("pid    4242")
    assert lines[at + 4].strip() == backoff.FIX
    assert chat.status_code == 503
    assert int(chat.headers["Retry-After"]) in range(40, 49)
    assert chat.json()["error"]["message"].startswith("chatbot refuses to start (exit 5): ")
    # Once the wait is over the port is closed again: connection refused, as before.
    assert checks.check_engine("chatbot", url, timeout=2).summary == (
        "not reachable (connection refused)"
    )
