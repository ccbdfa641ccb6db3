"""Print the capacity table: a few days on L4 units, simulated (sim.py).

    uv run python bench/capacity/run.py [--overlay deploy/k8s/overlays/gke-l4] [--measured FILE]
        [--sharing time-slicing|mps]

The scaling policy and the plan's sharing (COHOST_SHARING in the plan's ConfigMap) are read
from the rendered overlay (`kubectl kustomize`), the per-GPU numbers from measured.toml;
--sharing simulates the other sharing for comparison. The output is committed in
bench/capacity/README.md.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from cohost.k8s.render import PLAN_CONFIGMAP
from cohost.plan import envfile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.capacity.shares import SHARINGS, shares
from bench.capacity.sim import (
    MEASURED,
    Burst,
    Policy,
    Scenario,
    engines,
    load_measured,
    simulate,
    with_burst_max,
)

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3600.0


def render(overlay: Path) -> list[dict[str, Any]]:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


def policy_from(docs: list[dict[str, Any]]) -> Policy:
    scaled = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    return Policy.from_scaled_objects(scaled)


def sharing_from(docs: list[dict[str, Any]]) -> str:
    """The plan's sharing as the units get it: COHOST_SHARING in the plan's ConfigMap."""
    (plan,) = (
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == PLAN_CONFIGMAP
    )
    return envfile.sharing_of(plan["data"])


def ramp(start: float, end: float, from_s: float, to_s: float) -> Callable[[float], float]:
    def chats(t: float) -> float:
        if t <= from_s:
            return start
        if t >= to_s:
            return end
        return start + (end - start) * (t - from_s) / (to_s - from_s)

    return chats


# t = 0 is 08:00; the day runs to 13:00.
SCENARIOS = [
    Scenario("50 chats + 100k feedback at 9:00", 5, lambda t: 50, (Burst(HOUR, 100_000),)),
    Scenario("same, warm caches", 5, lambda t: 50, (Burst(HOUR, 100_000),), warm_caches=True),
    Scenario(
        "same, up to 16 burst units",
        5,
        lambda t: 50,
        (Burst(HOUR, 100_000),),
        policy_change=with_burst_max(16),
    ),
    Scenario("5 chats + 10k feedback at 9:00", 5, lambda t: 5, (Burst(HOUR, 10_000),)),
    Scenario(
        "chat 20 -> 150 (9-10h) + 30k over 9:30-10:30",
        5,
        ramp(20, 150, HOUR, 2 * HOUR),
        (Burst(1.5 * HOUR, 30_000, over_s=HOUR),),
    ),
    Scenario(
        "same ramp, warm caches",
        5,
        ramp(20, 150, HOUR, 2 * HOUR),
        (Burst(1.5 * HOUR, 30_000, over_s=HOUR),),
        warm_caches=True,
    ),
    Scenario("50 chats, no feedback", 5, lambda t: 50),
]


def fmt_minutes(seconds: float | None) -> str:
    return "not drained" if seconds is None else f"{seconds / 60:.0f} min"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overlay", type=Path, default=ROOT / "deploy/k8s/overlays/gke-l4")
    parser.add_argument("--measured", type=Path, default=MEASURED)
    parser.add_argument(
        "--sharing", choices=SHARINGS, help="instead of the overlay's plan's (for comparison)"
    )
    args = parser.parse_args()
    m = load_measured(args.measured)
    docs = render(args.overlay)
    policy = policy_from(docs)
    sharing: str = args.sharing or sharing_from(docs)
    source = "--sharing" if args.sharing else "the overlay's plan"
    chat_engine, feedback_engine = engines(m)
    gpu = m["gpu"]
    rate = feedback_engine.requests_per_s(gpu)
    sh = shares(m, sharing)
    print(
        f"L4 estimates: chat TPOT {1000 * chat_engine.step_s(1, gpu):.0f} ms alone, "
        f"{1000 * chat_engine.step_s(chat_engine.max_num_seqs, gpu):.0f} ms at "
        f"{chat_engine.max_num_seqs} in flight; feedback {rate:.1f} requests/s per unit on the "
        f"whole GPU ({rate * m['feedback']['output_tokens']:,.0f} tokens/s)"
    )
    print(
        f"sharing {sharing} ({source}), H200 ratios from the {sh.measured}: feedback keeps "
        f"{sh.alone:.0%} on a unit without chat ({rate * sh.alone:.1f}/s), {sh.idle:.0%} in chat's "
        f"idle time ({rate * sh.idle:.1f}/s), {sh.busy:.0%} beside busy chat "
        f"({rate * sh.busy:.2f}/s); chat TPOT x{sh.chat_slowdown:.2f} while feedback has work"
    )
    print(
        f"policy ({args.overlay.relative_to(ROOT) if args.overlay.is_relative_to(ROOT) else args.overlay}): "
        f"chat units {policy.chat.min_units}-{policy.chat.max_units} at {policy.chat.threshold:g} "
        f"in flight each; burst units {policy.burst.min_units}-{policy.burst.max_units} at "
        f"{policy.burst.threshold:g} backlog each, activation {policy.burst.activation:g}\n"
    )
    print(
        "| scenario | chat units | burst units (peak) | backlog drained after | chat holds "
        "(worst TPOT, time queued) | GPU-hours | GPU-h per 1M feedback |"
    )
    print("|---|---|---|---|---|---|---|")
    for scenario in SCENARIOS:
        r = simulate(scenario, policy, sharing, m)
        base = simulate(scenario.without_feedback(), policy, sharing, m)
        per_million = (
            (r.gpu_hours - base.gpu_hours) / r.feedback_total * 1e6
            if r.feedback_total
            else math.nan
        )
        holds = (
            "yes"
            if r.queued_chat_s == 0 and r.worst_tpot_ms <= m["chat"]["tpot_target_ms"]
            else "NO"
        )
        print(
            f"| {scenario.name} | {r.chat_units[0]}-{r.chat_units[1]} | {r.burst_peak} | "
            f"{fmt_minutes(r.drained_after_s) if r.feedback_total else '-'} | "
            f"{holds} ({r.worst_tpot_ms:.0f} ms, {r.queued_chat_s / 60:.0f} min) | "
            f"{r.gpu_hours:.1f} | {'-' if math.isnan(per_million) else f'{per_million:.1f}'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
