"""`cohost launch SERVICE`: preflight, wait for the start gate, then exec vLLM.

Every vLLM container runs this instead of `vllm serve`. It

1. reads the service's planned settings (`<SERVICE>_ENGINE_*`, from the plan's env file);
2. checks through NVML that the GPU is the one planned for;
3. under MPS sharing, refuses a share its plan did not size (`preflight`) and waits for
   the MPS control daemon (`mps`), so vLLM cannot silently start without its share;
4. takes the GPU's start gate (`gate`), so servers start strictly one at a time;
5. checks that the whole server (its plan's process memory) fits in what is free now,
   and refuses with what holds the memory and what to change otherwise;
6. execs vLLM with the planned flags and, under MPS, its share of the SMs, priority and
   memory cap; vLLM gets the container's signals directly.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import NoReturn

from cohost import nvml
from cohost.cpu_engine import server
from cohost.launch import backoff, gate, mps, preflight, settings
from cohost.launch.command import planned_flags, vllm_argv, vllm_env
from cohost.launch.exits import EXIT_WRONG_GPU, Refusal, say
from cohost.units import MIB


def run(service: str) -> NoReturn:
    try:
        planned = settings.load(service)
    except Refusal as refusal:
        backoff.refuse(service, refusal, settings.address(service))
    # While a refusal waits, it is answered on the port the server would serve.
    address = (planned.host, planned.port)
    if planned.device == "cpu":
        run_cpu(service, planned)
    try:
        try:
            reading = nvml.read(planned.gpu_index)
        except nvml.NvmlError as exc:
            raise Refusal(EXIT_WRONG_GPU, f"cannot read GPU {planned.gpu_index}: {exc}") from None
        preflight.check_card(planned, reading)
        preflight.check_mps_cap(service, planned)
        preflight.check_mps_share(service, planned)
        if planned.sharing == "mps":
            mps.wait_for_daemon(service, planned)
        fd = gate.take(service, planned, gate.name_of(reading))
        # Read again: what was free before the gate is stale once the server before us is up.
        reading = nvml.read(planned.gpu_index)
        util = preflight.utilization(planned, reading)
        try:
            preflight.check_memory(service, planned, reading, util)
        except Refusal:
            os.close(fd)
            raise
    except Refusal as refusal:
        backoff.refuse(service, refusal, address)
    argv = vllm_argv(planned, service, util)
    env = mps.client_env(planned, vllm_env(planned, os.environ, service))
    say(service, mps.describe(planned, env))
    say(
        service,
        f"GPU {reading.name}: {reading.free_bytes // MIB:,} MiB free; util {util:.4f} of "
        f"{reading.cuda_total_bytes // MIB:,} MiB; starting: {shlex.join(argv)}",
    )
    gate.keep_until_healthy(fd, service, planned.port, planned.health_timeout_s, planned.watchdog_s)
    os.close(fd)
    os.execvpe(argv[0], argv, env)


def run_cpu(service: str, planned: settings.EngineSettings) -> NoReturn:
    """A CPU plan (cohost.plan.cpu): no GPU to check; one server starts at a time all the
    same (two loading at once share the cores), and the watchdog runs as on a GPU."""
    try:
        fd = gate.take(service, planned, "cpu")
    except Refusal as refusal:
        backoff.refuse(service, refusal, (planned.host, planned.port))
    argv = server.server_command(
        Path(planned.model),
        port=planned.port,
        served_model_name=planned.served_model_name or service,
        host=planned.host,
        max_model_len=planned.max_model_len,
        max_num_seqs=planned.max_num_seqs,
        python="python3",
        extra_args=[*planned_flags(planned), *shlex.split(planned.extra_args)],
    )
    env = vllm_env(
        planned, server.server_env(os.environ, kv_cache_gib=planned.cpu_kvcache_gib), service
    )
    kv = planned.cpu_kvcache_gib
    say(service, f"CPU engine, KV cache {kv} GiB; starting: {shlex.join(argv)}")
    gate.keep_until_healthy(fd, service, planned.port, planned.health_timeout_s, planned.watchdog_s)
    os.close(fd)
    os.execvpe(argv[0], argv, env)
