"""The restart stress run: the worker SIGTERMed (a deploy, a scale-in) and SIGKILLed (a
crash) under load, over and over, with every request that each restart caught followed
until it comes back.

    uv run python -m bench.reliability --restarts [--sigterm 50] [--sigkill 20]

One cycle: publish a batch of slow requests (`max_tokens` 64, so a SIGTERM's 1 s grace
period cancels the ones in flight), wait until the worker has some in flight, signal it
(the supervisor restarts it once it exits, like a container runtime), then follow every
request that was unanswered at the signal until its result is out. A result says when a
worker took the request up again (`created_at` less `latency_ms`), so per restart it
counts the requests that came back, those that came back late (taken up again more than
two ack deadlines after the signal) and those that never came back (no result by the end
of the run, after a final wait).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from cohost.status.checks import fetch_metrics
from cohost_shared.messages import FeedbackResult

from .config import WORKER_KILL, WORKER_TERM, Config
from .running import running
from .stack import Stack, SuiteError
from .supervisor import Supervisor
from .traffic import Producer, Tolerant

PREFIX = "restart-"
FOLLOW_S = 180.0  # how long a cycle waits for answers past two ack deadlines


@dataclass
class Restart:
    number: int
    kind: str
    at: float  # when the worker was signalled (time.time())
    in_flight: float  # the worker's feedback_in_flight at the signal
    caught: list[str]  # request ids unanswered at the signal
    back_s: dict[str, float] = field(default_factory=dict)  # id -> seconds until taken up
    exit_code: int | None = None
    returned: int | None = None  # what a SIGTERMed worker says it returned

    def late(self, limit_s: float) -> int:
        return sum(1 for s in self.back_s.values() if s > limit_s)

    def lost(self) -> int:
        return len(self.caught) - len(self.back_s)


@dataclass
class StressOutcome:
    ack_deadline_s: int
    restarts: list[Restart] = field(default_factory=list)
    published: int = 0
    answered: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    seconds: float = 0.0

    @property
    def late_limit_s(self) -> float:
        return 2.0 * self.ack_deadline_s


def schedule(sigterms: int, sigkills: int) -> list[str]:
    """Both kinds spread evenly over the run, interleaved."""
    marks = [((i + 0.5) / sigterms, WORKER_TERM) for i in range(sigterms)]
    marks += [((i + 0.5) / sigkills, WORKER_KILL) for i in range(sigkills)]
    return [kind for _, kind in sorted(marks)]


def run_stress(
    cfg: Config, *, logs: Path, batch: int, say: Callable[[str], None] = print
) -> StressOutcome:
    """`cfg.worker_terms` SIGTERMs and `cfg.worker_kills` SIGKILLs on a fresh emulator,
    project and CPU engine."""
    with running(cfg, logs, say=say) as parts:
        supervisor = parts.start()
        say(f"{cfg.worker_terms} SIGTERMs and {cfg.worker_kills} SIGKILLs (logs: {logs})")
        return run_restarts(
            cfg,
            parts.stack,
            supervisor,
            sigterms=cfg.worker_terms,
            sigkills=cfg.worker_kills,
            batch=batch,
            say=say,
        )


def run_restarts(
    cfg: Config,
    stack: Stack,
    supervisor: Supervisor,
    *,
    sigterms: int,
    sigkills: int,
    batch: int,
    say: Callable[[str], None] = print,
) -> StressOutcome:
    producer, collector = Producer(stack.project), Tolerant(stack.project)
    outcome = StressOutcome(ack_deadline_s=cfg.ack_deadline_s)
    taken_up: dict[str, float] = {}  # request id -> when a worker began its answer
    results: Counter[str] = Counter()
    seen = 0
    started = time.monotonic()

    def poll() -> None:
        nonlocal seen
        collector.poll()
        for received in collector.results[seen:]:
            result = FeedbackResult.model_validate_json(received.data)
            results[result.request_id] += 1
            began = result.created_at.timestamp() - result.latency_ms / 1000
            taken_up[result.request_id] = max(taken_up.get(result.request_id, 0.0), began)
        seen = len(collector.results)

    for n, kind in enumerate(schedule(sigterms, sigkills), start=1):
        ids = [f"{PREFIX}{n:03d}-{i:03d}" for i in range(batch)]
        if None in producer.publish_many([_request(rid, cfg.max_tokens) for rid in ids]):
            raise SuiteError(f"restart {n}: publishing a batch failed")
        outcome.published += len(ids)
        in_flight = _wait_busy(supervisor, poll, want=min(8, batch), timeout=60)
        caught = [r for r in ids if r not in taken_up]
        at = time.time()
        victim = supervisor.kill() if kind == WORKER_KILL else supervisor.terminate()
        restart = Restart(n, kind, at, in_flight, caught)
        outcome.restarts.append(restart)
        supervisor.wait_ready(after=victim.number)
        # Follow this restart's requests until they are answered; stragglers are picked
        # up by the final wait.
        until = time.monotonic() + outcome.late_limit_s + FOLLOW_S
        while time.monotonic() < until and not all(r in taken_up for r in caught):
            poll()
        restart.exit_code = victim.exit_code
        restart.returned = _returned(victim.child.log_path.read_text(errors="replace"))
        back = [taken_up[r] - at for r in caught if r in taken_up]
        say(
            f"  restart {n} ({kind}, {in_flight:.0f} in flight): {len(back)}/{len(caught)} "
            f"back, the last taken up {max(back, default=0.0):.1f} s after the signal"
        )
    # The final wait: anything still missing after three more ack deadlines is lost.
    until = time.monotonic() + 3 * cfg.ack_deadline_s
    while time.monotonic() < until and len(taken_up) < outcome.published:
        poll()
    for restart in outcome.restarts:
        restart.back_s = {r: taken_up[r] - restart.at for r in restart.caught if r in taken_up}
    outcome.answered = sum(1 for r in results if r.startswith(PREFIX))
    outcome.duplicates = sum(c - 1 for r, c in results.items() if r.startswith(PREFIX))
    outcome.dead_letters = len(collector.dead_letters)
    outcome.seconds = time.monotonic() - started
    return outcome


def markdown(outcome: StressOutcome) -> str:
    rs = outcome.restarts
    limit = outcome.late_limit_s
    lines = [
        f"{outcome.published:,} requests published, {outcome.answered:,} answered, "
        f"{outcome.duplicates} duplicate results, {outcome.dead_letters} dead letters, "
        f"in {outcome.seconds / 60:.1f} min. Ack deadline {outcome.ack_deadline_s} s; "
        f"late = back more than {limit:.0f} s (two ack deadlines) after the signal.",
        "",
        "| restarts | requests caught | in flight at the signal | back | late | never back | "
        "slowest back | restarts that lost any |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in (WORKER_TERM, WORKER_KILL):
        of = [r for r in rs if r.kind == kind]
        if not of:
            continue
        caught = sum(len(r.caught) for r in of)
        back = sum(len(r.back_s) for r in of)
        slowest = max((s for r in of for s in r.back_s.values()), default=0.0)
        lines.append(
            f"| {len(of)} x {kind} | {caught:,} | {sum(r.in_flight for r in of):,.0f} | "
            f"{back:,} | {sum(r.late(limit) for r in of)} | {sum(r.lost() for r in of)} | "
            f"{slowest:.1f} s | {sum(1 for r in of if r.lost())} |"
        )
    lines += [
        "",
        "Per restart: kind, caught, back, late, never back, slowest (s), exit, returned.",
        "",
    ]
    lines.append("```")
    for r in rs:
        slowest = max(r.back_s.values(), default=0.0)
        lines.append(
            f"{r.number:3d} {r.kind:15s} {len(r.caught):3d} {len(r.back_s):3d} "
            f"{r.late(limit):3d} {r.lost():3d} {slowest:6.1f} {r.exit_code} {r.returned}"
        )
    lines.append("```")
    return "\n".join(lines)


def failures(outcome: StressOutcome) -> list[str]:
    lost = sum(r.lost() for r in outcome.restarts)
    late = sum(r.late(outcome.late_limit_s) for r in outcome.restarts)
    out = []
    if lost:
        out.append(f"{lost} requests never came back")
    if late:
        out.append(f"{late} requests came back more than two ack deadlines late")
    if outcome.dead_letters:
        out.append(f"{outcome.dead_letters} valid requests dead-lettered")
    bad_exit = [r.number for r in outcome.restarts if r.kind == WORKER_TERM and r.exit_code != 0]
    if bad_exit:
        out.append(f"SIGTERMed workers exited non-zero: restarts {bad_exit}")
    return out


def _request(rid: str, max_tokens: int) -> bytes:
    text = f"Stress {rid}: the worker restarts while this request is in flight."
    return json.dumps({"request_id": rid, "text": text, "max_tokens": max_tokens}).encode()


def _wait_busy(
    supervisor: Supervisor, poll: Callable[[], None], want: int, timeout: float
) -> float:
    """Poll results until the worker has `want` requests in flight; what it has then."""
    deadline = time.monotonic() + timeout
    in_flight = 0.0
    while time.monotonic() < deadline:
        poll()
        try:
            in_flight = (
                fetch_metrics(supervisor.metrics_url, timeout=1).value("feedback_in_flight") or 0.0
            )
        except httpx2.HTTPError:
            continue
        if in_flight >= want:
            break
    return in_flight


def _returned(log: str) -> int | None:
    for line in reversed(log.splitlines()):
        if '"shutdown_complete"' in line:
            try:
                value = json.loads(line).get("returned")
            except ValueError:
                return None
            return value if isinstance(value, int) else None
    return None
