"""`cohost launch SERVICE`: preflight, wait for the start gate, then exec vLLM.

Every vLLM container runs this instead of `vllm serve`. It

1. reads the service's planned settings (`<SERVICE>_ENGINE_*`, from the plan's env file);
2. checks through NVML that the GPU is the one planned for;
3. takes the GPU's start gate: an flock on `$COHOST_LOCK_DIR/<gpu uuid>.lock`, a file
   on a volume every vLLM container of that GPU shares. vLLM measures free memory
   while it starts, so two servers starting at once both misjudge it and crash;
   holding the gate until /health answers keeps starts strictly one at a time;
4. checks that the whole server (its plan's process memory) fits in what is free now,
   and refuses with what holds the memory and what to change otherwise;
5. execs vLLM with the planned flags, so vLLM gets the container's signals directly.

The gate outlives the exec in a small detached keeper process, which lets go of it
once /health answers or the server dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cohost import nvml
from cohost.envfile import prefix
from cohost.memory import MIB

# Exit codes, so an orchestrator (and a person) can tell refusals apart.
EXIT_CONFIG = 2
EXIT_WRONG_GPU = 3
EXIT_GATE_TIMEOUT = 4
EXIT_NO_MEMORY = 5

# A card within this fraction of the planned size counts as the planned card.
SIZE_TOLERANCE = 0.01


class EngineSettings(BaseSettings):
    """One vLLM service's planned settings; the prefix is `<SERVICE>_ENGINE_`."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    model: str
    served_model_name: str | None = None
    host: str = "0.0.0.0"  # noqa: S104 - the server is reached from other containers
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = None
    gpu_memory_utilization: float = Field(gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    budget_bytes: int | None = Field(default=None, gt=0)
    expected_process_bytes: int | None = Field(default=None, gt=0)
    max_model_len: int = Field(ge=16)
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    kv_cache_dtype: str = "auto"
    chat_template: str | None = None
    extra_args: str = ""  # more vLLM flags, shell-quoted
    command: str = "vllm serve"  # how to run vLLM, shell-quoted
    gpu_index: int = Field(default=0, ge=0)

    planned_gpu_name: str | None = Field(default=None, validation_alias="COHOST_GPU_NAME")
    planned_gpu_total_bytes: int | None = Field(
        default=None, validation_alias="COHOST_GPU_TOTAL_BYTES"
    )
    lock_dir: Path = Field(default=Path("/var/lock/cohost"), validation_alias="COHOST_LOCK_DIR")
    gate_timeout_s: float = Field(default=1800.0, gt=0, validation_alias="COHOST_GATE_TIMEOUT_S")
    health_timeout_s: float = Field(
        default=1800.0, gt=0, validation_alias="COHOST_HEALTH_TIMEOUT_S"
    )
    # For emulating a smaller card on a bigger one (memory held by a ballast process).
    allow_other_gpu: bool = Field(default=False, validation_alias="COHOST_ALLOW_OTHER_GPU")


@dataclass(frozen=True)
class Refusal(Exception):
    code: int
    message: str


def load_settings(service: str) -> EngineSettings:
    try:
        return EngineSettings(_env_prefix=prefix(service))  # type: ignore[call-arg]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            env = name if name.startswith("COHOST_") else prefix(service) + name.upper()
            lines.append(f"  {env}: {err['msg']}")
        raise Refusal(
            EXIT_CONFIG,
            f"the plan for {service!r} is missing or invalid:\n"
            + "\n".join(lines)
            + "\nLoad the plan's env file (deploy/*.env) into the environment.",
        ) from None


def check_gpu(settings: EngineSettings, reading: nvml.GpuReading) -> None:
    planned = settings.planned_gpu_total_bytes
    if planned is None or settings.allow_other_gpu:
        return
    if abs(reading.total_bytes - planned) > SIZE_TOLERANCE * planned:
        raise Refusal(
            EXIT_WRONG_GPU,
            f"this GPU is {reading.name} with {reading.total_bytes // MIB:,} MiB, but the plan "
            f"is for {settings.planned_gpu_name or 'another card'} with {planned // MIB:,} MiB. "
            "Re-plan for this card (`cohost plan --gpu ...` or without --gpu to detect it), or "
            "set COHOST_ALLOW_OTHER_GPU=1 when emulating the planned card on a bigger one.",
        )


def utilization(settings: EngineSettings, reading: nvml.GpuReading) -> float:
    """The planned budget as a fraction of THIS card's CUDA total (vLLM's denominator)."""
    if settings.budget_bytes is None:
        return settings.gpu_memory_utilization
    return math.ceil(settings.budget_bytes / reading.cuda_total_bytes * 10_000) / 10_000


def check_memory(
    service: str, settings: EngineSettings, reading: nvml.GpuReading, util: float
) -> None:
    needed = settings.expected_process_bytes or math.ceil(util * reading.cuda_total_bytes)
    if reading.free_bytes >= needed:
        return
    holders = sorted(reading.processes, key=lambda p: -p.used_bytes)
    lines = [
        f"  pid {p.pid:>7}  {p.used_bytes // MIB:>8,} MiB  {p.name or '(in another container)'}"
        for p in holders
    ] or ["  (NVML lists no processes: memory may be held outside this container's view)"]
    raise Refusal(
        EXIT_NO_MEMORY,
        f"refusing to start {service}: GPU {reading.index} ({reading.name}) has "
        f"{reading.free_bytes // MIB:,} MiB free, this server needs {needed // MIB:,} MiB "
        "(its planned process memory).\nHolding GPU memory now:\n"
        + "\n".join(lines)
        + "\nStop what should not be there, or re-plan for what is free: "
        f"cohost plan --gpu-memory-mib {reading.total_bytes // MIB} --service ...",
    )


def vllm_argv(settings: EngineSettings, service: str, util: float) -> list[str]:
    argv = shlex.split(settings.command)
    # `vllm serve` takes the model as its positional argument (--model is deprecated
    # there); the api_server module only knows --model.
    argv += [settings.model] if argv[-1] == "serve" else ["--model", settings.model]
    argv += [
        "--served-model-name", settings.served_model_name or service,
        "--host", settings.host,
        "--port", str(settings.port),
        "--gpu-memory-utilization", f"{util:.4f}",
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
    ]  # fmt: skip
    if settings.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
    if settings.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    if settings.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", settings.kv_cache_dtype]
    if settings.chat_template:
        argv += ["--chat-template", settings.chat_template]
    argv += shlex.split(settings.extra_args)
    return argv


def say(service: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    print(f"{stamp} cohost launch {service}: {message}", file=sys.stderr, flush=True)


def take_gate(service: str, settings: EngineSettings, reading: nvml.GpuReading) -> int:
    """Block until this GPU's start gate is ours; returns the locked file descriptor."""
    settings.lock_dir.mkdir(parents=True, exist_ok=True)
    name = reading.uuid or f"gpu{reading.index}"
    path = settings.lock_dir / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    started = time.monotonic()
    next_note = started
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            now = time.monotonic()
            if now - started > settings.gate_timeout_s:
                os.close(fd)
                raise Refusal(
                    EXIT_GATE_TIMEOUT,
                    f"another server has held the start gate {path} for over "
                    f"{settings.gate_timeout_s:.0f} s ({_holder(path)}); is it stuck starting?",
                ) from None
            if now >= next_note:
                say(service, f"waiting for the start gate, held by {_holder(path)}")
                next_note = now + 15
            time.sleep(0.5)
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, json.dumps({"service": service, "pid": os.getpid(), "since": time.time()}).encode(), 0
    )
    waited = time.monotonic() - started
    say(service, f"start gate taken after {waited:.1f} s ({path})")
    return fd


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text() or "{}")
        if data:
            age = time.time() - float(data.get("since", time.time()))
            return f"{data.get('service')} (pid {data.get('pid')}, starting for {age:.0f} s)"
    return "another server"


