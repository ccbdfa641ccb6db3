"""How fast does the worker give the GPU back when a chat request arrives?

    uv run python -m bench.preempt_signal [--trials 20] [--poll-s 0.02] [--in-flight 8]
        [--signal load|metrics]
        [--chat-url http://127.0.0.1:PORT/v1 --feedback-url http://127.0.0.1:PORT/v1]

Starts two CPU vLLM servers with tiny-llama (the chatbot and the feedback engine; or uses
the two given), keeps `--in-flight` feedback answers going through the worker's own
preemption (`feedback.preempt`: ChatWatch polling the chatbot's /load, or its /metrics
with `--signal metrics`; Preempter), then,
per trial, with chat idle for a second, sends one streamed chat request and times:

- detect: the request sent -> the worker's ChatWatch sees chat busy;
- abort: the request sent -> the last feedback stream closed (vLLM aborts a request whose
  stream is closed at its next step), and the first one;
- engine idle: the request sent -> the feedback engine's own /metrics shows no running
  request (polled every 5 ms from another thread; its gauge moves at engine steps);
- chat first token: the request sent -> its first streamed token.

Then the resume, from the chat stream's end at the client ("done") to: the chatbot's /load
reading 0 (polled every 3 ms from another thread, from the chat's first token); the
worker's ChatWatch turning idle; the first and last preempted answer leaving
`Preempter._pause` (its continuation is posted next) and their first token back at the
worker; the feedback engine's /metrics showing a running request, and its generation-token
counter past its idle value, again (the 5 ms poll). A poll's time is when its response is
back, so its own latency is in it ("GET that saw running" says how much).

Also what one poll costs: GET of the chatbot's page (the chatbot renders it) and the
worker's parse of it. Prints medians, p90 and max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import AsyncGenerator, Iterator

import httpx2 as httpx
import openai
from cohost.cpu_engine.install import ensure_engine
from cohost.cpu_engine.models import ensure_model
from cohost.paths import logs_dir
from cohost.processes import free_port
from cohost_shared.messages import FeedbackRequest
from cohost_shared.metrics import VLLM_RUNNING, Metrics
from feedback.chatload import chat_load
from feedback.engine import EngineClient
from feedback.preempt import Answer, ChatWatch, Preempter
from feedback.prompts import build_messages
from feedback.settings import WorkerSettings
from feedback.stream import Chunk
from structlog.testing import capture_logs

from harness.engine import SERVED_NAME, TEST_MODEL, CpuServer

GENERATED = "vllm:generation_tokens_total"
RESUME = (
    "chat /load 0", "worker saw idle", "first re-posted", "last re-posted",
    "first token at worker", "last 1st token at worker", "engine running > 0",
    "engine tokens moving",
)  # fmt: skip


class TimedWatch(ChatWatch):
    """The worker's ChatWatch, recording when it sees chat turn idle."""

    def __init__(self, busy_threshold: int) -> None:
        super().__init__(busy_threshold)
        self.idle_at: list[float] = []

    def observe(self, load: int | None) -> None:
        was = self.busy
        super().observe(load)
        if was and not self.busy:
            self.idle_at.append(time.monotonic())


class TimedPreempter(Preempter):
    """The worker's Preempter, recording when each preempted answer is resumed (leaves
    `_pause`, its continuation posted next) and when its first token is back."""

    def __init__(self, settings: WorkerSettings, engine: EngineClient, watch: ChatWatch) -> None:
        super().__init__(settings, engine, watch)
        self.reposted: list[float] = []
        self.first_token: list[float] = []

    async def _pause(self, preempted: bool, answer: Answer) -> None:
        await super()._pause(preempted, answer)
        if preempted:
            self.reposted.append(time.monotonic())

    async def _segment(
        self, chunks: AsyncGenerator[Chunk, None], answer: Answer, min_tokens: int
    ) -> bool:
        # min_tokens > 0 only for a resumed call (FEEDBACK_PREEMPT_MIN_TOKENS >= 1).
        return await super()._segment(self._timed(chunks) if min_tokens else chunks, answer,
                                      min_tokens)  # fmt: skip

    async def _timed(self, chunks: AsyncGenerator[Chunk, None]) -> AsyncGenerator[Chunk, None]:
        seen = False
        try:
            async for chunk in chunks:
                if not seen and (chunk.token_ids or chunk.text):
                    seen = True
                    self.first_token.append(time.monotonic())
                yield chunk
        finally:
            await chunks.aclose()


