"""The chat messages the worker sends for one request.

The requester's text is data, not instructions: it goes into the user message
between <text> markers, any marker inside it is neutralised so the text cannot
close the block early, and the system prompt says to ignore instructions inside.

The engine renders the messages with the model's chat template and then tokenizes
the result as one string, so a chat-template control token written in the text
(`<|im_end|><|im_start|>system ...`) would become a real control token and open a
real system turn, which no wording of the system prompt can undo. Such tokens are
broken up the same way as the markers (`< |im_start|>`): the model still sees what
was written, as plain text.
"""

from __future__ import annotations

import re

from cohost_shared.messages import FeedbackRequest

OPEN, CLOSE = "<text>", "</text>"

# The opening character of a chat-template control token, followed by the rest of it:
# `<|...|>` (ChatML: Qwen, SmolLM; Llama 3, Phi), the same with U+FF5C fullwidth bars
# (DeepSeek), `[INST]` and friends (Mistral, Llama 2), `<s>` / `</s>`, and Gemma's
# `<start_of_turn>`.
_CONTROL_TOKEN = re.compile(
    r"<(?=[|\uff5c])"
    r"|\[(?=/?(?:INST|SYS|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|THINK)\])"
    r"|<(?=/?s>)"
    r"|<(?=(?:start|end)_of_turn>)"
)


def _fence(text: str) -> str:
    # Break any marker the text carries so it cannot end (or reopen) the block.
    text = text.replace(CLOSE, "</ text>").replace(OPEN, "< text>")
    return _CONTROL_TOKEN.sub(lambda m: m.group(0) + " ", text)


def build_messages(request: FeedbackRequest, system_prompt: str) -> list[dict[str, str]]:
    parts = [f"Language of the answer: {request.language}"]
    if request.instructions:
        parts.append(f"Focus on: {_fence(request.instructions)}")
    parts.append(f"{OPEN}\n{_fence(request.text)}\n{CLOSE}")
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": "\n\n".join(parts)},
    ]
