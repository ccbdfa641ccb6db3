"""Does the worker keep up with its engine? Direct engine calls vs Pub/Sub + worker.

    uv run python bench/throughput.py [--requests 300] [--concurrency 16] [--rounds 2]
        [--model smollm2-135m-instruct] [--out bench/results/throughput.jsonl]

Starts the real parts (Pub/Sub emulator, one CPU vLLM server, the `feedback-worker`
process) and sends the same N prompts at the same concurrency
  (a) straight to the engine with the openai client, and
  (b) through Pub/Sub: published to feedback-requests, answered by the worker,
      collected from feedback-results;
then prints msgs/s for both, their ratio (goal >= 0.95) and the worker's CPU
seconds per message (and the emulator's: on a CPU-only machine both take cores
from the engine, which a GPU engine would not miss). With --rounds N the two
alternate N times and the medians are reported, next to every round. Both runs use the worker's own prompt (feedback.prompts) and
sampling settings, so the engine does the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

import openai
import psutil
from cohost import emulator, paths
from cohost.cpu_engine.models import MODELS, ensure_model
from cohost.cpu_engine.server import server_command, server_env
from cohost.processes import (
    Child,
    console_script,
    feedback_setup,
    free_port,
    http_ok,
    worker_pulling,
)
from cohost_shared import messages
from cohost_shared.messages import FeedbackRequest
from feedback.engine import sampling_args
from feedback.prompts import build_messages
from feedback.settings import DEFAULT_SYSTEM_PROMPT, WorkerSettings

TEXT = (
    "Water moves between the sea, the air and the land. It evaporates from the ocean, "
    "forms clouds, falls as rain and returns through rivers. Essay number {i}."
)


async def direct(base_url: str, n: int, concurrency: int, max_tokens: int) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    sampling = WorkerSettings(project="bench")  # the worker's own defaults

    async def one(i: int) -> None:
        messages = build_messages(FeedbackRequest(text=TEXT.format(i=i)), DEFAULT_SYSTEM_PROMPT)
        async with gate:
            await client.chat.completions.create(
                model="feedback", messages=messages,  # type: ignore[arg-type]
                max_tokens=max_tokens, **sampling_args(sampling),
            )  # fmt: skip

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    took = time.monotonic() - started
    await client.close()
    return took


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


def through_pubsub(
    env: dict[str, str], n: int, max_tokens: int, emulator_pid: int, tag: str
) -> tuple[float, float, float, int]:
    """(seconds from first publish to the last of this round's results, worker and
    emulator CPU seconds meanwhile, duplicate results of this round)."""
    from google.cloud import pubsub_v1

    project = env["GOOGLE_CLOUD_PROJECT"]
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, messages.REQUESTS_TOPIC)
    results = subscriber.subscription_path(project, messages.RESULTS_SUBSCRIPTION)
    worker = Child(
        "worker", [console_script("feedback-worker")],
        log_path=paths.logs_dir() / "bench-throughput-worker.log", env=env,
    ).start()  # fmt: skip
    try:
        worker.wait_ready(worker_pulling(worker.log_path), timeout=120)
        cpu0, emu0 = cpu_seconds(worker.pid), cpu_seconds(emulator_pid)
        started = time.monotonic()
        futures = [
            publisher.publish(
                topic,
                json.dumps(
                    {"request_id": f"{tag}-{i}", "text": TEXT.format(i=i), "max_tokens": max_tokens}
                ).encode(),
            )
            for i in range(n)
        ]
        for f in futures:
            f.result(timeout=60)
        seen: set[str] = set()
        duplicates = 0
        while len(seen) < n:
            response = subscriber.pull(subscription=results, max_messages=1000, timeout=30)
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=results, ack_ids=[m.ack_id for m in response.received_messages]
                )
            for m in response.received_messages:
                # A result left over from an earlier round is not this round's.
                request_id = m.message.attributes["request_id"]
                if request_id.startswith(f"{tag}-"):
                    duplicates += request_id in seen
                    seen.add(request_id)
        took = time.monotonic() - started
        cpu, emu = cpu_seconds(worker.pid) - cpu0, cpu_seconds(emulator_pid) - emu0
    finally:
        worker.stop(timeout=60)
    return took, cpu, emu, duplicates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--ack-deadline",
        type=int,
        default=600,
        help="FEEDBACK_ACK_DEADLINE_S for the bench's subscription and worker (see bench/README.md)",
    )
    p.add_argument("--rounds", type=int, default=2, help="direct and Pub/Sub runs, alternating")
    p.add_argument("--model", default="smollm2-135m-instruct", choices=MODELS)
    p.add_argument("--out", type=Path, help="append the result as a JSON line")
    args = p.parse_args()

    logs = paths.logs_dir()
    model = ensure_model(args.model)
    emu_port, engine_port = free_port(), free_port()
    emu = emulator.emulator_child("127.0.0.1", emu_port, log_path=logs / "bench-emulator.log")
    engine = Child(
        "engine",
        server_command(
            model, port=engine_port, served_model_name="feedback",
            max_num_seqs=args.concurrency, max_model_len=2048,
        ),
        log_path=logs / "bench-engine.log", env=server_env(),
    )  # fmt: skip
    env = dict(
        os.environ,
        PUBSUB_EMULATOR_HOST=f"127.0.0.1:{emu_port}",
        GOOGLE_CLOUD_PROJECT=f"bench-{uuid.uuid4().hex[:8]}",
        FEEDBACK_LLM_BASE_URL=f"http://127.0.0.1:{engine_port}/v1",
        FEEDBACK_LLM_MODEL="feedback",
        FEEDBACK_MAX_IN_FLIGHT=str(args.concurrency),
        FEEDBACK_METRICS_PORT="0",
        FEEDBACK_ACK_DEADLINE_S=str(args.ack_deadline),
        FEEDBACK_LOG_LEVEL="INFO",  # as in production; also how we see it is ready
    )
    os.environ.update(PUBSUB_EMULATOR_HOST=env["PUBSUB_EMULATOR_HOST"])
    try:
        emu.start()
        emulator.wait_until_started(emu)
        engine.start()
        engine.wait_ready(http_ok(f"http://127.0.0.1:{engine_port}/health"), timeout=600)
        feedback_setup(env)
        base = f"http://127.0.0.1:{engine_port}/v1"
        asyncio.run(
            direct(base, args.concurrency * 2, args.concurrency, args.max_tokens)
        )  # warm-up
        rounds: list[dict[str, float]] = []
        for k in range(args.rounds):
            direct_s = asyncio.run(direct(base, args.requests, args.concurrency, args.max_tokens))
            pubsub_s, worker_cpu, emulator_cpu, duplicates = through_pubsub(
                env, args.requests, args.max_tokens, emu.pid, tag=f"round{k}"
            )
            rounds.append(
                {
                    "direct_msgs_per_s": round(args.requests / direct_s, 2),
                    "pubsub_msgs_per_s": round(args.requests / pubsub_s, 2),
                    "ratio": round(direct_s / pubsub_s, 3),
                    "worker_cpu_s_per_msg": round(worker_cpu / args.requests, 5),
                    "emulator_cpu_s_per_msg": round(emulator_cpu / args.requests, 5),
                    "duplicate_results": duplicates,
                }
            )
            print(json.dumps({"round": k + 1, **rounds[-1]}), file=sys.stderr, flush=True)
    finally:
        engine.stop()
        emu.stop()
    result = {
        "requests": args.requests,
        "ack_deadline_s": args.ack_deadline,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "model": args.model,
        **{key: round(statistics.median(r[key] for r in rounds), 5) for key in rounds[0]},
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
    }
    print(json.dumps(result))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
