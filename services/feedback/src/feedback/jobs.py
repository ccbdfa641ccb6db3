"""One request, from received message to ack: the worker's data path.

    delivery -> parse -> engine (retried) -> publish result -> ack
                  |          |
                  +----------+--> dead-letter (permanent) -> ack
                             +--> nack (transient, for Pub/Sub to redeliver)

A message is acked only after what it produced (a result or a dead letter) is
published, so a crash at any point loses nothing: Pub/Sub redelivers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Protocol

import structlog
from cohost_shared.messages import (
    FeedbackResult,
    InvalidRequest,
    Reason,
    Usage,
    clip_attribute,
    parse_request,
    utc_now,
)
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from feedback import metrics
from feedback.engine import Completion, EngineClient, EngineUnavailable
from feedback.limiter import Limiter
from feedback.preempt import Preempter
from feedback.prompts import build_messages
from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)


class Delivery(Protocol):
    """A received message, from Pub/Sub or a local source."""

    @property
    def data(self) -> bytes: ...
    @property
    def message_id(self) -> str: ...
    @property
    def delivery_attempt(self) -> int | None: ...
    def ack(self) -> None: ...
    def nack(self) -> None: ...


class Sink(Protocol):
    """Where results and dead letters go. Both return once the publish is confirmed."""

    async def publish_result(self, result: FeedbackResult) -> None: ...
    async def publish_dead_letter(self, data: bytes, attributes: Mapping[str, str]) -> None: ...
    async def close(self) -> None: ...


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    DEAD_LETTERED = "dead_lettered"
    NACKED = "nacked"


class Processor:
    def __init__(
        self,
        settings: WorkerSettings,
        engine: EngineClient,
        sink: Sink,
        limiter: Limiter,
        preempter: Preempter | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._sink = sink
        self._limiter = limiter
        self._complete = preempter.complete if preempter else engine.complete

    async def handle(self, delivery: Delivery) -> Outcome:
        started = time.monotonic()
        metrics.RECEIVED.inc()
        metrics.IN_FLIGHT.inc()
        structlog.contextvars.bind_contextvars(
            message_id=delivery.message_id, delivery_attempt=delivery.delivery_attempt
        )
        try:
            return await self._handle(delivery, started)
        except asyncio.CancelledError:
            # Shutdown ran past its grace period: Pub/Sub redelivers the message.
            delivery.nack()
            metrics.NACKED.labels("shutdown").inc()
            log.info("request_done", outcome=Outcome.NACKED, cause="shutdown")
            raise
        except Exception:
            # A bug, not the message's fault: hand it back rather than hold its lease.
            log.exception("request_failed")
            return self._nack(delivery, "internal_error", "unexpected error, see request_failed")
        finally:
            metrics.IN_FLIGHT.dec()

    async def _handle(self, delivery: Delivery, started: float) -> Outcome:
        try:
            request = parse_request(delivery.data, max_bytes=self._settings.max_request_bytes)
        except InvalidRequest as exc:
            return await self._dead_letter(delivery, exc, exc.request_id or delivery.message_id)
        request_id = request.request_id or delivery.message_id
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            # Checked before taking an engine slot: a text that cannot fit never waits
            # behind real work to be dead-lettered.
            messages = build_messages(request, self._settings.system_prompt)
            self._engine.check_fits(messages)
            async with self._limiter:
                completion = await self._generate(messages, request.max_tokens)
        except InvalidRequest as exc:
            return await self._dead_letter(delivery, exc, request_id)
        except EngineUnavailable as exc:
            attempt = delivery.delivery_attempt or 0
            if attempt >= self._settings.max_delivery_attempts:
                final = InvalidRequest(Reason.ENGINE_UNAVAILABLE, str(exc))
                return await self._dead_letter(delivery, final, request_id)
            return self._nack(delivery, "engine_unavailable", str(exc))

        result = FeedbackResult(
            request_id=request_id,
            feedback=completion.text,
            model=completion.model,
            usage=Usage(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            ),
            latency_ms=round((time.monotonic() - started) * 1000, 1),
            created_at=utc_now(),
        )
        try:
            await self._sink.publish_result(result)
        except Exception as exc:
            return self._nack(delivery, "publish_failed", f"{type(exc).__name__}: {exc}")
        delivery.ack()
        metrics.SUCCEEDED.inc()
        metrics.LATENCY.observe(time.monotonic() - started)
        metrics.COMPLETION_TOKENS.inc(completion.completion_tokens)
        log.info(
            "request_done",
            outcome=Outcome.SUCCEEDED,
            latency_ms=result.latency_ms,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        )
        return Outcome.SUCCEEDED

    async def _generate(
        self, messages: list[dict[str, str]], requested_max_tokens: int | None
    ) -> Completion:
        max_tokens = requested_max_tokens or self._settings.default_max_tokens
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(EngineUnavailable),
            wait=wait_exponential_jitter(multiplier=0.5, max=15.0),
            stop=stop_after_delay(self._settings.retry_budget_s),
            before_sleep=_note_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self._complete(messages, max_tokens)
                except EngineUnavailable:
                    metrics.ENGINE_ERRORS.labels("unavailable").inc()
                    raise
                except InvalidRequest:
                    metrics.ENGINE_ERRORS.labels("rejected").inc()
                    raise
        raise AssertionError("unreachable: tenacity reraises the last failure")

    async def _dead_letter(
        self, delivery: Delivery, exc: InvalidRequest, request_id: str
    ) -> Outcome:
        attributes = {
            "error": exc.reason.value,
            "error_detail": clip_attribute(exc.detail),
            "request_id": clip_attribute(request_id),
            "message_id": delivery.message_id,
        }
        try:
            await self._sink.publish_dead_letter(delivery.data, attributes)
        except Exception as publish_exc:
            return self._nack(
                delivery, "publish_failed", f"{type(publish_exc).__name__}: {publish_exc}"
            )
        delivery.ack()
        metrics.DEAD_LETTERED.labels(exc.reason.value).inc()
        log.warning(
            "request_done",
            outcome=Outcome.DEAD_LETTERED,
            request_id=request_id,
            error=exc.reason.value,
            error_detail=exc.detail[:300],
        )
        return Outcome.DEAD_LETTERED

    def _nack(self, delivery: Delivery, cause: str, detail: str) -> Outcome:
        delivery.nack()
        metrics.NACKED.labels(cause).inc()
        log.warning("request_done", outcome=Outcome.NACKED, cause=cause, detail=detail[:300])
        return Outcome.NACKED


def _note_retry(state: RetryCallState) -> None:
    metrics.RETRIED.inc()
    exc = state.outcome.exception() if state.outcome else None
    log.info(
        "engine_retry",
        attempt=state.attempt_number,
        wait_s=round(state.upcoming_sleep, 2),
        reason=str(exc)[:200],
    )
