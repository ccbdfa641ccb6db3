"""Cap glibc's malloc arenas, so the worker's RSS levels off under large messages.

glibc gives busy threads their own arenas (up to 8 per core) and each keeps the room
its largest allocations needed. The worker's gRPC and publisher threads handle
payloads of up to 1 MiB, so with the default the RSS kept climbing for rounds of the
same messages while the Python heap stayed flat (docs/reliability.md has the
numbers). Two arenas keep it level at no measurable cost: the worker's CPU time goes
to waiting on the engine, not to malloc.

The same as starting it with MALLOC_ARENA_MAX=N, which an operator's own setting
overrides. Does nothing where libc has no mallopt (musl, macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(arenas: int) -> int | None:
    """Cap the arenas at `arenas` (0: leave glibc's default). Returns the cap in force
    when this process set or inherited one, else None."""
    inherited = os.environ.get("MALLOC_ARENA_MAX")
    if inherited:
        return int(inherited) if inherited.isdigit() else None
    if arenas <= 0:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return arenas if mallopt(_M_ARENA_MAX, arenas) == 1 else None
