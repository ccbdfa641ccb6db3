"""Preemption by abort (FEEDBACK_PREEMPT_MODE=abort, and what an engine without /pause
gets): the worker stops its engine calls while chat is busy and resumes them from their
tokens (pause mode: tests/test_pause.py). The trigger's state machine alone, then the real
CPU engine (SmolLM2, so a temperature-0 answer is real text), then the whole worker against
the emulator with a real chatbot's /metrics as the signal."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from cohost.cpu_engine.models import ensure_model
from cohost.plan.spec import BATCH_STREAM_INTERVAL
from cohost.processes import free_port
from cohost_shared.messages import FeedbackRequest, FeedbackResult
from feedback.engine import Completion, EngineClient
from feedback.preempt import Answer, ChatWatch, Preempter
from feedback.prompts import build_messages
from feedback.settings import WorkerSettings
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from harness.chat import ChatBursts
from harness.engine import SERVED_NAME, CpuServer
from harness.pubsub import Project, worker_events

TEXTS = [
    "Plants turn light into sugar. Photosynthesis is how they eat.",
    "Mon essai : les chats sont très indépendants, et les chiens aussi.",
    "The war ended in 1945 and everyone was happy forever after that.",
]


def _count(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


# -- the trigger alone ---------------------------------------------------------------------


def test_watch_flips_on_the_threshold_and_treats_unreadable_as_idle() -> None:
    async def scenario() -> None:
        watch = ChatWatch(busy_threshold=2)
        watch.observe(1)
        assert not watch.busy
        watch.observe(2)
        assert watch.busy
        waiter = asyncio.create_task(watch.wait_idle())
        await asyncio.sleep(0.01)
        assert not waiter.done(), "nothing resumes while chat is busy"
        watch.observe(None)
        await asyncio.wait_for(waiter, 1)
        assert not watch.busy

    asyncio.run(scenario())


def test_armed_calls_stop_when_chat_turns_busy_and_at_once_when_it_is() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        watch = ChatWatch(busy_threshold=1)
        armed, disarmed = loop.create_future(), loop.create_future()
        watch.arm(armed)
        watch.arm(disarmed)
        watch.disarm(disarmed)
        assert not armed.done()
        watch.observe(3)
        assert armed.done()
        assert not disarmed.done(), "a call that finished is no longer stopped"
        late = loop.create_future()
        watch.arm(late)
        assert late.done(), "a call that becomes preemptible while chat is busy stops at once"

    asyncio.run(scenario())


def test_poll_interval_defaults_follow_the_mode() -> None:
    url = "http://127.0.0.1:1/metrics"
    assert WorkerSettings(chat_metrics_url=url).chat_poll_interval() == 0.02
    assert WorkerSettings(chat_metrics_url=url, preempt=False).chat_poll_interval() == 0.5
    assert not WorkerSettings().preempting(), "no chatbot to watch: nothing to preempt for"
    assert WorkerSettings(chat_metrics_url=url, chat_poll_s=0.05).chat_poll_interval() == 0.05


# -- the real engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(logs: Path) -> Iterator[CpuServer]:
    """SmolLM2-135M-Instruct on the CPU engine: real text at temperature 0, and the
    chatbot whose /load the end-to-end tests watch. It streams in chunks of tokens as
    the plans' feedback engine does, so a preemption closes a stream between chunks and
    the tokens generated past the last one are generated again."""
    server = CpuServer(ensure_model("smollm2-135m-instruct"), free_port(), logs / "smollm2.log",
                       extra_args=["--stream-interval", str(BATCH_STREAM_INTERVAL)],
                       role="chatbot")  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _answers(server: CpuServer, watch: ChatWatch, storm: bool, **extra: Any) -> list[Completion]:
    settings = WorkerSettings(
        llm_base_url=server.base_url, llm_model=SERVED_NAME, temperature=0.0, **extra
    )

    async def flip() -> None:
        while True:
            await asyncio.sleep(random.uniform(0.05, 0.3))
            watch.observe(1)
            await asyncio.sleep(random.uniform(0.01, 0.1))
            watch.observe(0)

    async def scenario() -> list[Completion]:
        engine = EngineClient(settings)
        preempter = Preempter(settings, engine, watch)
        messages = [
            build_messages(FeedbackRequest(request_id=str(i), text=t), settings.system_prompt)
            for i, t in enumerate(TEXTS)
        ]
        try:
            # One at a time: answers batched together are not reproducible even without
            # preemption (the batch changes the arithmetic; a near tie then flips a token).
            flipping = asyncio.create_task(flip()) if storm else None
            answers = [await preempter.complete(m, 96) for m in messages]
            if flipping:
                flipping.cancel()
            return answers
        finally:
            await engine.close()

    return asyncio.run(scenario())


# Two tokens count as tied within one step of the engine's logits: bfloat16 (the CPU
# engine's dtype where the CPU has it) keeps 8 bits, a step of 0.125 for logits of 16-32
# and 0.25 for 32-64 (a run parted at 0.25 with TIE at 0.13).
TIE = 0.26


def _top(server: CpuServer, prompt: list[int], k: int = 5) -> dict[int, float]:
    """The engine's k likeliest next tokens after `prompt` at temperature 0, by logprob."""
    response = httpx.post(
        f"{server.base_url}/completions",
        json={
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": k,
            "return_tokens_as_token_ids": True,
        },
        timeout=120,
    ).json()
    top = response["choices"][0]["logprobs"]["top_logprobs"][0]
    return {int(t.removeprefix("token_id:")): float(v) for t, v in top.items()}


