"""Google's Pub/Sub emulator, started directly from its jar with a one-class gRPC fix.

The jar that ships with google-cloud-cli 528 bundles a grpc-core newer than its
grpc-api: grpc-core calls `InternalStatus.asRuntimeException(Status, Metadata,
boolean)`, which that grpc-api lacks. The NoSuchMethodError it throws leaves the
emulator streaming messages to subscribers that have gone, so after a worker dies
its messages stall for minutes. We compile a replacement `io.grpc.InternalStatus`
with the missing method and put it first on the classpath.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from cohost import paths
from cohost.processes import Child, log_contains

DEFAULT_JAR_GLOB = (
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*-all.jar"
)
MAIN_CLASS = "com.google.cloud.pubsub.testing.v1.Main"
READY_LINE = "Server started"

# The replacement class; also compiled into the emulator image
# (services/pubsub-emulator/Dockerfile).
SHIM_SOURCE = (Path(__file__).parent / "grpc_fix" / "InternalStatus.java").read_text()


class EmulatorMissing(RuntimeError):
    """The emulator jar or Java is not installed."""


def find_jar() -> Path:
    """The emulator jar: `$PUBSUB_EMULATOR_JAR`, else google-cloud-cli's own copy."""
    explicit = os.environ.get("PUBSUB_EMULATOR_JAR")
    candidates = [explicit] if explicit else sorted(glob.glob(DEFAULT_JAR_GLOB))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise EmulatorMissing(
        "Pub/Sub emulator jar not found "
        f"({'PUBSUB_EMULATOR_JAR=' + explicit if explicit else DEFAULT_JAR_GLOB}). "
        "Install google-cloud-cli with its pubsub-emulator component "
        "(`gcloud components install pubsub-emulator` or the Debian package "
        "google-cloud-cli-pubsub-emulator), or set PUBSUB_EMULATOR_JAR."
    )


def _java(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise EmulatorMissing(f"`{tool}` not found: the Pub/Sub emulator needs a JDK 11+ on PATH")
    return found


def ensure_shim(jar: Path) -> Path:
    """Compile the InternalStatus shim against `jar` once; returns its classpath entry."""
    digest = hashlib.sha256(f"{jar}:{jar.stat().st_size}:{SHIM_SOURCE}".encode()).hexdigest()[:12]
    out = paths.emulator_dir() / f"shim-{digest}"
    marker = out / "io" / "grpc" / "InternalStatus.class"
    if marker.is_file():
        return out
    src = paths.emulator_dir() / f"src-{digest}" / "io" / "grpc"
    src.mkdir(parents=True, exist_ok=True)
    (src / "InternalStatus.java").write_text(SHIM_SOURCE)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    result = subprocess.run(
        [
            _java("javac"),
            "-nowarn",
            "-cp",
            str(jar),
            "-d",
            str(tmp),
            str(src / "InternalStatus.java"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise EmulatorMissing(f"compiling the emulator's gRPC shim failed:\n{result.stderr}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def emulator_child(host: str, port: int, *, log_path: Path) -> Child:
    """The emulator as a `Child` (not started): wait on it with `wait_until_started`."""
    jar = find_jar()
    shim = ensure_shim(jar)
    argv = [
        _java("java"),
        "-cp",
        f"{shim}{os.pathsep}{jar}",
        MAIN_CLASS,
        f"--host={host}",
        f"--port={port}",
    ]
    return Child("pubsub-emulator", argv, log_path=log_path)


def wait_until_started(child: Child, *, timeout: float = 60.0) -> float:
    return child.wait_ready(log_contains(child.log_path, READY_LINE), timeout=timeout)
