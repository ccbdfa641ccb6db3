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
from collections.abc import Iterator

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
from feedback.preempt import ChatWatch, Preempter
from feedback.prompts import build_messages
from feedback.settings import WorkerSettings
from structlog.testing import capture_logs

from harness.engine import SERVED_NAME, TEST_MODEL, CpuServer


@contextlib.contextmanager
def servers(chat_url: str | None, feedback_url: str | None) -> Iterator[tuple[str, str]]:
    if chat_url and feedback_url:
        yield chat_url, feedback_url
        return
    ensure_engine(log=print)
    model = ensure_model(TEST_MODEL, log=print)
    started = [CpuServer(model, free_port(), logs_dir() / f"bench-preempt-{n}.log") for n in "cf"]
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


def engine_idle_after(root: str, sent: float, timeout: float = 5.0) -> float | None:
    """Seconds from `sent` until the engine's running gauge reads 0."""
    with httpx.Client(timeout=timeout) as client:
        while time.monotonic() - sent < timeout:
            try:
                text = client.get(f"{root}/metrics").text
            except httpx.HTTPError:
                return None
            running = Metrics.parse(text, (VLLM_RUNNING,)).value(VLLM_RUNNING)
            if running == 0:
                return time.monotonic() - sent
            time.sleep(0.005)
    return None


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
    watch = ChatWatch(settings.chat_busy_threshold)
    engine = EngineClient(settings)
    preempter = Preempter(settings, engine, watch)
    messages = build_messages(
        FeedbackRequest(request_id="b", text="The sea is wide and deep."), settings.system_prompt
    )

    async def feedback_forever() -> None:
        while True:
            await preempter.complete(messages, 256)

    chat = openai.OpenAI(base_url=chat_url, api_key="EMPTY", max_retries=0)
    poller = asyncio.create_task(watch.run(settings.chat_metrics_url or "", args.poll_s))
    workers = [asyncio.create_task(feedback_forever()) for _ in range(args.in_flight)]
    detect, first_abort, last_abort, idle, ttft = [], [], [], [], []
    try:
        with capture_logs() as events:
            for trial in range(args.trials):
                await asyncio.sleep(1.0)  # chat idle, feedback running again
                before = len(events)
                out: dict[str, float] = {}
                sent = threading.Event()
                chat_thread = threading.Thread(target=chat_once, args=(chat, out, sent))
                chat_thread.start()
                await asyncio.to_thread(sent.wait)
                idle_s = await asyncio.to_thread(engine_idle_after, feedback_root, out["sent"])
                await asyncio.to_thread(chat_thread.join)
                await asyncio.sleep(0.05)
                cut = [e for e in events[before:] if e["event"] == "preempted"]
                if watch.busy_since is None or watch.busy_since < out["sent"] or not cut:
                    print(f"trial {trial}: no preemption seen", file=sys.stderr)
                    continue
                seen = (watch.busy_since - out["sent"]) * 1000
                detect.append(seen)
                aborts = [seen + float(e["after_busy_ms"]) for e in cut]
                first_abort.append(min(aborts))
                last_abort.append(max(aborts))
                if idle_s is not None:
                    idle.append(idle_s * 1000)
                ttft.append((out["first"] - out["sent"]) * 1000)
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
    sys.exit(main())
