"""The GPU trace benchmark's tables (bench/gpu/trace_report.py) from results of several runs:
every row against chat alone without MPS, the goals' baseline, wherever it was measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.gpu.trace_report import print_matrix, print_tables


def chat(ttft_p99: float, tpot_p99: float, idle: float) -> dict[str, Any]:
    return {
        "requests": 100, "errors": 0, "window_s": 60.0, "idle_fraction": idle,
        "ttft_ms_p50": 20.0, "ttft_ms_p99": ttft_p99, "tpot_ms_p50": 4.0, "tpot_ms_p99": tpot_p99,
    }  # fmt: skip


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    base = {"profile": "l4", "load": 0.5}
    lines = [json.dumps({**base, **r}) for r in rows]
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return path / "results.jsonl"


def row_of(out: str, label: str) -> list[str]:
    (line,) = [x for x in out.splitlines() if x.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_mps_rows_are_against_chat_alone_without_mps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An MPS run that measured its own chat alone (slower: the chatbot an MPS client) is
    still put against chat alone time-sliced from the other run, and its harvest takes the
    chat-idle fraction from that baseline and the feedback alone from its own pair."""
    ts = write(tmp_path / "ts", [
        {"step": "chat_alone", "sharing": "time-slicing", "chat": chat(1000.0, 5.0, 0.25)},
    ])  # fmt: skip
    mps = write(tmp_path / "mps", [
        {"step": "chat_alone", "sharing": "mps", "chat": chat(1400.0, 6.0, 0.20)},
        {"step": "feedback_alone", "sharing": "mps", "feedback": {"tokens_per_s": 8000.0}},
        {"step": "shared", "sharing": "mps", "preempt": True, "chat": chat(1400.0, 6.0, 0.2),
         "feedback": {"tokens_per_s": 1800.0}, "worker": {"has_preemption": True}},
    ])  # fmt: skip
    print_tables([ts, mps])
    out = capsys.readouterr().out
    shared = row_of(out, "mps")
    assert shared[2] == "20.0 (x1.00) / 1400.0 (x1.40)"
    assert shared[3] == "4.0 (x1.00) / 6.0 (x1.20)"
    assert shared[6] == f"{1800 / (8000 * 0.25):.0%}"  # 90%, not 1800 / (8000 x 0.20)
    alone_under_mps = row_of(out, "chat alone (mps, chat-idle 20%)")
    assert alone_under_mps[2] == "20.0 (x1.00) / 1400.0 (x1.40)"


def test_harvest_takes_feedback_alone_of_the_same_sharing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with feedback alone only time-sliced does not lend it to an MPS row of its own
    run: under MPS feedback alone is what its share makes."""
    run = write(tmp_path / "run", [
        {"step": "chat_alone", "sharing": "time-slicing", "chat": chat(1000.0, 5.0, 0.25)},
        {"step": "feedback_alone", "sharing": "time-slicing", "feedback": {"tokens_per_s": 12e3}},
        {"step": "feedback_alone", "sharing": "mps", "feedback": {"tokens_per_s": 6e3}},
        {"step": "shared", "sharing": "mps", "preempt": False, "chat": chat(2000.0, 7.0, 0.1),
         "feedback": {"tokens_per_s": 3000.0}},
    ])  # fmt: skip
    print_tables([run])
    assert row_of(capsys.readouterr().out, "mps")[6] == f"{3000 / (6000 * 0.25):.0%}"


def shared(sharing: str, preempt: bool, ttft_p99: float, tok_s: float) -> dict[str, Any]:
    return {"step": "shared", "sharing": sharing, "preempt": preempt,
            "chat": chat(ttft_p99, 5.0, 0.2), "feedback": {"tokens_per_s": tok_s},
            "worker": {"has_preemption": True}}  # fmt: skip


def test_matrix_takes_each_settings_latest_run_against_the_latest_chat_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs given oldest first: a setting measured twice shows the later run's row, named;
    a run without chat alone is put against the latest run that has it, not the oldest
    (another machine, older code), and says which."""
    old = write(tmp_path / "trace-old", [
        {"step": "chat_alone", "sharing": "time-slicing", "chat": chat(2000.0, 5.0, 0.25)},
        {"step": "feedback_alone", "sharing": "time-slicing", "feedback": {"tokens_per_s": 1e4}},
        shared("time-slicing", True, 4000.0, 500.0),
        shared("time-slicing", False, 9000.0, 6000.0),
    ])  # fmt: skip
    new = write(tmp_path / "trace-new", [
        {"step": "chat_alone", "sharing": "time-slicing", "chat": chat(1000.0, 5.0, 0.5)},
        {"step": "feedback_alone", "sharing": "time-slicing", "feedback": {"tokens_per_s": 1e4}},
        shared("time-slicing", True, 1000.0, 4500.0),
    ])  # fmt: skip
    mps = write(tmp_path / "trace-mps" / "mps-l4", [
        {"step": "feedback_alone", "sharing": "mps", "feedback": {"tokens_per_s": 5000.0}},
        shared("mps", True, 1500.0, 2000.0),
    ])  # fmt: skip
    print_matrix([old, new, mps])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| l4 |")]
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines]
    assert [(c[2], c[3], c[9]) for c in cells] == [
        ("time-slicing", "on", "trace-new"),
        ("time-slicing", "off", "trace-old"),
        ("mps", "on", "trace-mps/mps-l4 (alone: trace-new)"),
    ]
    ts_on, ts_off, mps_on = cells
    assert ts_on[4] == "x1.00 / x1.00"
    assert ts_on[8] == "90%"  # 4500 / (10000 x 0.5)
    assert ts_off[4] == "x1.00 / x4.50"  # its own run's chat alone, 2000 ms
    assert mps_on[4] == "x1.00 / x1.50"  # trace-new's chat alone, not trace-old's
    assert mps_on[8] == "80%"  # 2000 / (5000 x 0.5)


