"""How the launcher ends when it will not start vLLM: an exit code an orchestrator (and a
person) can tell apart, and one line on stderr that says why and what to change."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

EXIT_CONFIG = 2
EXIT_WRONG_GPU = 3
EXIT_GATE_TIMEOUT = 4
EXIT_NO_MEMORY = 5
EXIT_NO_MPS = 6
EXIT_UNPLANNED_SHARE = 7


@dataclass(frozen=True)
class Refusal(Exception):
    code: int
    message: str


def say(service: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} cohost launch {service}: {message}", file=sys.stderr, flush=True)
