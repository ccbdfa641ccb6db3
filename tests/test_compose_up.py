"""`docker compose up` for real: the CPU stack (compose.cpu.yml with the emulator) on a
Docker engine, reached only through its published ports, with containers crashed under it.

The images come from `uv run cohost images --cpu` (`.ci/run` builds them). Without a Docker
engine these tests are skipped with the reason; under CI (CI=true) that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
from cohost import nvml
from cohost.images import engine_tag
from cohost.launch.exits import EXIT_WRONG_GPU
from cohost.processes import console_script, free_port
from cohost.units import MIB

from harness.compose import IMAGES, Stack, engine_problem
from harness.pubsub import Collector, Project, Publisher

pytestmark = pytest.mark.docker

LOCAL_PROJECT = "cohost-local"  # what pubsub-init creates (COHOST_LOCAL_PROJECT's default)


def need_docker(images: tuple[str, ...] = IMAGES) -> None:
    problem = engine_problem(images)
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs Docker: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def stack(logs: Path) -> Iterator[Stack]:
    need_docker()
    stack = Stack(logs)
    try:
        took = stack.up()
        print(f"compose up -> every service ready: {took:.0f} s", file=sys.stderr)
        yield stack
    finally:
        stack.save_logs("final")
        stack.down(volumes=True)


@pytest.fixture
def pubsub(stack: Stack, logs: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    host = f"127.0.0.1:{stack.emulator_port}"
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", LOCAL_PROJECT)
    return Project(host, LOCAL_PROJECT, logs)


def chat(stack: Stack, key: str | None = None) -> str:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{stack.chatbot_port}/v1",
        api_key=key or stack.key,
        max_retries=0,
        timeout=120,
    )
    reply = client.chat.completions.create(
        model="chatbot", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}
    return reply.choices[0].message.content or ""


def burst(pubsub: Project, count: int) -> list[str]:
    publisher = Publisher(pubsub)
    ids = [f"req-{uuid.uuid4().hex[:12]}" for _ in range(count)]
    for rid in ids:
        publisher.request(rid, f"Plants turn light into sugar ({rid}).", max_tokens=8)
    return ids


def collect(pubsub: Project, ids: list[str], timeout: float) -> Counter[str]:
    collector = Collector(pubsub)
    collector.wait(results=ids, timeout=timeout)
    # A few more pulls: a doubled result would come in after the last awaited one.
    for _ in range(3):
        collector.wait(timeout=5)
    counts = Counter(r.attributes["request_id"] for r in collector.results)
    return Counter({rid: counts[rid] for rid in ids})


def test_worker_image_holds_no_torch_or_vllm(stack: Stack) -> None:
    """The built image, not only its lock: nothing of the GPU stack is importable in it."""
    probe = (
        "import importlib.util as u, sys; "
        "found = [m for m in ('torch', 'vllm', 'triton', 'transformers') if u.find_spec(m)]; "
        "print(found); sys.exit(1 if found else 0)"
    )
    result = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", IMAGES[0], "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"


def test_chat_with_the_key_and_refused_without(stack: Stack) -> None:
    assert chat(stack).strip()
    with pytest.raises(openai.AuthenticationError):
        chat(stack, key="not-the-key")


def test_feedback_through_the_emulator_container(stack: Stack, pubsub: Project) -> None:
    ids = burst(pubsub, 3)
    counts = collect(pubsub, ids, timeout=300)
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1


def test_feedback_engine_crash_costs_chat_nothing_and_loses_no_request(
    stack: Stack, pubsub: Project
) -> None:
    ids = burst(pubsub, 16)
    time.sleep(5)  # the worker has some in flight
    before = stack.crash("feedback-engine")
    # The chatbot is another container: it answers while its neighbour is down.
    for _ in range(3):
        assert chat(stack).strip()
    back = stack.wait_healthy("feedback-engine", after_restarts=before)
    print(f"feedback engine crashed: healthy again after {back:.0f} s", file=sys.stderr)
    counts = collect(pubsub, ids, timeout=600)
    assert set(counts) == set(ids), "no request lost"
    doubled = {rid: n for rid, n in counts.items() if n > 1}
    print(f"feedback engine crash: {len(ids)} answered, doubled {doubled}", file=sys.stderr)
    assert not doubled


def test_worker_crash_mid_burst_loses_and_doubles_nothing(stack: Stack, pubsub: Project) -> None:
    ids = burst(pubsub, 30)
    collector = Collector(pubsub)
    deadline = time.monotonic() + 300
    while len(collector.result_ids()) < 5 and time.monotonic() < deadline:
        collector.wait(timeout=2)
    assert collector.result_ids(), "the worker answered nothing before the crash"
    before = stack.crash("feedback-worker")
    back = stack.wait_healthy("feedback-worker", after_restarts=before)
    print(f"worker crashed: healthy again after {back:.0f} s", file=sys.stderr)
    collector.wait(results=ids, timeout=600)
    for _ in range(3):
        collector.wait(timeout=5)
    counts = Counter(r.attributes["request_id"] for r in collector.results)
    assert set(ids) <= set(counts), "no request lost"
    doubled = {rid: n for rid, n in counts.items() if n > 1}
    print(f"worker crash: {len(ids)} answered, doubled {doubled}", file=sys.stderr)
    assert not doubled


def test_down_then_up_leaves_nothing_behind(stack: Stack) -> None:
    stack.down()
    assert stack.leftovers() == []
    took = stack.up()
    print(f"compose up again -> every service ready: {took:.0f} s", file=sys.stderr)
    assert chat(stack).strip()


def test_a_plan_that_can_never_start_restarts_slowly_and_says_why(
    logs: Path, tmp_path: Path
) -> None:
    """The chatbot's own compose service (image, restart policy, published port) with the L4
    plan on a smaller card (a Tesla T4, NVML faked by a file mounted in): its launcher
    refuses before vLLM loads, every time. Docker restarts it more often than on-failure:3
    would, each refusal in a row waits longer before exiting (COHOST_REFUSAL_BACKOFF_S=2:
    0, 2, 4, 8, 16 s), and `cohost status` through the published port shows the refusal."""
    need_docker((engine_tag(cpu=True),))
    t4 = nvml.GpuReading(
        index=0, name="Tesla T4", uuid="GPU-t4", total_bytes=15_360 * MIB,
        reserved_bytes=254 * MIB, free_bytes=14_900 * MIB, used_bytes=206 * MIB, processes=[],
    )  # fmt: skip
    fake = tmp_path / "nvml.json"
    fake.write_text(t4.to_json())
    fake.chmod(0o644)  # the engine runs as UID 10001
    override = tmp_path / "refusing.yml"
    override.write_text(
        "services:\n  chatbot:\n    environment:\n"
        '      COHOST_REFUSAL_BACKOFF_S: "2"\n      COHOST_FAKE_NVML: /etc/cohost/nvml.json\n'
        f"    volumes:\n      - {fake}:/etc/cohost/nvml.json:ro\n"
    )
    refused = Stack(logs, profile="l4", overrides=(override,))
    url = f"http://127.0.0.1:{refused.chatbot_port}"
    try:
        up = refused.compose("up", "-d", "--no-deps", "--no-build", "--pull", "never", "chatbot")
        assert up.returncode == 0, up.stderr
        # Four restarts take 0 + 2 + 4 + 8 s of waits and five starts; the fifth run waits
        # 16 s, and status is read then.
        deadline = time.monotonic() + 90
        while (restarts := refused.restarts("chatbot")) < 4:
            assert time.monotonic() < deadline, f"{restarts} restarts in 90 s"
            time.sleep(0.5)
        while not _refusing(f"{url}/health", at_least=5):
            assert time.monotonic() < deadline, "no refusal answered on the published port"
            time.sleep(0.3)
        status = subprocess.run(
            [console_script("cohost"), "status", "--json", "--chatbot", url,
             "--feedback", f"http://127.0.0.1:{free_port()}",
             "--worker", f"http://127.0.0.1:{free_port()}", "--timeout", "5"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        restarts = refused.restarts("chatbot")
        log = refused.compose("logs", "--no-color", "chatbot").stdout
    finally:
        refused.save_logs("refusing")
        refused.down(volumes=True)
    assert restarts > 3, "unless-stopped: on-failure:3 would have given up"
    assert log.count("this GPU is Tesla T4 with 15,360 MiB, but the plan is for NVIDIA L4") >= 5
    waits = [int(s) for s in re.findall(r"in a row \(exit 3\): waiting (\d+) s", log)]
    assert waits[:4] == [2, 4, 8, 16], log[-3000:]
    chatbot = json.loads(status.stdout)["checks"]["chatbot"]
    assert chatbot["state"] == "down"
    assert chatbot["summary"].startswith("refusing to start (exit 3): this GPU is Tesla T4")
    details = chatbot["details"]["refused"]
    assert details["code"] == EXIT_WRONG_GPU
    assert details["refusals_in_a_row"] >= 5
    assert details["exits_in_s"] > 0
    assert "Re-plan for this card" in details["reason"]


def _refusing(url: str, *, at_least: int) -> bool:
    """Whether `url` answers with a refusal at least `at_least` in a row."""
    try:
        response = httpx2.get(url, timeout=2)
        refused = response.json().get("refused") if response.status_code == 503 else None
    except (httpx2.HTTPError, ValueError):
        return False
    return isinstance(refused, dict) and refused.get("refusals_in_a_row", 0) >= at_least
