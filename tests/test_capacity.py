"""The capacity simulator's logic (bench/capacity/sim.py), on cases with known answers."""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cohost.plan import sharing

from bench.capacity import run
from bench.capacity.shares import SHARINGS, shares
from bench.capacity.sim import (
    Burst,
    Policy,
    Scaler,
    Scenario,
    engines,
    load_measured,
    simulate,
)
from tests.deployfiles import ROOT
from tests.k8sfiles import OVERLAYS, kustomize, overlay_sharing

MEASURED = load_measured()
TRACE_RUN = ROOT / "bench/gpu/results/trace-2026-12-03b/results.jsonl"


def instant(m: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """No start times and no metric lag: what is left is the arithmetic."""
    fast = copy.deepcopy(m)
    for key in fast["start"]:
        fast["start"][key] = 0.0
    fast["metrics"]["pubsub_visible_after_s"] = 0.0
    fast["metrics"]["chat_metric_lag_s"] = 0.0
    return fast


def policy(burst_max: int) -> Policy:
    chat = Scaler(1, 1, 6, 0, 15, 300, 0, 1, 15)
    burst = Scaler(0, burst_max, 1, 0, 5, 60, 0, 100, 5)
    return Policy(chat=chat, burst=burst)


def test_l4_estimates_follow_the_bandwidth_and_never_beat_the_h200() -> None:
    chat, feedback = engines(MEASURED)
    gpu = MEASURED["gpu"]
    assert chat.step_s(1, gpu) >= chat.h200_step_s
    assert chat.step_s(8, gpu) > chat.step_s(1, gpu)
    # One sequence reads the weights and its context once per token.
    read = (
        chat.weights_bytes + (chat.prompt_tokens + chat.output_tokens / 2) * chat.kv_bytes_per_token
    )
    bandwidth = gpu["l4_bandwidth_gb_s"] * 1e9 * gpu["achieved_bandwidth_fraction"]
    assert chat.step_s(1, gpu) == pytest.approx(read / bandwidth)
    per_request = feedback.output_tokens * feedback.step_s(32, gpu) / 32 + feedback.prefill_s(gpu)
    assert feedback.requests_per_s(gpu) == pytest.approx(1 / per_request)


@pytest.mark.parametrize("mode", SHARINGS)
@pytest.mark.parametrize("units", [1, 4])
def test_backlog_drains_at_the_units_rate(units: int, mode: str) -> None:
    m = instant(MEASURED)
    requests = 20_000.0
    scenario = Scenario("drain", 3, lambda t: 0, (Burst(600, requests),))
    result = simulate(scenario, policy(units), mode, m)
    assert result.burst_peak == units
    rate = result.burst_rate * units
    # An idle chat unit drains too (its chatbot takes no traffic): units + 1 engines.
    expected = requests / (rate + result.burst_rate)
    assert result.drained_after_s == pytest.approx(expected, abs=30)


def test_burst_units_go_back_to_zero_and_their_nodes_are_released() -> None:
    m = instant(MEASURED)
    mode = "time-slicing"
    short = simulate(Scenario("a", 2, lambda t: 0, (Burst(600, 5_000),)), policy(2), mode, m)
    long = simulate(Scenario("a", 6, lambda t: 0, (Burst(600, 5_000),)), policy(2), mode, m)
    # After the burst only the chat unit's node is billed: 4 more hours cost 4 GPU-hours.
    assert long.gpu_hours - short.gpu_hours == pytest.approx(4.0, abs=0.01)


@pytest.mark.parametrize("mode", SHARINGS)
def test_metric_lag_and_start_time_delay_the_drain(mode: str) -> None:
    p = policy(4)
    scenario = Scenario("lag", 4, lambda t: 0, (Burst(600, 50_000),))
    fast = simulate(scenario, p, mode, instant(MEASURED))
    real = simulate(scenario, p, mode, MEASURED)
    assert real.drained_after_s is not None
    assert fast.drained_after_s is not None
    start = MEASURED["start"]
    delay = real.unit_start_s + start["node_provision_s"] + start["image_pull_s"]
    # Meanwhile the idle chat unit drains alone, at 1/5 of what the five engines do later.
    assert real.drained_after_s - fast.drained_after_s >= delay * 4 / 5


def test_mps_shares_are_the_measured_throughput_over_the_whole_gpu() -> None:
    sh = shares(MEASURED, "mps")
    t = MEASURED["mps"]
    whole = t["feedback_whole_gpu_tokens_per_s"]
    assert sh.busy == t["feedback_tokens_per_s_chat_busy"] / whole
    assert sh.idle == t["feedback_tokens_per_s_chat_idle"] / whole
    # MPS caps feedback's SMs whether or not chat runs: a burst unit keeps the idle share.
    assert sh.alone == sh.idle
    assert sh.chat_slowdown == t["chat_tpot_ms_feedback_busy"] / t["chat_whole_gpu_tpot_ms"]
    assert 0 < sh.busy < sh.idle <= 1
    assert sh.chat_slowdown > 1


def test_time_slicing_shares_are_derived_from_the_trace_run() -> None:
    """In chat's idle gaps: the feedback rate there; beside busy chat: the tokens made in
    chat's busy time over that time; chat: its TPOT with feedback over alone."""
    sh = shares(MEASURED, "time-slicing")
    t = MEASURED["time-slicing"]
    whole = t["feedback_whole_gpu_tokens_per_s"]
    assert sh.idle == t["feedback_tokens_per_s_chat_idle"] / whole
    busy_s = t["chat_window_s"] - t["chat_idle_s"]
    assert sh.busy == t["feedback_tokens_chat_busy"] / busy_s / whole
    assert sh.chat_slowdown == t["chat_tpot_ms_feedback_busy"] / t["chat_whole_gpu_tpot_ms"]
    # A burst unit's worker never preempts: its feedback runs as feedback alone.
    assert sh.alone == 1.0
    assert 0 < sh.busy < sh.idle < sh.alone


def _trace_rows(step: str, load: float | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in TRACE_RUN.read_text().splitlines() if line.strip()]
    return [
        r for r in rows
        if r.get("profile") == "l4" and r.get("sharing") == "time-slicing"
        and r["step"] == step and r.get("load") == load
        and (step != "shared" or r.get("preempt") is True)
    ]  # fmt: skip


def test_time_slicing_inputs_are_the_trace_runs_rows() -> None:
    """measured.toml's time-slicing table is what results.jsonl recorded (rounded) at the
    table's chat load."""
    t = MEASURED["time-slicing"]
    (alone,) = _trace_rows("feedback_alone")
    (chat_alone,) = _trace_rows("chat_alone", t["chat_load"])
    (shared,) = _trace_rows("shared", t["chat_load"])
    summary = shared["timeline_summary"]
    assert t["feedback_whole_gpu_tokens_per_s"] == round(alone["feedback"]["tokens_per_s"])
    assert t["feedback_tokens_per_s_chat_idle"] == summary["idle_tok_s"]
    assert t["feedback_tokens_chat_busy"] == summary["tokens_while_chat_busy"]
    assert t["chat_idle_s"] == summary["idle_s"]
    assert t["chat_window_s"] == shared["chat"]["window_s"]
    assert t["chat_whole_gpu_tpot_ms"] == round(chat_alone["chat"]["tpot_ms_p50"], 3)
    assert t["chat_tpot_ms_feedback_busy"] == round(shared["chat"]["tpot_ms_p50"], 3)


def test_a_chat_units_feedback_falls_with_chat_load_more_under_time_slicing() -> None:
    """Under time-slicing with preemption feedback runs only in chat's idle time; under
    MPS it keeps its SMs beside busy chat. So more chat takes more of it away."""
    ts, mps = shares(MEASURED, "time-slicing"), shares(MEASURED, "mps")
    loads = [0.25, 1.0, 2.0, 6.0]  # chat requests in flight per chat unit
    for low, high in itertools.pairwise(loads):
        assert ts.chat_unit(high) < ts.chat_unit(low)
        assert mps.chat_unit(high) < mps.chat_unit(low)
        kept_ts = ts.chat_unit(high) / ts.chat_unit(low)
        assert kept_ts < mps.chat_unit(high) / mps.chat_unit(low)
    # At the chat units' target (6 in flight each) a time-slicing chat unit drains little.
    assert ts.chat_unit(6.0) < 0.1 * mps.chat_unit(6.0)


@pytest.mark.parametrize("mode", SHARINGS)
def test_burst_units_drain_at_the_no_chat_share(mode: str) -> None:
    _, feedback = engines(MEASURED)
    result = simulate(Scenario("idle", 0.1, lambda t: 0), policy(0), mode, instant(MEASURED))
    expected = feedback.requests_per_s(MEASURED["gpu"]) * shares(MEASURED, mode).alone
    assert result.burst_rate == pytest.approx(expected)


@pytest.mark.parametrize("mode", SHARINGS)
def test_busy_chat_units_drain_at_the_busy_share(mode: str) -> None:
    """One chat unit, no burst units: with its chatbot always busy it drains at the busy
    share of its whole-GPU rate, with no chat at all at the share of a unit without chat."""
    m = instant(MEASURED)
    p = replace(policy(0), chat=Scaler(1, 1, 10**6, 0, 15, 300, 0, 1, 15))
    _, feedback = engines(m)
    whole = feedback.requests_per_s(m["gpu"])
    sh = shares(m, mode)
    requests = whole * sh.busy * 3600  # an hour's work beside busy chat
    no_chat = simulate(Scenario("no chat", 3, lambda t: 0, (Burst(60, requests),)), p, mode, m)
    busy = simulate(Scenario("busy", 3, lambda t: 400, (Burst(60, requests),)), p, mode, m)
    # Drained: less than one request left; within two 5-s steps.
    assert no_chat.drained_after_s == pytest.approx((requests - 1) / (whole * sh.alone), abs=10)
    assert busy.drained_after_s == pytest.approx((requests - 1) / (whole * sh.busy), abs=10)


@pytest.mark.parametrize("mode", SHARINGS)
def test_chat_slows_by_the_measured_ratio_while_feedback_runs(mode: str) -> None:
    m = instant(MEASURED)
    p = policy(0)
    quiet = simulate(Scenario("quiet", 1, lambda t: 10), p, mode, m)
    shared = simulate(Scenario("shared", 1, lambda t: 10, (Burst(60, 50_000),)), p, mode, m)
    slowdown = shares(m, mode).chat_slowdown
    assert shared.worst_tpot_ms == pytest.approx(quiet.worst_tpot_ms * slowdown)
    assert slowdown > 1


def test_chat_queues_when_units_cannot_hold_the_load() -> None:
    m = instant(MEASURED)
    p = replace(policy(0), chat=Scaler(1, 1, 6, 0, 15, 300, 0, 1, 15))
    light = simulate(Scenario("light", 1, lambda t: 10), p, "time-slicing", m)
    heavy = simulate(Scenario("heavy", 1, lambda t: 200), p, "time-slicing", m)
    assert light.queued_chat_s == 0
    assert heavy.queued_chat_s == pytest.approx(3600, abs=10)
    assert heavy.worst_tpot_ms > light.worst_tpot_ms


def test_policy_is_the_rendered_overlays() -> None:
    overlay = next(o for o in OVERLAYS if o.name.startswith("gke"))
    scaled = {d["metadata"]["name"]: d for d in kustomize(overlay) if d["kind"] == "ScaledObject"}
    read = run.policy_from(run.render(overlay))
    assert read == Policy.from_scaled_objects(scaled)
    chat = scaled["unit-chat"]["spec"]
    assert read.chat.min_units == chat["minReplicaCount"] >= 1, "chat never scales to zero"
    assert read.burst.min_units == 0
    assert math.isfinite(read.burst.threshold)


def simulated_header(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> str:
    """The line run.py prints about the sharing it simulates."""
    monkeypatch.setattr(sys, "argv", ["run.py", *argv])
    assert run.main() == 0
    return capsys.readouterr().out.splitlines()[1]


def test_sharing_is_the_rendered_plans(
    overlay: Path,
    rendered: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What the units get in the plan's ConfigMap, as shipped and re-planned, is what
    run.py simulates."""
    planned = overlay_sharing(overlay)
    assert run.sharing_from(rendered) == planned
    header = simulated_header(monkeypatch, capsys, "--overlay", str(overlay))
    assert header.startswith(f"sharing {planned} (the overlay's plan)"), header


def test_the_shipped_overlay_is_simulated_under_time_slicing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = next(o for o in OVERLAYS if o.name.startswith("gke"))
    assert run.sharing_from(run.render(overlay)) == "time-slicing" == sharing.DEFAULT_MODE
    assert set(SHARINGS) == set(sharing.MODES), "every sharing a plan can have is simulated"
    header = simulated_header(monkeypatch, capsys, "--overlay", str(overlay), "--sharing", "mps")
    assert header.startswith("sharing mps (--sharing)"), header
