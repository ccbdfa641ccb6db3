"""Tables from the recorded GPU runs: planner vs vLLM vs nvidia-smi, trials, sharing.

    uv run python bench/gpu/report.py calibration|trials|sharing
    uv run python bench/gpu/report.py trace RUN_DIR...  # trace_run.py runs (results.jsonl)
    uv run python bench/gpu/report.py matrix RUN_DIR... # one line per setting, latest run

Reads deploy/calibration/ and bench/gpu/results/; prints Markdown. The numbers in
docs/calibration.md and docs/sharing.md are this script's output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The repository root too: the trace tables read raw timelines with bench/'s code.
for sub in ("", "ops/src", "shared/src"):
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


RUN = RESULTS / "sharing-2026-11-29"


def _phase_row(label: str, p: dict[str, Any]) -> str:
    chat, fb = p.get("chat"), p.get("feedback")
    ttft = f"{chat['ttft_ms_p50']:.1f} / {chat['ttft_ms_p99']:.1f}" if chat else ""
    tpot = f"{chat['tpot_ms_p50']:.2f} / {chat['tpot_ms_p99']:.2f}" if chat else ""
    req = f"{fb['requests_per_s']:.1f}" if fb else ""
    tok = f"{fb['tokens_per_s']:,.0f}" if fb else ""
    return f"| {label} | {ttft} | {tpot} | {req} | {tok} |"


def sharing() -> None:
    """The 2026-11-29 run: phases per profile and sharing, the goals, faults, memory."""
    rows = [json.loads(line) for line in (RUN / "results.jsonl").read_text().splitlines()]
    for profile in ("l4", "rtx5090"):
        phases = {
            (r["sharing"], r["setting"], r["phase"]): r
            for r in rows
            if r["step"] == "phase" and r["profile"] == profile
        }
        print(f"\n**{profile}** (H200 held to the card's memory)\n")
        print("| sharing, phase | chat TTFT p50 / p99 ms | chat TPOT p50 / p99 ms "
              "| feedback req/s | feedback tok/s |")  # fmt: skip
        print("|---|---|---|---|---|")
        for (mode, setting, name), r in phases.items():
            label = f"{mode}, {name}" + ("" if setting == "planned" else f" ({setting})")
            print(_phase_row(label, r))
        alone = phases[("time-slicing", "planned", "chat_alone")]["chat"]
        solo = phases[("time-slicing", "planned", "feedback_alone")]["feedback"]["tokens_per_s"]
        print(
            f"\nAgainst chat alone without MPS (TPOT p50 {alone['tpot_ms_p50']:.2f} ms, TTFT p99 "
            f"{alone['ttft_ms_p99']:.1f} ms) and feedback alone without MPS ({solo:,.0f} tok/s):\n"
        )
        print("| sharing | chat TPOT p50 while feedback runs (goal <= 1.2x) | chat TTFT p99 "
              "(goal <= 1.5x) | feedback while chat busy (goal >= 50%) | feedback while chat "
              "idle (goal >= 95%) |")  # fmt: skip
        print("|---|---|---|---|---|")
        for mode in ("time-slicing", "mps"):
            both = phases[(mode, "planned", "raw_sharing")]
            # Chat idle: feedback with chat-first on and no chat; where that phase was not
            # run (time-slicing on the second profile), feedback alone is the baseline itself.
            idle = phases.get((mode, "planned", "chat_first_idle"))
            idle_cell = (
                f"{idle['feedback']['tokens_per_s'] / solo:.0%}" if idle else "(the baseline)"
            )
            print(
                f"| {mode} | x{both['chat']['tpot_ms_p50'] / alone['tpot_ms_p50']:.2f} "
                f"| x{both['chat']['ttft_ms_p99'] / alone['ttft_ms_p99']:.2f} "
                f"| {both['feedback']['tokens_per_s'] / solo:.0%} | {idle_cell} |"
            )
    print("\n**Faults** (l4, MPS, chat and feedback load running)\n")
    print("| fault | engines | back after | chat errors (window) | chat TPOT p50 during | "
          "feedback requests answered / lost |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["step"] not in ("feedback-kill", "mps-kill"):
            continue
        fb = r["feedback"]
        if r["step"] == "feedback-kill":
            what, engines = "feedback engine SIGKILL", "feedback restarted by its launcher"
            back = f"{r['restarted_healthy_s']:.0f} s"
        else:
            what = "MPS server SIGKILL"
            hung = ", ".join(r["engines_hung_then_killed"]) or "none"
            engines = f"exited: {', '.join(r['engines_exited']) or 'none'}; hung: {hung}"
            back = ", ".join(f"{k} {v:.0f} s" for k, v in r["restarted_healthy_s"].items())
        window = (
            f"{r['chat_error_count']} ({r['chat_errors_from_s']:.0f}-{r['chat_errors_until_s']:.0f} s)"
            if r["chat_error_count"] else "0"
        )  # fmt: skip
        print(
            f"| {what} | {engines} | {back} | {window} | {r['during']['tpot_ms_p50']:.2f} ms "
            f"| {fb['answered']:,} of {fb['requests']:,} / {fb['lost']} |"
        )
    print("\n**Memory** (nvidia-smi per server against the plan it ran with)\n")
    print(
        "| profile, sharing | server | plan MiB | nvidia-smi MiB | MPS cap MiB | started after s |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["step"] != "pair":
            continue
        name = (
            f"{r['profile']}.env" if r["sharing"] == "mps" else f"{r['profile']}-time-slicing.env"
        )
        plan = envfile.read(RUN / "plans" / name)
        for n in ("chatbot", "feedback"):
            p = envfile.prefix(n)
            cap = plan.get(p + "MPS_PINNED_MEMORY_BYTES")
            cap_cell = f"{int(cap) / MIB:,.0f} " if cap else "- "
            print(
                f"| {r['profile']}, {r['sharing']} | {n} "
                f"| {int(plan[p + 'EXPECTED_PROCESS_BYTES']) / MIB:,.0f} "
                f"| {r['nvidia_smi_mib'][n]:,} | {cap_cell}| {r['healthy_s'][n]:.0f} |"
            )


def trace(run_dirs: list[str], matrix: bool = False) -> None:
    """bench/gpu/trace_run.py's rows: chat against chat alone, feedback and its harvest;
    `matrix`: one line per setting, the latest of the runs (given oldest first)."""
    import trace_report

    paths = [Path(d) / "results.jsonl" for d in run_dirs]
    (trace_report.print_matrix if matrix else trace_report.print_tables)(paths)


if __name__ == "__main__":
    if sys.argv[1] in ("trace", "matrix"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        trace(sys.argv[2:], matrix=sys.argv[1] == "matrix")
    else:
        {"calibration": calibration, "trials": trials, "sharing": sharing}[sys.argv[1]]()
