"""`cohost up`: the whole system on one machine without a GPU or Docker (the local stack).

Starts, each gated on the previous one being ready (the same order the GPU stack
uses): the Pub/Sub emulator, the chatbot's CPU vLLM server, the feedback CPU vLLM
server, the topics, and the feedback worker. Ctrl-C (or SIGTERM) stops them in
reverse order; the worker first, so it can hand unfinished requests back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from cohost_shared import endpoints
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cohost import emulator, paths
from cohost.cpu_engine import install, models, server
from cohost.launch.command import pause_env
from cohost.processes import (
    Child,
    ChildFailed,
    console_script,
    feedback_setup,
    http_ok,
    log_contains,
    port_free,
    worker_pulling,
)

Say = Callable[[str], None]


class LocalSettings(BaseSettings):
    """Ports and models of the local stack (`COHOST_LOCAL_` variables)."""

    model_config = SettingsConfigDict(env_prefix="COHOST_LOCAL_", extra="ignore")

    host: str = endpoints.HOST
    emulator_port: int = endpoints.EMULATOR_PORT
    chatbot_port: int = endpoints.CHATBOT_PORT
    feedback_port: int = endpoints.FEEDBACK_ENGINE_PORT
    metrics_port: int = endpoints.WORKER_METRICS_PORT
    project: str = "cohost-local"
    chatbot_model: str = "smollm2-135m-instruct"
    feedback_model: str = "smollm2-135m-instruct"
    max_model_len: int = Field(default=2048, ge=256)
    max_num_seqs: int = Field(default=8, ge=1)
    # Each CPU server's KV cache, in GiB of RAM.
    kv_cache_gib: int = Field(default=1, ge=1)
    engine_start_timeout_s: float = 600.0


def worker_env(settings: LocalSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PUBSUB_EMULATOR_HOST": f"{settings.host}:{settings.emulator_port}",
            "GOOGLE_CLOUD_PROJECT": settings.project,
            "FEEDBACK_LLM_BASE_URL": f"http://{settings.host}:{settings.feedback_port}/v1",
            "FEEDBACK_LLM_MODEL": "feedback",
            "FEEDBACK_MAX_IN_FLIGHT": str(settings.max_num_seqs),
            "FEEDBACK_METRICS_PORT": str(settings.metrics_port),
            "FEEDBACK_CHAT_METRICS_URL": f"http://{settings.host}:{settings.chatbot_port}/load",
        }
    )
    return env


class Stack:
    def __init__(self, settings: LocalSettings, say: Say = print) -> None:
        self.settings = settings
        self.say = say
        self.children: list[Child] = []

    def _engine(self, name: str, model: str, port: int) -> Child:
        s = self.settings
        model_dir = models.ensure_model(model, log=self.say)
        argv = server.server_command(
            model_dir,
            port=port,
            served_model_name=name,
            host=s.host,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
        )
        env = server.server_env(kv_cache_gib=s.kv_cache_gib) | pause_env(name)
        return Child(
            f"{name} engine", argv, log_path=paths.logs_dir() / f"{name}-engine.log", env=env
        )

    def _start(self, child: Child, ready: Callable[[], bool], timeout: float) -> None:
        self.say(f"starting {child.name} (log: {child.log_path})")
        child.log_path.unlink(missing_ok=True)
        child.start()
        self.children.append(child)
        took = child.wait_ready(ready, timeout=timeout, progress=self.say)
        self.say(f"  {child.name} ready in {took:.0f} s")

    def check_ports(self) -> None:
        """Fail before starting anything if a port is taken: a leftover server there
        would answer our health checks and we would talk to the wrong process."""
        s = self.settings
        wanted = {
            "COHOST_LOCAL_EMULATOR_PORT": s.emulator_port,
            "COHOST_LOCAL_CHATBOT_PORT": s.chatbot_port,
            "COHOST_LOCAL_FEEDBACK_PORT": s.feedback_port,
            "COHOST_LOCAL_METRICS_PORT": s.metrics_port,
        }
        for name, port in wanted.items():
            if not port_free(s.host, port):
                raise ChildFailed(
                    f"port {port} on {s.host} is already in use (another `cohost up` or a "
                    f"leftover server?); stop it or choose another with {name}"
                )

    def up(self) -> None:
        s = self.settings
        self.check_ports()
        install.ensure_engine(log=self.say)
        emu = emulator.emulator_child(
            s.host, s.emulator_port, log_path=paths.logs_dir() / "pubsub-emulator.log"
        )
        self._start(emu, log_contains(emu.log_path, emulator.READY_LINE), 60)
        # One engine after the other, as on the GPU: each measures free memory at start.
        for name, model, port in (
            ("chatbot", s.chatbot_model, s.chatbot_port),
            ("feedback", s.feedback_model, s.feedback_port),
        ):
            child = self._engine(name, model, port)
            self._start(child, http_ok(f"http://{s.host}:{port}/health"), s.engine_start_timeout_s)
        env = worker_env(s)
        self.say("creating topics and subscriptions")
        feedback_setup(env)
        worker = Child(
            "feedback worker",
            [console_script("feedback-worker")],
            log_path=paths.logs_dir() / "feedback-worker.log",
            env=env,
        )
        self._start(worker, worker_pulling(worker.log_path), 120)

    def banner(self) -> str:
        s = self.settings
        emu = f"{s.host}:{s.emulator_port}"
        return f"""
cohost is up.
  chat:      OpenAI API at http://{s.host}:{s.chatbot_port}/v1, model "chatbot"
             uv run chatbot "Hello!"
  feedback:  PUBSUB_EMULATOR_HOST={emu} GOOGLE_CLOUD_PROJECT={s.project} \\
               uv run feedback-worker submit "Text to get feedback on"
  metrics:   worker http://{s.host}:{s.metrics_port}/metrics, engines /metrics on their ports
  logs:      {paths.logs_dir()}
Ctrl-C stops everything.
"""

    def watch(self) -> int:
        """Block until Ctrl-C/SIGTERM (return 0) or a child dies (return 1)."""
        while True:
            for child in self.children:
                if not child.alive():
                    self.say(f"{child.name} exited unexpectedly (log: {child.log_path})")
                    return 1
            time.sleep(0.5)

    def down(self) -> None:
        for child in reversed(self.children):
            if child.alive():
                self.say(f"stopping {child.name}")
                child.stop(timeout=60)


class _Stop(Exception):
    pass


def run(settings: LocalSettings | None = None, say: Say = print) -> int:
    stack = Stack(settings or LocalSettings(), say)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        stack.up()
        say(stack.banner())
        code = stack.watch()
    except _Stop:
        say("stopping (Ctrl-C)")
    except ChildFailed as exc:
        say(f"error: {exc}")
        code = 1
    finally:
        # A second Ctrl-C must not cut the orderly shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.down()
    say("stopped")
    return code