@contextlib.contextmanager
def servers(chat_url: str | None, feedback_url: str | None) -> Iterator[tuple[str, str]]:
    if chat_url and feedback_url:
        yield chat_url, feedback_url
        return
    ensure_engine(log=print)
    model = ensure_model(TEST_MODEL, log=print)
    started = [
        CpuServer(model, free_port(), logs_dir() / f"bench-preempt-{n}.log", role=role)
        for n, role in (("c", "chatbot"), ("f", "feedback"))
    ]
    try:
        for server in started:
            server.start()
        yield started[0].base_url, started[1].base_url
    finally:
        for server in started:
            server.stop()


def stats(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:<34} none"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"{name:<34} median {statistics.median(ordered):7.1f}  p90 {p90:7.1f}  "
        f"max {ordered[-1]:7.1f}  (n={len(ordered)})"
    )


def engine_cycle(root: str, sent: float, out: dict[str, float], timeout: float = 10.0) -> None:
    """From `sent`, when the engine's running gauge reads 0 (out["idle"]), then above 0
    (out["running"]), and its generation-token counter passes its idle value (out["tokens"])."""
    base: float | None = None
    with httpx.Client(timeout=timeout) as client:
        while time.monotonic() - sent < timeout and "tokens" not in out:
            asked = time.monotonic()
            try:
                text = client.get(f"{root}/metrics").text
            except httpx.HTTPError:
                return
            now, m = time.monotonic(), Metrics.parse(text, (VLLM_RUNNING, GENERATED))
            running, tokens = m.value(VLLM_RUNNING), m.value(GENERATED) or 0.0
            if base is None and running == 0:
                out["idle"], base = now, tokens
            elif base is not None:
                if running and "running" not in out:
                    out["running"], out["running_get"] = now, now - asked
                if tokens > base:
                    out["tokens"] = now
            time.sleep(0.005)


def load_zero_after(url: str, chat: dict[str, float], out: dict[str, float]) -> None:
    """Poll the chatbot's /load from the chat's first token (surely counted by then) until it
    reads 0 (out["load0"])."""
    with httpx.Client(timeout=5.0) as client:
        while "first" not in chat and "done" not in chat:
            time.sleep(0.001)
        start = time.monotonic()
        while time.monotonic() - start < 5.0:
            if chat_load(client.get(url).text) == 0:
                out["load0"] = time.monotonic()
                return
            time.sleep(0.003)


