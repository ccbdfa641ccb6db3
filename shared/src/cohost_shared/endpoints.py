"""Where the parts listen by default: the ports of the local stack (`cohost up`).

Every client's default points here (the chat command, the worker's engine URL, `cohost
status`), so the defaults agree with each other. Containers set their own URLs.
"""

from __future__ import annotations

HOST = "127.0.0.1"
EMULATOR_PORT = 8085
CHATBOT_PORT = 8001
FEEDBACK_ENGINE_PORT = 8002
WORKER_METRICS_PORT = 9100


def url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


CHATBOT_URL = url(CHATBOT_PORT)
FEEDBACK_ENGINE_URL = url(FEEDBACK_ENGINE_PORT)
WORKER_METRICS_URL = url(WORKER_METRICS_PORT)
