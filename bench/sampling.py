"""Does the worker's feedback read well? Sampling settings against SmolLM2-135M-Instruct.

    uv run python bench/sampling.py [SETTINGS_JSON ...]
    uv run python bench/sampling.py --speed      # what each setting costs the CPU engine

Starts a CPU vLLM server with the local stack's default model (SmolLM2-135M-Instruct) and
asks it for feedback on three short texts, twice each, with the worker's own prompt
(feedback.prompts), once per sampling setting (a JSON object of temperature, top_p,
frequency_penalty, presence_penalty, repetition_penalty; default: the grid below). Prints,
per setting, how many answers echo the request back (the text, verbatim) instead of
commenting on it, the share of distinct 4-word sequences in the answers (1.00: nothing
repeated), the share of sentences that repeat an earlier one, the mean answer length, and
the start of one answer. Never an exact-text check: the model is small and sampled.

--speed: requests per second of the random-weight tiny-llama (where sampling, not the
model, is the work) for 300 requests of 16 tokens, 16 at a time, per setting.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter

import openai
from cohost.cpu_engine.models import ensure_model
from cohost.cpu_engine.server import server_command, server_env
from cohost.paths import logs_dir
from cohost.processes import Child, free_port, http_ok
from cohost_shared.messages import FeedbackRequest
from feedback.prompts import build_messages
from feedback.settings import DEFAULT_SYSTEM_PROMPT

TEXTS = (
    "Plants turn light into sugar. They use water and air. This is called photosynthesis and "
    "it happens in the leaves.",
    "The essay argues that cities should plant more trees to cool their streets, because trees "
    "give shade and release water vapour.",
    "My summer holiday was great. We went to the sea and swam every day. I liked the food and "
    "the people were friendly.",
)
GRID = (
    {"temperature": 0.3},
    {"temperature": 0.3, "frequency_penalty": 0.5},
    {"temperature": 0.7, "top_p": 0.9},
    {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1},
    {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.2},
    {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2},
)


def scores(text: str) -> tuple[float, float, int]:
    """(distinct 4-grams, repeated sentences, words) of one answer."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    sentences = [s.strip().lower() for s in re.split(r"[.!?\n]+", text) if len(s.split()) >= 4]
    repeats = sum(n - 1 for n in Counter(sentences).values())
    return len(set(grams)) / max(1, len(grams)), repeats / max(1, len(sentences)), len(words)


def answer(client: openai.OpenAI, text: str, seed: int, setting: dict[str, float]) -> str:
    messages = build_messages(
        FeedbackRequest(text=text, instructions="Check clarity"), DEFAULT_SYSTEM_PROMPT
    )
    response = client.chat.completions.create(
        model="feedback",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=256,
        temperature=setting.get("temperature", 0.3),
        top_p=setting.get("top_p", 1.0),
        frequency_penalty=setting.get("frequency_penalty", 0.0),
        presence_penalty=setting.get("presence_penalty", 0.0),
        seed=seed,
        extra_body={"repetition_penalty": setting.get("repetition_penalty", 1.0)},
    )
    return response.choices[0].message.content or ""


SPEED = (
    {"temperature": 0.3},
    {"temperature": 0.3, "top_p": 0.9},
    {"temperature": 0.3, "repetition_penalty": 1.1},
    {"temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.1},
)


async def requests_per_s(url: str, setting: dict[str, float], n: int = 300) -> float:
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    gate = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with gate:
            await client.chat.completions.create(
                model="feedback",
                messages=[{"role": "user", "content": f"Essay {i}: water cycles through air."}],
                max_tokens=16,
                temperature=setting.get("temperature", 0.3),
                top_p=setting.get("top_p", 1.0),
                extra_body={"repetition_penalty": setting.get("repetition_penalty", 1.0)},
            )

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return n / (time.monotonic() - started)


def main() -> int:
    speed = "--speed" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--speed"]
    settings = [json.loads(a) for a in args] or list(SPEED if speed else GRID)
    model = ensure_model("tiny-llama" if speed else "smollm2-135m-instruct")
    port = free_port()
    argv = server_command(
        model, port=port, served_model_name="feedback", max_model_len=2048, max_num_seqs=16
    )
    server = Child("smollm2", argv, log_path=logs_dir() / "bench-sampling.log", env=server_env())
    server.start()
    try:
        server.wait_ready(http_ok(f"http://127.0.0.1:{port}/health"), timeout=600)
        url = f"http://127.0.0.1:{port}/v1"
        if speed:
            for setting in settings:
                rate = asyncio.run(requests_per_s(url, setting))
                print(f"{json.dumps(setting)}: {rate:.1f} requests/s", flush=True)
            return 0
        client = openai.OpenAI(base_url=url, api_key="EMPTY")
        for setting in settings:
            answers = [
                answer(client, text, seed * 7 + i, setting)
                for i, text in enumerate(TEXTS)
                for seed in range(2)
            ]
            rows = [scores(a) for a in answers]
            n = len(rows)
            asked = [text for text in TEXTS for _ in range(2)]
            echoed = sum(text[:40] in a for a, text in zip(answers, asked, strict=True))
            print(
                f"{json.dumps(setting)}: echoed {echoed}/{n}, "
                f"distinct 4-grams {sum(r[0] for r in rows) / n:.2f}, "
                f"repeated sentences {sum(r[1] for r in rows) / n:.2f}, "
                f"words {sum(r[2] for r in rows) / n:.0f}",
                flush=True,
            )
            print("    " + answers[0][:300].replace("\n", " | "), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
