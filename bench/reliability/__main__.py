"""Reliability suite: the real stack under faults, malformed input and hostile input.

    uv run python -m bench.reliability --short   # the CI version (tests/test_reliability.py), ~4 min
    uv run python -m bench.reliability --full    # 10,000 + 2 x 11,000 messages, ~12 min on 2 cores
    uv run python -m bench.reliability --restarts [--sigterm 50 --sigkill 20]  # ~50 min

Prints the Markdown report (and writes it with --out); exit code 1 if an invariant failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from cohost import paths

from .config import FULL, RESTARTS, SHORT
from .restarts import failures, markdown, run_stress
from .suite import run_suite


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.reliability", description=(__doc__ or "").split("\n")[0]
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true", help="10,000 requests, 10,000 malformed")
    mode.add_argument("--short", action="store_true", help="the CI version")
    mode.add_argument("--restarts", action="store_true", help="the restart stress run only")
    p.add_argument("--sigterm", type=int, default=RESTARTS.worker_terms, help="with --restarts")
    p.add_argument("--sigkill", type=int, default=RESTARTS.worker_kills, help="with --restarts")
    p.add_argument("--batch", type=int, default=32, help="requests per restart (--restarts)")
    p.add_argument("--out", type=Path, help="write the Markdown report here too")
    p.add_argument("--logs", type=Path, help="where process logs go (default: the cohost cache)")
    args = p.parse_args()
    cfg = FULL if args.full else SHORT
    if args.restarts:
        cfg = dataclasses.replace(RESTARTS, worker_terms=args.sigterm, worker_kills=args.sigkill)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    logs = args.logs or paths.logs_dir() / f"reliability-{cfg.name}-{stamp}"
    command = "uv run python -m bench.reliability " + " ".join(sys.argv[1:])

    def say(line: str) -> None:
        print(f"{datetime.now(UTC):%H:%M:%S} {line}", file=sys.stderr, flush=True)

    # A Ctrl-C or SIGTERM still stops every child (the teardown of `running`, both runs').
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.restarts:
        outcome = run_stress(cfg, logs=logs, batch=args.batch, say=say)
        failed = failures(outcome)
        text = f"# Restart stress run\n\n`{command}`\n\n{markdown(outcome)}\n\n" + (
            "FAILED: " + "; ".join(failed) if failed else "PASSED"
        )
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text + "\n")
        return 1 if failed else 0
    report = run_suite(cfg, logs=logs, command=command, say=say)
    text = report.markdown()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        say(f"wrote {args.out}")
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
