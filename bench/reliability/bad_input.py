"""Phase 2: generated malformed payloads mixed with valid ones; each malformed one must be
dead-lettered, byte for byte, with its reason, each valid one answered, and the worker
must never restart. Phase 2b sends the same payloads again (for the memory check)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from cohost.processes import tail

from harness.pubsub import Received

from .config import Config
from .load import LOAD_PREFIX
from .payloads import (
    Payload,
    check_oracle,
    dumps,
    generate,
    malformed_payload,
    oversized_payload,
    valid_request,
)
from .stack import SuiteError
from .supervisor import Supervisor
from .traffic import Producer, Tolerant


@dataclass
class BadInputOutcome:
    malformed: int
    valid: int
    by_kind: dict[str, int]
    dead_by_reason: dict[str, int]
    wrong_reason: list[str]
    not_dead_lettered: int
    bytes_changed: int
    detail_missing: int
    valid_answered: int
    valid_dead_lettered: list[str]
    unexpected_results: int
    seconds: float
    generation_s: float
    seed: int
    distinct: int
    worker_restarts: int


@dataclass(frozen=True)
class BadInput:
    malformed: list[Payload]
    valid: list[Payload]
    generation_s: float

    def renamed(self, prefix: str) -> BadInput:
        """The same payloads, the valid ones under new request ids (a second pass)."""
        valid = [
            Payload("valid", "", dumps({**json.loads(p.data), "request_id": f"{prefix}-{i:05d}"}))
            for i, p in enumerate(self.valid)
        ]
        return BadInput(self.malformed, valid, self.generation_s)


def generate_bad_input(cfg: Config) -> BadInput:
    t0 = time.monotonic()
    oversized = max(5, cfg.malformed // 200)
    malformed = generate(malformed_payload(), cfg.malformed - oversized, cfg.seed)
    malformed += generate(oversized_payload(), oversized, cfg.seed + 2000)
    valid = generate(valid_request(), cfg.mixed_valid, cfg.seed + 1000)
    check_oracle(malformed)
    check_oracle(valid)
    return BadInput(malformed, valid, time.monotonic() - t0).renamed("mixed")


def run_bad_input(
    cfg: Config,
    payloads: BadInput,
    supervisor: Supervisor,
    producer: Producer,
    collector: Tolerant,
    say: Callable[[str], None],
) -> BadInputOutcome:
    malformed, valid, generation_s = payloads.malformed, payloads.valid, payloads.generation_s
    check_oracle(valid)
    mixed = malformed + valid
    random.Random(cfg.seed).shuffle(mixed)

    incarnations_before = len(supervisor.incarnations)
    expected: dict[str, Payload] = {}  # message id -> payload
    valid_ids = {json.loads(p.data)["request_id"] for p in valid}
    started = time.monotonic()
    last_progress = started
    last_note = started
    sent = 0
    window = 2_000
    dead0, results0 = len(collector.dead_letters), len(collector.results)

    def dead_letters() -> list[Received]:
        return collector.dead_letters[dead0:]

    answered_before = {r.attributes.get("request_id", "") for r in collector.results}

    def results() -> list[Received]:
        # Late duplicates of earlier phases may still arrive: they are counted there.
        return [
            r
            for r in collector.results[results0:]
            if not r.attributes.get("request_id", "").startswith(LOAD_PREFIX)
            and r.attributes.get("request_id", "") not in answered_before
        ]

    def done() -> int:
        return len(collector.dead_letters) - dead0 + len(results())

    while sent < len(mixed) or done() < len(mixed):
        if sent < len(mixed) and sent - done() < window:
            batch = mixed[sent : sent + 250]
            for p, mid in zip(batch, producer.publish_many([p.data for p in batch]), strict=True):
                if mid is None:
                    raise SuiteError("publishing a bad-input payload failed")
                expected[mid] = p
            sent += len(batch)
        before = done()
        collector.poll()
        now = time.monotonic()
        if done() > before:
            last_progress = now
        if now - last_note > 30:
            say(f"  bad input: {done():,}/{len(mixed):,} settled")
            last_note = now
        if now - last_progress > cfg.stall_s:
            raise SuiteError(
                f"bad input stalled at {done()}/{len(mixed)} settled:\n"
                f"{tail(supervisor.current.child.log_path)}"
            )
    took = time.monotonic() - started

    dead_by_mid = {d.attributes.get("message_id", ""): d for d in dead_letters()}
    wrong: list[str] = []
    changed = 0
    no_detail = 0
    missing = 0
    valid_dead: list[str] = []
    for mid, p in expected.items():
        dead = dead_by_mid.get(mid)
        if p.kind == "valid":
            if dead is not None:
                valid_dead.append(f"{dead.attributes.get('request_id')}: {dead.attributes}")
            continue
        if dead is None:
            missing += 1
            continue
        if dead.attributes.get("error") != p.reason:
            wrong.append(f"{p.kind}: expected {p.reason}, got {dead.attributes.get('error')}")
        if dead.data != p.data:
            changed += 1
        if not dead.attributes.get("error_detail"):
            no_detail += 1
    answered = {r.attributes.get("request_id", "") for r in results()}
    return BadInputOutcome(
        malformed=len(malformed),
        valid=len(valid),
        by_kind=dict(Counter(p.kind for p in malformed)),
        dead_by_reason=dict(Counter(d.attributes.get("error", "") for d in dead_letters())),
        wrong_reason=wrong,
        not_dead_lettered=missing,
        bytes_changed=changed,
        detail_missing=no_detail,
        valid_answered=len(answered & valid_ids),
        valid_dead_lettered=valid_dead,
        unexpected_results=len(answered - valid_ids),
        seconds=took,
        generation_s=generation_s,
        seed=cfg.seed,
        distinct=len({p.data for p in malformed}),
        worker_restarts=len(supervisor.incarnations) - incarnations_before,
    )
