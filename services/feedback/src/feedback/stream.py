"""Streamed engine calls that can be stopped mid-answer and continued from their tokens.

Preemption (`feedback.preempt`) needs three things the one-shot chat call does not give:

- **a stream it can close**: vLLM aborts a streamed request when its client disconnects
  and frees the batch slot at its next step, so closing the response is the abort;
- **the token ids**: `return_token_ids` (vLLM's, 0.26 and 0.32) puts the prompt's ids in
  the first chunk and each chunk's generated ids beside its text;
- **a continuation from exact ids**: `/v1/completions` with a token-id prompt (the chat
  prompt's ids plus what was generated) continues exactly where the answer stopped.
  Re-rendering the partial text through the chat template (`continue_final_message`)
  would re-tokenize it, and BPE need not give back the ids that were generated.

Both are posted through the client's plain `post`, the body as built here: the typed
`create` walks every parameter through its type hints first, about 7 ms for a prompt of
640 ids, so resuming 32 answers stalled the worker's event loop 282-447 ms on CPU
(bench/stream_cost.py), as long as the stalls the GPU run saw around resumes. The chunks
come back as the JSON's dicts (`cast_to=object`): building the client's typed chunk took
about 110 us of the ~400 us the worker spent per chunk, for fields read once here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from feedback.engine import EngineUnavailable, classify, sampling_args
from feedback.settings import WorkerSettings


@dataclass(frozen=True, slots=True)
class Chunk:
    """One streamed chunk: the ids and text one engine step (or several, when the
    client lagged) added, and on the last chunks the finish reason and usage."""

    token_ids: list[int]
    text: str
    prompt_token_ids: list[int] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str = ""


def _body(settings: WorkerSettings, max_tokens: int, **request: object) -> dict[str, Any]:
    """What both streamed calls send: the worker's sampling, with token ids and usage."""
    sampling = sampling_args(settings)
    return {
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        **sampling["extra_body"],
        "model": settings.llm_model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        **request,
    }


def _ids(value: object) -> list[int] | None:
    return [int(i) for i in value] if isinstance(value, list) else None


Event = dict[str, Any]  # one streamed chunk's JSON


async def _chunks(
    start: Callable[[], Awaitable[Any]], to_chunk: Callable[[Any], Chunk]
) -> AsyncGenerator[Chunk, None]:
    """Open a stream (its failures classified as the one-shot call's are), yield its
    chunks, and close it however the caller leaves: the close is the abort."""
    try:
        stream = await start()
    except Exception as exc:
        raise classify(exc) from exc
    try:
        async for event in stream:
            yield to_chunk(event)
    except (openai.APIError, httpx2.HTTPError) as exc:
        raise EngineUnavailable(f"stream broke: {type(exc).__name__}: {exc}") from exc
    finally:
        await stream.close()


def _usage(event: Event) -> dict[str, Any]:
    usage = event.get("usage") or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "model": event.get("model") or "",
    }


def _choice(event: Event) -> dict[str, Any]:
    choices = event.get("choices")
    return choices[0] if choices else {}


def _chat_chunk(event: Event) -> Chunk:
    choice = _choice(event)
    return Chunk(
        token_ids=_ids(choice.get("token_ids")) or [],
        text=(choice.get("delta") or {}).get("content") or "",
        prompt_token_ids=_ids(event.get("prompt_token_ids")),
        finish_reason=choice.get("finish_reason"),
        **_usage(event),
    )


def _completion_chunk(event: Event) -> Chunk:
    choice = _choice(event)
    return Chunk(
        token_ids=_ids(choice.get("token_ids")) or [],
        text=choice.get("text") or "",
        finish_reason=choice.get("finish_reason"),
        **_usage(event),
    )


def chat(
    client: openai.AsyncOpenAI,
    settings: WorkerSettings,
    messages: list[dict[str, str]],
    max_tokens: int,
) -> AsyncGenerator[Chunk, None]:
    """A streamed chat completion; closing the iterator aborts it in the engine."""
    body = _body(settings, max_tokens, messages=messages)
    return _chunks(
        lambda: client.post("/chat/completions", body=body, cast_to=object, stream=True,
                            stream_cls=openai.AsyncStream[Event]),
        _chat_chunk,
    )  # fmt: skip


def continuation(
    client: openai.AsyncOpenAI,
    settings: WorkerSettings,
    prompt_token_ids: list[int],
    max_tokens: int,
) -> AsyncGenerator[Chunk, None]:
    """A streamed completion continuing `prompt_token_ids` (the chat prompt's ids plus
    what the answer has so far); closing the iterator aborts it in the engine."""
    body = _body(settings, max_tokens, prompt=prompt_token_ids)
    return _chunks(
        lambda: client.post("/completions", body=body, cast_to=object, stream=True,
                            stream_cls=openai.AsyncStream[Event]),
        _completion_chunk,
    )  # fmt: skip
