"""Google Cloud Pub/Sub: the request source, the result sink and topic setup.

The client library calls back on its own threads; `PubSubSource` hands each
message to the worker's event loop and leaves it there: flow control keeps at
most FEEDBACK_MAX_IN_FLIGHT messages leased, and the library extends their
leases until they are acked or nacked.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
import structlog
from cohost_shared.logs import WORKER_READY_EVENT
from cohost_shared.messages import FeedbackResult
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1 import types as ps_types
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from feedback.jobs import Delivery
from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)

# Ack ids per ModifyAckDeadline request: well under the API's 2,500.
NACK_BATCH = 1000


def subscriber_client(settings: WorkerSettings) -> pubsub_v1.SubscriberClient:
    """A SubscriberClient that takes streaming-pull responses of any size.

    Against the emulator the client library opens a bare `grpc.insecure_channel`, with
    gRPC's default 4 MiB limit on received messages (its channel to Google sets no
    limit). One response carries several messages, so a few requests near the 1 MiB
    request limit overflow it: the stream is dropped and reopened, and the messages
    come back only after their ack deadline, to fail the same way. A burst of them
    stalled the worker (2 of 20 delivered in 150 s).
    """
    if not settings.pubsub_emulator_host:
        return pubsub_v1.SubscriberClient()
    channel = grpc.insecure_channel(
        settings.pubsub_emulator_host,
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


class Lease:
    """A message handed to the worker. Its ack goes out at once. A nack gives it back
    after a backoff (FEEDBACK_NACK_BACKOFF_S, doubling per delivery attempt), unless the
    source is draining: then the message stays leased and `PubSubSource.close` returns it
    at once, once the stream is closed."""

    __slots__ = ("_message", "_source")

    def __init__(self, message: Any, source: PubSubSource) -> None:
        self._message = message
        self._source = source

    @property
    def data(self) -> bytes:
        return bytes(self._message.data)

    @property
    def message_id(self) -> str:
        return str(self._message.message_id)

    @property
    def delivery_attempt(self) -> int | None:
        attempt: int | None = self._message.delivery_attempt
        return attempt

    def ack(self) -> None:
        self._source._settle(self._message, ack=True)

    def nack(self) -> None:
        self._source._settle(self._message, ack=False)


class PubSubSource:
    """Streaming pull, and the return of every unsettled message at shutdown.

    A message nacked while our stream is still open can be sent straight back to that
    stream, which is closing: it then waits out its ack deadline. So while draining, nacks
    are held; `close` stops the stream first, then nacks what the worker did not settle
    through the unary API and waits for the answer.

    Nacks back off on the lease (`_settle`), not through a subscription retry policy: under
    one, the emulator loses messages waiting out their backoff when the stream they are
    meant for closes, whether nacked or expired (docs/reliability.md).
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._subscriber = subscriber_client(settings)
        self._path = self._subscriber.subscription_path(
            settings.project_id(), settings.requests_subscription
        )
        self._future: Future[Any] | None = None
        self._lock = threading.Lock()
        self._unsettled: dict[str, Any] = {}  # ack_id -> message handed over, not settled
        self._draining = False

    def start(
        self,
        on_message: Callable[[Delivery], None],
        on_failure: Callable[[BaseException], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        flow = pubsub_v1.types.FlowControl(
            max_messages=self._settings.max_in_flight,
            max_lease_duration=int(self._settings.max_lease_s),
            min_duration_per_lease_extension=self._settings.ack_deadline_s,
            # Also the stream's ack deadline (the client library's default is 60 s,
            # whatever the subscription says): what the service allows for messages it
            # has sent and the client has not yet read, e.g. a backlog the emulator,
            # which does not apply max_outstanding_messages, pushes all at once.
            max_duration_per_lease_extension=self._settings.ack_deadline_s,
        )

        def callback(message: Any) -> None:
            with self._lock:
                self._unsettled[message.ack_id] = message
                if self._draining:
                    return  # not started: `close` returns it
            loop.call_soon_threadsafe(on_message, Lease(message, self))

        # Await callbacks on shutdown: once the future's result is in, no callback runs.
        future = self._subscriber.subscribe(
            self._path, callback=callback, flow_control=flow, await_callbacks_on_shutdown=True
        )

        def done(f: Any) -> None:
            exc = f.exception() if not f.cancelled() else None
            if exc is not None:
                loop.call_soon_threadsafe(on_failure, exc)

        future.add_done_callback(done)
        self._future = future
        log.info(
            WORKER_READY_EVENT, subscription=self._path, max_in_flight=self._settings.max_in_flight
        )

    def _settle(self, message: Any, *, ack: bool) -> None:
        with self._lock:
            if message.ack_id not in self._unsettled:
                return  # already returned by `close`
            if not ack and self._draining:
                return  # returned by `close`, after the stream
            del self._unsettled[message.ack_id]
        if ack:
            message.ack()
            return
        delay = self._settings.nack_delay_s(message.delivery_attempt)
        if delay == 0:
            message.nack()
            return
        # The backoff on the lease itself: Pub/Sub redelivers the message once this
        # deadline passes, and the library stops extending it.
        message.modify_ack_deadline(delay)
        message.drop()

    def drain(self) -> None:
        """Take no new work: hold back new messages and nacks until `close`."""
        with self._lock:
            self._draining = True

    async def close(self) -> int:
        """Stop the stream, then return (nack) every message not acked: returns how many.

        The client library nacks the messages it held back (flow control) itself, after
        its stream is closed; acks already issued are flushed first."""
        self.drain()
        future = self._future
        if future is None:
            return 0
        future.cancel()

        def wait() -> None:
            try:
                future.result(timeout=30)
            except Exception as exc:  # already reported through on_failure
                log.debug("stream_closed_with_error", error=str(exc))

        await asyncio.to_thread(wait)
        with self._lock:
            ack_ids = list(self._unsettled)
            self._unsettled.clear()
        if ack_ids:
            await asyncio.to_thread(self._nack, ack_ids)
        self._subscriber.close()
        return len(ack_ids)

    def _nack(self, ack_ids: list[str]) -> None:
        # The stream's own nack path stopped with it; ack ids stay valid for the unary API.
        for i in range(0, len(ack_ids), NACK_BATCH):
            batch = ack_ids[i : i + NACK_BATCH]
            try:
                self._subscriber.modify_ack_deadline(
                    subscription=self._path, ack_ids=batch, ack_deadline_seconds=0, timeout=30
                )
            except gexc.GoogleAPICallError as exc:
                # Not lost: Pub/Sub redelivers them when their ack deadline passes.
                log.error("return_failed", messages=len(batch), error=str(exc))
            else:
                log.info("returned", messages=len(batch))


class PubSubSink:
    def __init__(self, settings: WorkerSettings) -> None:
        self._publisher = pubsub_v1.PublisherClient()
        project = settings.project_id()
        self._results = self._publisher.topic_path(project, settings.results_topic)
        self._dead_letters = self._publisher.topic_path(project, settings.dead_letter_topic)

    async def publish_result(self, result: FeedbackResult) -> None:
        future = self._publisher.publish(
            self._results, result.to_bytes(), request_id=result.request_id
        )
        await asyncio.wrap_future(future)

    async def publish_dead_letter(self, data: bytes, attributes: Mapping[str, str]) -> None:
        # Attributes are keyword arguments of publish(); mypy cannot tell them from `retry`.
        future = self._publisher.publish(self._dead_letters, data, **attributes)  # type: ignore[arg-type]
        await asyncio.wrap_future(future)

    async def close(self) -> None:
        await asyncio.to_thread(self._publisher.stop)


def service_agent(project_number: int) -> str:
    """Pub/Sub's own service account in a project: it forwards dead letters."""
    return f"serviceAccount:service-{project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"


def add_member(policy: Any, role: str, member: str) -> bool:
    """Give `member` `role` in an IAM policy (google.iam.v1 Policy); False if it had it."""
    for binding in policy.bindings:
        if binding.role == role and not binding.condition.expression:
            if member in binding.members:
                return False
            binding.members.append(member)
            return True
    policy.bindings.add(role=role, members=[member])
    return True


def grant_dead_letter_roles(
    settings: WorkerSettings,
    publisher: pubsub_v1.PublisherClient,
    subscriber: pubsub_v1.SubscriberClient,
) -> list[str]:
    """What Pub/Sub needs to forward a message after max_delivery_attempts: publish on the
    dead-letter topic, subscribe on the source subscription (Pub/Sub's dead-letter topics
    guide). Without them the policy is accepted but nothing is forwarded."""
    if settings.pubsub_emulator_host:
        return []  # the emulator has no IAM
    if settings.project_number is None:
        return [
            "dead letters: set FEEDBACK_PROJECT_NUMBER to let setup grant the Pub/Sub service "
            "agent roles/pubsub.publisher on "
            f"{settings.dead_letter_topic} and roles/pubsub.subscriber on "
            f"{settings.requests_subscription}, or grant them yourself (docs/kubernetes.md)"
        ]
    project = settings.project_id()
    dead_letters = publisher.topic_path(project, settings.dead_letter_topic)
    requests = subscriber.subscription_path(project, settings.requests_subscription)
    agent = service_agent(settings.project_number)
    done = []
    for client, resource, role in (
        (publisher, dead_letters, "roles/pubsub.publisher"),
        (subscriber, requests, "roles/pubsub.subscriber"),
    ):
        policy = client.get_iam_policy(request={"resource": resource})
        name = resource.rsplit("/", 1)[-1]
        if add_member(policy, role, agent):
            client.set_iam_policy(request={"resource": resource, "policy": policy})
            done.append(f"granted {role} on {name} to the Pub/Sub service agent")
        else:
            done.append(f"the Pub/Sub service agent has {role} on {name}")
    return done


def ensure_topology(settings: WorkerSettings) -> list[str]:
    """Create the topics and subscriptions if missing; fix the worker subscription's
    dead-letter policy if it differs; on Google Cloud, grant the Pub/Sub service agent what
    dead-lettering needs. Idempotent. Returns what it did, line by line."""
    project = settings.project_id()
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    done: list[str] = []
    topic = publisher.topic_path
    sub = subscriber.subscription_path

    for name in (settings.requests_topic, settings.results_topic, settings.dead_letter_topic):
        try:
            publisher.create_topic(name=topic(project, name))
            done.append(f"created topic {name}")
        except gexc.AlreadyExists:
            done.append(f"topic {name} exists")

    dead_letter_policy = ps_types.DeadLetterPolicy(
        dead_letter_topic=topic(project, settings.dead_letter_topic),
        max_delivery_attempts=settings.max_delivery_attempts,
    )
    worker_sub = ps_types.Subscription(
        name=sub(project, settings.requests_subscription),
        topic=topic(project, settings.requests_topic),
        ack_deadline_seconds=settings.ack_deadline_s,
        dead_letter_policy=dead_letter_policy,
        # No retry policy: the worker backs off nacks itself (FEEDBACK_NACK_BACKOFF_S), and
        # messages returned at shutdown or after a crash go to another worker at once.
    )
    plain = [
        (settings.results_subscription, settings.results_topic),
        (settings.dead_letter_subscription, settings.dead_letter_topic),
    ]
    try:
        subscriber.create_subscription(request=worker_sub)
        done.append(f"created subscription {settings.requests_subscription}")
    except gexc.AlreadyExists:
        existing = subscriber.get_subscription(subscription=worker_sub.name)
        policy = existing.dead_letter_policy
        if (
            policy.dead_letter_topic != dead_letter_policy.dead_letter_topic
            or policy.max_delivery_attempts != dead_letter_policy.max_delivery_attempts
        ):
            subscriber.update_subscription(
                request={
                    "subscription": ps_types.Subscription(
                        name=worker_sub.name, dead_letter_policy=dead_letter_policy
                    ),
                    "update_mask": {"paths": ["dead_letter_policy"]},
                }
            )
            done.append(f"updated dead-letter policy of {settings.requests_subscription}")
        else:
            done.append(f"subscription {settings.requests_subscription} exists")
    for sub_name, topic_name in plain:
        try:
            subscriber.create_subscription(
                name=sub(project, sub_name), topic=topic(project, topic_name)
            )
            done.append(f"created subscription {sub_name}")
        except gexc.AlreadyExists:
            done.append(f"subscription {sub_name} exists")
    done.extend(grant_dead_letter_roles(settings, publisher, subscriber))
    publisher.stop()
    subscriber.close()
    return done
