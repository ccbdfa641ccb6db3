"""The chat messages the worker sends for one request.

The requester's text is data, not instructions: it goes into the user message
between <text> markers, any marker inside it is neutralised so the text cannot
close the block early, and the system prompt says to ignore instructions inside.
"""

from __future__ import annotations

from cohost.messages import FeedbackRequest

OPEN, CLOSE = "<text>", "</text>"


def _fence(text: str) -> str:
    # Break any marker the text carries so it cannot end (or reopen) the block.
    return text.replace(CLOSE, "</ text>").replace(OPEN, "< text>")


def build_messages(request: FeedbackRequest, system_prompt: str) -> list[dict[str, str]]:
    parts = [f"Language of the answer: {request.language}"]
    if request.instructions:
        parts.append(f"Focus on: {_fence(request.instructions)}")
    parts.append(f"{OPEN}\n{_fence(request.text)}\n{CLOSE}")
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": "\n\n".join(parts)},
    ]
