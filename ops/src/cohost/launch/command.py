"""The vLLM command line the plan asks for, and the environment it runs in."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from cohost.launch.settings import EngineSettings


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
    # /load: requests in flight from their arrival, the worker's signal to preempt
    # (feedback.chatload); vLLM keeps one counter for it.
    argv += [*planned_flags(settings), "--enable-server-load-tracking"]
    return argv + shlex.split(settings.extra_args)


def planned_flags(settings: EngineSettings) -> list[str]:
    """The plan's flags that vLLM on a GPU and the CPU engine take alike."""
    argv: list[str] = []
    # The plan sized its memory (activations, KV cache) for these two.
    if settings.max_num_batched_tokens:
        argv += ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    if settings.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", settings.kv_cache_dtype]
    if settings.stream_interval > 1:
        argv += ["--stream-interval", str(settings.stream_interval)]
    if settings.chat_template:
        argv += ["--chat-template", settings.chat_template]
    return argv


def pause_env(service: str) -> dict[str, str]:
    """The feedback engine serves vLLM's POST /pause and /resume, which its worker calls to
    hold it while chat is busy (feedback/pause.py). vLLM serves them only in its development
    mode, which also opens other endpoints that take no API key (docs/sharing.md, "The
    pause's endpoints"): never for the chatbot, which users reach."""
    return {"VLLM_SERVER_DEV_MODE": "1"} if service == "feedback" else {}


def vllm_env(settings: EngineSettings, base: Mapping[str, str], service: str) -> dict[str, str]:
    env = dict(base) | pause_env(service)
    if settings.api_key is not None:
        # vLLM reads VLLM_API_KEY; kept out of argv so `ps` does not show it.
        env["VLLM_API_KEY"] = settings.api_key.get_secret_value()
    return env
