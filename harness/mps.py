"""A stand-in for the CUDA MPS control daemon at its boundary, for machines without a GPU.

`cohost launch` knows the daemon only by its socket, `$CUDA_MPS_PIPE_DIRECTORY/control`: this
listens there and accepts connections, nothing more. What MPS does once vLLM connects is
measured on a real GPU (bench/gpu/), not emulated.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from types import TracebackType


class FakeMpsDaemon:
    def __init__(self, pipe: Path) -> None:
        self.pipe = pipe
        pipe.mkdir(parents=True, exist_ok=True)
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server.bind(str(pipe / "control"))
        self._server.listen(16)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()
        (self.pipe / "control").unlink(missing_ok=True)

    def __enter__(self) -> FakeMpsDaemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
