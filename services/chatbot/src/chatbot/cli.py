"""`chatbot`: talk to the chatbot server with the openai client.

chatbot "Hello!"      one question, the answer streamed to stdout
chatbot               a conversation: one line per turn, Ctrl-D to end
"""

from __future__ import annotations

import argparse
import sys

import openai
from openai.types.chat import ChatCompletionMessageParam

from chatbot.settings import ChatbotSettings


def client(settings: ChatbotSettings) -> openai.OpenAI:
    key = settings.api_key.get_secret_value() if settings.api_key else "EMPTY"
    return openai.OpenAI(base_url=settings.base_url, api_key=key, timeout=settings.timeout_s)


def reply(
    api: openai.OpenAI, settings: ChatbotSettings, history: list[ChatCompletionMessageParam]
) -> str:
    """Stream one assistant turn to stdout and return its text."""
    stream = api.chat.completions.create(
        model=settings.model,
        messages=history,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        stream=True,
    )
    parts: list[str] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text = chunk.choices[0].delta.content
            parts.append(text)
            print(text, end="", flush=True)
    print()
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__.split("\n")[0])
    parser.add_argument("message", nargs="?", help="one message; without it, a conversation")
    args = parser.parse_args(argv)
    settings = ChatbotSettings()
    api = client(settings)
    history: list[ChatCompletionMessageParam] = []
    try:
        if args.message is not None:
            history.append({"role": "user", "content": args.message})
            reply(api, settings, history)
            return 0
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": reply(api, settings, history)})
    except openai.APIConnectionError:
        print(f"error: no chatbot at {settings.base_url} (is it running?)", file=sys.stderr)
        return 1
    except openai.APIStatusError as exc:
        print(f"error: the chatbot answered {exc.status_code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
