"""The tables of a trace run (bench/gpu/trace_run.py): `report.py trace RUN_DIR` prints them;
`report.py matrix RUN_DIR...` one line per setting, the latest run's, over every run given.

Per profile and load: chat TTFT and TPOT p50/p99 under each sharing and preemption setting
against chat alone without MPS with the same arrivals (the card's own speed, the goals'
baseline), feedback tok/s, and the harvest: feedback tok/s over (feedback alone tok/s x the
chat-idle fraction that load leaves, measured with chat alone). Feedback alone is the same
pair's (under MPS, what its share makes). A harvest above 100% means feedback also made
progress while chat was busy, not only in its idle time.

Several runs (one per session, say; given oldest first) print as one: each row's baselines
come from its own run where it has them (the same machine), else from the latest run that
does (the code and plans nearest its own), which the matrix names: one setting measured
in two sessions differed 2x, so a borrowed baseline is a weaker comparison. A run's
machine (`host`, recorded by the runs after trace-2026-12-03e) prints first. Shared rows
with a timeline (bench/gpu/trace_timeline.py) get a line on where their feedback tokens
came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _rows(paths: list[Path]) -> list[dict[str, Any]]:
    return [{**json.loads(line), "run": i} for i, path in enumerate(paths)
            for line in path.read_text().splitlines() if line.strip()]  # fmt: skip


def _baseline(
    rows: list[dict[str, Any]], step: str, run: int | None = None, **match: Any
) -> dict[str, Any] | None:
    """Chat alone: without MPS (the goals' baseline: the card's own speed; a chatbot that is
    an MPS client is slower alone too), of `run` if it has one, else of the latest run that
    does; MPS only where no run has it without. Feedback alone (`match` names the sharing:
    under MPS, what its share makes): of `run`, else of the latest run that has one."""
    found = [r for r in rows if r["step"] == step and all(r.get(k) == v for k, v in match.items())]
    if step == "chat_alone":
        found.sort(key=lambda r: (r["sharing"] != "time-slicing", r["run"] != run, -r["run"]))
    else:
        found.sort(key=lambda r: (r["run"] != run, -r["run"], r["sharing"] != "time-slicing"))
    return found[0] if found else None


def _against(rows: list[dict[str, Any]], r: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """A row's baselines: chat alone (its `chat` numbers) and feedback alone tok/s under the
    row's sharing (None for rows without feedback alone, such as chat alone's own)."""
    alone, fb_alone = _alones(rows, r)
    solo = fb_alone["feedback"]["tokens_per_s"] if fb_alone else None
    return (alone["chat"] if alone else {}), solo


def _alones(
    rows: list[dict[str, Any]], r: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The chat alone and feedback alone rows a row is measured against."""
    alone = _baseline(rows, "chat_alone", r["run"], profile=r["profile"], load=r["load"])
    fb_alone = _baseline(
        rows, "feedback_alone", r["run"], profile=r["profile"], sharing=r["sharing"]
    )
    return alone, fb_alone


def _borrowed(rows: list[dict[str, Any]], r: dict[str, Any], paths: list[Path]) -> str:
    """Where a row's baselines come from other runs (other sessions, likely other machines),
    which: " (alone: RUN)"; "" where all are its own."""
    others = sorted({a["run"] for a in _alones(rows, r) if a and a["run"] != r["run"]})
    return f" (alone: {', '.join(_run_name(paths[i]) for i in others)})" if others else ""


def _harvest(r: dict[str, Any], solo: float | None, idle: float | None) -> str:
    fb = r.get("feedback")
    return f"{fb['tokens_per_s'] / (solo * idle):.0%}" if fb and solo and idle else "-"


def _preemption(r: dict[str, Any]) -> str:
    """A shared row's preemption: "on" is by abort (every run before pause mode was),
    "pause" holds the feedback engine; "on" runs of a worker without preemption had the
    older chat-first limit instead (the chat-metrics URL turned that on)."""
    if not r["preempt"]:
        return "off"
    if r.get("preempt_mode") == "pause":
        return "pause"
    return "on" if r["worker"]["has_preemption"] else "on (worker without preemption: chat-first)"


def _times(value: float, base: float | None) -> str:
    return f"x{value / base:.2f}" if base else "-"


