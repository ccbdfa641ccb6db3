"""The report as Markdown: verdict, invariants, then one section per phase."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cohost.units import MIB

from harness.engine import ENGINE_MAX_MODEL_LEN, ENGINE_MAX_NUM_SEQS, TEST_MODEL

from .hostile import HOSTILE_ROUNDS

if TYPE_CHECKING:
    from .report import Report


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v / MIB:,.1f}"


def render_markdown(r: Report) -> str:
    out: list[str] = []
    w = out.append
    verdict = "PASSED" if not r.failures else f"FAILED ({len(r.failures)} invariants)"
    w(f"# Reliability suite, {r.cfg.name} run: {verdict}")
    w("")
    w(f"- started: {r.started_at}, took {r.seconds / 60:.1f} min")
    w(f"- command: `{r.command}`")
    w(f"- machine: {r.machine}")
    w("- software: " + ", ".join(f"{k} {v}" for k, v in r.software.items()))
    w(
        f"- stack: Pub/Sub emulator, one CPU vLLM server with `{TEST_MODEL}` "
        f"(max-model-len {ENGINE_MAX_MODEL_LEN}, max-num-seqs {ENGINE_MAX_NUM_SEQS}), "
        f"`feedback-worker` processes (FEEDBACK_MAX_IN_FLIGHT {ENGINE_MAX_NUM_SEQS}, "
        f"FEEDBACK_DEFAULT_MAX_TOKENS {r.cfg.max_tokens}, FEEDBACK_ACK_DEADLINE_S "
        f"{r.cfg.ack_deadline_s}, other settings default)"
    )
    w("")
    if r.error:
        w("## Aborted")
        w("")
        w("```")
        w(r.error[-3000:])
        w("```")
        w("")
    w("## Invariants")
    w("")
    if r.failures:
        w("\n".join(f"- FAILED: {f}" for f in r.failures))
    else:
        w("All hold: every request id answered; every duplicate explained by a redelivery or "
          "by the re-publish after the emulator restart; no crash loop; worker memory flat; "
          "every malformed payload dead-lettered, byte for byte, with its reason; every valid "
          "one answered; hostile input handled within the engine's limits.")  # fmt: skip
    w("")
    if r.load:
        lo = r.load
        dup = sum(lo.duplicates.values())
        w(f"## 1. Load with faults: {lo.requests:,} requests")
        w("")
        w(f"- answered: **{lo.answered:,} / {lo.requests:,}** request ids, {lo.results:,} results "
          f"in {lo.seconds / 60:.1f} min ({lo.requests / lo.seconds:.1f} requests/s with the faults)")  # fmt: skip
        w(f"- duplicate results: **{dup}** ({dup / lo.requests:.2%})")
        for cause, count in sorted(lo.duplicates.items(), key=lambda kv: -kv[1]):
            ids = lo.duplicate_ids.get(cause, [])
            w(f"  - {count}: {cause} (e.g. {', '.join(ids[:3])})")
        w(f"- re-published after the emulator restart: {len(lo.republished)}")
        w(f"- dead letters: {len(lo.dead_letters)}")
        w("")
        w("| # | at answered | fault | took | what happened |")
        w("|---|---:|---|---:|---|")
        for i, e in enumerate(lo.faults, 1):
            w(f"| {i} | {e.at_answered:,} | {e.kind} | {e.took_s:.1f} s | {e.detail} |")
        w("")
    if r.incarnations:
        unplanned = sum(1 for i in r.incarnations if i["unplanned_exit"])
        w(f"## Worker processes: {len(r.incarnations)} started, "
          f"{len(r.incarnations) - 1} restarts, {unplanned} unplanned exits, "
          f"crash loop: {'YES' if r.crash_loop else 'no'}")  # fmt: skip
        w("")
        w("| worker | pid | lived | messages | RSS first / last / max (MiB) | how it ended |")
        w("|---:|---:|---:|---:|---|---|")
        for inc in r.incarnations:
            w(f"| {inc['number']} | {inc['pid']} | {inc['lived_s']:,.0f} s | {inc['received']:,} | "
              f"{_mib(inc['rss_first'])} / {_mib(inc['rss_last'])} / {_mib(inc['rss_max'])} | "
              f"{inc['cause']} |")  # fmt: skip
        w("")
    if r.memory:
        m = r.memory
        w(f"## Worker memory: worker {m['worker']}, {m['messages']:,} messages")
        w("")
        w("The worker that served the end of the load and both bad-input passes, from its "
          "start to the hostile phase (whose 1 MiB messages are measured on their own, "
          "below). The invariant is the growth over the second bad-input pass: the first "
          "one may lift RSS to the high-water mark its message mix needs; a leak keeps "
          "growing with the same messages.")  # fmt: skip
        w("")
        w(f"RSS {_mib(m['rss_start'])} MiB at its start, {_mib(m['rss_warm'])} MiB when the "
          f"second pass began ({m['warm_at_messages']:,} messages), {_mib(m['rss_end'])} MiB at "
          f"its end, peak {_mib(m['rss_max'])} MiB: growth over the second pass "
          f"{m['growth_bytes'] / MIB:+.1f} MiB (limit {m['limit_bytes'] / MIB:.0f} MiB).")  # fmt: skip
        w("")
        w("| seconds | messages | RSS (MiB) |")
        w("|---:|---:|---:|")
        for t, n, rss in m["series"]:
            w(f"| {t:,} | {n:,} | {_mib(rss)} |")
        w("")
    passes = [("2. Bad input", r.bad), ("2b. The same bad input again", r.bad_again)]
    for title, b in passes:
        if b is None:
            continue
        w(f"## {title}: {b.malformed:,} malformed + {b.valid:,} valid, mixed")
        w("")
        w(f"- generated with Hypothesis, seed {b.seed}, in {b.generation_s:.0f} s "
          f"({b.distinct:,} distinct payloads); settled in {b.seconds:.0f} s")  # fmt: skip
        w(f"- malformed dead-lettered with the expected reason: "
          f"**{b.malformed - b.not_dead_lettered - len(b.wrong_reason):,} / {b.malformed:,}**; "
          f"byte-identical: {b.malformed - b.not_dead_lettered - b.bytes_changed:,}; "
          f"without error_detail: {b.detail_missing}")  # fmt: skip
        w(f"- valid answered: **{b.valid_answered:,} / {b.valid:,}**; valid dead-lettered: "
          f"{len(b.valid_dead_lettered)}; results for malformed payloads: {b.unexpected_results}")  # fmt: skip
        w(f"- worker restarts during the phase: {b.worker_restarts}")
        w("")
        w("| kind generated | count | | dead-letter reason | count |")
        w("|---|---:|---|---|---:|")
        kinds = sorted(b.by_kind.items(), key=lambda kv: -kv[1])
        reasons = sorted(b.dead_by_reason.items(), key=lambda kv: -kv[1])
        for k in range(max(len(kinds), len(reasons))):
            kk = kinds[k] if k < len(kinds) else ("", "")
            rr = reasons[k] if k < len(reasons) else ("", "")
            w(f"| {kk[0]} | {kk[1]} | | {rr[0]} | {rr[1]} |")
        w("")
        for line in b.wrong_reason[:10] + b.valid_dead_lettered[:10]:
            w(f"- {line}")
    if r.hostile:
        h = r.hostile
        w("## 3. Hostile input, one message at a time")
        w("")
        w("Engine columns are deltas of the engine's own /metrics around each message: "
          "HTTP calls to /v1/chat/completions (4xx of them) and /tokenize, request bytes "
          "it received, prompt tokens it processed.")  # fmt: skip
        w("")
        w("| case | bytes | outcome | chat calls (4xx) | tokenize | bytes to engine | "
          "prompt tokens | ok |")  # fmt: skip
        w("|---|---:|---|---:|---:|---:|---:|---|")
        for row in h.rows:
            d = row.engine
            w(f"| {row.name} | {row.size:,} | {row.got} | {d['chat_calls']:.0f} "
              f"({d['chat_4xx']:.0f}) | {d['tokenize_calls']:.0f} | {d['bytes_to_engine']:,.0f} | "
              f"{d['prompt_tokens']:.0f} | {'yes' if row.ok else 'NO ' + row.note} |")  # fmt: skip
        w("")
        after = ", ".join(_mib(b) for b in h.rss_after_rounds)
        w(f"Every case ran {HOSTILE_ROUNDS} times; later rounds ended as round 1 did: "
          f"{'yes' if not h.repeat_failures else 'NO: ' + '; '.join(h.repeat_failures)}. "
          f"Worker RSS after each round: {after} MiB. Growth from round 2 on: "
          f"{h.rss_slope / MIB:+.1f} MiB a round (median of pairwise slopes), limit "
          f"{h.rss_slope_limit / MIB:.1f} MiB: half of the {h.round_bytes / MIB:.1f} MiB a "
          "round sends; round 1 may lift RSS to the room 1 MiB payloads need.")  # fmt: skip
        w("")
        w("Dead-letter details:")
        w("")
        for row in h.rows:
            if row.got != "result":
                w(f"- {row.name}: `{row.got}`: {row.detail[:240]}")
        w("")
        w(f"Prompt injection, structure check with the engine's tokenizer: "
          f"{'no injection text adds a control token or a second text block' if not h.injection_checks else '; '.join(h.injection_checks)}. "
          "(tiny-llama has random weights, so whether a model obeys an injected "
          "instruction cannot be judged here; what can be checked is that the text cannot "
          "change the prompt's structure.)")  # fmt: skip
        w("")
        buckets = ", ".join(f"<= {k}: {v:,.0f}" for k, v in h.prompt_buckets.items() if v)
        w(f"Engine's prompt-length histogram at the end (vllm:request_prompt_tokens, cumulative "
          f"since its last restart): {buckets}")  # fmt: skip
        w("")
    if r.worker_metrics:
        w("## Worker counters at the end (last worker, its /metrics)")
        w("")
        w("```")
        w(json.dumps(r.worker_metrics, indent=1, sort_keys=True))
        w("```")
        w("")
    return "\n".join(out) + "\n"
