"""Chat while feedback runs: chat latency and feedback throughput on two running servers.

    python bench/sharing.py --chat-url http://127.0.0.1:8001/v1 \
        --feedback-url http://127.0.0.1:8002/v1 --feedback-in-flight 32 --out result.json

Chat load: N users, each sending a streamed request as soon as the last one ended.
Feedback load: the worker's own pipeline (feedback.worker.Worker: limiter, retries,
chat-first controller) fed by an in-process source with Pub/Sub's delivery semantics.
Phases, each measured for --duration seconds after --warmup:

  chat_alone         chat only
  feedback_alone     feedback only, chat-first off: the standalone throughput
  raw_sharing        both, chat-first off
  chat_first         both, chat-first on (the worker watches the chatbot's /metrics)
  chat_first_idle    feedback only, chat-first on (must not cost throughput)

Prints one line per phase and writes everything to --out as JSON. bench/gpu/sharing_run.py
uses the same loads for its runs and faults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The GPU host runs this from the repository with no project install.
for sub in ("shared/src", "services/feedback/src"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

import httpx2  # noqa: E402
import openai  # noqa: E402
from cohost_shared import endpoints, logs  # noqa: E402
from cohost_shared.metrics import VLLM_LOAD, Metrics  # noqa: E402
from feedback.inprocess import InProcessSink, InProcessSource  # noqa: E402
from feedback.settings import WorkerSettings  # noqa: E402
from feedback.worker import Worker  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """What the loads send."""

    users: int = 4
    chat_prompt_tokens: int = 256
    chat_max_tokens: int = 128
    feedback_prompt_tokens: int = 512
    feedback_max_tokens: int = 256
    feedback_in_flight: int = 32
    busy_in_flight: int = 2
    prompt_kind: str = "words"  # "letters": one token per letter (bench/gpu/dummy.py)


PROMPT_KINDS = ("letters", "words")


def text_of(tokens: int, seed: int, kind: str) -> str:
    if kind == "letters":
        letters = "abcdefghijklmnopqrstuvwxyz"
        return "".join(letters[(seed * 7 + i * 13) % 26] for i in range(tokens))
    words = ["The", "essay", "argues", "that", "water", "cycles", "through", "air", "and", "sea"]
    return " ".join(words[(seed + i) % len(words)] for i in range(tokens))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class ChatSample:
    started: float
    ttft_s: float
    tpot_s: float | None
    tokens: int


@dataclass
class ChatLoad:
    """`users` chat users against the chatbot, each sending its next turn when the last ends.
    A failed turn is recorded (time, error) and the user tries again 0.2 s later."""

    url: str
    model: str
    shape: Shape
    samples: list[ChatSample] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        client = openai.AsyncOpenAI(base_url=self.url, api_key="EMPTY", max_retries=0, timeout=60)
        try:
            await asyncio.gather(*(self._user(client, u) for u in range(self.shape.users)))
        finally:
            await client.close()

    def stop(self) -> None:
        self._stop.set()

    async def _user(self, client: openai.AsyncOpenAI, user: int) -> None:
        turn = 0
        while not self._stop.is_set():
            turn += 1
            try:
                await self._turn(client, user * 100_000 + turn)
            except (openai.APIError, httpx2.HTTPError) as exc:
                self.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"[:200]))
                await asyncio.sleep(0.2)

    async def _turn(self, client: openai.AsyncOpenAI, seed: int) -> None:
        s = self.shape
        prompt = text_of(s.chat_prompt_tokens, seed, s.prompt_kind)
        started = time.monotonic()
        first = last = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=s.chat_max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.monotonic()
                first = first or now
                last = now
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        if first is None or last is None:
            return
        tpot = (last - first) / (tokens - 1) if tokens > 1 else None
        self.samples.append(ChatSample(started, first - started, tpot, tokens))

    def summary(self, t0: float, t1: float) -> dict[str, float | int | None]:
        window = [s for s in self.samples if t0 <= s.started <= t1]
        ttft = [s.ttft_s * 1000 for s in window]
        tpot = [s.tpot_s * 1000 for s in window if s.tpot_s is not None]
        return {
            "requests": len(window),
            "errors": sum(1 for at, _ in self.errors if t0 <= at <= t1),
            "ttft_ms_p50": pct(ttft, 0.5),
            "ttft_ms_p99": pct(ttft, 0.99),
            "tpot_ms_p50": pct(tpot, 0.5),
            "tpot_ms_p99": pct(tpot, 0.99),
            "tpot_ms_mean": statistics.fmean(tpot) if tpot else None,
        }


class FeedbackLoad:
    """The worker's real pipeline against the feedback server: `count` requests, at most
    `feedback_in_flight` out at once, chat-first on when `chat_metrics_url` is given."""

    def __init__(
        self,
        url: str,
        model: str,
        shape: Shape,
        *,
        count: int,
        tag: str,
        chat_metrics_url: str | None = None,
        log_level: str = "WARNING",
    ) -> None:
        self.settings = WorkerSettings(
            llm_base_url=url,
            llm_model=model,
            max_in_flight=shape.feedback_in_flight,
            busy_in_flight=shape.busy_in_flight,
            default_max_tokens=shape.feedback_max_tokens,
            chat_metrics_url=chat_metrics_url,
            metrics_port=0,
            shutdown_grace_s=0,
            log_level=log_level,  # type: ignore[arg-type]
        )
        self.ids = [f"{tag}-{i}" for i in range(count)]
        payloads = (
            json.dumps(
                {
                    "text": text_of(shape.feedback_prompt_tokens, i, shape.prompt_kind),
                    "request_id": rid,
                }
            ).encode()
            for i, rid in enumerate(self.ids)
        )
        self.source = InProcessSource(payloads, max_outstanding=shape.feedback_in_flight)
        self.sink = InProcessSink()
        self.worker = Worker(self.settings, self.source, self.sink)

    async def run(self) -> None:
        await self.worker.run()

    def stop(self) -> None:
        self.worker.request_stop("phase over")

    def summary(self, t0: float, t1: float) -> dict[str, float | int]:
        """Results created between two monotonic instants."""
        wall = time.time() - time.monotonic()
        done = [r for r in self.sink.results if t0 <= r.created_at.timestamp() - wall <= t1]
        tokens = sum(r.usage.completion_tokens for r in done)
        seconds = max(t1 - t0, 1e-9)
        return {
            "completed": len(done),
            "requests_per_s": len(done) / seconds,
            "tokens_per_s": tokens / seconds,
            "dead_letters": len(self.sink.dead_letters),
        }

    def accounting(self) -> dict[str, int]:
        """Every request's fate: answered, dead-lettered, or neither (lost)."""
        answered = {r.request_id for r in self.sink.results}
        dead = {json.loads(d)["request_id"] for d, _ in self.sink.dead_letters}
        return {
            "requests": len(self.ids),
            "answered": len(answered & set(self.ids)),
            "dead_lettered": len(dead),
            "results_total": len(self.sink.results),
            "lost": len(set(self.ids) - answered - dead),
            "redelivered": self.source.nacked,
        }


