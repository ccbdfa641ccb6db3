"""The feedback message contract: what producers publish and what the worker returns.

Requests arrive on `feedback-requests` as UTF-8 JSON objects; results go to
`feedback-results`; requests that can never succeed go, byte for byte, to
`feedback-requests-dead-letter` with an `error` reason code. `parse_request` turns
raw bytes into a `FeedbackRequest` or raises `InvalidRequest` with that code.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

REQUESTS_TOPIC = "feedback-requests"
REQUESTS_SUBSCRIPTION = "feedback-requests-worker"
RESULTS_TOPIC = "feedback-results"
DEAD_LETTER_TOPIC = "feedback-requests-dead-letter"
# Created by `feedback-worker setup` so results and dead letters are kept until read.
RESULTS_SUBSCRIPTION = "feedback-results-sub"
DEAD_LETTER_SUBSCRIPTION = "feedback-requests-dead-letter-sub"
MAX_DELIVERY_ATTEMPTS = 5

MAX_TOKENS_LIMIT = 2048
# Pub/Sub attribute values are limited to 1024 bytes.
ATTRIBUTE_VALUE_LIMIT = 1024


class Reason(StrEnum):
    """Why a request was dead-lettered (the `error` attribute)."""

    TOO_LARGE = "too_large"  # payload bytes over the worker's limit, never parsed
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"  # includes nesting too deep to parse
    NOT_AN_OBJECT = "not_an_object"
    INVALID_SCHEMA = "invalid_schema"  # missing/unknown fields, wrong types, out of range
    TEXT_TOO_LONG = "text_too_long"  # prompt + max_tokens over the engine's max-model-len
    ENGINE_REJECTED = "engine_rejected"  # the engine answered 4xx for this request
    ENGINE_UNAVAILABLE = "engine_unavailable"  # transient failures on every delivery attempt


class InvalidRequest(Exception):
    """A request that can never succeed; it is dead-lettered with `reason`."""

    def __init__(self, reason: Reason, detail: str, request_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id


LANGUAGE_TAG = r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$"
RequestId = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class FeedbackRequest(BaseModel):
    """A request as published on `feedback-requests`."""

    # Unknown fields are errors: a typo such as "max_token" must not silently fall back
    # to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId | None = None
    text: Annotated[StrictStr, Field(min_length=1)]
    instructions: StrictStr | None = None
    # A BCP 47 language tag such as "en", "de" or "pt-BR".
    language: Annotated[StrictStr, Field(max_length=35, pattern=LANGUAGE_TAG)] = "en"
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None

    @field_validator("text")
    @classmethod
    def _text_has_content(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class FeedbackResult(BaseModel):
    """A result as published on `feedback-results` (attribute `request_id` carries the same id)."""

    request_id: str
    feedback: str
    model: str
    usage: Usage
    latency_ms: float
    created_at: datetime

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def utc_now() -> datetime:
    return datetime.now(UTC)


def _peek_request_id(obj: dict[str, Any]) -> str | None:
    rid = obj.get("request_id")
    if isinstance(rid, str) and 1 <= len(rid) <= 128:
        return rid
    return None


def _schema_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_request(data: bytes, *, max_bytes: int) -> FeedbackRequest:
    """Decode and validate one request; `InvalidRequest` names what is wrong."""
    if len(data) > max_bytes:
        raise InvalidRequest(Reason.TOO_LARGE, f"{len(data)} bytes, limit {max_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            Reason.INVALID_UTF8, f"not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise InvalidRequest(Reason.INVALID_JSON, "JSON nested too deeply") from None
    except ValueError as exc:
        raise InvalidRequest(Reason.INVALID_JSON, f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(
            Reason.NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}"
        )
    try:
        return FeedbackRequest.model_validate(obj)
    except ValidationError as exc:
        raise InvalidRequest(
            Reason.INVALID_SCHEMA, _schema_detail(exc), _peek_request_id(obj)
        ) from None
    except RecursionError:
        raise InvalidRequest(Reason.INVALID_JSON, "JSON nested too deeply") from None


def clip_attribute(value: str) -> str:
    """Fit a string into a Pub/Sub attribute value (1024 bytes of UTF-8)."""
    raw = value.encode()
    if len(raw) <= ATTRIBUTE_VALUE_LIMIT:
        return value
    return raw[: ATTRIBUTE_VALUE_LIMIT - 3].decode("utf-8", errors="ignore") + "..."
