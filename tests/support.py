"""The real parts tests drive: a CPU vLLM server, a Pub/Sub project, publisher, collector."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cohost import cpu_engine
from cohost.processes import Child, console_script, free_port, http_ok

if TYPE_CHECKING:
    from google.cloud.pubsub_v1 import SubscriberClient

# Small context so "text too long" is easy to reach; small model so it starts fast.
ENGINE_MAX_MODEL_LEN = 1024
ENGINE_MAX_NUM_SEQS = 16
TEST_MODEL = "tiny-llama"
SERVED_NAME = "feedback"


class Engine:
    """A real CPU vLLM server that tests may kill and restart on the same port."""

    def __init__(self, model_dir: Path, port: int, log_path: Path) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        argv = cpu_engine.server_command(
            model_dir,
            port=port,
            served_model_name=SERVED_NAME,
            max_model_len=ENGINE_MAX_MODEL_LEN,
            max_num_seqs=ENGINE_MAX_NUM_SEQS,
        )
        self.child = Child("engine", argv, log_path=log_path, env=cpu_engine.server_env())

    def start(self) -> None:
        self.child.start()
        self.child.wait_ready(http_ok(f"http://127.0.0.1:{self.port}/health"), timeout=600)

    def kill(self) -> None:
        self.child.kill()

    def stop(self) -> None:
        self.child.stop()


@dataclass
class Project:
    """One Pub/Sub project on the emulator with the worker's topics set up."""

    emulator_host: str
    project_id: str
    logs: Path
    env: dict[str, str] = field(default_factory=dict)

    def worker_env(self, engine: Engine, **extra: str) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            FEEDBACK_LLM_BASE_URL=engine.base_url,
            FEEDBACK_LLM_MODEL=SERVED_NAME,
            FEEDBACK_MAX_IN_FLIGHT=str(ENGINE_MAX_NUM_SEQS),
            FEEDBACK_METRICS_PORT=str(free_port()),
            FEEDBACK_DEFAULT_MAX_TOKENS="16",
        )
        env.update(extra)
        return env

    def start_worker(self, engine: Engine, name: str = "worker", **extra: str) -> Child:
        env = self.worker_env(engine, **extra)
        log_path = self.logs / f"{self.project_id}-{name}.log"
        child = Child(name, [console_script("feedback-worker")], log_path=log_path, env=env).start()
        child.wait_ready(lambda: '"pulling"' in _read(log_path), timeout=120)
        return child

    def publisher(self) -> Publisher:
        return Publisher(self)

    def collector(self) -> Collector:
        return Collector(self)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


class Publisher:
    def __init__(self, project: Project) -> None:
        from google.cloud import pubsub_v1

        self._client = pubsub_v1.PublisherClient()
        self._topic = self._client.topic_path(project.project_id, "feedback-requests")

    def publish(self, data: bytes) -> str:
        message_id: str = self._client.publish(self._topic, data).result(timeout=30)
        return message_id

    def request(self, request_id: str, text: str, **fields: object) -> str:
        return self.publish(json.dumps({"request_id": request_id, "text": text, **fields}).encode())


@dataclass
class Received:
    data: bytes
    attributes: dict[str, str]


class Collector:
    """Pulls what the worker published: results and dead letters, by request id."""

    def __init__(
        self, project: Project, wait_s: float = 5.0, client: SubscriberClient | None = None
    ) -> None:
        from google.cloud import pubsub_v1

        self._client = client or pubsub_v1.SubscriberClient()
        self.wait_s = wait_s
        self._results = self._client.subscription_path(project.project_id, "feedback-results-sub")
        self._dead = self._client.subscription_path(
            project.project_id, "feedback-requests-dead-letter-sub"
        )
        self.results: list[Received] = []
        self.dead_letters: list[Received] = []

    def _pull(self, path: str, into: list[Received]) -> None:
        from google.api_core import exceptions as gexc

        try:
            response = self._client.pull(subscription=path, max_messages=500, timeout=self.wait_s)
        except gexc.DeadlineExceeded:
            return
        if response.received_messages:
            self._client.acknowledge(
                subscription=path, ack_ids=[m.ack_id for m in response.received_messages]
            )
        for m in response.received_messages:
            into.append(Received(bytes(m.message.data), dict(m.message.attributes)))

    def result_ids(self) -> set[str]:
        return {r.attributes["request_id"] for r in self.results}

    def dead_ids(self) -> set[str]:
        return {r.attributes.get("request_id", "") for r in self.dead_letters}

    def wait(self, *, results: Collection[str] = (), dead: int = 0, timeout: float = 300) -> None:
        wanted = set(results)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._pull(self._results, self.results)
            self._pull(self._dead, self.dead_letters)
            if wanted <= self.result_ids() and len(self.dead_letters) >= dead:
                return
        missing = sorted(wanted - self.result_ids())
        raise AssertionError(
            f"timed out after {timeout:.0f} s: {len(missing)} results missing "
            f"(e.g. {missing[:5]}), {len(self.dead_letters)}/{dead} dead letters"
        )
