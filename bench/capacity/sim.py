"""Capacity and autoscaling of cohost units on GPUs, simulated in 5-second steps.

Inputs: measured.toml (per-GPU numbers, start times, metric lag; each with its source), the
scaling policy as the rendered overlay gives it to KEDA (`Policy.from_scaled_objects`) and
the plan's sharing (COHOST_SHARING, which picks measured.toml's table of that name).
A scenario is a chat load curve and feedback arrivals; the result says how many units ran,
when the backlog was drained, whether chat latency held and what it cost in GPU-hours.

The model, in the order a step applies it:
- chat: sessions x duty cycle = requests in flight, spread evenly over ready chat units;
  while there is feedback to do, the chat units' chatbots step slower by the measured
  ratio of the plan's sharing (`Shares.chat_slowdown`);
- feedback: each ready unit drains at its engine's rate on the whole GPU, scaled by the
  share it keeps under the plan's sharing (shares.py): a chat unit's while its chatbot is
  busy (with probability 1 - exp(-in flight per unit)) or idle, a burst unit's (no chat);
- KEDA: every polling interval, desired units = ceil(metric / threshold) within
  min/max, the metric as it was `lag` seconds ago (Pub/Sub: sampled each minute, visible
  up to two minutes later, read as the maximum over 3 minutes); scale-up at once,
  scale-down one unit per policy period after the stabilization window; burst units go to
  zero after the cooldown at or below the activation threshold;
- a new unit takes an idle GPU node if one is left (image cached), else provisions one;
  then its two servers start one after the other. Nodes are billed from provisioning until
  the cluster autoscaler removes them, `node_scale_down_delay_s` after they empty.
"""

from __future__ import annotations

import math
import tomllib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.capacity.shares import shares

STEP_S = 5.0
HERE = Path(__file__).resolve().parent
MEASURED = HERE / "measured.toml"


def load_measured(path: Path = MEASURED) -> dict[str, dict[str, float]]:
    data: dict[str, dict[str, float]] = tomllib.loads(path.read_text())
    return data


# ---------------------------------------------------------------- per-GPU numbers


@dataclass(frozen=True)
class Engine:
    """One engine on an L4, estimated from its H200 measurement (docs/kubernetes.md)."""

    weights_bytes: float
    kv_bytes_per_token: float
    max_num_seqs: int
    parameters: float
    prompt_tokens: float
    output_tokens: float
    h200_step_s: float  # measured decode step at the measured batch

    def step_s(self, seqs: float, gpu: Mapping[str, float]) -> float:
        """Decode step on an L4 with `seqs` sequences: every weight and every running
        sequence's KV cache read once, at the achieved fraction of the L4's bandwidth;
        never faster than the step measured on the H200."""
        context = self.prompt_tokens + self.output_tokens / 2
        read = self.weights_bytes + seqs * context * self.kv_bytes_per_token
        bandwidth = gpu["l4_bandwidth_gb_s"] * 1e9 * gpu["achieved_bandwidth_fraction"]
        return max(self.h200_step_s, read / bandwidth)

    def prefill_s(self, gpu: Mapping[str, float]) -> float:
        flops = 2 * self.parameters * self.prompt_tokens
        return flops / (gpu["l4_tensor_tflops"] * 1e12 * gpu["prefill_mfu"])

    def requests_per_s(self, gpu: Mapping[str, float]) -> float:
        """Throughput with max_num_seqs in flight: each request costs its share of the
        batch's decode steps plus its own prefill (which stalls the batch)."""
        seqs = self.max_num_seqs
        per_request = self.output_tokens * self.step_s(seqs, gpu) / seqs + self.prefill_s(gpu)
        return 1.0 / per_request


def engines(m: Mapping[str, Mapping[str, float]]) -> tuple[Engine, Engine]:
    chat, feedback = m["chat"], m["feedback"]
    chat_engine = Engine(
        chat["weights_bytes"], chat["kv_bytes_per_token"], int(chat["max_num_seqs"]),
        chat["parameters"], chat["prompt_tokens"], chat["output_tokens"],
        h200_step_s=chat["h200_tpot_ms"] / 1000,
    )  # fmt: skip
    feedback_engine = Engine(
        feedback["weights_bytes"], feedback["kv_bytes_per_token"],
        int(feedback["max_num_seqs"]), feedback["parameters"], feedback["prompt_tokens"],
        feedback["output_tokens"],
        h200_step_s=feedback["max_num_seqs"] / feedback["h200_tokens_per_s"],
    )  # fmt: skip
    return chat_engine, feedback_engine


# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class Scaler:
    min_units: int
    max_units: int
    threshold: float
    activation: float
    polling_s: float
    cooldown_s: float  # to zero (KEDA), when min is 0
    stabilization_s: float  # scale-down window (HPA)
    down_step: int  # units removed per down period (HPA policy)
    down_period_s: float


@dataclass(frozen=True)
class Policy:
    chat: Scaler
    burst: Scaler

    @staticmethod
    def from_scaled_objects(objects: Mapping[str, Mapping[str, Any]]) -> Policy:
        """From the rendered ScaledObjects unit-chat and unit-burst, with KEDA's and the
        HPA's defaults where a field is left out."""

        def scaler(so: Mapping[str, Any]) -> Scaler:
            spec = so["spec"]
            trigger = spec["triggers"][0]["metadata"]
            hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
            down = hpa.get("behavior", {}).get("scaleDown", {})
            # The HPA's default scale-down: up to 100 % of the units every 15 s.
            default: list[dict[str, Any]] = [{"type": "Percent", "value": 100, "periodSeconds": 15}]
            policies = down.get("policies") or default
            step = policies[0]["value"] if policies[0]["type"] == "Pods" else 10**6
            return Scaler(
                min_units=int(spec.get("minReplicaCount", 0)),
                max_units=int(spec.get("maxReplicaCount", 100)),
                threshold=float(trigger["threshold"]),
                activation=float(trigger.get("activationThreshold", 0)),
                polling_s=float(spec.get("pollingInterval", 30)),
                cooldown_s=float(spec.get("cooldownPeriod", 300)),
                stabilization_s=float(down.get("stabilizationWindowSeconds", 300)),
                down_step=int(step),
                down_period_s=float(policies[0]["periodSeconds"]),
            )

        return Policy(chat=scaler(objects["unit-chat"]), burst=scaler(objects["unit-burst"]))


# ---------------------------------------------------------------- scenario and result


@dataclass(frozen=True)
class Burst:
    at_s: float  # seconds after the start of the scenario
    requests: float
    over_s: float = 0.0  # published evenly over this long (0: all at once)

    def arriving(self, t: float, dt: float) -> float:
        if self.over_s <= 0:
            return self.requests if t <= self.at_s < t + dt else 0.0
        overlap = min(t + dt, self.at_s + self.over_s) - max(t, self.at_s)
        return self.requests * max(0.0, overlap) / self.over_s


@dataclass(frozen=True)
class Scenario:
    name: str
    hours: float
    chats: Callable[[float], float]  # concurrent chat sessions at t seconds
    bursts: tuple[Burst, ...] = ()
    warm_caches: bool = False  # models, compile cache and image kept across Pods
    policy_change: Callable[[Policy], Policy] | None = None

    def without_feedback(self) -> Scenario:
        return replace(self, bursts=())


@dataclass
class Result:
    scenario: str
    chat_units: tuple[int, int] = (0, 0)  # min, max ready
    burst_peak: int = 0
    feedback_total: float = 0.0
    # From the first arrival to an empty backlog once the last request is published.
    drained_after_s: float | None = None
    worst_tpot_ms: float = 0.0
    queued_chat_s: float = 0.0  # seconds in which chat requests waited for a slot
    gpu_hours: float = 0.0
    unit_start_s: float = 0.0
    burst_rate: float = 0.0  # feedback requests/s of one burst unit


@dataclass
class _Unit:
    ready_at: float


@dataclass
class _Node:
    since: float
    idle_since: float | None = None


