"""`cohost plan --sharing`: what each server gets under MPS (its share of the SMs, priority,
a memory cap that fits the card) and under time-slicing, shares set per service and checked,
the sharing written to the env file, and the batch service streaming in chunks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cohost import gpus
from cohost.plan import Plan, PlanError, ServiceSpec, envfile, make_plan, memory, sharing
from cohost.units import MIB

from tests.test_plan import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "deploy" / "models"
QWEN_1_5B = str(MODELS / "Qwen--Qwen2.5-1.5B-Instruct")
QWEN_7B_AWQ = str(MODELS / "Qwen--Qwen2.5-7B-Instruct-AWQ")


def _pair(mode: str, **feedback: object) -> Plan:
    return make_plan(
        gpus.by_name("L4"),
        [
            ServiceSpec("chatbot", QWEN_7B_AWQ, max_model_len=8192, max_num_seqs=8),
            ServiceSpec("feedback", QWEN_1_5B, max_model_len=4096, max_num_seqs=32, **feedback),  # type: ignore[arg-type]
        ],
        mode=mode,
    )


def test_mps_plan_gives_each_server_its_share_and_a_cap_that_fits_the_card() -> None:
    plan = _pair("mps")
    assert plan.fits
    chat, feedback = plan.services
    assert chat.mps is not None
    assert feedback.mps is not None
    # The interactive service (first) has every SM at normal priority; the batch one its share.
    assert (chat.mps.sm_percent, chat.mps.priority, chat.mps.client_priority) == (100, "normal", 0)
    assert (feedback.mps.sm_percent, feedback.mps.priority) == (sharing.BATCH_SM_PERCENT, "low")
    assert feedback.mps.client_priority == 1
    for s in plan.services:
        assert s.mps is not None
        cap = s.mps.memory_limit_bytes
        assert cap % MIB == 0, "CUDA takes the cap in whole MiB"
        # Room for the whole server as planned, plus its share of the headroom.
        assert s.footprint.process <= cap <= s.footprint.process + plan.headroom_bytes // 2
        # vLLM's own start check sees the capped free memory: its budget must fit under the cap.
        assert math.ceil(s.gpu_memory_utilization * plan.gpu.cuda_total_bytes) < cap
    # An MPS client's context shrinks with its share of the SMs.
    assert chat.footprint.context == memory.mps_context_bytes(100) == memory.CONTEXT_BYTES
    assert feedback.footprint.context == memory.CONTEXT_BYTES - memory.MPS_SAVING_AT_30_PERCENT
    caps = sum(s.mps.memory_limit_bytes for s in plan.services if s.mps)
    assert caps + plan.mps_server_bytes <= plan.gpu.cuda_total_bytes
    assert plan.used_bytes == sum(s.footprint.process for s in plan.services) + (
        memory.MPS_SERVER_BYTES
    )


def test_mps_leaves_more_for_the_kv_caches_than_time_slicing() -> None:
    """Under MPS the servers have no CUDA context of their own; one MPS server holds it."""
    mps, sliced = _pair("mps"), _pair("time-slicing")
    assert sliced.sharing == "time-slicing"
    assert all(s.mps is None for s in sliced.services)
    assert all(s.footprint.context == memory.CONTEXT_BYTES for s in sliced.services)
    gained = sum(s.footprint.kv_cache for s in mps.services) - sum(
        s.footprint.kv_cache for s in sliced.services
    )
    saved = memory.MPS_SAVING_AT_30_PERCENT - memory.MPS_SERVER_BYTES
    # Whole KV blocks only: within a block or so of each service, either way.
    assert abs(gained - saved) <= 2 * 4 * MIB


def test_shares_can_be_set_per_service_and_are_checked() -> None:
    plan = _pair("mps", sm_percent=45, priority="normal")
    feedback = plan.services[1].mps
    assert feedback is not None
    assert (feedback.sm_percent, feedback.priority) == (45, "normal")
    assert ServiceSpec.parse("f=x,sm=20,priority=low").sm_percent == 20
    with pytest.raises(PlanError, match="from 1 to 100"):
        _pair("mps", sm_percent=0)
    with pytest.raises(PlanError, match="priority='urgent'"):
        _pair("mps", priority="urgent")
    with pytest.raises(PlanError, match="--sharing time-slicing has no shares"):
        _pair("time-slicing", sm_percent=30)
    with pytest.raises(PlanError, match="--sharing 'gang'"):
        _pair("gang")


def test_env_file_carries_the_sharing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [
        "plan", "--gpu", "L4",
        "--service", f"chatbot={QWEN_7B_AWQ},max_model_len=8192,max_num_seqs=8",
        "--service", f"feedback={QWEN_1_5B},max_model_len=4096,max_num_seqs=32,sm=25",
    ]  # fmt: skip
    mps_env, sliced_env = tmp_path / "mps.env", tmp_path / "sliced.env"
    assert run_cli(capsys, *argv, "--sharing", "mps", "--write-env", str(mps_env))[0] == 0
    # The default is time-slicing, where an MPS share means nothing: refused, saying so.
    refused = run_cli(capsys, *argv, "--write-env", str(sliced_env))
    assert refused[0] == 2
    assert "use --sharing mps" in refused[2]
    assert not sliced_env.exists()
    out = run_cli(capsys, *argv[:-1], argv[-1].removesuffix(",sm=25"),
                  "--write-env", str(sliced_env))  # fmt: skip
    assert out[0] == 0
    assert "sharing: time-slicing" in out[1]
    assert envfile.read(sliced_env)["COHOST_SHARING"] == "time-slicing"
    values = envfile.read(mps_env)
    assert values["COHOST_SHARING"] == "mps"
    assert values["FEEDBACK_ENGINE_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    assert values["FEEDBACK_ENGINE_MPS_CLIENT_PRIORITY"] == "1"
    assert values["CHATBOT_ENGINE_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    assert int(values["CHATBOT_ENGINE_MPS_PINNED_MEMORY_BYTES"]) > int(
        values["CHATBOT_ENGINE_EXPECTED_PROCESS_BYTES"]
    )
    assert "# sharing: CUDA MPS (chatbot 100% of SMs" in mps_env.read_text()
    # The share is tied to the memory sized for it: the launcher recomputes this check.
    p = "FEEDBACK_ENGINE_"
    assert values[p + "MPS_SHARE_CHECK"] == sharing.share_check(
        25, 1, int(values[p + "MPS_PINNED_MEMORY_BYTES"]), int(values[p + "EXPECTED_PROCESS_BYTES"])
    )
    # Another share is another plan: more SMs, more memory, another check.
    wide_env = tmp_path / "wide.env"
    wide = [*argv[:-1], argv[-1].replace("sm=25", "sm=100,priority=normal"), "--sharing", "mps"]
    assert run_cli(capsys, *wide, "--write-env", str(wide_env))[0] == 0
    widened = envfile.read(wide_env)
    assert widened[p + "MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    assert widened[p + "MPS_CLIENT_PRIORITY"] == "0"

    def outside_budget(plan: dict[str, str]) -> int:  # CUDA graphs, sampler, the context
        return int(plan[p + "EXPECTED_PROCESS_BYTES"]) - int(plan[p + "BUDGET_BYTES"])

    grown = memory.mps_context_bytes(100) - memory.mps_context_bytes(25)
    assert outside_budget(widened) - outside_budget(values) == grown
    assert widened[p + "MPS_SHARE_CHECK"] != values[p + "MPS_SHARE_CHECK"]
    sliced = envfile.read(sliced_env)
    assert sliced["COHOST_SHARING"] == "time-slicing"
    assert not [k for k in sliced if "_MPS_" in k]


def test_the_batch_service_streams_in_chunks_of_tokens(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The first service streams every token to its users; the others 8 a chunk unless
    `stream=` says otherwise, on a GPU plan and a CPU plan alike."""
    chat, feedback = f"chatbot={QWEN_7B_AWQ},max_model_len=8192", f"feedback={QWEN_1_5B}"
    for extra, expected in (("", "8"), (",stream=2", "2")):
        for device in (["--gpu", "L4"], ["--cpu"]):
            env = tmp_path / "plan.env"
            argv = ["plan", *device, "--service", chat, "--service", feedback + extra]
            assert run_cli(capsys, *argv, "--write-env", str(env))[0] == 0
            values = envfile.read(env)
            assert values["CHATBOT_ENGINE_STREAM_INTERVAL"] == "1"
            assert values["FEEDBACK_ENGINE_STREAM_INTERVAL"] == expected
    assert ServiceSpec.parse("f=x,stream=4").describe() == "f=x,max_num_seqs=16,stream=4"
