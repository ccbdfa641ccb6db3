"""Preemption: feedback gives the GPU back to chat within an engine step, and resumes.

While the chatbot has requests (its /metrics, `FEEDBACK_CHAT_METRICS_URL`, polled every
`FEEDBACK_CHAT_POLL_S`, 20 ms by default), every engine call of the worker is stopped at
once: its stream is closed, vLLM aborts the request and frees its batch slot at its next
step. What was generated is kept. When chat is idle again each answer continues from its
exact token ids (`feedback.stream.continuation`; prefix caching makes the re-prefill
cheap), so at temperature 0 the answer equals the uninterrupted one token for token.

- The message stays leased meanwhile (the Pub/Sub client extends the lease up to
  FEEDBACK_MAX_LEASE_S) and keeps its limiter slot: one slot per answer in progress, as the
  engine's --max-num-seqs. New requests wait for idle chat too.
- No thrash: a resumed call generates FEEDBACK_PREEMPT_MIN_TOKENS before it can be
  preempted again, so every resume makes progress.
- A cut inside a multi-byte character (the engine's detokenizer holds such bytes back)
  drops those few tokens, found by asking the engine to detokenize the tail; they are
  generated again.
- `usage` counts the whole answer: the prompt once, every kept token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from feedback import metrics, stream
from feedback.chatload import poll_load
from feedback.engine import Completion, EngineClient, EngineUnavailable
from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A character is at most 4 bytes, so the last 4 tokens hold the start of the last one.
_TAIL = 4
_REPLACEMENT = "\ufffd"


class Pausing(Protocol):
    """What the Preempter needs of `feedback.pause.EnginePause`."""

    @property
    def works(self) -> bool: ...

    async def timed(self, call: Awaitable[T]) -> T: ...


class ChatWatch:
    """Whether the chatbot has requests now; wakes what waits on either state."""

    def __init__(self, busy_threshold: int) -> None:
        self.busy_threshold = busy_threshold
        self.busy = False
        self.busy_since: float | None = None  # monotonic, when chat was last seen busy
        self.idle_since: float | None = None  # monotonic, when chat was last seen idle
        self._idle = asyncio.Event()
        self._idle.set()
        self._changed = asyncio.Event()
        self._armed: set[asyncio.Future[None]] = set()

    def observe(self, load: int | None) -> None:
        """One reading of chat's running + waiting requests (None: unreadable, so idle:
        a chatbot that cannot be read needs no protection)."""
        busy = load is not None and load >= self.busy_threshold
        if busy == self.busy:
            return
        self.busy = busy
        self._changed.set()
        metrics.CHAT_BUSY.set(int(busy))
        log.debug("chat_busy" if busy else "chat_idle", chat_load=load)
        if busy:
            self.busy_since = time.monotonic()
            self._idle.clear()
            for stop in self._armed:
                if not stop.done():
                    stop.set_result(None)
            self._armed.clear()
        else:
            self.idle_since = time.monotonic()
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def wait_change(self, at_most_s: float) -> None:
        """Until chat turns busy or idle, or `at_most_s` seconds pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), at_most_s)
        self._changed.clear()

    def arm(self, stop: asyncio.Future[None]) -> None:
        """Resolve `stop` as soon as chat is busy (now, if it is)."""
        if stop.done():
            return
        if self.busy:
            stop.set_result(None)
        else:
            self._armed.add(stop)

    def disarm(self, stop: asyncio.Future[None]) -> None:
        self._armed.discard(stop)

    async def run(self, url: str, poll_s: float) -> None:
        log.info("preempt_on", url=url, poll_s=poll_s)
        await poll_load(url, poll_s, self.observe)


@dataclass
class Answer:
    """One answer across its engine calls."""

    prompt_ids: list[int] | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    model: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    # Tokens kept before the current call, and that call's own count from the engine.
    before: int = 0
    counted: int | None = None
    stopped_at: float = 0.0  # monotonic, when its last preempted call's stream was closed

    def add(self, chunk: stream.Chunk) -> None:
        if self.prompt_ids is None and chunk.prompt_token_ids is not None:
            self.prompt_ids = chunk.prompt_token_ids
        self.ids.extend(chunk.token_ids)
        self.text += chunk.text
        self.model = chunk.model or self.model
        self.finish_reason = chunk.finish_reason or self.finish_reason
        if chunk.prompt_tokens is not None and self.prompt_tokens is None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.counted = chunk.completion_tokens

    def completion(self) -> Completion:
        prompt = len(self.prompt_ids) if self.prompt_ids else (self.prompt_tokens or 0)
        last = self.counted if self.counted is not None else len(self.ids) - self.before
        return Completion(self.text, self.model, prompt, self.before + last, tuple(self.ids))


