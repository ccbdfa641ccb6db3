"""Phase 1: valid requests at a steady pace while the worker, the engine and the emulator
are killed at fixed points of progress; every request id must get a result, and every
duplicate result must be explained."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx2
from cohost.processes import tail
from cohost.status.checks import fetch_metrics
from cohost_shared.messages import FeedbackResult

from .config import ENGINE_RESTART, WORKER_KILL, WORKER_TERM, Config, fault_plan
from .stack import Stack, SuiteError
from .supervisor import Supervisor, read_log
from .traffic import Producer, Tolerant


@dataclass
class FaultEvent:
    kind: str
    at_answered: int
    started: float
    took_s: float
    detail: str


@dataclass
class LoadOutcome:
    requests: int
    answered: int = 0
    results: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    duplicate_ids: dict[str, list[str]] = field(default_factory=dict)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    republished: set[str] = field(default_factory=set)
    faults: list[FaultEvent] = field(default_factory=list)
    seconds: float = 0.0


SENTENCES = (
    "The water cycle moves water between the sea, the air and the land.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The essay argues that cities should plant more trees to cool their streets.",
    "Rivers carve valleys over millions of years, carrying sediment to the sea.",
)
LOAD_PREFIX = "load-"


def load_request(i: int) -> bytes:
    text = f"Essay {i}: " + " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4))
    return json.dumps({"request_id": f"{LOAD_PREFIX}{i:05d}", "text": text}).encode()


def run_load(
    cfg: Config,
    stack: Stack,
    supervisor: Supervisor,
    producer: Producer,
    collector: Tolerant,
    say: Callable[[str], None],
) -> LoadOutcome:
    """Publish at a steady pace, inject the faults, return once every id has a result.
    Duplicates are counted at the end of the whole run (`account_load`), so that late
    redeliveries are included."""
    n = cfg.requests
    outcome = LoadOutcome(requests=n)
    payloads = {f"{LOAD_PREFIX}{i:05d}": load_request(i) for i in range(n)}
    order = list(payloads)
    answered: set[str] = set()
    plan = fault_plan(cfg)
    seen = len(collector.results)
    dead_seen = len(collector.dead_letters)
    next_i = 0
    last_fault_at = 0
    started = time.monotonic()
    last_progress = started
    last_note = started

    def publish(ids: Sequence[str]) -> None:
        for rid, mid in zip(ids, producer.publish_many([payloads[r] for r in ids]), strict=True):
            if mid is None:
                raise SuiteError(f"publishing {rid} failed outside any emulator outage")

    while len(answered) < n:
        outstanding = next_i - len(answered)
        if next_i < n and outstanding < cfg.window:
            batch = order[next_i : next_i + min(200, cfg.window - outstanding)]
            publish(batch)
            next_i += len(batch)
        collector.poll()
        for received in collector.results[seen:]:
            answered.add(received.attributes.get("request_id", ""))
            last_progress = time.monotonic()
        seen = len(collector.results)
        if len(collector.dead_letters) > dead_seen:
            outcome.dead_letters = [d.attributes for d in collector.dead_letters[dead_seen:]]
            break  # valid requests must never be dead-lettered: reported as a failure
        now = time.monotonic()
        if now - last_note > 30:
            say(f"  load: {len(answered):,}/{n:,} answered, {next_i:,} published")
            last_note = now
        if now - last_progress > cfg.stall_s:
            missing = [r for r in order[:next_i] if r not in answered][:10]
            raise SuiteError(
                f"load stalled: no result for {cfg.stall_s:.0f} s, {len(answered)}/{n} "
                f"answered; missing e.g. {missing}\n"
                f"worker log:\n{tail(supervisor.current.child.log_path)}"
            )
        # Each fault waits for its point of progress and for some progress since the last
        # one, so that faults do not pile up when results arrive in bursts.
        if plan and len(answered) >= max(plan[0][0], last_fault_at + n // 25):
            _, kind = plan.pop(0)
            last_fault_at = len(answered)
            busy = _in_flight(supervisor.metrics_url)
            retries_before = _log_events(supervisor, "engine_retry")
            incarnation_before = supervisor.current.number
            say(f"  fault at {len(answered):,} answered ({busy} in flight): {kind}")
            t0 = time.time()
            if kind in (WORKER_KILL, WORKER_TERM):
                victim = supervisor.kill() if kind == WORKER_KILL else supervisor.terminate()
                supervisor.wait_ready(after=victim.number)
                detail = (
                    f"worker {victim.number} (pid {victim.pid}) "
                    f"{kind.removeprefix('worker ')}ed after about "
                    f"{victim.received():,.0f} messages; worker {supervisor.current.number} "
                    f"pulling {time.time() - t0:.1f} s later"
                )
            elif kind == ENGINE_RESTART:
                stack.engine.kill()
                time.sleep(2)
                stack.engine.start()
                detail = (
                    "engine SIGKILLed, restarted 2 s later on the same port: "
                    f"healthy {time.time() - t0:.1f} s after the kill"
                )
            else:
                stack.kill_emulator()
                up = stack.start_emulator()
                lines = stack.setup()
                created = sum(1 for line in lines if line.startswith("created"))
                # As a producer would: everything sent without an answer yet goes again.
                lost = [r for r in order[:next_i] if r not in answered]
                publish(lost)
                outcome.republished.update(lost)
                detail = (
                    f"emulator SIGKILLed and restarted (up in {up:.1f} s, empty); "
                    f"`feedback-worker setup` created {created} topics and subscriptions; "
                    f"re-published the {len(lost)} requests that had no result yet"
                )
            detail = f"{busy} requests in flight in the worker; " + detail
            retried = _log_events(supervisor, "engine_retry") - retries_before
            if kind not in (WORKER_KILL, WORKER_TERM):
                before = supervisor.incarnations[incarnation_before - 1]
                detail += f"; {retried} engine calls retried meanwhile; the worker " + (
                    "kept running" if before.ended is None else f"was restarted ({before.cause})"
                )
            outcome.faults.append(FaultEvent(kind, last_fault_at, t0, time.time() - t0, detail))
            last_progress = time.monotonic()
    outcome.seconds = time.monotonic() - started
    return outcome


def _log_events(supervisor: Supervisor, event: str) -> int:
    needle = f'"event": "{event}"'
    return sum(read_log(i.child.log_path).count(needle) for i in supervisor.incarnations)


def _in_flight(url: str) -> str:
    try:
        value = fetch_metrics(url, timeout=2).value("feedback_in_flight")
    except httpx2.HTTPError:
        return "?"
    return "?" if value is None else f"{value:.0f}"


def account_load(outcome: LoadOutcome, collector: Tolerant, supervisor: Supervisor) -> None:
    """Results and duplicates of the load phase, over everything collected in the run."""
    answers: dict[str, list[FeedbackResult]] = defaultdict(list)
    for received in collector.results:
        rid = received.attributes.get("request_id", "")
        if rid.startswith(LOAD_PREFIX):
            answers[rid].append(FeedbackResult.model_validate_json(received.data))
    outcome.answered = len(answers)
    outcome.results = sum(len(v) for v in answers.values())
    outcome.duplicates, outcome.duplicate_ids = explain_duplicates(
        answers, outcome.republished, supervisor
    )


def explain_duplicates(
    answers: dict[str, list[FeedbackResult]], republished: set[str], supervisor: Supervisor
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Count extra results by cause. Each result's created_at says which worker made it."""
    counts: Counter[str] = Counter()
    ids: dict[str, list[str]] = defaultdict(list)
    handled = _handled_by_log(supervisor)
    for rid, got in answers.items():
        if len(got) < 2:
            continue
        extra = len(got) - 1
        makers = [supervisor.incarnation_at(r.created_at.timestamp()) for r in got]
        numbers = sorted({m.number for m in makers if m is not None})
        if rid in republished:
            cause = "re-published by the producer after the emulator restart"
        elif len(numbers) >= 2 and all(
            supervisor.incarnations[k - 1].exit_code not in (0, None) for k in numbers[:-1]
        ):
            cause = "redelivered: the worker that answered first died before its ack landed"
        elif len(numbers) == 1 and handled.get((numbers[0], rid), 0) >= 2:
            cause = "redelivered to the same worker (ack deadline passed or ack lost)"
        else:
            cause = "unexplained"
        counts[cause] += extra
        ids[cause].append(rid)
    return dict(counts), dict(ids)


def _handled_by_log(supervisor: Supervisor) -> Counter[tuple[int, str]]:
    """(incarnation, request id) -> succeeded request_done events in its log."""
    seen: Counter[tuple[int, str]] = Counter()
    for inc in supervisor.incarnations:
        for line in read_log(inc.child.log_path).splitlines():
            if '"succeeded"' not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "request_done" and event.get("request_id"):
                    seen[(inc.number, str(event["request_id"]))] += 1
    return seen
