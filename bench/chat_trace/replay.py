"""A schedule of trace requests sent to a chatbot, and what that chatbot did with it.

Each request is a streamed chat completion with a prompt of the trace's context length
(synthetic text sized with the server's own /tokenize) and exactly the trace's generated
length (`max_tokens` = `min_tokens`, `ignore_eos`), sent at its scheduled time whatever
the chatbot is doing (an open loop, as users are). Per request: time to first token, time
per output token after it, the server's own token counts, or the error.

The chat-idle fraction of a replay is the share of its window with no chat request in
flight, as the replayer sees it (from sending a request to its last byte). That is the
time the feedback work may have the GPU to itself.

Capacity (`capacity`): the chatbot's completed requests per second with the trace's
(capped) sizes, in trace order, while a closed loop keeps `concurrency` requests in
flight (its max_num_seqs: a full batch, nothing queued). No open-loop rate above it can
be sustained; 25%, 50% and 75% loads are fractions of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletionUserMessageParam

from bench.chat_trace.trace import Request
from bench.sharing import pct, text_of


@dataclass
class Outcome:
    index: int
    scheduled_s: float
    started_s: float  # from the replay's start
    ended_s: float
    context_tokens: int  # asked for
    generated_tokens: int
    prompt_tokens: int | None = None  # as the server counted them
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    error: str | None = None


class PromptMaker:
    """User text of a given token length for one chatbot: the server's /tokenize of the
    chat messages at two lengths gives tokens per unit of text and the template's share."""

    def __init__(self, root_url: str, model: str, kind: str = "words") -> None:
        self.root, self.model, self.kind = root_url.rstrip("/"), model, kind
        self.per_unit, self.overhead = 1.0, 0.0
        self._prepared: dict[int, list[ChatCompletionUserMessageParam]] = {}

    def _user_text(self, units: int, index: int) -> str:
        # A number first, unique per request, so vLLM's prefix cache never serves one
        # request's prompt from another's (the trace's prompts are all different).
        return f"{index} " + text_of(units, index, self.kind)

    def _messages(self, units: int, index: int) -> list[ChatCompletionUserMessageParam]:
        return [{"role": "user", "content": self._user_text(units, index)}]

    async def _count(self, client: httpx2.AsyncClient, units: int, index: int) -> int:
        body = {"model": self.model, "messages": self._messages(units, index)}
        reply = await client.post(f"{self.root}/tokenize", json=body)
        reply.raise_for_status()
        return int(reply.json()["count"])

    def _units(self, tokens: int) -> int:
        return max(1, round((tokens - self.overhead) / self.per_unit))

    async def calibrate(self) -> None:
        async with httpx2.AsyncClient(timeout=60) as client:
            counts = [await self._count(client, units, 12345) for units in (64, 512)]
        self.per_unit = (counts[1] - counts[0]) / (512 - 64)
        self.overhead = counts[0] - 64 * self.per_unit
        if self.per_unit <= 0:
            raise RuntimeError(f"{self.root}/tokenize counted {counts} tokens for 64 and 512 units")

    async def prepare(self, requests: Sequence[Request]) -> None:
        """Size each request's prompt exactly (or within a token or two), correcting the
        estimate with /tokenize, before a replay, so sizing costs the replay no time."""
        limit = asyncio.Semaphore(8)

        async def one(client: httpx2.AsyncClient, index: int, tokens: int) -> None:
            units = self._units(tokens)
            best: tuple[int, int] | None = None
            async with limit:
                for _ in range(4):
                    count = await self._count(client, units, index)
                    if best is None or abs(count - tokens) < abs(best[1] - tokens):
                        best = (units, count)
                    if count == tokens:
                        break
                    units = max(1, units + round((tokens - count) / self.per_unit))
            assert best is not None
            self._prepared[index] = self._messages(best[0], index)

        async with httpx2.AsyncClient(timeout=60) as client:
            await asyncio.gather(
                *(one(client, i, r.context_tokens) for i, r in enumerate(requests))
            )

    def messages(self, tokens: int, index: int) -> list[ChatCompletionUserMessageParam]:
        """The prepared messages of request `index`, else the estimate's."""
        return self._prepared.get(index) or self._messages(self._units(tokens), index)


