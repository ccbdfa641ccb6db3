"""Where the chatbot is and how to reach it: `CHATBOT_` variables.

The chatbot *is* a vLLM server speaking the OpenAI API; these are what its clients need.
The server's own flags come from the plan (deploy/*.env, `CHATBOT_ENGINE_*`).
"""

from __future__ import annotations

from cohost_shared import endpoints
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ChatbotSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATBOT_", extra="ignore", frozen=True)

    base_url: str = f"{endpoints.CHATBOT_URL}/v1"
    model: str = "chatbot"
    api_key: SecretStr | None = None
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    timeout_s: float = Field(default=120.0, gt=0)
