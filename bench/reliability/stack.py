"""The parts a run drives: the Pub/Sub emulator (restartable on its port), the engine and
one Pub/Sub project, and the environment the Google clients of this process read."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from cohost import emulator
from cohost.processes import Child, ChildFailed, feedback_setup, free_port

from harness.engine import CpuServer
from harness.pubsub import Project

from .config import Config


class SuiteError(RuntimeError):
    """The run could not go on (a part did not start, a phase stalled)."""


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set variables for this process (the Google clients read them), restore after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Stack:
    """The emulator (restartable on its port), the engine and one Pub/Sub project."""

    def __init__(self, cfg: Config, logs: Path, engine: CpuServer) -> None:
        self.cfg = cfg
        self.logs = logs
        self.engine = engine
        self.emulator_port = free_port()
        self.emulator_host = f"127.0.0.1:{self.emulator_port}"
        self.emulator_starts = 0
        self.emulator: Child | None = None
        project_id = f"rel-{uuid.uuid4().hex[:8]}"
        env = dict(
            os.environ,
            PUBSUB_EMULATOR_HOST=self.emulator_host,
            GOOGLE_CLOUD_PROJECT=project_id,
            FEEDBACK_ACK_DEADLINE_S=str(cfg.ack_deadline_s),
        )
        self.project = Project(self.emulator_host, project_id, logs, env)

    def start_emulator(self) -> float:
        self.emulator_starts += 1
        log_path = self.logs / f"emulator-{self.emulator_starts}.log"
        self.emulator = emulator.emulator_child("127.0.0.1", self.emulator_port, log_path=log_path)
        self.emulator.start()
        return emulator.wait_until_started(self.emulator)

    def kill_emulator(self) -> None:
        if self.emulator is not None:
            self.emulator.kill()

    def stop_emulator(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()

    def setup(self) -> list[str]:
        """`feedback-worker setup`: what an operator runs after the emulator lost its state."""
        try:
            return feedback_setup(self.project.env)
        except ChildFailed as exc:
            raise SuiteError(str(exc)) from exc
