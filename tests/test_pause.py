"""Preemption by pausing the feedback engine (FEEDBACK_PREEMPT_MODE=pause): the real CPU
engine started as the feedback engine is (it serves vLLM's /pause), then one without it,
then the whole worker against the emulator with a real chatbot's /load as the signal."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from cohost.cpu_engine.models import ensure_model
from cohost.processes import free_port
from cohost.status import checks
from cohost_shared.messages import FeedbackRequest, FeedbackResult
from cohost_shared.metrics import Metrics
from feedback.engine import Completion, EngineClient, EngineUnavailable
from feedback.pause import EnginePause, within
from feedback.preempt import ChatWatch, Preempter
from feedback.prompts import build_messages
from feedback.settings import WorkerSettings
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from harness.chat import ChatBursts
from harness.engine import SERVED_NAME, CpuServer
from harness.pubsub import Project, worker_events

GENERATED = "vllm:generation_tokens_total"
TEXT = "Plants turn light into sugar. Photosynthesis is how they eat, and they eat all day."


@pytest.fixture(scope="module")
def chatbot(logs: Path) -> Iterator[CpuServer]:
    """SmolLM2-135M-Instruct as the chatbot: its /load is the worker's signal, and it
    serves no /pause (a chatbot never does)."""
    server = CpuServer(ensure_model("smollm2-135m-instruct"), free_port(),
                       logs / "pause-chatbot.log", role="chatbot")  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _generated(server: CpuServer) -> float:
    body = httpx.get(f"{server.root}/metrics", timeout=10).text
    return Metrics.parse(body, {GENERATED}).value(GENERATED) or 0.0


def _is_paused(server: CpuServer) -> bool:
    return bool(httpx.get(f"{server.root}/is_paused", timeout=10).json()["is_paused"])


def _settings(server: CpuServer, **extra: Any) -> WorkerSettings:
    return WorkerSettings(
        llm_base_url=server.base_url, llm_model=SERVED_NAME, temperature=0.0, **extra
    )


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def _answer(server: CpuServer, max_tokens: int) -> tuple[str, int]:
    """One chat answer at temperature 0 that runs to `max_tokens` (no stop at EOS), as a
    plain call: its text and token count."""
    body = {
        "model": SERVED_NAME,
        "messages": build_messages(FeedbackRequest(request_id="p", text=TEXT), "Be helpful."),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(f"{server.base_url}/chat/completions", json=body)
    response.raise_for_status()
    reply = response.json()
    return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]


@pytest.mark.engine
def test_a_paused_engine_generates_nothing_and_resumes_each_answer_where_it_stopped(
    engine: CpuServer,
) -> None:
    """At temperature 0 a paused-and-resumed answer equals the uninterrupted one: its KV
    cache stayed, and nothing was cut or sent again."""
    settings = _settings(engine)
    tokens = 600

    async def scenario() -> tuple[tuple[str, int], tuple[str, int], list[float]]:
        watch = ChatWatch(1)
        pause = EnginePause(settings, watch)
        await pause.start()
        assert pause.works
        holding = asyncio.create_task(pause.run())
        try:
            plain = await _answer(engine, tokens)
            answer = asyncio.create_task(_answer(engine, tokens))
            frozen = []
            for _ in range(3):
                await asyncio.sleep(0.3)
                watch.observe(1)
                # The pause is confirmed once the engine's step under way is over.
                await _until(lambda: pause.paused is True)
                before = await asyncio.to_thread(_generated, engine)
                await asyncio.sleep(1.0)
                frozen.append(await asyncio.to_thread(_generated, engine) - before)
                assert not answer.done(), "the answer went on while paused"
                watch.observe(0)
                await _until(lambda: pause.paused is False)
            return plain, await asyncio.wait_for(answer, 300), frozen
        finally:
            holding.cancel()
            await pause.close()

    with capture_logs() as events:
        plain, paused, frozen = asyncio.run(scenario())
    assert frozen == [0.0, 0.0, 0.0], "the engine generated while paused"
    assert [e["event"] for e in events if e["event"].startswith("engine_")] == [
        "engine_paused", "engine_resumed"] * 3  # fmt: skip
    assert plain[1] == paused[1] == tokens
    assert paused[0] == plain[0]
    assert not _is_paused(engine)


@pytest.mark.engine
def test_an_engine_without_pause_is_preempted_by_abort(chatbot: CpuServer) -> None:
    """A feedback engine started without vLLM's development mode: the worker says so and
    stops and continues its calls itself."""
    settings = _settings(chatbot, preempt_min_tokens=2)
    messages = build_messages(FeedbackRequest(request_id="a", text=TEXT), settings.system_prompt)

    async def scenario() -> Completion:
        client = EngineClient(settings)
        watch = ChatWatch(1)
        pause = EnginePause(settings, watch)
        await pause.start()

        async def flip() -> None:
            while True:
                await asyncio.sleep(0.15)
                watch.observe(1)
                await asyncio.sleep(0.05)
                watch.observe(0)

        flipping = asyncio.create_task(flip())
        try:
            return await Preempter(settings, client, watch, pause).complete(messages, 96)
        finally:
            flipping.cancel()
            await pause.close()
            await client.close()

    with capture_logs() as events:
        answer = asyncio.run(scenario())
    names = [e["event"] for e in events]
    assert names.count("engine_pause_missing") == 1
    assert "preempted" in names, "the calls were stopped by abort"
    assert "engine_paused" not in names
    assert answer.completion_tokens == len(answer.token_ids or ())


@pytest.mark.engine
def test_time_held_paused_does_not_count_toward_the_call_timeout(engine: CpuServer) -> None:
    """Chat busy for longer than FEEDBACK_LLM_TIMEOUT_S: the answer waits it out and then
    finishes, instead of timing out and being redone from scratch."""
    settings = _settings(engine, llm_timeout_s=3.0)
    messages = build_messages(FeedbackRequest(request_id="t", text=TEXT), settings.system_prompt)
    held_before = REGISTRY.get_sample_value("feedback_engine_paused_seconds_total") or 0.0

    async def scenario() -> tuple[Completion, float, bool]:
        client = EngineClient(settings)
        watch = ChatWatch(1)
        pause = EnginePause(settings, watch)
        await pause.start()
        holding = asyncio.create_task(pause.run())
        try:
            watch.observe(1)
            await _until(lambda: pause.paused is True)
            answer = asyncio.create_task(
                Preempter(settings, client, watch, pause).complete(messages, 8)
            )
            await asyncio.sleep(8.0)  # well past the 3 s timeout, all of it paused
            waited = answer.done()
            watch.observe(0)
            return await asyncio.wait_for(answer, 60), pause.held_s(), waited
        finally:
            holding.cancel()
            await pause.close()
            await client.close()

    completion, held, done_while_paused = asyncio.run(scenario())
    assert not done_while_paused, "the call ended while the engine was paused"
    assert 0 < completion.completion_tokens <= 8
    assert held >= 8.0
    counted = REGISTRY.get_sample_value("feedback_engine_paused_seconds_total") or 0.0
    assert counted - held_before >= 8.0


def test_within_times_out_on_unpaused_time_only() -> None:
    """The deadline's clock stops while the engine is held: a call of 1.5 s with 1.0 s of
    it held finishes within a 1.0 s limit; with nothing held it is cut at the limit."""

    async def scenario(held: Callable[[], float]) -> str:
        async def call() -> str:
            await asyncio.sleep(1.5)
            return "answered"

        return await within(call(), 1.0, held)

    began = time.monotonic()
    assert asyncio.run(scenario(lambda: min(max(time.monotonic() - began - 0.2, 0.0), 1.0))) == (
        "answered"
    )
    began = time.monotonic()
    with pytest.raises(EngineUnavailable, match="FEEDBACK_LLM_TIMEOUT_S"):
        asyncio.run(scenario(lambda: 0.0))
    assert 0.9 < time.monotonic() - began < 1.4


# -- the worker, the emulator and a real chatbot ---------------------------------------------


@pytest.mark.engine
@pytest.mark.emulator
def test_pausing_through_chat_bursts_loses_and_duplicates_nothing(
    project: Project, engine: CpuServer, chatbot: CpuServer
) -> None:
    worker = project.start_worker(
        engine,
        FEEDBACK_CHAT_METRICS_URL=f"{chatbot.root}/load",
        FEEDBACK_DEFAULT_MAX_TOKENS="96",
    )
    publisher, collector = project.publisher(), project.collector()
    chat = ChatBursts(chatbot.base_url, SERVED_NAME, busy_s=0.3, idle_s=0.4).start()
    try:
        wanted = {f"pause-{i}" for i in range(40)}
        for rid in sorted(wanted):
            publisher.request(rid, f"Review {rid}: the tide comes in twice a day.")
        collector.wait(results=wanted, timeout=600)
    finally:
        chat.stop()
        assert worker.stop(timeout=60) == 0
    assert not chat.errors
    counts = Counter(r.attributes["request_id"] for r in collector.results)
    assert set(counts) == wanted
    assert max(counts.values()) == 1, "a request was answered twice"
    assert not collector.dead_letters
    paused = worker_events(worker.log_path, "engine_paused")
    resumed = worker_events(worker.log_path, "engine_resumed")
    assert len(paused) >= 10, f"only {len(paused)} pauses in {chat.bursts} bursts"
    assert len(paused) - 1 <= len(resumed) <= len(paused) + 1
    assert not worker_events(worker.log_path, "preempted"), "the engine paused: nothing was cut"
    for received in collector.results:
        result = FeedbackResult.model_validate_json(received.data)
        assert 0 < result.usage.completion_tokens <= 96
    assert not _is_paused(engine), "the worker leaves its engine running when it stops"


@pytest.mark.engine
@pytest.mark.emulator
def test_sigterm_while_the_engine_is_paused_hands_back_and_resumes_it(
    project: Project, engine: CpuServer, chatbot: CpuServer
) -> None:
    first = project.start_worker(
        engine,
        "worker-1",
        FEEDBACK_CHAT_METRICS_URL=f"{chatbot.root}/load",
        FEEDBACK_DEFAULT_MAX_TOKENS="256",
        FEEDBACK_SHUTDOWN_GRACE_S="1",
    )
    publisher, collector = project.publisher(), project.collector()
    wanted = {f"held-{i}" for i in range(12)}
    for rid in sorted(wanted):
        publisher.request(rid, "Please review this text about waiting politely.", max_tokens=700)
    deadline = time.monotonic() + 180
    while "/v1/chat/completions" not in first.log_path.read_text():
        assert time.monotonic() < deadline, "no engine call started"
        time.sleep(0.1)
    # Chat stays busy from here on: the engine is paused with the answers in it.
    chat = ChatBursts(chatbot.base_url, SERVED_NAME, busy_s=600, idle_s=0).start()
    try:
        while not worker_events(first.log_path, "engine_paused"):
            assert time.monotonic() < deadline, "the engine was not paused"
            time.sleep(0.2)
        assert _is_paused(engine)
        status = checks.check_worker(f"http://127.0.0.1:{first.env['FEEDBACK_METRICS_PORT']}")
        assert "its engine paused for chat" in status.summary, status.summary
        first.send_signal(signal.SIGTERM)
        assert first.proc is not None
        assert first.proc.wait(timeout=60) == 0
        assert not _is_paused(engine), "a stopped worker leaves its engine paused"
    finally:
        chat.stop()
    assert worker_events(first.log_path, "shutdown_complete")
    second = project.start_worker(engine, "worker-2", FEEDBACK_DEFAULT_MAX_TOKENS="16")
    try:
        collector.wait(results=wanted, timeout=600)
    finally:
        assert second.stop(timeout=60) == 0
    assert not collector.dead_letters
    counts = Counter(r.attributes["request_id"] for r in collector.results)
    assert set(counts) == wanted
    assert max(counts.values()) == 1
