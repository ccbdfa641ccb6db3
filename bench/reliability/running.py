"""One run's parts brought up in order, and down in reverse however the run ends: the CPU
engine (unless the caller lends one), the emulator with a fresh project, and the worker
under its supervisor. The suite and the restart stress run both run inside `running`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.processes import free_port

from harness.engine import TEST_MODEL, CpuServer

from .config import Config
from .stack import Stack, environment
from .supervisor import Supervisor


@dataclass
class Parts:
    """What `running` yields: the stack, not yet started, and its supervisor once `start`
    has made one (kept even if the worker never comes up: the suite reports on it)."""

    stack: Stack
    supervisor: Supervisor | None = None

    def start(self) -> Supervisor:
        """The emulator, the project's topics, then the worker, pulling. Called inside the
        run's own error handling, so that a part that does not start is the run's to report."""
        self.stack.start_emulator()
        self.stack.setup()
        self.supervisor = Supervisor(self.stack, free_port())
        self.supervisor.start()
        return self.supervisor


@contextlib.contextmanager
def running(
    cfg: Config,
    logs: Path,
    *,
    engine: CpuServer | None = None,
    say: Callable[[str], None] = print,
    say_engine_start: bool = False,
) -> Iterator[Parts]:
    """With `engine`, use (and let the run kill and restart) that server and leave it
    running; else install, start and finally stop one. `say_engine_start`: a line before
    an own engine starts (the suite's progress has it; the stress run's does not)."""
    logs.mkdir(parents=True, exist_ok=True)
    # Everything started here is stopped in reverse, whichever start fails: an own engine
    # must not outlive a run whose emulator or project could not be set up.
    with contextlib.ExitStack() as started:
        if engine is None:
            ensure_engine(log=say)
            engine = CpuServer(ensure_model(TEST_MODEL, log=say), free_port(), logs / "engine.log")
            started.callback(engine.stop)
            if say_engine_start:
                say("starting the engine")
            engine.start()
        parts = Parts(Stack(cfg, logs, engine))
        started.callback(parts.stack.stop_emulator)

        def stop_worker() -> None:
            # It talks to the emulator and the engine, so it stops first. The suite may have
            # stopped it already, to report how it ended: a second stop does nothing.
            if parts.supervisor is not None:
                parts.supervisor.stop()

        started.callback(stop_worker)
        # The Google clients of this process (the producer, the collector) read these.
        with environment(
            PUBSUB_EMULATOR_HOST=parts.stack.emulator_host,
            GOOGLE_CLOUD_PROJECT=parts.stack.project.project_id,
        ):
            yield parts
