"""One vLLM service's planned settings: `<SERVICE>_ENGINE_*` and the `COHOST_*` shared by
every launcher of a GPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from cohost_shared.settings import env_errors
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cohost.launch.exits import EXIT_CONFIG, Refusal
from cohost.plan.envfile import prefix
from cohost.plan.sharing import UNSTATED_MODE, Sharing


class EngineSettings(BaseSettings):
    """One vLLM service's planned settings; the prefix is `<SERVICE>_ENGINE_`."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    model: str
    served_model_name: str | None = None
    host: str = "0.0.0.0"  # noqa: S104 - the server is reached from other containers
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = None
    # Required on a GPU (load() says so); a CPU plan has none.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    budget_bytes: int | None = Field(default=None, gt=0)
    expected_process_bytes: int | None = Field(default=None, gt=0)
    max_model_len: int = Field(ge=16)
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    kv_cache_dtype: str = "auto"
    stream_interval: int = Field(default=1, ge=1)  # tokens per streamed chunk
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

    # How the plan shares the GPU; a plan without the variable predates MPS.
    sharing: Sharing = Field(default=UNSTATED_MODE, validation_alias="COHOST_SHARING")
    mps_active_thread_percentage: int | None = Field(default=None, ge=1, le=100)
    mps_client_priority: int | None = Field(default=None, ge=0, le=1)
    mps_pinned_memory_bytes: int | None = Field(default=None, gt=0)
    # The plan's check of the three above with expected_process_bytes (cohost.plan.sharing).
    mps_share_check: str | None = None
    # Where the MPS control daemon listens: the same directory for the daemon and every
    # client (CUDA's own variable and default).
    mps_pipe_directory: Path = Field(
        default=Path("/tmp/nvidia-mps"),  # noqa: S108 - CUDA's default, not a scratch file
        validation_alias="CUDA_MPS_PIPE_DIRECTORY",
    )
    mps_wait_s: float = Field(default=120.0, ge=0, validation_alias="COHOST_MPS_WAIT_S")
    # Once healthy: kill the server when /health stays silent this long (0: no watchdog).
    watchdog_s: float = Field(default=60.0, ge=0, validation_alias="COHOST_WATCHDOG_S")

    # A plan for vLLM's CPU engine (cohost.plan.cpu) sets COHOST_DEVICE=cpu and the KV cache
    # in RAM; the launcher then checks no GPU and starts the CPU engine.
    device: Literal["gpu", "cpu"] = Field(default="gpu", validation_alias="COHOST_DEVICE")
    cpu_kvcache_gib: int = Field(default=1, ge=1)

    def missing_mps_shares(self) -> list[str]:
        """The MPS settings a plan that shares through MPS must give (field names)."""
        if self.sharing != "mps":
            return []
        fields = (
            "mps_active_thread_percentage",
            "mps_client_priority",
            "mps_pinned_memory_bytes",
            "mps_share_check",
        )
        return [name for name in fields if getattr(self, name) is None]


def load(service: str) -> EngineSettings:
    p = prefix(service)
    try:
        settings = EngineSettings(_env_prefix=p)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise _invalid(service, env_errors(exc, p)) from None
    if settings.device == "gpu" and settings.gpu_memory_utilization is None:
        raise _invalid(service, [f"  {p}GPU_MEMORY_UTILIZATION: Field required"])
    missing = settings.missing_mps_shares()
    if missing:
        lines = [f"  {(p + name).upper()}: required when COHOST_SHARING=mps" for name in missing]
        raise _invalid(service, lines)
    return settings


def address(service: str) -> tuple[str, int] | None:
    """Where the server would listen, read leniently from `<SERVICE>_ENGINE_HOST`/`PORT`:
    a plan refused as invalid is still answered for there while its refusal waits."""
    p = prefix(service)
    fields = EngineSettings.model_fields
    host = os.environ.get(p + "HOST") or str(fields["host"].default)
    try:
        port = int(os.environ.get(p + "PORT") or fields["port"].default)
    except ValueError:
        return None
    return (host, port) if 0 < port < 65536 else None


def _invalid(service: str, lines: list[str]) -> Refusal:
    return Refusal(
        EXIT_CONFIG,
        f"the plan for {service!r} is missing or invalid:\n"
        + "\n".join(lines)
        + "\nLoad the plan's env file (deploy/*.env) into the environment.",
    )