@pytest.mark.engine
def test_preempted_answers_equal_uninterrupted_ones_token_for_token(smollm2: CpuServer) -> None:
    """Token for token up to the first tie the engine breaks differently, if any.

    SmolLM2's logits come in coarse steps (bfloat16), so two tokens often tie or lie one
    step apart; the prompt a resumed call prefills in one pass and the decode steps of an
    uninterrupted one differ in the last bit, which can break such a tie the other way (as
    batching does too). So where the answers part, both tokens must be tied at the top; a
    lost, doubled or shifted token would part them where one token clearly leads. No
    repetition penalty here, so the logprobs are what the sampler compares."""
    plain = _answers(smollm2, ChatWatch(1), storm=False, repetition_penalty=1.0)
    again = _answers(smollm2, ChatWatch(1), storm=False, repetition_penalty=1.0)
    assert [a.token_ids for a in again] == [a.token_ids for a in plain], "engine not reproducible"
    preemptions, resumes = _count("feedback_preemptions_total"), _count("feedback_resumes_total")
    with capture_logs() as events:
        stormed = _answers(
            smollm2, ChatWatch(1), storm=True, preempt_min_tokens=4, repetition_penalty=1.0
        )
    cut = [e for e in events if e["event"] == "preempted"]
    assert len(cut) >= 2 * len(TEXTS), "the storm preempted too little to show anything"
    assert _count("feedback_preemptions_total") - preemptions == len(cut)
    assert _count("feedback_resumes_total") - resumes == len(cut)
    equal = 0
    for text, a, b in zip(TEXTS, plain, stormed, strict=True):
        assert a.token_ids
        assert b.token_ids
        assert len(a.token_ids) > 20, "temperature 0 gave a real answer"
        assert b.completion_tokens == len(b.token_ids)
        assert b.prompt_tokens == a.prompt_tokens
        parted = next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
            None,
        )
        if parted is None:
            assert b.token_ids == a.token_ids
            assert b.text == a.text
            equal += 1
            continue
        prompt = httpx.post(
            f"{smollm2.root}/tokenize",
            json={
                "model": SERVED_NAME,
                "messages": build_messages(
                    FeedbackRequest(request_id="x", text=text), WorkerSettings().system_prompt
                ),
            },
        ).json()["tokens"]
        top = _top(smollm2, prompt + list(a.token_ids[:parted]))
        ours, theirs = a.token_ids[parted], b.token_ids[parted]
        assert ours in top, (parted, top)
        assert theirs in top, (parted, top)
        assert abs(top[ours] - top[theirs]) <= TIE, f"parted at {parted} without a tie: {top}"
        assert top[ours] >= max(top.values()) - TIE, "the tie is for the top"
    print(f"{equal} of {len(TEXTS)} answers equal throughout, {len(cut)} preemptions")


@pytest.mark.engine
def test_a_resumed_call_makes_progress_before_it_is_preempted_again(smollm2: CpuServer) -> None:
    watch = ChatWatch(1)

    async def thrash() -> None:
        # Chat turns busy the moment anything resumes: without the rule, no progress.
        while True:
            watch.observe(1)
            await asyncio.sleep(0.02)
            watch.observe(0)
            await asyncio.sleep(0)

    async def scenario() -> Completion:
        settings = WorkerSettings(
            llm_base_url=smollm2.base_url, llm_model=SERVED_NAME, preempt_min_tokens=6
        )
        engine = EngineClient(settings)
        messages = build_messages(FeedbackRequest(request_id="t", text=TEXTS[0]), "Be brief.")
        flipping = asyncio.create_task(thrash())
        try:
            return await Preempter(settings, engine, watch).complete(messages, 60)
        finally:
            flipping.cancel()
            await engine.close()

    with capture_logs() as events:
        answer = asyncio.run(scenario())
    tokens = [e["tokens"] for e in events if e["event"] == "preempted"]
    assert len(tokens) >= 3
    gaps = [b - a for a, b in itertools.pairwise(tokens)]
    assert min(gaps) >= 6, tokens
    assert answer.completion_tokens == len(answer.token_ids or ())