def keep_gate_until_healthy(fd: int, service: str, port: int, timeout: float) -> None:
    """Hand the gate to a detached keeper that releases it once the server is healthy.

    Double fork: the keeper is not our child, so vLLM (which this process becomes)
    never has to reap it.
    """
    server_pid = os.getpid()
    first = os.fork()
    if first:
        os.waitpid(first, 0)
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    code = 0
    try:
        started = time.monotonic()
        url = f"http://127.0.0.1:{port}/health"
        while True:
            if not _alive(server_pid):
                say(service, "server exited before it was healthy; start gate released")
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    say(
                        service,
                        f"healthy after {time.monotonic() - started:.0f} s; start gate released",
                    )
                    break
            if time.monotonic() - started > timeout:
                say(service, f"not healthy after {timeout:.0f} s; start gate released")
                break
            time.sleep(1)
    except BaseException:
        code = 1
    finally:
        os.close(fd)
        os._exit(code)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead too (reading its state avoids waiting on a pid we do not own).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    return True


def run(service: str) -> NoReturn:
    try:
        settings = load_settings(service)
        try:
            reading = nvml.read(settings.gpu_index)
        except nvml.NvmlError as exc:
            raise Refusal(EXIT_WRONG_GPU, f"cannot read GPU {settings.gpu_index}: {exc}") from None
        check_gpu(settings, reading)
        fd = take_gate(service, settings, reading)
        # Read again: what was free before the gate is stale once the server before us is up.
        reading = nvml.read(settings.gpu_index)
        util = utilization(settings, reading)
        try:
            check_memory(service, settings, reading, util)
        except Refusal:
            os.close(fd)
            raise
    except Refusal as refusal:
        say(service, refusal.message)
        sys.exit(refusal.code)
    argv = vllm_argv(settings, service, util)
    env = dict(os.environ)
    if settings.api_key is not None:
        # vLLM reads VLLM_API_KEY; kept out of argv so `ps` does not show it.
        env["VLLM_API_KEY"] = settings.api_key.get_secret_value()
    say(
        service,
        f"GPU {reading.name}: {reading.free_bytes // MIB:,} MiB free; util {util:.4f} of "
        f"{reading.cuda_total_bytes // MIB:,} MiB; starting: {shlex.join(argv)}",
    )
    keep_gate_until_healthy(fd, service, settings.port, settings.health_timeout_s)
    os.close(fd)
    os.execvpe(argv[0], argv, env)
