"""The capacity simulator's logic (bench/capacity/sim.py), on cases with known answers."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest

from bench.capacity import run
from bench.capacity.sim import (
    Burst,
    Policy,
    Scaler,
    Scenario,
    chat_slowdown,
    engines,
    feedback_shares,
    load_measured,
    simulate,
)
from tests.k8sfiles import OVERLAYS, kustomize

MEASURED = load_measured()


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


@pytest.mark.parametrize("units", [1, 4])
def test_backlog_drains_at_the_units_rate(units: int) -> None:
    m = instant(MEASURED)
    m["feedback"]["h200_mps_tokens_per_s_chat_busy"] = 0.0  # no chat here: unused
    requests = 20_000.0
    result = simulate(Scenario("drain", 3, lambda t: 0, (Burst(600, requests),)), policy(units), m)
    assert result.burst_peak == units
    rate = result.burst_rate * units
    # An idle chat unit drains too (its chatbot takes no traffic): units + 1 engines.
    expected = requests / (rate + result.burst_rate)
    assert result.drained_after_s == pytest.approx(expected, abs=30)


def test_burst_units_go_back_to_zero_and_their_nodes_are_released() -> None:
    m = instant(MEASURED)
    short = simulate(Scenario("a", 2, lambda t: 0, (Burst(600, 5_000),)), policy(2), m)
    long = simulate(Scenario("a", 6, lambda t: 0, (Burst(600, 5_000),)), policy(2), m)
    # After the burst only the chat unit's node is billed: 4 more hours cost 4 GPU-hours.
    assert long.gpu_hours - short.gpu_hours == pytest.approx(4.0, abs=0.01)


def test_metric_lag_and_start_time_delay_the_drain() -> None:
    p = policy(4)
    scenario = Scenario("lag", 4, lambda t: 0, (Burst(600, 50_000),))
    fast = simulate(scenario, p, instant(MEASURED))
    real = simulate(scenario, p, MEASURED)
    assert real.drained_after_s is not None
    assert fast.drained_after_s is not None
    start = MEASURED["start"]
    delay = real.unit_start_s + start["node_provision_s"] + start["image_pull_s"]
    # Meanwhile the idle chat unit drains alone, at 1/5 of what the five engines do later.
    assert real.drained_after_s - fast.drained_after_s >= delay * 4 / 5


def test_shares_are_the_measured_mps_throughput_over_the_whole_gpu() -> None:
    busy, idle = feedback_shares(MEASURED)
    fb = MEASURED["feedback"]
    assert busy == fb["h200_mps_tokens_per_s_chat_busy"] / fb["h200_tokens_per_s"]
    assert idle == fb["h200_mps_tokens_per_s_chat_idle"] / fb["h200_tokens_per_s"]
    assert 0 < busy < idle <= 1
    _, feedback = engines(MEASURED)
    result = simulate(Scenario("idle", 0.1, lambda t: 0), policy(0), instant(MEASURED))
    # A unit whose chatbot is idle drains at the idle share of the engine's whole-GPU rate.
    assert result.burst_rate == pytest.approx(feedback.requests_per_s(MEASURED["gpu"]) * idle)


def test_busy_chat_units_drain_at_the_busy_share() -> None:
    """One chat unit, no burst units: with its chatbot always busy it drains at
    busy / idle of the rate it drains at with its chatbot idle."""
    m = instant(MEASURED)
    p = replace(policy(0), chat=Scaler(1, 1, 10**6, 0, 15, 300, 0, 1, 15))
    requests = 3_000.0
    idle = simulate(Scenario("idle", 4, lambda t: 0, (Burst(60, requests),)), p, m)
    busy = simulate(Scenario("busy", 4, lambda t: 400, (Burst(60, requests),)), p, m)
    assert idle.drained_after_s is not None
    assert busy.drained_after_s is not None
    busy_share, idle_share = feedback_shares(m)
    assert busy.drained_after_s / idle.drained_after_s == pytest.approx(
        idle_share / busy_share, rel=0.02
    )


def test_chat_slows_by_the_measured_ratio_while_feedback_runs() -> None:
    m = instant(MEASURED)
    p = policy(0)
    quiet = simulate(Scenario("quiet", 1, lambda t: 10), p, m)
    shared = simulate(Scenario("shared", 1, lambda t: 10, (Burst(60, 50_000),)), p, m)
    assert shared.worst_tpot_ms == pytest.approx(quiet.worst_tpot_ms * chat_slowdown(m))
    assert chat_slowdown(m) > 1


def test_chat_queues_when_units_cannot_hold_the_load() -> None:
    m = instant(MEASURED)
    p = replace(policy(0), chat=Scaler(1, 1, 6, 0, 15, 300, 0, 1, 15))
    light = simulate(Scenario("light", 1, lambda t: 10), p, m)
    heavy = simulate(Scenario("heavy", 1, lambda t: 200), p, m)
    assert light.queued_chat_s == 0
    assert heavy.queued_chat_s == pytest.approx(3600, abs=10)
    assert heavy.worst_tpot_ms > light.worst_tpot_ms


def test_policy_is_the_rendered_overlays() -> None:
    overlay = next(o for o in OVERLAYS if o.name.startswith("gke"))
    scaled = {d["metadata"]["name"]: d for d in kustomize(overlay) if d["kind"] == "ScaledObject"}
    read = run.policy_from(overlay)
    assert read == Policy.from_scaled_objects(scaled)
    chat = scaled["unit-chat"]["spec"]
    assert read.chat.min_units == chat["minReplicaCount"] >= 1, "chat never scales to zero"
    assert read.burst.min_units == 0
    assert math.isfinite(read.burst.threshold)
