"""The worker's engine: its own vLLM server, reached over the OpenAI API.

One call per request, with an explicit timeout and none of the openai client's
hidden retries: `feedback.jobs` retries transient failures itself (tenacity) and
must see every failure to classify it. Failures become either `EngineUnavailable`
(retry, then nack) or `InvalidRequest` (dead-letter: the request can never succeed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import structlog
from cohost_shared.messages import InvalidRequest, Reason
from openai import NOT_GIVEN

from feedback.settings import WorkerSettings

log = structlog.get_logger(__name__)

# vLLM's wording when prompt + max_tokens do not fit its --max-model-len.
_CONTEXT_LENGTH_HINTS = ("maximum context length", "max_model_len", "max-model-len", "too long")


# Below this many tokens of room for the answer, feedback is not worth giving.
MIN_ANSWER_TOKENS = 16


class EngineUnavailable(Exception):
    """The engine could not answer now (down, overloaded, timed out): worth retrying."""


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    # The answer's token ids, where the call asked for them (preemption does).
    token_ids: tuple[int, ...] | None = None


Create = Callable[[list[dict[str, str]], int], Awaitable[Completion]]


def sampling_args(settings: WorkerSettings) -> dict[str, Any]:
    """The sampling part of a chat completion request (repetition_penalty is vLLM's own
    parameter, outside the OpenAI API)."""
    return {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "extra_body": {"repetition_penalty": settings.repetition_penalty},
    }


def classify(exc: Exception) -> Exception:
    """Map an openai/httpx failure to EngineUnavailable or InvalidRequest."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = _error_message(exc)
        if status in (400, 413, 422):
            reason = (
                Reason.TEXT_TOO_LONG
                if any(h in message.lower() for h in _CONTEXT_LENGTH_HINTS)
                else Reason.ENGINE_REJECTED
            )
            return InvalidRequest(reason, f"engine answered {status}: {message}")
        # 401/403/404 mean the worker or engine is misconfigured (key, model name), not
        # that this request is bad: retry, and let delivery attempts run out if it lasts.
        return EngineUnavailable(f"engine answered {status}: {message}")
    if isinstance(exc, openai.APIConnectionError | asyncio.TimeoutError):
        return EngineUnavailable(f"{type(exc).__name__}: {exc}")
    return exc


def _error_message(exc: openai.APIStatusError) -> str:
    body: Any = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return str(exc.message)


