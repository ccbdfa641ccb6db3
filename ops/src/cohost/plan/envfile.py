"""The plan as an env file: what docker compose, the launcher and a shell read.

Each vLLM service gets `<NAME>_ENGINE_*` variables (CHATBOT_ENGINE_MAX_MODEL_LEN=...);
the worker gets FEEDBACK_MAX_IN_FLIGHT, which must equal its engine's max_num_seqs, and
FEEDBACK_MAX_CHARS_PER_TOKEN when the model folder has its tokenizer.json.
The header records the command that wrote the file, so it can be checked and redone.
Values are shell-quoted where they need it (`COHOST_GPU_NAME='NVIDIA L4'`), which docker
compose, python-dotenv and `set -a; . deploy/l4.env` all read the same way.
"""

from __future__ import annotations

import io
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from dotenv.parser import parse_stream

from cohost.plan import models, sharing
from cohost.plan.fit import Plan, ServicePlan
from cohost.units import MIB

# A service's MPS share under its prefix: SM percentage, client priority, memory cap; and
# the check that ties them to the memory the plan sized (sharing.share_check).
MPS_KEYS = ("MPS_ACTIVE_THREAD_PERCENTAGE", "MPS_CLIENT_PRIORITY", "MPS_PINNED_MEMORY_BYTES")
MPS_CHECK_KEY = "MPS_SHARE_CHECK"
_ENGINE_MODEL = re.compile(r"^(?P<svc>[A-Z][A-Z0-9_]*)_ENGINE_MODEL$")


def prefix(service: str) -> str:
    return f"{service.upper().replace('-', '_')}_ENGINE_"


def service_variables(s: ServicePlan) -> dict[str, str]:
    p = prefix(s.spec.name)
    fp = s.footprint
    values = {
        "MODEL": s.spec.serve or s.spec.model,
        "SERVED_MODEL_NAME": s.spec.name,
        "GPU_MEMORY_UTILIZATION": f"{s.gpu_memory_utilization:.4f}",
        "MAX_MODEL_LEN": str(s.max_model_len),
        "MAX_NUM_SEQS": str(s.spec.max_num_seqs),
        "MAX_NUM_BATCHED_TOKENS": str(s.spec.max_num_batched_tokens),
        "KV_CACHE_DTYPE": s.spec.kv_cache_dtype,
        "STREAM_INTERVAL": str(s.stream_interval),
        "BUDGET_BYTES": str(fp.budget),
        "EXPECTED_PROCESS_BYTES": str(fp.process),
    }
    if s.kv_pinned:
        values["KV_CACHE_MEMORY_BYTES"] = str(fp.kv_cache)
    if s.mps is not None:
        share = (s.mps.sm_percent, s.mps.client_priority, s.mps.memory_limit_bytes)
        values.update(zip(MPS_KEYS, map(str, share), strict=True))
        values[MPS_CHECK_KEY] = sharing.share_check(*share, fp.process)
    return {p + k: v for k, v in values.items()}


