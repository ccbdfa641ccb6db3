"""Chat while feedback runs: chat latency and feedback throughput, raw vs chat-first.

    python bench/sharing.py --chat-url http://127.0.0.1:8001/v1 \
        --feedback-url http://127.0.0.1:8002/v1 --feedback-in-flight 32 --out result.json

Chat load: N users, each sending a streamed request as soon as the last one ended.
Feedback load: the worker's own pipeline (feedback.worker.Worker: limiter, retries,
chat-first controller) fed by a local source with Pub/Sub's delivery semantics.
Phases, each measured for --duration seconds after --warmup:

  chat_alone         chat only
  feedback_alone     feedback only, chat-first off: the standalone throughput
  raw_sharing        both, chat-first off
  chat_first         both, chat-first on (the worker watches the chatbot's /metrics)
  chat_first_idle    feedback only, chat-first on (must not cost throughput)

Prints one line per phase and writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for sub in ("shared/src", "services/feedback/src"):
    sys.path.insert(0, str(ROOT / sub))

import httpx  # noqa: E402
import openai  # noqa: E402
from cohost import logs  # noqa: E402
from feedback.chatload import chat_load  # noqa: E402
from feedback.inprocess import InProcessSink, InProcessSource  # noqa: E402
from feedback.settings import WorkerSettings  # noqa: E402
from feedback.worker import Worker  # noqa: E402


def text_of(tokens: int, seed: int, kind: str) -> str:
    if kind == "letters":  # one token per letter with bench/gpu/dummy.py tokenizers
        letters = "abcdefghijklmnopqrstuvwxyz"
        return "".join(letters[(seed * 7 + i * 13) % 26] for i in range(tokens))
    words = ["The", "essay", "argues", "that", "water", "cycles", "through", "air", "and", "sea"]
    return " ".join(words[(seed + i) % len(words)] for i in range(tokens))


@dataclass
class ChatSample:
    started: float
    ttft_s: float
    tpot_s: float | None
    tokens: int


async def chat_user(
    client: openai.AsyncOpenAI,
    args: argparse.Namespace,
    user: int,
    until: float,
    samples: list[ChatSample],
) -> None:
    turn = 0
    while time.monotonic() < until:
        turn += 1
        prompt = text_of(args.chat_prompt_tokens, user * 1000 + turn, args.prompt_kind)
        started = time.monotonic()
        first = last = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=args.chat_model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.chat_max_tokens,
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
            continue
        tpot = (last - first) / (tokens - 1) if tokens > 1 else None
        samples.append(ChatSample(started, first - started, tpot, tokens))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def chat_summary(samples: list[ChatSample], t0: float, t1: float) -> dict[str, float | int | None]:
    window = [s for s in samples if t0 <= s.started <= t1]
    ttft = [s.ttft_s * 1000 for s in window]
    tpot = [s.tpot_s * 1000 for s in window if s.tpot_s is not None]
    return {
        "requests": len(window),
        "ttft_ms_p50": pct(ttft, 0.5),
        "ttft_ms_p99": pct(ttft, 0.99),
        "tpot_ms_p50": pct(tpot, 0.5),
        "tpot_ms_p99": pct(tpot, 0.99),
        "tpot_ms_mean": statistics.fmean(tpot) if tpot else None,
    }


async def sample_timeline(
    args: argparse.Namespace,
    worker: Worker | None,
    until: float,
    start: float,
    timeline: list[dict[str, object]],
) -> None:
    """Every 0.5 s: the worker's limit and slots in use, and both engines' running+waiting."""
    chat_metrics = args.chat_url.removesuffix("/v1") + "/metrics"
    feedback_metrics = args.feedback_url.removesuffix("/v1") + "/metrics"
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < until:
            point: dict[str, object] = {"t": round(time.monotonic() - start, 2)}
            for key, url in (("chat_load", chat_metrics), ("feedback_load", feedback_metrics)):
                try:
                    point[key] = chat_load((await client.get(url)).text)
                except httpx.HTTPError:
                    point[key] = None
            if worker is not None:
                point["limit"] = worker.limiter.limit
                point["in_use"] = worker.limiter.in_use
                point["waiting"] = worker.limiter.waiting
            timeline.append(point)
            await asyncio.sleep(0.5)


async def run_phase(
    name: str, args: argparse.Namespace, chat: bool, feedback: bool, chat_first: bool
) -> dict[str, object]:
    start = time.monotonic()
    t0, t1 = start + args.warmup, start + args.warmup + args.duration
    tasks = []
    samples: list[ChatSample] = []
    if chat:
        client = openai.AsyncOpenAI(
            base_url=args.chat_url, api_key="EMPTY", max_retries=0, timeout=600
        )
        tasks += [
            asyncio.create_task(chat_user(client, args, u, t1, samples)) for u in range(args.users)
        ]
    sink = InProcessSink()
    worker = None
    if feedback:
        env = {
            "FEEDBACK_LLM_BASE_URL": args.feedback_url,
            "FEEDBACK_LLM_MODEL": args.feedback_model,
            "FEEDBACK_MAX_IN_FLIGHT": str(args.feedback_in_flight),
            "FEEDBACK_BUSY_IN_FLIGHT": str(args.busy_in_flight),
            "FEEDBACK_DEFAULT_MAX_TOKENS": str(args.feedback_max_tokens),
            "FEEDBACK_METRICS_PORT": "0",
            "FEEDBACK_SHUTDOWN_GRACE_S": "0",
            "FEEDBACK_LOG_LEVEL": args.log_level,
        }
        if chat_first:
            env["FEEDBACK_CHAT_METRICS_URL"] = args.chat_url.removesuffix("/v1") + "/metrics"
        os.environ.update(env)
        if not chat_first:
            os.environ.pop("FEEDBACK_CHAT_METRICS_URL", None)
        settings = WorkerSettings()
        count = int(args.duration + args.warmup + 10) * args.feedback_in_flight * 4
        payloads = (
            json.dumps(
                {
                    "text": text_of(args.feedback_prompt_tokens, i, args.prompt_kind),
                    "request_id": f"{name}-{i}",
                }
            ).encode()
            for i in range(count)
        )
        source = InProcessSource(payloads, max_outstanding=args.feedback_in_flight)
        worker = Worker(settings, source, sink)
        tasks.append(asyncio.create_task(worker.run()))
    timeline: list[dict[str, object]] = []
    sampler = asyncio.create_task(sample_timeline(args, worker, t1, start, timeline))
    await asyncio.sleep(max(0.0, t1 - time.monotonic()))
    await sampler
    if worker:
        worker.request_stop("phase over")
    await asyncio.gather(*tasks, return_exceptions=True)

    out: dict[str, object] = {"phase": name, "chat_first": chat_first, "timeline": timeline}
    if chat:
        out["chat"] = chat_summary(samples, t0, t1)
    if feedback:
        wall0 = datetime.now(UTC).timestamp() - (time.monotonic() - t0)
        done = [
            r for r in sink.results if wall0 <= r.created_at.timestamp() <= wall0 + args.duration
        ]
        tokens = sum(r.usage.completion_tokens for r in done)
        out["feedback"] = {
            "completed": len(done),
            "requests_per_s": len(done) / args.duration,
            "tokens_per_s": tokens / args.duration,
            "dead_letters": len(sink.dead_letters),
        }
    return out


PHASES = {
    "chat_alone": (True, False, False),
    "feedback_alone": (False, True, False),
    "raw_sharing": (True, True, False),
    "chat_first": (True, True, True),
    "chat_first_idle": (False, True, True),
}


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    results = []
    for name in args.phases.split(","):
        chat, feedback, chat_first = PHASES[name]
        result = await run_phase(name, args, chat, feedback, chat_first)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "timeline"}), flush=True)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chat-url", default="http://127.0.0.1:8001/v1")
    p.add_argument("--chat-model", default="chatbot")
    p.add_argument("--feedback-url", default="http://127.0.0.1:8002/v1")
    p.add_argument("--feedback-model", default="feedback")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--chat-prompt-tokens", type=int, default=256)
    p.add_argument("--chat-max-tokens", type=int, default=128)
    p.add_argument("--feedback-prompt-tokens", type=int, default=512)
    p.add_argument("--feedback-max-tokens", type=int, default=256)
    p.add_argument("--feedback-in-flight", type=int, default=32)
    p.add_argument("--busy-in-flight", type=int, default=2)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--prompt-kind", choices=["letters", "words"], default="words")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", type=Path)
    p.add_argument("--log-level", default="WARNING", help="the worker's log level (stderr)")
    args = p.parse_args()
    logs.configure(args.log_level)
    results = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "phases": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