class EngineClient:
    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._client = openai.AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.api_key(),
            timeout=settings.llm_timeout_s,
            max_retries=0,
        )
        self.max_model_len: int | None = None
        # vLLM's /tokenize lives at the server root, not under /v1.
        root = settings.llm_base_url.rstrip("/").removesuffix("/v1")
        self._http = httpx2.AsyncClient(
            base_url=root,
            headers={"Authorization": f"Bearer {settings.api_key()}"},
            timeout=30.0,
        )

    async def close(self) -> None:
        await self._client.close()
        await self._http.aclose()

    def check_fits(self, messages: list[dict[str, str]]) -> None:
        """Refuse, without sending it, a prompt that cannot fit max-model-len.

        No token covers more than `max_chars_per_token` characters, so a prompt of more
        than max_model_len times that many characters needs more tokens than the engine
        takes. Sending it anyway costs the engine a tokenization of up to the worker's
        whole byte limit (1 MiB) just to reject it, and a second one through /tokenize
        when `complete` looks for room to shorten the answer; vLLM 0.26 has no such
        check of its own. Off while max-model-len is unknown or the setting is 0.
        """
        limit = self.max_model_len
        per_token = self._settings.max_chars_per_token
        if not limit or not per_token:
            return
        chars = sum(len(m["content"]) for m in messages)
        if chars > limit * per_token:
            raise InvalidRequest(
                Reason.TEXT_TOO_LONG,
                f"prompt of {chars} characters cannot fit in {limit} tokens "
                f"(at most {per_token} characters per token); not sent to the engine",
            )

    @property
    def openai(self) -> openai.AsyncOpenAI:
        return self._client

    async def complete(
        self, messages: list[dict[str, str]], max_tokens: int, create: Create | None = None
    ) -> Completion:
        """One chat completion (`create`, default one plain call). If the prompt fits but
        prompt + max_tokens does not, the answer is shortened to the room left (vLLM 0.26
        rejects such requests where newer versions cap them; doing it here behaves the
        same on both)."""
        create = create or self.create
        try:
            return await create(messages, max_tokens)
        except InvalidRequest as exc:
            if exc.reason is not Reason.TEXT_TOO_LONG:
                raise
            room = await self._room_for_answer(messages)
            if room is None or room >= max_tokens or room < min(MIN_ANSWER_TOKENS, max_tokens):
                raise
            log.info("max_tokens_capped", requested=max_tokens, capped=room)
            return await create(messages, room)

    async def detokenize(self, token_ids: list[int]) -> str:
        """The engine's text for `token_ids` (vLLM's /detokenize)."""
        try:
            response = await self._http.post(
                "/detokenize", json={"model": self._settings.llm_model, "tokens": token_ids}
            )
            response.raise_for_status()
            return str(response.json()["prompt"])
        except (httpx2.HTTPError, KeyError, TypeError, ValueError) as exc:
            raise EngineUnavailable(f"detokenize failed: {type(exc).__name__}: {exc}") from exc

    async def _room_for_answer(self, messages: list[dict[str, str]]) -> int | None:
        """max-model-len minus the prompt's tokens, from the engine's /tokenize."""
        try:
            response = await self._http.post(
                "/tokenize", json={"model": self._settings.llm_model, "messages": messages}
            )
            response.raise_for_status()
            body = response.json()
            return int(body["max_model_len"]) - int(body["count"])
        except (httpx2.HTTPError, KeyError, TypeError, ValueError) as exc:
            log.warning("tokenize_failed", error=str(exc))
            return None

    async def create(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        *,
        timed: bool = True,
    ) -> Completion:
        """One plain call, timed out after FEEDBACK_LLM_TIMEOUT_S; `timed=False`: never, for
        a caller that keeps its own deadline (`feedback.pause`)."""
        try:
            response = await self._client.chat.completions.create(
                model=self._settings.llm_model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens,
                timeout=NOT_GIVEN if timed else None,
                **sampling_args(self._settings),
            )
        except Exception as exc:
            raise classify(exc) from exc
        if not response.choices:
            raise EngineUnavailable("engine returned no choices")
        usage = response.usage
        return Completion(
            text=response.choices[0].message.content or "",
            model=response.model,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    async def probe(self) -> int | None:
        """Check the engine serves our model; return its max-model-len when it says."""
        try:
            models = await self._client.models.list()
        except Exception as exc:
            raise classify(exc) from exc
        for model in models.data:
            if model.id == self._settings.llm_model:
                extra = model.model_extra or {}
                value = extra.get("max_model_len")
                self.max_model_len = int(value) if isinstance(value, int) else None
                return self.max_model_len
        served = ", ".join(m.id for m in models.data) or "none"
        raise EngineUnavailable(
            f"engine at {self._settings.llm_base_url} does not serve model "
            f"{self._settings.llm_model!r} (it serves: {served}); check FEEDBACK_LLM_MODEL"
        )

    async def wait_ready(self) -> int | None:
        """Wait until `probe` succeeds, logging progress; give up after engine_wait_s if set."""
        start = time.monotonic()
        delay = 1.0
        while True:
            try:
                max_len = await self.probe()
            except EngineUnavailable as exc:
                waited = time.monotonic() - start
                limit = self._settings.engine_wait_s
                if limit and waited >= limit:
                    raise
                log.info("engine_waiting", reason=str(exc), waited_s=round(waited, 1))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            log.info("engine_ready", model=self._settings.llm_model, max_model_len=max_len)
            return max_len