def test_tables_name_each_runs_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run's recorded host prints as one line under its name, GPU clocks where read."""
    run = write(tmp_path / "trace-x", [
        {"step": "host", "cpu": "Some CPU", "cpus": 16, "cpus_usable": 12,
         "load_avg": [1.5, 1.0, 0.5], "probe_ms": 9.1,
         "gpu": {"name": "H200", "driver": "1", "sm_mhz": 1980, "sm_max_mhz": 1980,
                 "mem_mhz": 3201}},
        {"step": "chat_alone", "sharing": "time-slicing", "chat": chat(1000.0, 5.0, 0.25)},
    ])  # fmt: skip
    print_tables([run])
    assert (
        "trace-x: Some CPU, 12 of 16 CPUs usable, load 1.5 / 1.0 / 0.5, probe 9.1 ms; H200, "
        "SM 1980 of 1980 MHz, memory 3201 MHz"
    ) in capsys.readouterr().out.splitlines()


def test_the_fault_table_names_the_workers_preemption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fault rows from before 2026-12-04 carry no mode: their worker ran without preemption."""
    fault = {"step": "fault", "sharing": "time-slicing", "faulter_exit": 1,
             "engines": {"chatbot": {}, "feedback": {}, "checked_for_s": 20.0},
             "chat_errors": 0, "chat": chat(1000.0, 5.0, 0.2),
             "feedback": {"requests": 1920, "answered": 1920, "lost": 0}}  # fmt: skip
    old = write(tmp_path / "old", [fault])
    new = write(tmp_path / "new", [{**fault, "preempt_mode": "pause"}])
    print_tables([old, new])
    out = capsys.readouterr().out
    rows = [x for x in out.splitlines() if x.startswith("| l4, time-slicing |")]
    assert [row.split("|")[2].strip() for row in rows] == ["off", "pause"]
    assert all("1920 of 1920 / 0" in row for row in rows)


def test_rows_summarised_before_the_engines_last_token_get_it_from_their_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs before 2026-12-04b stored no `still_after_ms`; their raw timeline has it."""
    t = [round(i * 0.05, 3) for i in range(61)]
    gen = [10.0 * min(i, 22) + 10.0 * max(0, i - 40) for i in range(61)]  # still 1.10-2.0 s
    outcome = {"index": 0, "scheduled_s": 1.0, "started_s": 1.0, "ended_s": 2.0,
               "context_tokens": 100, "generated_tokens": 50}  # fmt: skip
    seen = {"p50": 30.0, "p90": 40.0, "n": 1}
    summary = {"gaps": 2, "idle_s": 2.0, "tokens_in_idle": 400, "tokens_while_chat_busy": 20,
               "idle_tok_s": 200, "busy_seen_after_ms": seen}  # fmt: skip
    run = write(tmp_path / "old", [
        {"step": "chat_alone", "sharing": "time-slicing", "chat": chat(1000.0, 5.0, 0.66)},
        {"step": "shared", "sharing": "time-slicing", "preempt": True, "preempt_mode": "pause",
         "chat": {**chat(1000.0, 5.0, 0.66), "window_s": 3.0},
         "feedback": {"tokens_per_s": 150.0}, "timeline_summary": summary,
         "timeline": {"t": t, "fb_generated": gen}, "outcomes": [outcome]},
    ])  # fmt: skip
    print_tables([run])
    out = capsys.readouterr().out
    assert "the worker saw it busy 30 ms, its engine's last token by 100 ms." in out
