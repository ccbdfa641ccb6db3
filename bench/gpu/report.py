"""Tables from the recorded GPU runs: planner vs vLLM vs nvidia-smi, trials, sharing.

    uv run python bench/gpu/report.py calibration|trials|sharing

Reads deploy/calibration/ and bench/gpu/results/; prints Markdown. The numbers in
docs/calibration.md and bench/gpu/results/README.md are this script's output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for sub in ("ops/src", "shared/src"):
    sys.path.insert(0, str(ROOT / sub))

from cohost import gpus  # noqa: E402
from cohost.plan import ServiceSpec, envfile, fit  # noqa: E402
from cohost.units import GIB, MIB  # noqa: E402

RESULTS = ROOT / "bench" / "gpu" / "results"


def pct(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured * 100:+.1f}%"


def calibration() -> None:
    h100 = gpus.by_name("H100-80GB")
    print(
        "| run | weights GiB pred/vLLM | peak act. GiB pred/vLLM | non-torch | CUDA graphs "
        "GiB pred/vLLM | KV tokens pred / vLLM | process MiB pred / nvidia-smi |"
    )
    print("|---|---|---|---|---|---|---|")
    for line in (
        (ROOT / "deploy" / "calibration" / "h100-2026-11-22.jsonl").read_text().splitlines()
    ):
        run = json.loads(line)
        v = run["vllm"]
        spec = ServiceSpec(
            "svc", str(ROOT / "deploy" / "calibration" / "models" / run["arch"]),
            max_model_len=run["max_model_len"], max_num_seqs=run["max_num_seqs"],
            max_num_batched_tokens=run["max_num_batched_tokens"], util=run["util"],
        )  # fmt: skip
        s = fit(h100, [spec], mode="time-slicing").services[0]
        fp = s.footprint
        smi = run.get("nvidia_smi_mib")
        process = (
            f"{fp.process / MIB:,.0f} / {smi:,} ({pct(fp.process / MIB, smi)})" if smi else
            f"{fp.process / MIB:,.0f} / not read"
        )  # fmt: skip
        print(
            f"| {run['case']} | {fp.weights / GIB:.2f} / {v['weights_gib']} "
            f"| {fp.activation_peak / GIB:.2f} / {v['peak_activation_gib']} "
            f"| {fp.non_torch / GIB:.2f} / {v['non_torch_gib']} "
            f"| {fp.cuda_graphs / GIB:.2f} / {v['cuda_graph_gib']} "
            f"| {s.kv_cache_tokens:,} / {v['kv_cache_tokens']:,} "
            f"({pct(s.kv_cache_tokens, v['kv_cache_tokens'])}) | {process} |"
        )


def trials() -> None:
    print(
        "| profile | trial | machine | both healthy | order (gate wait s) | healthy after s "
        "| chatbot MiB plan / smi | feedback MiB plan / smi | KV tokens chat / feedback |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for line in (RESULTS / "trials-2026-11-22.jsonl").read_text().splitlines():
        run = json.loads(line)
        plan = envfile.read(RESULTS / "plans-2026-11-22" / Path(run["plan"]).name)
        profile = Path(run["plan"]).stem
        machine = "H100" if "h100" in run["machine"] else f"H200 #{run['gpu']}"
        if not run["both_healthy"]:
            why = "chatbot: vLLM import error (loguru missing on the host)"
            print(f"| {profile} | {run['trial']} | {machine} | no: {why} | | | | | |")
            continue
        events = {n: run[n]["launcher"] for n in ("chatbot", "feedback")}
        order = sorted(events, key=lambda n: events[n]["exec_at"])
        cells = []
        for n in ("chatbot", "feedback"):
            planned = int(plan[envfile.prefix(n) + "EXPECTED_PROCESS_BYTES"]) / MIB
            smi = run["nvidia_smi_mib"][n]
            cells.append(f"{planned:,.0f} / {smi:,} ({pct(planned, smi)})")
        kv = " / ".join(f"{run[n]['vllm']['kv_cache_tokens']:,}" for n in ("chatbot", "feedback"))
        waits = ", ".join(f"{n} {events[n]['gate_wait_s']:.0f}" for n in order)
        healthy = ", ".join(f"{n} {run['healthy_s'][n]:.0f}" for n in order)
        print(
            f"| {profile} | {run['trial']} | {machine} | yes | {' then '.join(order)} ({waits}) "
            f"| {healthy} | {cells[0]} | {cells[1]} | {kv} |"
        )


def sharing() -> None:
    for name in ("sharing-l4-h200", "sharing-rtx5090-h200", "sharing-rtx5090-h100-diagnostic"):
        data = json.loads((RESULTS / f"{name}.json").read_text())
        phases = {p["phase"]: p for p in data["phases"]}
        args = data["args"]
        print(
            f"\n**{name}** (4 chat users x {args['chat_prompt_tokens']}-token prompts, "
            f"{args['chat_max_tokens']} tokens out; feedback {args['feedback_in_flight']} in "
            f"flight x {args['feedback_prompt_tokens']} in / {args['feedback_max_tokens']} out; "
            f"chat-first floor {args['busy_in_flight']}; {args['duration']:.0f} s per phase)\n"
        )
        print(
            "| phase | chat TTFT p50 / p99 ms | chat TPOT p50 / p99 ms | feedback req/s | feedback tok/s |"
        )
        print("|---|---|---|---|---|")
        for phase in (
            "chat_alone",
            "feedback_alone",
            "raw_sharing",
            "chat_first",
            "chat_first_idle",
        ):
            if phase not in phases:
                continue
            p = phases[phase]
            chat, fb = p.get("chat"), p.get("feedback")
            ttft = f"{chat['ttft_ms_p50']:.1f} / {chat['ttft_ms_p99']:.1f}" if chat else ""
            tpot = f"{chat['tpot_ms_p50']:.2f} / {chat['tpot_ms_p99']:.2f}" if chat else ""
            req = f"{fb['requests_per_s']:.1f}" if fb else ""
            tok = f"{fb['tokens_per_s']:,.0f}" if fb else ""
            print(f"| {phase} | {ttft} | {tpot} | {req} | {tok} |")
        if {"chat_alone", "raw_sharing", "chat_first", "feedback_alone"} <= phases.keys():
            alone = phases["chat_alone"]["chat"]["tpot_ms_p50"]
            solo = phases["feedback_alone"]["feedback"]["requests_per_s"]
            print(
                f"\nchat TPOT p50 vs alone: raw x{phases['raw_sharing']['chat']['tpot_ms_p50'] / alone:.2f}, "
                f"chat-first x{phases['chat_first']['chat']['tpot_ms_p50'] / alone:.2f} (goal <= 1.2); "
                f"feedback while chat busy vs standalone: raw "
                f"{phases['raw_sharing']['feedback']['requests_per_s'] / solo:.0%}, chat-first "
                f"{phases['chat_first']['feedback']['requests_per_s'] / solo:.0%} (goal >= 50%); "
                f"chat-first while chat idle "
                f"{phases['chat_first_idle']['feedback']['requests_per_s'] / solo:.0%} (goal >= 95%)"
            )


if __name__ == "__main__":
    {"calibration": calibration, "trials": trials, "sharing": sharing}[sys.argv[1]]()
