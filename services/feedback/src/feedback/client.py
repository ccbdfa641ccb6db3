"""Submit one request and wait for its answer: what `feedback-worker submit` does.

It listens before it publishes, on two short-lived subscriptions of its own (one
on the results topic, one on the dead-letter topic), so neither a fast answer nor
a rejection can slip past; both are deleted when it returns.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cohost_shared.messages import FeedbackRequest, FeedbackResult
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1 import types as ps_types

from feedback.settings import WorkerSettings


@dataclass(frozen=True)
class Answer:
    request_id: str
    result: FeedbackResult | None = None
    error: str | None = None
    error_detail: str | None = None


class NoAnswer(TimeoutError):
    pass


def _filter(request_id: str) -> str:
    # Server-side filtering saves traffic on real Pub/Sub (the emulator ignores it, and
    # we check every message ourselves anyway). Skip it where quoting would be needed.
    if '"' in request_id or "\\" in request_id:
        return ""
    return f'attributes.request_id = "{request_id}"'


def submit(settings: WorkerSettings, request: FeedbackRequest, *, timeout_s: float) -> Answer:
    project = settings.project_id()
    request_id = request.request_id or uuid.uuid4().hex
    request = request.model_copy(update={"request_id": request_id})
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    suffix = uuid.uuid4().hex[:12]
    watched = {
        "result": (settings.results_topic, f"feedback-submit-{suffix}-results"),
        "dead_letter": (settings.dead_letter_topic, f"feedback-submit-{suffix}-dead-letters"),
    }
    created: list[str] = []
    try:
        for topic, name in watched.values():
            path = subscriber.subscription_path(project, name)
            subscriber.create_subscription(
                request=ps_types.Subscription(
                    name=path,
                    topic=publisher.topic_path(project, topic),
                    filter=_filter(request_id),
                    ack_deadline_seconds=10,
                    # Cleaned up by Pub/Sub itself if we are killed before deleting it.
                    expiration_policy=ps_types.ExpirationPolicy(ttl=timedelta(days=1)),
                )
            )
            created.append(path)
        data = request.model_dump_json(exclude_none=True).encode()
        publisher.publish(publisher.topic_path(project, settings.requests_topic), data).result(
            timeout=60
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for kind, path in zip(watched, created, strict=True):
                answer = _pull_once(subscriber, path, kind, request_id)
                if answer is not None:
                    return answer
        raise NoAnswer(
            f"no result for request {request_id} within {timeout_s:.0f} s; it stays queued "
            f"on {settings.requests_topic}. Is a worker running and its engine up?"
        )
    finally:
        for path in created:
            with contextlib.suppress(gexc.GoogleAPICallError):
                subscriber.delete_subscription(subscription=path)
        publisher.stop()
        subscriber.close()


def _pull_once(subscriber: Any, path: str, kind: str, request_id: str) -> Answer | None:
    try:
        response = subscriber.pull(subscription=path, max_messages=10, timeout=2.0)
    except gexc.DeadlineExceeded:
        return None
    if not response.received_messages:
        return None
    subscriber.acknowledge(
        subscription=path, ack_ids=[m.ack_id for m in response.received_messages]
    )
    for received in response.received_messages:
        message = received.message
        if message.attributes.get("request_id") != request_id:
            continue
        if kind == "result":
            return Answer(
                request_id, result=FeedbackResult.model_validate(json.loads(message.data))
            )
        return Answer(
            request_id,
            error=message.attributes.get("error", "unknown"),
            error_detail=message.attributes.get("error_detail", ""),
        )
    return None