def render(plan: Plan, argv: Sequence[str]) -> str:
    gpu = plan.gpu
    lines = [
        f"# cohost plan for {gpu.name} ({gpu.total_mib:,} MiB). Written by:",
        f"#   {shlex.join(['cohost', *argv])}",
        "# Re-run that command (changed as needed) to re-plan; do not edit values by hand.",
    ]
    for s in plan.services:
        fp = s.footprint
        lines.append(
            f"# {s.spec.name}: {fp.process / MIB:,.0f} MiB in all "
            f"(weights {fp.weights / MIB:,.0f}, "
            f"KV {fp.kv_cache / MIB:,.0f} = {s.kv_cache_tokens:,} tokens, outside vLLM's budget "
            f"{fp.outside_budget / MIB:,.0f})"
        )
    if plan.sharing == "mps":
        shares = "; ".join(f"{s.spec.name} {s.mps.describe()}" for s in plan.services if s.mps)
        lines.append(
            f"# sharing: CUDA MPS ({shares}; MPS server {plan.mps_server_bytes / MIB:,.0f} MiB)"
        )
    else:
        lines.append("# sharing: time-slicing (no MPS)")
    lines.append(
        f"# predicted use {plan.used_bytes / MIB:,.0f} of {gpu.cuda_total_bytes / MIB:,.0f} MiB, "
        f"headroom {plan.headroom_bytes / MIB:,.0f} MiB"
    )
    values = {
        "COHOST_GPU_NAME": gpu.name,
        "COHOST_GPU_TOTAL_BYTES": str(gpu.total_bytes),
        "COHOST_SHARING": plan.sharing,
    }
    for s in plan.services:
        values.update(service_variables(s))
        if s.spec.name == "feedback":
            values["FEEDBACK_MAX_IN_FLIGHT"] = str(s.spec.max_num_seqs)
            values["FEEDBACK_LLM_MODEL"] = s.spec.name
            # Read here only: tokenizer.json runs to megabytes, and planning loads each
            # model's shape many times over while it searches for suggestions.
            chars = models.longest_token_chars(Path(s.shape.source))
            if chars is not None:
                values["FEEDBACK_MAX_CHARS_PER_TOKEN"] = str(chars)
    lines.extend(f"{k}={shlex.quote(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def write(path: Path, plan: Plan, argv: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(plan, argv))


def read(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, quotes removed, as docker compose reads them; ValueError names
    the first line that is not KEY=VALUE."""
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(path.read_text())):
        if binding.error or (binding.key is not None and binding.value is None):
            line = binding.original
            raise ValueError(f"{path}:{line.line}: not KEY=VALUE: {line.string.strip()!r}")
        if binding.key is not None and binding.value is not None:
            values[binding.key] = binding.value
    return values


def command(path: Path) -> list[str]:
    """The cohost arguments recorded in the header."""
    for line in path.read_text().splitlines()[:3]:
        # The command sits indented under "Written by:"; the title also begins with "cohost".
        if line.startswith("#   cohost "):
            return shlex.split(line.removeprefix("#").strip())[1:]
    raise ValueError(f"{path} does not record the command that wrote it")


def replan_command(
    path: Path, out: Path, *, sharing_mode: str | None = None, feedback: str = ""
) -> list[str]:
    """The cohost arguments that plan `path` again into `out`: its recorded command with
    `--sharing sharing_mode` in place of its own (where given) and `feedback` options
    (`sm=50,priority=normal`) added to the feedback service. A plan is only ever changed
    by planning it again, never by a hand edit: the launcher refuses what it did not size."""
    argv = command(path)
    if argv[0] != "plan":
        raise ValueError(f"{path} was written by `cohost {argv[0]}`, not `cohost plan`")
    if sharing_mode is not None and "--sharing" in argv:
        at = argv.index("--sharing")
        del argv[at : at + 2]
    argv[argv.index("--write-env") + 1] = str(out)
    if feedback:
        at = next(i for i, a in enumerate(argv) if a.startswith("feedback="))
        argv[at] += "," + feedback
    return argv if sharing_mode is None else [*argv, "--sharing", sharing_mode]


def sharing_of(values: Mapping[str, str]) -> str:
    """The plan's GPU sharing (COHOST_SHARING; a plan without it predates MPS)."""
    return values.get("COHOST_SHARING", sharing.UNSTATED_MODE)


def engines(values: Mapping[str, str]) -> list[str]:
    """The services the plan starts, in its order (the start order): one per
    <SVC>_ENGINE_MODEL, so a plan with other or more services is read the same way."""
    found = (_ENGINE_MODEL.match(key) for key in values)
    return [m.group("svc").lower().replace("_", "-") for m in found if m]


def mps_share(values: Mapping[str, str], service: str) -> sharing.MpsShare | None:
    """The service's MPS share as the file gives it; None when the plan does not share
    through MPS. ValueError says what is missing or malformed."""
    if sharing_of(values) != "mps":
        return None
    p = prefix(service)
    missing = [p + k for k in MPS_KEYS if p + k not in values]
    if missing:
        raise ValueError(f"COHOST_SHARING=mps, but the plan lacks {', '.join(missing)}")
    sm, priority, limit = (int(values[p + k]) for k in MPS_KEYS)
    if priority not in sharing.PRIORITY_NAMES:
        raise ValueError(f"{p}MPS_CLIENT_PRIORITY={priority}: expected 0 (normal) or 1 (low)")
    return sharing.MpsShare(sm, sharing.PRIORITY_NAMES[priority], limit)