def chat_once(chat: openai.OpenAI, out: dict[str, float], sent: threading.Event) -> None:
    out["sent"] = time.monotonic()
    sent.set()
    stream = chat.chat.completions.create(
        model=SERVED_NAME,
        messages=[{"role": "user", "content": "Hello there!"}],
        max_tokens=16,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and "first" not in out:
            out["first"] = time.monotonic()
    out["done"] = time.monotonic()


def poll_cost(url: str, n: int = 200) -> tuple[list[float], list[float]]:
    fetch, parse = [], []
    with httpx.Client(timeout=5.0) as client:
        for _ in range(n):
            t = time.perf_counter()
            text = client.get(url).text
            fetch.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            chat_load(text)
            parse.append((time.perf_counter() - t) * 1000)
    return fetch, parse


async def run(args: argparse.Namespace, chat_url: str, feedback_url: str) -> None:
    chat_root, feedback_root = (u.removesuffix("/v1") for u in (chat_url, feedback_url))
    settings = WorkerSettings(
        llm_base_url=feedback_url,
        llm_model=SERVED_NAME,
        chat_metrics_url=f"{chat_root}/{args.signal}",
        chat_poll_s=args.poll_s,
        preempt=True,
    )
    watch = TimedWatch(settings.chat_busy_threshold)
    engine = EngineClient(settings)
    preempter = TimedPreempter(settings, engine, watch)
    messages = build_messages(
        FeedbackRequest(request_id="b", text="The sea is wide and deep."), settings.system_prompt
    )

    async def feedback_forever() -> None:
        while True:
            await preempter.complete(messages, 256)

    chat = openai.OpenAI(base_url=chat_url, api_key="EMPTY", max_retries=0)
    poller = asyncio.create_task(watch.run(settings.chat_metrics_url or "", args.poll_s))
    workers = [asyncio.create_task(feedback_forever()) for _ in range(args.in_flight)]
    detect, first_abort, last_abort, idle, ttft, resumed, get = [], [], [], [], [], [], []
    resume: dict[str, list[float]] = {name: [] for name in RESUME}
    try:
        with capture_logs() as events:
            for trial in range(args.trials):
                await asyncio.sleep(1.0)  # chat idle, feedback running again
                before = len(events)
                out: dict[str, float] = {}
                cycle: dict[str, float] = {}
                sent = threading.Event()
                threads = [
                    threading.Thread(target=chat_once, args=(chat, out, sent)),
                    threading.Thread(
                        target=load_zero_after, args=(f"{chat_root}/load", out, cycle)
                    ),
                ]
                for thread in threads:
                    thread.start()
                await asyncio.to_thread(sent.wait)
                await asyncio.to_thread(engine_cycle, feedback_root, out["sent"], cycle)
                for thread in threads:
                    await asyncio.to_thread(thread.join)
                await asyncio.sleep(0.05)
                cut = [e for e in events[before:] if e["event"] == "preempted"]
                busy = watch.busy_since
                if busy is None or busy < out["sent"] or not cut:
                    print(f"trial {trial}: no preemption seen", file=sys.stderr)
                    continue
                for _ in range(100):  # until each preempted answer has a token again
                    if sum(t > busy for t in preempter.first_token) >= len(cut):
                        break
                    await asyncio.sleep(0.02)
                seen = (busy - out["sent"]) * 1000
                detect.append(seen)
                aborts = [seen + float(e["after_busy_ms"]) for e in cut]
                first_abort.append(min(aborts))
                last_abort.append(max(aborts))
                if "idle" in cycle:
                    idle.append((cycle["idle"] - out["sent"]) * 1000)
                ttft.append((out["first"] - out["sent"]) * 1000)
                idles = [t for t in watch.idle_at if t > busy]
                posted = [t for t in preempter.reposted if t > busy]
                tokens = [t for t in preempter.first_token if t > busy]
                if len(idles) != 1:
                    print(f"trial {trial}: chat seen idle {len(idles)} times", file=sys.stderr)
                resumed.append(float(len(posted)))
                if "running_get" in cycle:
                    get.append(cycle["running_get"] * 1000)
                ats = (cycle.get("load0"), min(idles, default=None), min(posted, default=None),
                       max(posted, default=None), min(tokens, default=None),
                       max(tokens, default=None), cycle.get("running"), cycle.get("tokens"))  # fmt: skip
                for name, at in zip(RESUME, ats, strict=True):
                    if at is not None:
                        resume[name].append((at - out["done"]) * 1000)
    finally:
        for task in [*workers, poller]:
            task.cancel()
        await asyncio.gather(*workers, poller, return_exceptions=True)
        await engine.close()
    fetch, parse = poll_cost(f"{chat_root}/{args.signal}")
    print(f"/{args.signal} polled every {args.poll_s * 1000:.0f} ms, "
          f"{args.in_flight} feedback answers in flight")  # fmt: skip
    print(stats("detect (sent -> seen busy) ms", detect))
    print(stats("first abort (sent -> closed) ms", first_abort))
    print(stats("last abort (sent -> closed) ms", last_abort))
    print(stats("engine idle (sent -> running 0) ms", idle))
    print(stats("chat first token ms", ttft))
    print(stats(f"chatbot /{args.signal} GET ms", fetch))
    print(stats("worker parse of it ms", parse))
    print("resume, ms from the chat stream's end at the client:")
    for name, values in resume.items():
        print(stats(f"resume: {name} ms", values))
    print(stats("resume: answers resumed (count)", resumed))
    print(stats("resume: GET that saw running, ms", get))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--poll-s", type=float, default=0.02)
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--signal", choices=("load", "metrics"), default="load",
                   help="the chatbot page the worker polls")  # fmt: skip
    p.add_argument("--chat-url")
    p.add_argument("--feedback-url")
    args = p.parse_args()
    with servers(args.chat_url, args.feedback_url) as (chat_url, feedback_url):
        asyncio.run(run(args, chat_url, feedback_url))


if __name__ == "__main__":
    main()