async def send(
    client: openai.AsyncOpenAI, model: str, prompts: PromptMaker, request: Request, index: int
) -> Outcome:
    """One streamed request; `started_s`/`ended_s` are monotonic here (the caller shifts them)."""
    started = time.monotonic()
    out = Outcome(index, request.at_s, started, started, request.context_tokens,
                  request.generated_tokens)  # fmt: skip
    first = last = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=prompts.messages(request.context_tokens, index),
            max_tokens=request.generated_tokens,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.0,
            extra_body={"ignore_eos": True, "min_tokens": request.generated_tokens},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.monotonic()
                first = first or now
                last = now
            if chunk.usage:
                out.prompt_tokens = chunk.usage.prompt_tokens
                out.completion_tokens = chunk.usage.completion_tokens
    except (openai.APIError, httpx2.HTTPError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    out.ended_s = time.monotonic()
    if first is not None and last is not None:
        out.ttft_s = first - started
        tokens = out.completion_tokens or 0
        out.tpot_s = (last - first) / (tokens - 1) if tokens > 1 else None
    elif out.error is None:
        out.error = "no token streamed"
    return out


async def replay(
    url: str,
    model: str,
    requests: Sequence[Request],
    prompts: PromptMaker,
    *,
    duration_s: float = 0.0,
    drain_s: float = 120.0,
    timeout_s: float = 120.0,
    start_at: float | None = None,
) -> tuple[list[Outcome], float]:
    """Send each request at its time; wait up to `drain_s` after the last arrival for the
    ones in flight (those still running then count as errors), and at least until
    `duration_s` from the start (`start_at`, a `time.monotonic()` instant, else now).
    Returns the outcomes, times relative to the start, and the window's length (the start
    to the later of `duration_s` and the last request's end)."""
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=timeout_s)
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    start = time.monotonic() if start_at is None else start_at
    tasks: list[asyncio.Task[Outcome]] = []
    try:
        for i, request in enumerate(requests):
            await asyncio.sleep(max(0.0, start + request.at_s - time.monotonic()))
            tasks.append(asyncio.create_task(send(client, model, prompts, request, i)))
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        await asyncio.sleep(max(0.0, start + duration_s - time.monotonic()))
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await client.close()
    outcomes = []
    ended = time.monotonic()
    for i, task in enumerate(tasks):
        if task.cancelled() or task.exception() is not None:
            r = requests[i]
            outcomes.append(Outcome(i, r.at_s, r.at_s, ended - start, r.context_tokens,
                                    r.generated_tokens, error="unfinished at the end"))  # fmt: skip
            continue
        o = task.result()
        o.started_s -= start
        o.ended_s -= start
        outcomes.append(o)
    window = max([o.ended_s for o in outcomes] + [duration_s])
    return outcomes, window


class Apart:
    """Replays in a process of their own, as chat's clients are in production. Beside the
    feedback worker in one event loop each side's client waits on the other's work (chat's
    first token behind the worker's chunks, the worker's reaction behind chat's), so a
    slower host slowed both at once in the benchmark alone.
    `with Apart() as apart:` starts the process (a spawned Python imports for a second or
    more, so start it before the warm-up); `await apart.replay(...)`, as `replay` with
    `start_at`, whose monotonic clock the process shares."""

    def __init__(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: this process runs threads (the timeline's sampler), which fork would copy.
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> Apart:
        # A function of this module, so the process imports it (openai, httpx2: most of a
        # second, more on a busy host) now rather than at the first replay, past its start.
        self._pool.submit(_now).result()
        return self

    def __exit__(self, *_: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def replay(
        self, url: str, model: str, requests: Sequence[Request], prompts: PromptMaker,
        **options: Any,
    ) -> tuple[list[Outcome], float]:  # fmt: skip
        loop = asyncio.get_running_loop()
        call = functools.partial(_replay_here, url, model, list(requests), prompts, options)
        return await loop.run_in_executor(self._pool, call)


def _now() -> float:
    return time.monotonic()


def _replay_here(
    url: str, model: str, requests: list[Request], prompts: PromptMaker, options: dict[str, Any]
) -> tuple[list[Outcome], float]:
    return asyncio.run(replay(url, model, requests, prompts, **options))


def idle_gaps(outcomes: Sequence[Outcome], window_s: float) -> list[tuple[float, float]]:
    """The stretches of [0, window_s] with no request in flight, in order."""
    gaps, reach = [], 0.0
    for o in sorted(outcomes, key=lambda o: o.started_s):
        if o.started_s > reach and reach < window_s:
            gaps.append((reach, min(o.started_s, window_s)))
        reach = max(reach, o.ended_s)
    if reach < window_s:
        gaps.append((reach, window_s))
    return gaps


def idle_fraction(outcomes: Sequence[Outcome], window_s: float) -> float:
    """Share of [0, window_s] with no request in flight."""
    if window_s <= 0:
        return 1.0
    return sum(end - start for start, end in idle_gaps(outcomes, window_s)) / window_s


def summary(outcomes: Sequence[Outcome], window_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    ttft = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
    tpot = [o.tpot_s * 1000 for o in ok if o.tpot_s is not None]
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "window_s": round(window_s, 2),
        "idle_fraction": round(idle_fraction(outcomes, window_s), 4),
        "ttft_ms_p50": pct(ttft, 0.5),
        "ttft_ms_p99": pct(ttft, 0.99),
        "tpot_ms_p50": pct(tpot, 0.5),
        "tpot_ms_p99": pct(tpot, 0.99),
        "completion_tokens": sum(o.completion_tokens or 0 for o in ok),
        "first_errors": [o.error for o in outcomes if o.error][:5],
    }


def rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]


async def capacity(
    url: str,
    model: str,
    sizes: Sequence[Request],
    prompts: PromptMaker,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """Completed requests/s (and output tok/s) with `concurrency` always in flight, the
    trace's sizes taken in order; measured over `duration_s` after `warmup_s`."""
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=300)
    start = time.monotonic()
    t0, t1 = start + warmup_s, start + warmup_s + duration_s
    done: list[Outcome] = []
    taken = 0

    async def loop() -> None:
        nonlocal taken
        while time.monotonic() < t1:
            i, taken = taken, taken + 1
            o = await send(client, model, prompts, sizes[i % len(sizes)], i)
            if t0 <= o.ended_s <= t1:
                done.append(o)

    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        await client.close()
    ok = [o for o in done if o.error is None]
    return {
        "concurrency": concurrency,
        "duration_s": duration_s,
        "completed": len(ok),
        "errors": len(done) - len(ok),
        "requests_per_s": len(ok) / duration_s,
        "output_tokens_per_s": sum(o.completion_tokens or 0 for o in ok) / duration_s,
    }
