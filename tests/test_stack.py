"""`cohost up`, as a user runs it: the whole system on CPU, then Ctrl-C.

The real command in its own process: the Pub/Sub emulator, two CPU vLLM servers (the
random-weight tiny-llama, for speed) and the worker, started in order; a chat through the
openai client, a feedback request through `feedback-worker submit`, then SIGINT and an
orderly stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import openai
import pytest
from cohost.processes import Child, console_script, free_port, log_contains

pytestmark = [pytest.mark.engine, pytest.mark.emulator]

# What `cohost up` starts, in its order.
PARTS = ("pubsub-emulator", "chatbot engine", "feedback engine", "feedback worker")


def test_up_serves_chat_and_feedback_then_stops_on_ctrl_c(tmp_path: object) -> None:
    ports = {name: free_port() for name in ("EMULATOR", "CHATBOT", "FEEDBACK", "METRICS")}
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "COHOST_LOCAL_CHATBOT_MODEL": "tiny-llama",
        "COHOST_LOCAL_FEEDBACK_MODEL": "tiny-llama",
        "COHOST_LOCAL_PROJECT": "up-test",
        **{f"COHOST_LOCAL_{name}_PORT": str(port) for name, port in ports.items()},
    }
    log = tmp_path / "up.log"  # type: ignore[operator]
    up = Child("cohost up", [console_script("cohost"), "up"], log_path=log, env=env).start()
    try:
        up.wait_ready(log_contains(log, "cohost is up."), timeout=900)
        text = log.read_text()
        # One after the other, in the GPU stack's order.
        order = [text.index(f"starting {name}") for name in PARTS]
        assert order == sorted(order)

        chat = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['CHATBOT']}/v1", api_key="EMPTY")
        reply = chat.chat.completions.create(
            model="chatbot", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert reply.choices[0].message.content is not None
        assert reply.usage is not None
        assert reply.usage.completion_tokens > 0

        submit = subprocess.run(
            [console_script("feedback-worker"), "submit", "Plants turn light into sugar.",
             "--max-tokens", "8", "--timeout", "120"],
            env={**env, "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{ports['EMULATOR']}",
                 "GOOGLE_CLOUD_PROJECT": "up-test"},
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stderr
        result = json.loads(submit.stdout)
        assert result["model"] == "feedback"
        assert result["usage"]["completion_tokens"] > 0

        up.send_signal(signal.SIGINT)
        assert up.proc is not None
        assert up.proc.wait(timeout=180) == 0
    finally:
        up.stop(timeout=60)
    text = log.read_text()
    assert "stopping (Ctrl-C)" in text
    # The worker first (it hands back unfinished work), the emulator last.
    stops = [text.index(f"stopping {name}") for name in reversed(PARTS)]
    assert stops == sorted(stops)
    assert text.rstrip().endswith("stopped")