def print_matrix(paths: list[Path]) -> None:
    """One line per plan, load, sharing and preemption: the latest run's (the runs given
    oldest first), as ratios to chat alone without MPS, with the run it came from and the
    runs its baselines came from where those are others."""
    rows = _rows(paths)
    latest: dict[tuple[str, float, str, str], dict[str, Any]] = {}
    for r in rows:
        if r["step"] == "shared" and "error" not in r:
            latest[(r["profile"], r["load"], r["sharing"], _preemption(r))] = r
    print("| plan | chat load | sharing | preemption | chat TTFT p50 / p99 | chat TPOT p50 / p99 "
          "| chat errors | feedback tok/s | harvest | run |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = {"pause": 0, "on": 1}
    for key in sorted(latest, key=lambda k: (k[0], k[1], k[2] != "time-slicing",
                                             order.get(k[3], 2), k[3])):  # fmt: skip
        r = latest[key]
        alone, solo = _against(rows, r)
        c = r["chat"]
        preempt = _preemption(r)
        ttft = " / ".join(_times(c[k], alone.get(k)) for k in ("ttft_ms_p50", "ttft_ms_p99"))
        tpot = " / ".join(_times(c[k], alone.get(k)) for k in ("tpot_ms_p50", "tpot_ms_p99"))
        print(
            f"| {r['profile']} | {r['load']:.0%} | {r['sharing']} | {preempt} | {ttft} | {tpot} "
            f"| {c['errors']} of {c['requests']} | {r['feedback']['tokens_per_s']:,.0f} "
            f"| {_harvest(r, solo, alone.get('idle_fraction'))} "
            f"| {_run_name(paths[r['run']])}{_borrowed(rows, r, paths)} |"
        )


def _run_name(results: Path) -> str:
    """trace-2026-12-03b, or trace-2026-12-03c/mps-rtx5090 for a run kept in a subfolder."""
    run = results.parent
    return run.name if run.name.startswith("trace-") else f"{run.parent.name}/{run.name}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    if not base:
        return f"{value:.1f}"
    return f"{value:.1f} ({_times(value, base)})"


def print_tables(paths: list[Path]) -> None:
    rows = _rows(paths)
    for r in rows:
        if r["step"] == "host":
            print(_host(r, _run_name(paths[r["run"]])))
    for r in rows:
        if "error" in r:
            print(f"- error in step {r['step']} ({r.get('profile')}, {r.get('sharing')}): "
                  f"{r['error'].strip().splitlines()[-1]}")  # fmt: skip
    for cap in (r for r in rows if r["step"] == "capacity"):
        print(f"\n{cap['profile']}: capacity {cap['requests_per_s']:.2f} requests/s "
              f"({cap['output_tokens_per_s']:,.0f} output tok/s, {cap['concurrency']} in "
              f"flight, {cap['sharing']})")  # fmt: skip
    profiles = sorted({r["profile"] for r in rows if r["step"] in ("shared", "chat_alone")})
    for profile in profiles:
        for r in rows:
            if r["step"] == "feedback_alone" and r["profile"] == profile:
                tok = r["feedback"]["tokens_per_s"]
                print(
                    f"\n{profile}: feedback alone, {r['sharing']} (run {r['run']}): {tok:,.0f} tok/s"
                )
        loads = sorted({r["load"] for r in rows if r.get("profile") == profile and "load" in r})
        for load in loads:
            first = _baseline(rows, "chat_alone", profile=profile, load=load)
            print(f"\n**{profile}, chat at {load:.0%} of capacity**"
                  + (f" ({first['chat']['requests']} requests)" if first else ""))  # fmt: skip
            print("| sharing | preemption | chat TTFT p50 / p99 ms | chat TPOT p50 / p99 ms "
                  "| chat errors | feedback tok/s | harvest |")  # fmt: skip
            print("|---|---|---|---|---|---|---|")
            notes = []
            for r in rows:
                if r.get("profile") != profile or r.get("load") != load:
                    continue
                if r["step"] not in ("chat_alone", "shared"):
                    continue
                a, solo = _against(rows, r)
                idle = a.get("idle_fraction")
                if r["step"] == "chat_alone":
                    label = (
                        f"chat alone ({r['sharing']}, chat-idle {r['chat']['idle_fraction']:.0%})"
                    )
                    print(_line(r, label, "-", a, None, None))
                else:
                    preempt = _preemption(r)
                    print(_line(r, r["sharing"], preempt, a, solo, idle))
                    if "timeline_summary" in r:
                        notes.append(_where(r, preempt, solo))
            if notes:
                print("\nWhere the feedback tokens came from (chat-idle gaps, client side):")
                print("\n".join(notes))
    faults = [r for r in rows if r["step"] == "fault" and "error" not in r]
    if faults:
        print("\n| profile, sharing | preemption | faulting process exit | engines "
              "| chat errors (window s) | feedback answered / lost |")  # fmt: skip
        print("|---|---|---|---|---|---|")
    for r in faults:
        engines = r.get("engines", {})
        back = ", ".join(
            f"{n}: exited {e['exited_after_s']} s, healthy {e.get('healthy_after_s')} s"
            for n, e in engines.items() if isinstance(e, dict) and "exited_after_s" in e
        ) or f"none exited (checked {engines.get('checked_for_s')} s)"  # fmt: skip
        window = (f"{r['chat_errors']} ({r['chat_errors_from_s']}-{r['chat_errors_until_s']})"
                  if r["chat_errors"] else "0")  # fmt: skip
        fb = r["feedback"]
        print(
            # Runs before 2026-12-04 faulted beside a worker without preemption.
            f"| {r['profile']}, {r['sharing']} | {r.get('preempt_mode') or 'off'} "
            f"| {r.get('faulter_exit')} | {back} | {window} "
            f"| {fb['answered']} of {fb['requests']} / {fb['lost']} |"
        )


def _line(
    r: dict[str, Any], label: str, preempt: str, alone: dict[str, Any], solo: float | None,
    idle: float | None,
) -> str:  # fmt: skip
    c = r["chat"]
    ttft = f"{_ratio(c['ttft_ms_p50'], alone.get('ttft_ms_p50'))} / {_ratio(c['ttft_ms_p99'], alone.get('ttft_ms_p99'))}"
    tpot = f"{_ratio(c['tpot_ms_p50'], alone.get('tpot_ms_p50'))} / {_ratio(c['tpot_ms_p99'], alone.get('tpot_ms_p99'))}"
    fb = r.get("feedback")
    tok = f"{fb['tokens_per_s']:,.0f}" if fb else "-"
    return f"| {label} | {preempt} | {ttft} | {tpot} | {c['errors']} of {c['requests']} | {tok} | {_harvest(r, solo, idle)} |"


def _where(r: dict[str, Any], preempt: str, solo: float | None) -> str:
    """One shared row's timeline summary as a sentence."""
    w = r["timeline_summary"]
    if "error" in w:
        return f"- {r['sharing']}, preemption {preempt}: {w['error']}"

    def p50(key: str) -> str:
        return f"{w[key]['p50']:.0f} ms" if w.get(key) else "-"

    if "still_after_ms" not in w:
        w = {**w, "still_after_ms": _still(r)}

    rate = f"{w['idle_tok_s']:,} tok/s" if w.get("idle_tok_s") is not None else "-"
    share = f" ({w['idle_tok_s'] / solo:.0%} of alone)" if solo and w.get("idle_tok_s") else ""
    lag = w.get("loop_lag_ms") or {}
    # Runs before 2026-12-04 sampled on the event loop and read neither chatbot page.
    idle = busy = ""
    if "gauge_idle_after_ms" in w:
        idle = (f"the chatbot's /load idle {p50('load_idle_after_ms')}, its gauge "
                f"{p50('gauge_idle_after_ms')}, ")  # fmt: skip
        busy = (f"its /load busy {p50('load_busy_after_ms')}, its gauge "
                f"{p50('gauge_busy_after_ms')}, ")  # fmt: skip
    return (
        f"- {r['sharing']}, preemption {preempt}: {w['gaps']} gaps, {w['idle_s']} s idle; "
        f"{w['tokens_in_idle']:,} tokens in them, {rate}{share}; {w['tokens_while_chat_busy']:,} "
        f"while chat was busy. Median from a gap's start: {idle}the worker saw chat idle "
        f"{p50('idle_seen_after_ms')}, the engine generating {p50('generating_after_ms')}; from "
        f"chat's return: {busy}the worker saw it busy {p50('busy_seen_after_ms')}, its engine's "
        f"last token by {p50('still_after_ms')}. "
        f"Event-loop lag p50 / p99 / max: {lag.get('p50', '-')} / {lag.get('p99', '-')} / "
        f"{lag.get('max', '-')} ms"
    )


def _still(r: dict[str, Any]) -> dict[str, float] | None:
    """`still_after_ms` from a row's raw timeline: runs before 2026-12-04b did not summarise
    it. (Imported here: the tables need nothing else of the run's code.)"""
    if not r.get("timeline") or not r.get("outcomes"):
        return None
    from bench.chat_trace.replay import Outcome
    from bench.gpu.trace_timeline import still_after_return

    outcomes = [Outcome(**o) for o in r["outcomes"]]
    return still_after_return(r["timeline"], outcomes, r["chat"]["window_s"])


def _host(r: dict[str, Any], name: str) -> str:
    """A run's machine (recorded by the runs after trace-2026-12-03e)."""
    gpu = r.get("gpu")
    clocks = (f"; {gpu['name']}, SM {gpu['sm_mhz']} of {gpu['sm_max_mhz']} MHz, memory "
              f"{gpu['mem_mhz']} MHz" if isinstance(gpu, dict) else "")  # fmt: skip
    return (
        f"{name}: {r['cpu']}, {r['cpus_usable']} of {r['cpus']} CPUs usable, load "
        f"{' / '.join(str(x) for x in r['load_avg'])}, probe {r['probe_ms']} ms{clocks}"
    )