async def timeline(
    chat_url: str, feedback_url: str, worker: Worker | None, start: float, until: asyncio.Event
) -> list[dict[str, object]]:
    """Every 0.5 s: both engines' running+waiting and the worker's limit and slots in use."""
    points: list[dict[str, object]] = []
    urls = {
        "chat_load": f"{root(chat_url)}/metrics",
        "feedback_load": f"{root(feedback_url)}/metrics",
    }
    async with httpx2.AsyncClient(timeout=2) as client:
        while not until.is_set():
            point: dict[str, object] = {"t": round(time.monotonic() - start, 2)}
            for key, url in urls.items():
                try:
                    point[key] = Metrics.parse((await client.get(url)).text, VLLM_LOAD).vllm_load()
                except httpx2.HTTPError:
                    point[key] = None
            if worker is not None:
                point["limit"] = worker.limiter.limit
                point["in_use"] = worker.limiter.in_use
            points.append(point)
            await asyncio.sleep(0.5)
    return points


def root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


PHASES = {  # name: (chat, feedback, chat-first)
    "chat_alone": (True, False, False),
    "feedback_alone": (False, True, False),
    "raw_sharing": (True, True, False),
    "chat_first": (True, True, True),
    "chat_first_idle": (False, True, True),
}


async def run_phase(
    name: str,
    *,
    chat_url: str,
    feedback_url: str,
    shape: Shape,
    warmup: float,
    duration: float,
    chat_model: str = "chatbot",
    feedback_model: str = "feedback",
    log_level: str = "WARNING",
) -> dict[str, object]:
    chat, feedback, chat_first = PHASES[name]
    start = time.monotonic()
    t0, t1 = start + warmup, start + warmup + duration
    tasks: list[asyncio.Task[None]] = []
    chat_load = ChatLoad(chat_url, chat_model, shape) if chat else None
    feedback_load = None
    if feedback:
        count = int(duration + warmup + 30) * shape.feedback_in_flight * 4
        metrics = f"{root(chat_url)}/metrics" if chat_first else None
        feedback_load = FeedbackLoad(
            feedback_url, feedback_model, shape, count=count, tag=name,
            chat_metrics_url=metrics, log_level=log_level,
        )  # fmt: skip
    for load in (chat_load, feedback_load):
        if load is not None:
            tasks.append(asyncio.create_task(load.run()))
    done = asyncio.Event()
    worker = feedback_load.worker if feedback_load is not None else None
    sampler = asyncio.create_task(timeline(chat_url, feedback_url, worker, start, done))
    await asyncio.sleep(max(0.0, t1 - time.monotonic()))
    done.set()
    for load in (chat_load, feedback_load):
        if load is not None:
            load.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    out: dict[str, object] = {"phase": name, "chat_first": chat_first, "timeline": await sampler}
    if chat_load is not None:
        out["chat"] = chat_load.summary(t0, t1)
    if feedback_load is not None:
        out["feedback"] = feedback_load.summary(t0, t1)
    return out


