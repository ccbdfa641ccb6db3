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
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import httpx2
import openai

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

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


def _extra_body(settings: WorkerSettings) -> dict[str, Any]:
    extra: dict[str, Any] = sampling_args(settings)["extra_body"]
    return {**extra, "return_token_ids": True}


def _ids(value: object) -> list[int] | None:
    return [int(i) for i in value] if isinstance(value, list) else None


async def chat(
    client: openai.AsyncOpenAI,
    settings: WorkerSettings,
    messages: list[dict[str, str]],
    max_tokens: int,
) -> AsyncGenerator[Chunk, None]:
    """A streamed chat completion; closing the iterator aborts it in the engine."""
    try:
        stream = await client.chat.completions.create(
            model=settings.llm_model,
            messages=cast("list[ChatCompletionMessageParam]", messages),
            max_tokens=max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=_extra_body(settings),
        )
    except Exception as exc:
        raise classify(exc) from exc
    try:
        async for event in stream:
            extra = event.model_extra or {}
            usage = event.usage
            choice = event.choices[0] if event.choices else None
            yield Chunk(
                token_ids=_ids((choice.model_extra or {}).get("token_ids")) or [] if choice else [],
                text=(choice.delta.content or "") if choice else "",
                prompt_token_ids=_ids(extra.get("prompt_token_ids")),
                finish_reason=choice.finish_reason if choice else None,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                model=event.model,
            )
    except (openai.APIError, httpx2.HTTPError) as exc:
        raise EngineUnavailable(f"stream broke: {type(exc).__name__}: {exc}") from exc
    finally:
        await stream.close()


async def continuation(
    client: openai.AsyncOpenAI,
    settings: WorkerSettings,
    prompt_token_ids: list[int],
    max_tokens: int,
) -> AsyncGenerator[Chunk, None]:
    """A streamed completion continuing `prompt_token_ids` (the chat prompt's ids plus
    what the answer has so far); closing the iterator aborts it in the engine."""
    try:
        stream = await client.completions.create(
            model=settings.llm_model,
            prompt=prompt_token_ids,
            max_tokens=max_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=_extra_body(settings),
        )
    except Exception as exc:
        raise classify(exc) from exc
    try:
        async for event in stream:
            usage = event.usage
            choice = event.choices[0] if event.choices else None
            yield Chunk(
                token_ids=_ids((choice.model_extra or {}).get("token_ids")) or [] if choice else [],
                text=choice.text if choice else "",
                finish_reason=choice.finish_reason if choice else None,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                model=event.model,
            )
    except (openai.APIError, httpx2.HTTPError) as exc:
        raise EngineUnavailable(f"stream broke: {type(exc).__name__}: {exc}") from exc
    finally:
        await stream.close()
