"""Replay the Azure conversation trace against a chatbot, or measure its capacity.

    python -m bench.chat_trace capacity --url http://127.0.0.1:8001/v1 --max-model-len 8192 \
        --concurrency 8 --duration 60
    python -m bench.chat_trace replay --url http://127.0.0.1:8001/v1 --max-model-len 8192 \
        --capacity 3.2 --load 0.5 --duration 60 --out replay.json

`replay` sends the trace's requests with its clock scaled so the mean rate is
load x capacity requests/s, for --duration s (and at most --max-requests), and prints the
summary: TTFT and TPOT p50/p99, errors, the chat-idle fraction. Trace: Azure LLM inference
trace 2023 (conversation), CC BY 4.0, Patel et al., "Splitwise", ISCA 2024.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from bench.chat_trace import replay, trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.chat_trace", description=__doc__.split("\n")[0]
    )
    p.add_argument("what", choices=("capacity", "replay"))
    p.add_argument("--url", required=True, help="the chatbot's OpenAI base URL (…/v1)")
    p.add_argument("--model", default="chatbot")
    p.add_argument("--trace", type=Path, default=trace.DEFAULT_TRACE)
    p.add_argument("--max-model-len", type=int, required=True, help="the plan's, for the chatbot")
    p.add_argument("--prompt-kind", choices=("words", "letters"), default="words")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=5.0, help="capacity: seconds not counted")
    p.add_argument(
        "--concurrency", type=int, default=8, help="capacity: the chatbot's max_num_seqs"
    )
    p.add_argument("--capacity", type=float, help="replay: the chatbot's capacity, requests/s")
    p.add_argument("--load", type=float, default=0.5, help="replay: fraction of the capacity")
    p.add_argument("--max-requests", type=int)
    p.add_argument("--start", type=float, default=0.0, help="replay: trace second to start at")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        requests = trace.load(args.trace)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    root = args.url.rstrip("/").removesuffix("/v1")
    prompts = replay.PromptMaker(root, args.model, args.prompt_kind)

    async def go() -> dict[str, object]:
        await prompts.calibrate()
        if args.what == "capacity":
            sizes = trace.sizes(requests, args.max_model_len)
            return await replay.capacity(args.url, args.model, sizes, prompts,
                                         concurrency=args.concurrency, duration_s=args.duration,
                                         warmup_s=args.warmup)  # fmt: skip
        if not args.capacity or args.capacity <= 0:
            raise SystemExit("replay needs --capacity (requests/s; `capacity` measures it)")
        rate = args.load * args.capacity
        plan = trace.schedule(requests, rate, duration_s=args.duration,
                              max_requests=args.max_requests, start_s=args.start,
                              max_model_len=args.max_model_len)  # fmt: skip
        await prompts.prepare(plan)
        outcomes, window = await replay.replay(args.url, args.model, plan, prompts,
                                               duration_s=args.duration)  # fmt: skip
        return {"rate_per_s": rate, **replay.summary(outcomes, window),
                "outcomes": replay.rows(outcomes)}  # fmt: skip

    result = asyncio.run(go())
    print(json.dumps({k: v for k, v in result.items() if k != "outcomes"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        **result}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