class _Pool:
    """One Deployment's units and the GPU nodes under them."""

    def __init__(
        self, scaler: Scaler, start_s: float, m: Mapping[str, Mapping[str, float]]
    ) -> None:
        self.scaler = scaler
        self.units: list[_Unit] = []
        self.nodes: list[_Node] = []
        self.start_s = start_s
        self.m = m
        self.desired = scaler.min_units
        self.last_poll = -math.inf
        self.last_down = -math.inf
        self.above_since = 0.0  # last time the metric was above activation (cooldown)
        self.recommendations: deque[tuple[float, int]] = deque()

    def ready(self, t: float) -> int:
        return sum(1 for u in self.units if u.ready_at <= t)

    def poll(self, t: float, metric: float) -> None:
        s = self.scaler
        if t - self.last_poll < s.polling_s:
            return
        self.last_poll = t
        if metric > s.activation:
            self.above_since = t
        want = math.ceil(metric / s.threshold) if metric > 0 else 0
        if s.min_units == 0 and metric <= s.activation:
            want = len(self.units) if t - self.above_since < s.cooldown_s else 0
        want = max(s.min_units, min(s.max_units, max(want, 1 if metric > s.activation else 0)))
        # HPA: scale down only to the highest recommendation of the stabilization window.
        self.recommendations.append((t, want))
        while self.recommendations and self.recommendations[0][0] < t - s.stabilization_s:
            self.recommendations.popleft()
        if want < len(self.units):
            floor = max(r for _, r in self.recommendations)
            if s.min_units == 0 and want == 0 and t - self.above_since >= s.cooldown_s:
                floor = 0  # KEDA's own scale to zero after the cooldown
            if floor < len(self.units) and t - self.last_down >= s.down_period_s:
                want = max(floor, len(self.units) - s.down_step)
                self.last_down = t
            else:
                want = len(self.units)
        self.desired = want

    def act(self, t: float) -> None:
        start = self.m["start"]
        while len(self.units) < self.desired:
            idle = next((n for n in self.nodes if n.idle_since is not None), None)
            if idle is not None:
                idle.idle_since = None
                self.units.append(_Unit(t + self.start_s))
            else:
                self.nodes.append(_Node(since=t))
                delay = start["node_provision_s"] + start["image_pull_s"]
                self.units.append(_Unit(t + delay + self.start_s))
        while len(self.units) > self.desired:
            # The youngest (possibly not yet ready) unit goes first.
            self.units.sort(key=lambda u: u.ready_at)
            self.units.pop()
            busy = next(n for n in self.nodes if n.idle_since is None)
            busy.idle_since = t
        delay = start["node_scale_down_delay_s"]
        self.nodes = [n for n in self.nodes if n.idle_since is None or t - n.idle_since < delay]

    def gpu_seconds(self, dt: float) -> float:
        return len(self.nodes) * dt


def unit_start_s(m: Mapping[str, Mapping[str, float]], warm: bool) -> float:
    """Both servers of a unit, one after the other, on a node that has the image."""
    start = m["start"]
    if warm:
        return start["servers_warm_s"]
    return start["model_download_s"] + start["servers_cold_s"]


def _duty(
    engine: Engine, step_s: float, chat: Mapping[str, float], gpu: Mapping[str, float]
) -> float:
    """Share of a session's time with a request in flight: answer, then think."""
    generate_s = chat["output_tokens"] * step_s + engine.prefill_s(gpu)
    return generate_s / (generate_s + chat["think_time_s"])