class Preempter:
    """Engine calls that stop while chat is busy and resume from their tokens; plain ones
    while `pause` holds the whole engine instead (`feedback.pause`)."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: EngineClient,
        watch: ChatWatch,
        pause: Pausing | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._watch = watch
        self._pause_engine = pause

    async def complete(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        if self._pause_engine is not None and self._pause_engine.works:
            return await self._engine.complete(messages, max_tokens, self._held)
        return await self._engine.complete(messages, max_tokens, self._answer)

    async def _held(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        """A plain call whose timeout leaves out the time the engine was paused for chat."""
        assert self._pause_engine is not None
        call = self._engine.create(messages, max_tokens, timed=False)
        return await self._pause_engine.timed(call)

    async def _answer(self, messages: list[dict[str, str]], max_tokens: int) -> Completion:
        answer = Answer()
        client, settings = self._engine.openai, self._settings
        preempted = False
        while True:
            await self._pause(preempted, answer)
            if answer.prompt_ids is None:
                chunks = stream.chat(client, settings, messages, max_tokens)
            else:
                prompt = answer.prompt_ids + answer.ids
                chunks = stream.continuation(client, settings, prompt, max_tokens - len(answer.ids))
            min_tokens = settings.preempt_min_tokens if preempted else 0
            if await self._segment(chunks, answer, min_tokens):
                return answer.completion()
            preempted = True
            dropped = await self._cut(answer)
            metrics.PREEMPTIONS.inc()
            since = self._since(answer)
            log.info("preempted", tokens=len(answer.ids), dropped=dropped, after_busy_ms=since)

    def _since(self, answer: Answer) -> float | None:
        """Milliseconds from chat seen busy to this call's stream closed (the abort)."""
        since = self._watch.busy_since
        return round((answer.stopped_at - since) * 1000, 2) if since is not None else None

    async def _pause(self, preempted: bool, answer: Answer) -> None:
        """Wait for idle chat; a preempted answer counts as paused meanwhile."""
        if not preempted:
            await self._watch.wait_idle()
            return
        metrics.PAUSED.inc()
        try:
            await self._watch.wait_idle()
        finally:
            metrics.PAUSED.dec()
        metrics.RESUMES.inc()
        log.info("resumed", tokens=len(answer.ids))

    async def _segment(
        self, chunks: AsyncGenerator[stream.Chunk, None], answer: Answer, min_tokens: int
    ) -> bool:
        """One engine call: True when the answer finished, False when chat took the GPU."""
        start = len(answer.ids)
        answer.before, answer.counted = start, None
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_chunk() -> None:
            # Preemptible once the prompt's ids are known and a resumed call made progress;
            # never once finished (only the usage chunk is still to come).
            if (
                answer.finish_reason is None
                and answer.prompt_ids is not None
                and len(answer.ids) - start >= min_tokens
            ):
                self._watch.arm(stop)

        consumer = asyncio.create_task(_consume(chunks, answer, on_chunk))
        try:
            await asyncio.wait({consumer, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._watch.disarm(stop)
            if not consumer.done():
                consumer.cancel()  # closes the stream: vLLM aborts the request
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
                answer.stopped_at = time.monotonic()
        if consumer.cancelled():
            # Stopped between the finish and the usage chunk: finished all the same (its
            # count then comes from the ids).
            return answer.finish_reason is not None
        consumer.result()  # raises what the call raised
        if answer.finish_reason is None:
            raise EngineUnavailable("the engine's stream ended without a finish reason")
        return True

    async def _cut(self, answer: Answer) -> int:
        """Drop trailing tokens that end inside a character (their text was held back)."""
        dropped = 0
        while answer.ids and dropped < _TAIL - 1:
            tail = await self._engine.detokenize(answer.ids[-_TAIL:])
            if not tail.endswith(_REPLACEMENT):
                break
            answer.ids.pop()
            dropped += 1
        if dropped:
            metrics.PREEMPT_DROPPED_TOKENS.inc(dropped)
        answer.before = len(answer.ids)
        return dropped


async def _consume(
    chunks: AsyncGenerator[stream.Chunk, None], answer: Answer, on_chunk: Callable[[], None]
) -> None:
    try:
        async for chunk in chunks:
            answer.add(chunk)
            on_chunk()
    finally:
        await chunks.aclose()
