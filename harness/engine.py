"""A real CPU vLLM server that tests and benchmarks may kill and restart on the same port."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cohost.cpu_engine import server
from cohost.launch.command import pause_env
from cohost.processes import Child, http_ok

# Small context so "text too long" is easy to reach; small model so it starts fast.
ENGINE_MAX_MODEL_LEN = 1024
ENGINE_MAX_NUM_SEQS = 16
TEST_MODEL = "tiny-llama"
SERVED_NAME = "feedback"


class CpuServer:
    """One CPU vLLM server serving `SERVED_NAME`, with its log in a file."""

    def __init__(
        self,
        model_dir: Path,
        port: int,
        log_path: Path,
        extra_args: Sequence[str] = (),
        role: str = "feedback",
    ) -> None:
        """`role`: the service it stands in for; the feedback engine serves /pause."""
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        argv = server.server_command(
            model_dir,
            port=port,
            served_model_name=SERVED_NAME,
            max_model_len=ENGINE_MAX_MODEL_LEN,
            max_num_seqs=ENGINE_MAX_NUM_SEQS,
            extra_args=extra_args,
        )
        env = server.server_env() | pause_env(role)
        self.child = Child("engine", argv, log_path=log_path, env=env)

    @property
    def root(self) -> str:
        """The server's root URL (/health, /metrics, /tokenize), without /v1."""
        return self.base_url.removesuffix("/v1")

    def start(self) -> None:
        self.child.start()
        self.child.wait_ready(http_ok(f"{self.root}/health"), timeout=600)

    def kill(self) -> None:
        self.child.kill()

    def stop(self) -> None:
        self.child.stop()
