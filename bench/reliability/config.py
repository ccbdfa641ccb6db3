"""What a run does: how many messages, which faults, and where in the run each one comes."""

from __future__ import annotations

from dataclasses import dataclass

from feedback.settings import WorkerSettings

# The worker's default FEEDBACK_MAX_REQUEST_BYTES: the suite runs workers with defaults.
MAX_REQUEST_BYTES: int = WorkerSettings.model_fields["max_request_bytes"].default


@dataclass(frozen=True)
class Config:
    name: str
    requests: int
    worker_kills: int
    worker_terms: int
    engine_restarts: int
    emulator_restarts: int
    malformed: int
    mixed_valid: int
    seed: int = 20261122
    window: int = 400  # unanswered requests the producer keeps published at most
    # The subscription's and the worker's stream ack deadline (FEEDBACK_ACK_DEADLINE_S):
    # what a SIGKILLed worker held comes back after it.
    ack_deadline_s: int = 60
    # FEEDBACK_SHUTDOWN_GRACE_S: short, so a SIGTERM under load finds requests in flight
    # and returns them (the worker's default, 30 s, lets these short requests finish).
    shutdown_grace_s: float = 1.0
    max_tokens: int = 16
    stall_s: float = 300.0  # no new result for this long fails the phase


FULL = Config(
    "full",
    requests=10_000,
    worker_kills=5,
    worker_terms=5,
    engine_restarts=2,
    emulator_restarts=1,
    malformed=10_000,
    mixed_valid=1_000,
)
# Same faults and bad-input kinds, fewer messages.
SHORT = Config(
    "short",
    requests=600,
    worker_kills=2,
    worker_terms=2,
    engine_restarts=1,
    emulator_restarts=1,
    malformed=1_000,
    mixed_valid=100,
    window=200,
)
# The restart stress run (restarts.py): restarts only, slow requests, the default 60 s
# ack deadline (a stall waits out a whole deadline; queueing behind the batch does not).
RESTARTS = Config(
    "restarts",
    requests=0,
    worker_kills=20,
    worker_terms=50,
    engine_restarts=0,
    emulator_restarts=0,
    malformed=0,
    mixed_valid=0,
    max_tokens=64,
)

WORKER_KILL, WORKER_TERM, ENGINE_RESTART, EMULATOR_RESTART = (
    "worker SIGKILL",
    "worker SIGTERM",
    "engine restart",
    "emulator restart",
)


def fault_plan(cfg: Config) -> list[tuple[int, str]]:
    """(answered-count threshold, fault) pairs, spread evenly over 8%..92% of the run,
    with the kinds interleaved (each kind at its own even spacing, then merged)."""
    kinds: list[tuple[float, int, str]] = []
    for order, (kind, count) in enumerate(
        ((WORKER_KILL, cfg.worker_kills), (WORKER_TERM, cfg.worker_terms),
         (ENGINE_RESTART, cfg.engine_restarts), (EMULATOR_RESTART, cfg.emulator_restarts))
    ):  # fmt: skip
        kinds += [((i + 0.5) / count, order, kind) for i in range(count)]
    kinds.sort()
    n = len(kinds)
    return [
        (max(1, round(cfg.requests * (0.08 + 0.84 * (i + 0.5) / n))), kind)
        for i, (_, _, kind) in enumerate(kinds)
    ]
