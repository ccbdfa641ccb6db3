"""What the worker's streamed engine calls cost its event loop, against real CPU vLLM servers.

    uv run python -m bench.stream_cost [--intervals 1,8,16] [--answers 16] [--tokens 256]
        [--resumes 32] [--prompt-ids 640]

The worker streams every engine call (preemption needs a stream it can close) and reads
every chunk in one asyncio loop, beside its chat poll. In the GPU trace run of 2026-12-03
that loop stalled for hundreds of milliseconds around the resumes of preempted answers
(docs/sharing.md). This measures on CPU what a chunk and a resume cost the worker: the
engine is slow here, but the client's work per chunk and per request is the same.

Per vLLM `--stream-interval` (one SmolLM2-135M server each; the server sends a chunk every
that many tokens):

- stream: `--answers` answers at once through `feedback.stream.chat` (the worker's call),
  `--tokens` each: chunks per answer and the worker's CPU time per token and per chunk
  (so how many tokens a second one core of the worker can read);
- resume: `--resumes` continuations of one `--prompt-ids`-id prompt started at once
  (`feedback.stream.continuation`, as the Preempter resumes its paused answers): the event
  loop's longest stall and its stalled time in all (a 1 ms ticker's lateness over 2 ms)
  until every call has its first chunk; and the same through the openai client's typed
  `completions.create`, the call the worker made before 2026-12-03.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import openai
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.paths import logs_dir
from cohost.processes import free_port
from feedback import stream
from feedback.settings import WorkerSettings

from harness.engine import SERVED_NAME, CpuServer

MODEL = "smollm2-135m-instruct"


class Ticker:
    """A 1 ms ticker: how late the loop woke it, while running."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            due = time.perf_counter() + 0.001
            await asyncio.sleep(0.001)
            self.late.append(max(0.0, time.perf_counter() - due))

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def summary(self) -> str:
        stalls = [x for x in self.late if x > 0.002]
        return (f"longest stall {max(self.late, default=0) * 1000:6.1f} ms, stalled "
                f"{sum(stalls) * 1000:6.1f} ms in all")  # fmt: skip


async def _first_chunk(chunks: AsyncGenerator[stream.Chunk, None]) -> None:
    try:
        async for _ in chunks:
            return
    finally:
        await chunks.aclose()


async def _typed_first_chunk(
    client: openai.AsyncOpenAI, settings: WorkerSettings, prompt: list[int]
) -> None:
    """The continuation as the worker sent it before: the typed `create`."""
    events = await client.completions.create(
        model=settings.llm_model, prompt=prompt, max_tokens=8, stream=True,
        temperature=settings.temperature, top_p=settings.top_p,
        stream_options={"include_usage": True},
        extra_body={"repetition_penalty": settings.repetition_penalty, "return_token_ids": True},
    )  # fmt: skip
    try:
        async for _ in events:
            return
    finally:
        await events.close()


async def resume_burst(n: int, call: Callable[[], Awaitable[None]]) -> tuple[str, float]:
    with Ticker() as ticker:
        began = time.perf_counter()
        await asyncio.gather(*(call() for _ in range(n)))
        took = time.perf_counter() - began
    return ticker.summary(), took


async def measure(url: str, args: argparse.Namespace) -> None:
    settings = WorkerSettings(llm_base_url=url, llm_model=SERVED_NAME, temperature=0.7)
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": "Write a long story about the sea."}]

    async def one_answer() -> tuple[int, int]:
        tokens = chunks = 0
        async for chunk in stream.chat(client, settings, messages, args.tokens):
            tokens += len(chunk.token_ids)
            chunks += 1
        return tokens, chunks

    await one_answer()  # warm
    cpu, began = time.process_time(), time.perf_counter()
    done = await asyncio.gather(*(one_answer() for _ in range(args.answers)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - began
    tokens, chunks = sum(t for t, _ in done), sum(c for _, c in done)
    print(f"  stream: {tokens} tokens in {wall:.1f} s ({tokens / wall:.0f} tok/s), "
          f"{chunks / args.answers:.1f} chunks per answer, worker CPU "
          f"{cpu / tokens * 1e6:.0f} us per token ({cpu / chunks * 1e6:.0f} us per chunk), "
          f"so one core keeps up with {tokens / cpu:,.0f} tok/s")  # fmt: skip

    rng = random.Random(0)
    prompt = [rng.randrange(1000, 30000) for _ in range(args.prompt_ids)]
    await _first_chunk(stream.continuation(client, settings, prompt, 8))  # prefix-cache it
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "post (now)": lambda: _first_chunk(stream.continuation(client, settings, prompt, 8)),
        "typed create (before)": lambda: _typed_first_chunk(client, settings, prompt),
    }
    for name, call in calls.items():
        summary, took = await resume_burst(args.resumes, call)
        print(f"  resume {args.resumes} x {args.prompt_ids} ids, {name:<22}: {summary}; "
              f"all first chunks in {took * 1000:.0f} ms")  # fmt: skip
    await client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--intervals", default="1,8,16", help="the server's --stream-interval values")
    p.add_argument("--answers", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--resumes", type=int, default=32)
    p.add_argument("--prompt-ids", type=int, default=640)
    args = p.parse_args()
    ensure_engine(log=print)
    model = ensure_model(MODEL, log=print)
    for interval in (int(x) for x in args.intervals.split(",") if x):
        server = CpuServer(model, free_port(), logs_dir() / f"bench-stream-{interval}.log",
                           extra_args=["--stream-interval", str(interval)])  # fmt: skip
        print(f"--stream-interval {interval}: starting the server", flush=True)
        server.start()
        try:
            asyncio.run(measure(server.base_url, args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
