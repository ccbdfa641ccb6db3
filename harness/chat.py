"""Chat load on a real vLLM server: bursts of streamed chat requests from a thread.

Each burst is one streamed chat request held open for `busy_s` (then closed, which makes
vLLM abort it), followed by `idle_s` without chat. The server's own /metrics then shows
chat busy and idle in turn, as the worker's preemption reads it.
"""

from __future__ import annotations

import threading
import time

import openai


class ChatBursts:
    def __init__(
        self, base_url: str, model: str, *, busy_s: float, idle_s: float, max_tokens: int = 512
    ) -> None:
        self._client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0)
        self._model = model
        self.busy_s, self.idle_s, self.max_tokens = busy_s, idle_s, max_tokens
        self.bursts = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ChatBursts:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def burst(self) -> float:
        """One chat request held open for busy_s; returns when it was sent (monotonic)."""
        sent = time.monotonic()
        stream = self._client.chat.completions.create(
            model=self._model,
            messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
            max_tokens=self.max_tokens,
            stream=True,
        )
        try:
            for _ in stream:
                if time.monotonic() - sent >= self.busy_s or self._stop.is_set():
                    break
        finally:
            stream.close()
        return sent

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.burst()
                self.bursts += 1
            except openai.OpenAIError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.idle_s)
