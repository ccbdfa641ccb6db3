"""Reliability suite: the real stack under faults, malformed input and hostile input.

    uv run python -m bench.reliability --short   # the CI version (tests/test_reliability.py), ~4 min
    uv run python -m bench.reliability --full    # 10,000 + 2 x 11,000 messages, ~12 min on 2 cores

Starts its own Pub/Sub emulator, one CPU vLLM server ("tiny-llama", a random-weight
Llama: fast, meaningless text) and `feedback-worker` processes under a small
supervisor that restarts them like a container runtime would. Three phases:

1. load: N valid requests published at a steady pace (at most `window` unanswered),
   while faults are injected at fixed points of progress: the worker SIGKILLed
   or SIGTERMed with requests in flight (and restarted), the engine SIGKILLed and restarted on the same port, the
   emulator SIGKILLed and restarted (it keeps state in memory only: the suite runs
   `feedback-worker setup` and re-publishes every request without a result, as a
   producer would). Every request id must get a result; duplicates are counted
   and each must be explained by a redelivery or by that re-publish.
2. bad input: M malformed payloads generated with Hypothesis (fixed seed) mixed
   with valid ones: each malformed one must be dead-lettered, byte for byte, with
   the reason its kind implies; each valid one answered; the worker never restarts.
3. hostile input, one message at a time with the engine's /metrics read before and
   after each: huge texts, deep nesting, invalid UTF-8, prompt injection. Checks
   the outcome and how much reached the engine.

Prints a Markdown report (and writes it with --out); exit code 1 if an invariant
failed. docs/reliability.md describes the method and the latest full run.

config      Config, FULL and SHORT, the fault kinds and where in the run each comes
stack       the emulator, the engine and one Pub/Sub project; SuiteError
supervisor  the worker processes, restarted like a container runtime would
running     those parts brought up for one run and down after it, however it ends
traffic     the producer and the tolerant collector of results and dead letters
load        phase 1: valid requests under faults
payloads    the Hypothesis generators of bad input, and their oracle
bad_input   phase 2: malformed payloads mixed with valid ones
hostile     phase 3: hostile input, one message at a time
report      the Report, its invariants and the facts behind it
markdown    the report as Markdown
suite       run_suite: all three phases, one run
restarts    run_stress: the restart stress run (--restarts), its own run
__main__    the command line

The parts it drives are the tests' own, from `harness` (`harness.engine.CpuServer`,
`harness.pubsub`); the suite never imports `tests`.
"""

from __future__ import annotations

from .config import (
    EMULATOR_RESTART,
    ENGINE_RESTART,
    FULL,
    SHORT,
    WORKER_KILL,
    WORKER_TERM,
    Config,
)
from .report import Report
from .suite import run_suite

__all__ = [
    "EMULATOR_RESTART",
    "ENGINE_RESTART",
    "FULL",
    "SHORT",
    "WORKER_KILL",
    "WORKER_TERM",
    "Config",
    "Report",
    "run_suite",
]
