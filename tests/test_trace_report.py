"""The GPU trace benchmark's tables (bench/gpu/trace_report.py) from results of several runs:
every row against chat alone without MPS, the goals' baseline, wherever it was measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.gpu.trace_report import print_tables


def chat(ttft_p99: float, tpot_p99: float, idle: float) -> dict[str, Any]:
    return {
        "requests": 100, "errors": 0, "window_s": 60.0, "idle_fraction": idle,
        "ttft_ms_p50": 20.0, "ttft_ms_p99": ttft_p99, "tpot_ms_p50": 4.0, "tpot_ms_p99": tpot_p99,
    }  # fmt: skip


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.mkdir()
    base = {"profile": "l4", "load": 0.5}
    lines = [json.dumps({**base, **r}) for r in rows]
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
