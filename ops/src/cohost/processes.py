"""Child processes that must come up in order and go down cleanly.

`cohost up` and the tests start the same things (the Pub/Sub emulator, CPU vLLM
servers, the worker). Each is a `Child`: started with its output in a log file,
waited on until it is ready, and failing fast with the log's tail when it dies
before that, instead of waiting out a timeout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx2
from cohost_shared.logs import WORKER_READY_EVENT, logged


class ChildFailed(RuntimeError):
    """A child exited or did not become ready in time."""


def console_script(name: str) -> str:
    """A console script of this same environment (the worker's, for instance)."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if found is None:
        raise ChildFailed(f"`{name}` not found: run `uv sync` in the project first")
    return found


def feedback_setup(env: Mapping[str, str], timeout: float = 120) -> list[str]:
    """Run `feedback-worker setup` (topics and subscriptions, idempotent) and return the
    lines it printed; raises ChildFailed with its stderr if it fails."""
    done = subprocess.run(
        [console_script("feedback-worker"), "setup"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise ChildFailed(f"feedback-worker setup failed:\n{done.stderr[-2000:]}")
    return done.stdout.splitlines()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on host:port (so a server we start can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """One child process with its own log file and process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A new session: a Ctrl-C in the terminal reaches `cohost up`, which then
            # stops the children in order, rather than every child at once.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        return self._proc().pid

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise ChildFailed(f"{self.name} was never started")
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(
        self,
        ready: Callable[[], bool],
        *,
        timeout: float,
        interval: float = 0.25,
        progress: Callable[[str], None] | None = None,
    ) -> float:
        """Poll `ready` until it holds; raise with the log tail if the child dies or time runs out.

        Returns the seconds it took.
        """
        start = time.monotonic()
        next_note = start + 10.0
        while True:
            if ready():
                return time.monotonic() - start
            code = self._proc().poll()
            if code is not None:
                raise ChildFailed(
                    f"{self.name} exited with code {code} before it was ready "
                    f"(log: {self.log_path}):\n{tail(self.log_path)}"
                )
            now = time.monotonic()
            if now - start > timeout:
                raise ChildFailed(
                    f"{self.name} not ready after {timeout:.0f} s "
                    f"(log: {self.log_path}):\n{tail(self.log_path)}"
                )
            if progress is not None and now >= next_note:
                progress(f"still waiting for {self.name} ({now - start:.0f} s)")
                next_note = now + 10.0
            time.sleep(interval)

    def send_signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, *, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the child to stop, then kill its process group if it does not within `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as far as the child can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def worker_pulling(log_path: Path) -> Callable[[], bool]:
    """Ready check of a `feedback-worker` process: its log says its stream is open."""
    return lambda: logged(log_path, WORKER_READY_EVENT)


def log_contains(path: Path, needle: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with path.open("rb") as f:
                return needle.encode() in f.read()
        except FileNotFoundError:
            return False

    return check


def http_ok(url: str, *, timeout: float = 2.0) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx2.get(url, timeout=timeout).status_code == 200
        except httpx2.HTTPError:
            return False

    return check