@pytest.mark.engine
def test_a_cut_inside_a_character_drops_its_bytes(smollm2: CpuServer) -> None:
    async def scenario() -> None:
        settings = WorkerSettings(llm_base_url=smollm2.base_url, llm_model=SERVED_NAME)
        engine = EngineClient(settings)
        try:
            response = httpx.post(
                f"{smollm2.root}/tokenize",
                json={"model": SERVED_NAME, "prompt": "cat 🐈", "add_special_tokens": False},
            )
            ids = response.json()["tokens"]
            whole = await engine.detokenize(ids)
            assert whole == "cat 🐈"
            assert (await engine.detokenize(ids[:-1])).endswith("\ufffd"), "the emoji spans tokens"
            preempter = Preempter(settings, engine, ChatWatch(1))
            partial = Answer(prompt_ids=[1], ids=ids[:-1])
            dropped = await preempter._cut(partial)
            assert dropped >= 1
            kept = await engine.detokenize(partial.ids)
            assert kept.startswith("cat")
            assert "cat 🐈".startswith(kept), "only whole characters are kept"
            complete = Answer(prompt_ids=[1], ids=list(ids), text=whole)
            assert await preempter._cut(complete) == 0
            assert complete.ids == ids
        finally:
            await engine.close()

    asyncio.run(scenario())


# -- the worker, the emulator and a real chatbot ---------------------------------------------


@pytest.mark.engine
@pytest.mark.emulator
def test_a_preemption_storm_loses_and_duplicates_nothing(
    project: Project, engine: CpuServer, smollm2: CpuServer
) -> None:
    worker = project.start_worker(
        engine,
        FEEDBACK_CHAT_METRICS_URL=f"{smollm2.root}/load",
        FEEDBACK_PREEMPT="true",
        FEEDBACK_PREEMPT_MODE="abort",
        FEEDBACK_DEFAULT_MAX_TOKENS="96",
        # The emulator sends the whole backlog at once and redelivers what the client still
        # holds unread after the stream's ack deadline (docs/configuration.md); at 60 s that
        # duplicated 8 of 40 on the loaded 2-core machine, held back behind paused answers.
        # The worker now answers such copies once (tests/test_copies.py); this test keeps
        # to the preemption itself.
        FEEDBACK_ACK_DEADLINE_S="600",
    )
    publisher, collector = project.publisher(), project.collector()
    chat = ChatBursts(smollm2.base_url, SERVED_NAME, busy_s=0.3, idle_s=0.4).start()
    try:
        wanted = {f"storm-{i}" for i in range(40)}
        for rid in sorted(wanted):
            publisher.request(rid, f"Review {rid}: the tide comes in twice a day.")
        collector.wait(results=wanted, timeout=600)
    finally:
        chat.stop()
        assert worker.stop(timeout=60) == 0
    assert not chat.errors
    counts = Counter(r.attributes["request_id"] for r in collector.results)
    assert set(counts) == wanted
    assert max(counts.values()) == 1, "a preempted request was answered twice"
    assert not collector.dead_letters
    preempted = worker_events(worker.log_path, "preempted")
    resumed = worker_events(worker.log_path, "resumed")
    assert len(preempted) >= 20, f"only {len(preempted)} preemptions in {chat.bursts} bursts"
    assert len(resumed) == len(preempted)
    assert {e["request_id"] for e in preempted} <= wanted
    for received in collector.results:
        result = FeedbackResult.model_validate_json(received.data)
        assert 0 < result.usage.completion_tokens <= 96
    done = worker_events(worker.log_path, "request_done")
    nacked = [e for e in done if e["outcome"] != "succeeded"]
    assert not nacked


@pytest.mark.engine
@pytest.mark.emulator
def test_sigterm_while_answers_are_paused_nacks_them(
    project: Project, engine: CpuServer, smollm2: CpuServer
) -> None:
    first = project.start_worker(
        engine,
        "worker-1",
        FEEDBACK_CHAT_METRICS_URL=f"{smollm2.root}/metrics",
        FEEDBACK_PREEMPT_MODE="abort",
        FEEDBACK_DEFAULT_MAX_TOKENS="256",
        FEEDBACK_SHUTDOWN_GRACE_S="1",
    )
    publisher, collector = project.publisher(), project.collector()
    wanted = {f"paused-{i}" for i in range(12)}
    for rid in sorted(wanted):
        publisher.request(rid, "Please review this text about waiting politely.", max_tokens=700)
    deadline = time.monotonic() + 180
    while "/v1/chat/completions" not in first.log_path.read_text():
        assert time.monotonic() < deadline, "no engine call started"
        time.sleep(0.1)
    # Chat stays busy from here on: whatever is in flight is preempted and waits.
    chat = ChatBursts(smollm2.base_url, SERVED_NAME, busy_s=600, idle_s=0).start()
    try:
        while not worker_events(first.log_path, "preempted"):
            assert time.monotonic() < deadline, "nothing was preempted"
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.proc is not None
        assert first.proc.wait(timeout=60) == 0
    finally:
        chat.stop()
    log = first.log_path
    assert worker_events(log, "shutdown_complete")
    paused = {e["request_id"] for e in worker_events(log, "preempted")}
    done = worker_events(log, "request_done")
    nacked = {e["request_id"] for e in done if e["outcome"] == "nacked"}
    assert paused <= nacked | {r.attributes["request_id"] for r in collector.results}
    second = project.start_worker(engine, "worker-2", FEEDBACK_DEFAULT_MAX_TOKENS="16")
    try:
        collector.wait(results=wanted, timeout=600)
    finally:
        assert second.stop(timeout=60) == 0
    assert not collector.dead_letters
