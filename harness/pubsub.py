"""A Pub/Sub project on the emulator with the worker's topics, and what talks to it:
worker processes, a publisher of requests, a collector of results and dead letters."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cohost.processes import Child, console_script, free_port, worker_pulling
from cohost_shared import messages

from harness.engine import ENGINE_MAX_NUM_SEQS, SERVED_NAME, CpuServer

if TYPE_CHECKING:
    from google.cloud.pubsub_v1 import SubscriberClient


def worker_events(log: Path, name: str) -> list[dict[str, object]]:
    """The JSON log events called `name` in a worker's log, in order."""
    found = []
    for line in log.read_text().splitlines():
        if f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


@dataclass
class Project:
    """One Pub/Sub project on the emulator with the worker's topics set up."""

    emulator_host: str
    project_id: str
    logs: Path
    env: dict[str, str] = field(default_factory=dict)

    def worker_env(self, engine: CpuServer, **extra: str) -> dict[str, str]:
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

    def start_worker(self, engine: CpuServer, name: str = "worker", **extra: str) -> Child:
        env = self.worker_env(engine, **extra)
        log_path = self.logs / f"{self.project_id}-{name}.log"
        child = Child(name, [console_script("feedback-worker")], log_path=log_path, env=env).start()
        child.wait_ready(worker_pulling(log_path), timeout=120)
        return child

    def publisher(self) -> Publisher:
        return Publisher(self)

    def collector(self) -> Collector:
        return Collector(self)


class Publisher:
    def __init__(self, project: Project) -> None:
        from google.cloud import pubsub_v1

        self._client = pubsub_v1.PublisherClient()
        self._topic = self._client.topic_path(project.project_id, messages.REQUESTS_TOPIC)

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
        self._results = self._client.subscription_path(
            project.project_id, messages.RESULTS_SUBSCRIPTION
        )
        self._dead = self._client.subscription_path(
            project.project_id, messages.DEAD_LETTER_SUBSCRIPTION
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


def pull_back(path: str, want: int, within_s: float) -> dict[str, tuple[float, int]]:
    """Pull and ack from subscription `path` until `want` messages came or `within_s`
    passed: message id -> (time.monotonic() when pulled, its delivery attempt)."""
    from google.api_core.exceptions import DeadlineExceeded
    from google.cloud import pubsub_v1

    client = pubsub_v1.SubscriberClient()
    back: dict[str, tuple[float, int]] = {}
    started = time.monotonic()
    while len(back) < want and time.monotonic() - started < within_s:
        try:
            response = client.pull(subscription=path, max_messages=100, timeout=2)
        except DeadlineExceeded:  # nothing to pull within the long-poll
            continue
        if response.received_messages:
            client.acknowledge(
                subscription=path, ack_ids=[m.ack_id for m in response.received_messages]
            )
        for m in response.received_messages:
            back.setdefault(m.message.message_id, (time.monotonic(), m.delivery_attempt))
    client.close()
    return back