def simulate(
    scenario: Scenario,
    policy: Policy,
    sharing: str,
    m: Mapping[str, Mapping[str, float]] | None = None,
) -> Result:
    m = m or load_measured()
    if scenario.policy_change is not None:
        policy = scenario.policy_change(policy)
    gpu, chat_cfg, lag = m["gpu"], m["chat"], m["metrics"]
    chat_engine, feedback_engine = engines(m)
    sh = shares(m, sharing)
    whole_rate = feedback_engine.requests_per_s(gpu)
    burst_rate = whole_rate * sh.alone  # a unit without chat: all a burst unit ever is
    start_s = unit_start_s(m, scenario.warm_caches)
    chat_pool = _Pool(policy.chat, start_s, m)
    burst_pool = _Pool(policy.burst, start_s, m)
    # The day starts in steady state: the chat units its first load asks for are up.
    chat_engine_full = chat_engine.step_s(chat_engine.max_num_seqs, gpu)
    first = scenario.chats(0) * _duty(chat_engine, chat_engine_full, chat_cfg, gpu)
    initial = max(policy.chat.min_units, math.ceil(first / policy.chat.threshold))
    initial = min(policy.chat.max_units, initial)
    chat_pool.desired = initial
    for _ in range(initial):
        chat_pool.units.append(_Unit(0.0))
        chat_pool.nodes.append(_Node(since=0.0))

    result = Result(scenario.name, unit_start_s=start_s, burst_rate=burst_rate)
    backlog = 0.0
    samples: deque[tuple[float, float]] = deque()
    chat_history: deque[tuple[float, float]] = deque()
    first_burst = min((b.at_s for b in scenario.bursts), default=None)
    # Drained: nothing left once the last request of every burst has been published.
    last_arrival = max((b.at_s + b.over_s for b in scenario.bursts), default=0.0)
    gpu_s = 0.0
    ready_chat_range = [10**9, 0]
    t = 0.0
    end = scenario.hours * 3600
    while t < end:
        # Chat: requests in flight, with the TPOT of a full batch as the generation speed.
        in_flight = scenario.chats(t) * _duty(chat_engine, chat_engine_full, chat_cfg, gpu)
        ready_chat = chat_pool.ready(t)
        low, high = ready_chat_range
        ready_chat_range = [min(low, ready_chat), max(high, ready_chat)]
        per_unit = in_flight / ready_chat if ready_chat else math.inf
        if per_unit > chat_engine.max_num_seqs:
            result.queued_chat_s += STEP_S
        running = min(per_unit, chat_engine.max_num_seqs)
        arrived = sum(b.arriving(t, STEP_S) for b in scenario.bursts)
        backlog += arrived
        result.feedback_total += arrived
        if in_flight > 0 and ready_chat:
            # Beside a busy feedback engine (there is a backlog) chat steps slower.
            slowdown = sh.chat_slowdown if backlog else 1.0
            tpot_ms = 1000 * chat_engine.step_s(running, gpu) * slowdown
            result.worst_tpot_ms = max(result.worst_tpot_ms, tpot_ms)

        # Feedback: a chat unit keeps the busy share while its chatbot has requests.
        chat_share = sh.chat_unit(per_unit) if ready_chat else 0.0
        rate = whole_rate * (ready_chat * chat_share + burst_pool.ready(t) * sh.alone)
        backlog = max(0.0, backlog - rate * STEP_S)
        published = first_burst is not None and t + STEP_S > last_arrival
        if published and result.drained_after_s is None and backlog < 1:
            assert first_burst is not None
            result.drained_after_s = t + STEP_S - first_burst

        # What KEDA reads: Pub/Sub's backlog as sampled each minute and visible up to two
        # minutes later, as the max over 3 minutes; chat load after its scrape lag.
        sample_t = math.floor(t / lag["pubsub_sample_s"]) * lag["pubsub_sample_s"]
        if not samples or samples[-1][0] != sample_t:
            samples.append((sample_t, backlog))
        while samples[0][0] < t - 600:
            samples.popleft()
        visible = [b for s, b in samples if t - 180 <= s <= t - lag["pubsub_visible_after_s"]]
        backlog_metric = max(visible) if visible else 0.0
        chat_history.append((t, in_flight))
        while chat_history[0][0] < t - lag["chat_metric_lag_s"]:
            chat_history.popleft()
        chat_metric = chat_history[0][1]

        chat_pool.poll(t, chat_metric)
        burst_pool.poll(t, backlog_metric)
        chat_pool.act(t)
        burst_pool.act(t)
        gpu_s += chat_pool.gpu_seconds(STEP_S) + burst_pool.gpu_seconds(STEP_S)
        result.burst_peak = max(result.burst_peak, len(burst_pool.units))
        t += STEP_S
    result.chat_units = (ready_chat_range[0], ready_chat_range[1])
    result.gpu_hours = gpu_s / 3600
    return result


def with_burst_max(units: int) -> Callable[[Policy], Policy]:
    def change(policy: Policy) -> Policy:
        return replace(policy, burst=replace(policy.burst, max_units=units))

    return change
