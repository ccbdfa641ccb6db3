"""The GPU benches start where the project is not installed, as on the device machine:
its own Python, the bundle's packages on PYTHONPATH, no `cohost` console script anywhere.

A module the benches import that looks a console script up at import time cost a whole
device call once (2026-12-03): the run died at its first line while the call waited.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployfiles import ROOT

SCRIPTS = ("trace_run.py", "sharing_run.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts_without_the_project_installed(script: str, tmp_path: Path) -> None:
    python = Path(getattr(sys, "_base_executable", sys.executable))
    if python.parent == Path(sys.executable).parent:
        pytest.skip("not in a virtual environment: no Python without the console scripts")
    assert not (python.parent / "cohost").exists()
    # Site-packages on PYTHONPATH, as the bundle is: its .pth files (the workspace's
    # editable installs) are not read, so the script's own path setup must find the code.
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [str(python), str(ROOT / "bench" / "gpu" / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