def phase_line(result: dict[str, object]) -> str:
    return json.dumps({k: v for k, v in result.items() if k != "timeline"})


def chunks(names: str) -> Iterator[str]:
    for name in names.split(","):
        if name not in PHASES:
            raise SystemExit(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        yield name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chat-url", default=f"{endpoints.CHATBOT_URL}/v1")
    p.add_argument("--chat-model", default="chatbot")
    p.add_argument("--feedback-url", default=f"{endpoints.FEEDBACK_ENGINE_URL}/v1")
    p.add_argument("--feedback-model", default="feedback")
    defaults = Shape()
    for name, value in asdict(defaults).items():
        choices = PROMPT_KINDS if name == "prompt_kind" else None
        p.add_argument(
            f"--{name.replace('_', '-')}", type=type(value), default=value, choices=choices
        )
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", type=Path)
    p.add_argument("--log-level", default="WARNING", help="the worker's log level (stderr)")
    args = p.parse_args()
    logs.configure(args.log_level)
    shape = Shape(**{k: getattr(args, k) for k in asdict(defaults)})

    async def all_phases() -> list[dict[str, object]]:
        results = []
        for name in chunks(args.phases):
            result = await run_phase(
                name, chat_url=args.chat_url, feedback_url=args.feedback_url, shape=shape,
                warmup=args.warmup, duration=args.duration, chat_model=args.chat_model,
                feedback_model=args.feedback_model, log_level=args.log_level,
            )  # fmt: skip
            results.append(result)
            print(phase_line(result), flush=True)
        return results

    results = asyncio.run(all_phases())
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "phases": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
