"""While a refused launcher waits out its backoff, it answers on its server's port.

Otherwise the port is closed for the whole wait (up to 30 minutes): `cohost status`, the
worker and a person with curl see only "connection refused", and the reason is in the
container's log alone. Every request gets HTTP 503 with the refusal as JSON: `cohost
status` shows it (`KEY`), an OpenAI client reads `error.message`, and health checks keep
failing, as they should. A port that cannot be bound costs one line in the log, never the
refusal itself: the launcher waits and exits with its code all the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cohost.launch.exits import Refusal, say

# The body's key `cohost status` looks for (cohost.status.checks).
KEY = "refused"


@dataclass(frozen=True)
class Waiting:
    service: str
    refusal: Refusal
    refusals: int
    wait_s: float
    next_wait_s: float
    fix: str
    exits_at: float  # time.monotonic()

    def body(self) -> dict[str, Any]:
        """The refusal as it stands now: how long is left is computed per request."""
        left = max(0.0, self.exits_at - time.monotonic())
        first = self.refusal.message.splitlines()[0] if self.refusal.message else ""
        code = self.refusal.code
        return {
            "error": {
                "message": f"{self.service} refuses to start (exit {code}): {first}",
                "type": "ServiceUnavailable",
                "code": 503,
            },
            KEY: {
                "service": self.service,
                "code": code,
                "reason": self.refusal.message,
                "refusals_in_a_row": self.refusals,
                "wait_s": self.wait_s,
                "exits_in_s": round(left, 1),
                "next_wait_s": self.next_wait_s,
                "fix": self.fix,
            },
        }


def _handler(waiting: Waiting) -> type[BaseHTTPRequestHandler]:
    class Refused(BaseHTTPRequestHandler):
        def _answer(self, *, with_body: bool = True) -> None:
            body = waiting.body()
            data = json.dumps(body).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Retry-After", str(math.ceil(body[KEY]["exits_in_s"])))
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer()

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def do_POST(self) -> None:
            # A chat request: read what was sent (up to 1 MiB) so the client gets the answer.
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(max(length, 0), 1 << 20))
            self._answer()

        def log_message(self, format: str, *args: object) -> None:
            return  # health checks every 5 s would flood the log the refusal is said in

    return Refused


@contextlib.contextmanager
def answering(address: tuple[str, int] | None, waiting: Waiting) -> Iterator[None]:
    """Answer every request at `address` with the refusal until the block ends."""
    if address is None:
        yield
        return
    host, port = address
    try:
        server = _server_for(host)((host, port), _handler(waiting))
    except (OSError, OverflowError) as exc:
        say(waiting.service, f"cannot answer on {host}:{port} while waiting: {exc}")
        yield
        return
    thread = threading.Thread(target=server.serve_forever, name="refusing", daemon=True)
    thread.start()
    say(waiting.service, f"answering on {host}:{port} with 503 and this refusal while waiting")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class _Ipv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _server_for(host: str) -> type[ThreadingHTTPServer]:
    """The server for `host` as vLLM's --host takes it: `::` or another IPv6 address binds an
    IPv6 socket (on Linux `::` takes IPv4 too, by default), anything else an IPv4 one."""
    return _Ipv6Server if ":" in host else ThreadingHTTPServer
