"""The suite's side of Pub/Sub: a producer that publishes many requests at once, and a
collector of results and dead letters that rides out an emulator restart."""

from __future__ import annotations

import time
from collections.abc import Sequence

from feedback.pubsub import subscriber_client
from feedback.settings import WorkerSettings
from google.api_core import exceptions as gexc

from harness.pubsub import Collector, Project, Publisher, Received


class Producer(Publisher):
    """`harness.pubsub.Publisher`, publishing many messages at once."""

    def publish_many(self, payloads: Sequence[bytes]) -> list[str | None]:
        futures = [self._client.publish(self._topic, data) for data in payloads]
        ids: list[str | None] = []
        for future in futures:
            try:
                ids.append(future.result(timeout=120))
            except Exception:
                ids.append(None)
        return ids


class Tolerant(Collector):
    """`harness.pubsub.Collector`, pulling with a short wait (its 5 s long-poll on an empty
    subscription would make the suite, not the worker, the bottleneck), through a channel
    that takes pull responses over 4 MiB (the worker's `subscriber_client`: 1 MiB dead
    letters come several to a response), and riding out an emulator restart."""

    def __init__(self, project: Project, wait_s: float = 0.5) -> None:
        super().__init__(project, wait_s, client=subscriber_client(WorkerSettings()))
        self.errors = 0

    def _pull(self, path: str, into: list[Received]) -> None:
        try:
            super()._pull(path, into)
        except (gexc.GoogleAPICallError, gexc.RetryError):
            self.errors += 1  # the emulator is restarting, or lost the subscription
            time.sleep(0.5)

    def poll(self) -> None:
        self._pull(self._results, self.results)
        self._pull(self._dead, self.dead_letters)
