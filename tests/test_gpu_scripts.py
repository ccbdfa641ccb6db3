"""The GPU benches' plumbing, which device time cannot be spent on finding broken.

The run scripts start where the project is not installed, as on the device machine: its
own Python, the bundle's packages on PYTHONPATH, no `cohost` console script anywhere.
`device.sh wait` returns as soon as the run is done or its process is gone. Both failed
together once (2026-12-03): a module looked a console script up at import, the run died at
its first line, and the call waited out its 520 s.
"""

from __future__ import annotations

import json
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


def _device_wait(run_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "COHOST_RUN_DIR": str(run_dir), "OUT": str(out)}
    # `wait 600` against a 60 s timeout: a wait that sat out its deadline fails the test.
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu" / "device.sh"), "wait", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_device_wait_returns_when_the_run_died(tmp_path: Path) -> None:
    """A run that died without finishing ends the wait (and the device call) at once."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "pid").write_text(f"{dead.pid}\n")
    (run_dir / "progress.log").write_text("Traceback: the run's last words\n")
    done = _device_wait(run_dir, tmp_path / "out")
    assert done.returncode == 1
    assert "run ended without finishing" in done.stdout
    assert "the run's last words" in done.stdout
    assert (tmp_path / "out" / "run.tgz").stat().st_size > 0


def test_device_wait_reports_a_finished_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "done").touch()
    done = _device_wait(run_dir, tmp_path / "out")
    assert done.returncode == 0
    assert "== run done" in done.stdout


def test_a_run_records_its_machine_without_a_gpu() -> None:
    """`host` (the first row of every run): where NVML cannot load, the CPU facts alone."""
    out = subprocess.run(
        [sys.executable, "-c", "import json, gpuhost; print(json.dumps(gpuhost.host_facts()))"],
        cwd=ROOT / "bench" / "gpu", capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    facts = json.loads(out.stdout)
    assert facts["cpus"] >= facts["cpus_usable"] >= 1
    assert facts["cpu"]
    assert len(facts["load_avg"]) == 3
    assert 0 < facts["probe_ms"] < 10_000
    if not isinstance(facts["gpu"], dict):
        assert facts["gpu"].startswith("no NVML")
