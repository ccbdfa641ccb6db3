"""The worker under a small supervisor that restarts it like a container runtime would,
and what each worker process (an `Incarnation`) did and how it ended."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import psutil
from cohost.processes import Child, console_script, tail
from cohost.status.checks import fetch_metrics
from cohost_shared.logs import WORKER_READY_EVENT, logged

from .stack import Stack, SuiteError


@dataclass
class Incarnation:
    number: int
    child: Child
    started: float
    ready: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    planned: str | None = None  # why the suite stopped it, if it did
    cause: str = ""
    rss: list[tuple[float, int, float]] = field(default_factory=list)  # (time, rss, received)

    @property
    def pid(self) -> int:
        return self.child.pid

    def received(self) -> float:
        return self.rss[-1][2] if self.rss else 0.0


class Supervisor:
    """Runs `feedback-worker` like a container runtime with a restart policy.

    A planned kill (fault injection) is restarted at once; any other exit after a
    backoff that doubles while the worker keeps dying young (a crash loop, which
    the report flags once three exits in a row come within 30 s of a start).
    Samples each worker's RSS and Prometheus counters every 2 s.
    """

    def __init__(self, stack: Stack, metrics_port: int) -> None:
        self.stack = stack
        self.metrics_port = metrics_port
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.incarnations: list[Incarnation] = []
        self.crash_loop = False
        self._young_exits = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def env(self) -> dict[str, str]:
        return self.stack.project.worker_env(
            self.stack.engine,
            FEEDBACK_DEFAULT_MAX_TOKENS=str(self.stack.cfg.max_tokens),
            FEEDBACK_METRICS_PORT=str(self.metrics_port),
            FEEDBACK_ACK_DEADLINE_S=str(self.stack.cfg.ack_deadline_s),
            FEEDBACK_SHUTDOWN_GRACE_S=str(self.stack.cfg.shutdown_grace_s),
        )

    @property
    def current(self) -> Incarnation:
        with self._lock:
            return self.incarnations[-1]

    def _spawn(self) -> Incarnation:
        n = len(self.incarnations) + 1
        log_path = self.stack.logs / f"{self.stack.project.project_id}-worker-{n}.log"
        child = Child(
            f"worker-{n}", [console_script("feedback-worker")], log_path=log_path, env=self.env()
        )
        child.start()
        inc = Incarnation(n, child, started=time.time())
        with self._lock:
            self.incarnations.append(inc)
        return inc

    def start(self, timeout: float = 180) -> None:
        self._spawn()
        self._thread.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180, after: int = 0) -> Incarnation:
        """The first pulling worker numbered above `after` (a stopped one's number)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            inc = self.current
            if inc.number > after and inc.ready is not None and inc.child.alive():
                return inc
            time.sleep(0.2)
        raise SuiteError(
            f"worker not pulling after {timeout:.0f} s:\n{tail(self.current.child.log_path)}"
        )

    def kill(self) -> Incarnation:
        """SIGKILL the worker (a crash as far as it can tell); the loop restarts it."""
        inc = self.current
        inc.planned = "SIGKILL (fault injection)"
        inc.child.kill()
        return inc

    def terminate(self) -> Incarnation:
        """SIGTERM the worker (a deploy or scale-in); the loop restarts it once it exits."""
        inc = self.current
        inc.planned = "SIGTERM (fault injection)"
        inc.child.send_signal(signal.SIGTERM)
        return inc

    def stop(self) -> Incarnation:
        """SIGTERM the worker for good (end of run) and stop supervising; once stopped,
        a second call only returns the last incarnation again."""
        self._stop.set()
        self._thread.join(timeout=30)
        inc = self.current
        if inc.child.alive():
            inc.planned = "SIGTERM (end of run)"
            inc.child.stop(timeout=60)
        self._record_exit(inc)
        return inc

    def _record_exit(self, inc: Incarnation) -> None:
        if inc.ended is not None:
            return
        inc.ended = time.time()
        proc = inc.child.proc
        inc.exit_code = None if proc is None else proc.returncode
        inc.cause = inc.planned or exit_cause(inc.child.log_path, inc.exit_code)

    def _loop(self) -> None:
        next_sample = 0.0
        while not self._stop.is_set():
            inc = self.current
            proc = inc.child.proc
            if proc is not None and proc.poll() is not None:
                self._record_exit(inc)
                if inc.planned:
                    delay = 0.1
                    self._young_exits = 0
                else:
                    lived = (inc.ended or time.time()) - inc.started
                    self._young_exits = self._young_exits + 1 if lived < 30 else 1
                    if self._young_exits >= 3:
                        self.crash_loop = True
                    delay = min(30.0, 0.5 * 2 ** (self._young_exits - 1))
                if self._stop.wait(delay):
                    return
                self._spawn()
                continue
            if inc.ready is None and logged(inc.child.log_path, WORKER_READY_EVENT):
                inc.ready = time.time()
            now = time.monotonic()
            if now >= next_sample:
                next_sample = now + 2.0
                self._sample(inc)
            self._stop.wait(0.2)

    def _sample(self, inc: Incarnation) -> None:
        try:
            rss = psutil.Process(inc.pid).memory_info().rss
        except psutil.Error:
            return
        received = float("nan")
        with contextlib.suppress(httpx2.HTTPError):
            received = (
                fetch_metrics(self.metrics_url, timeout=1.0).value("feedback_received_total") or 0.0
            )
        if received == received:  # not NaN: the endpoint is this incarnation's
            inc.rss.append((time.time(), rss, received))

    def incarnation_at(self, when: float) -> Incarnation | None:
        for inc in self.incarnations:
            if inc.started <= when <= (inc.ended or float("inf")):
                return inc
        return None


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def exit_cause(log_path: Path, code: int | None) -> str:
    """Why a worker exited on its own: its last error event, else its last line."""
    lines = read_log(log_path).splitlines()
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("level") in ("error", "critical"):
                detail = event.get("error") or event.get("exception") or ""
                return f"exit {code}: {event.get('event')}: {str(detail)[:200]}"
    last = lines[-1][:200] if lines else "(empty log)"
    return f"exit {code}: {last}"
