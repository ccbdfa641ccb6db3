"""The message contract: parsing, validation, reasons."""

from __future__ import annotations

import json

import pytest
from cohost_shared.messages import (
    ATTRIBUTE_VALUE_LIMIT,
    FeedbackRequest,
    InvalidRequest,
    Reason,
    clip_attribute,
    parse_request,
)
from hypothesis import given
from hypothesis import strategies as st

LIMIT = 1_000_000


def reason_of(data: bytes, max_bytes: int = LIMIT) -> Reason:
    with pytest.raises(InvalidRequest) as info:
        parse_request(data, max_bytes=max_bytes)
    return info.value.reason


def test_minimal_request_gets_defaults() -> None:
    request = parse_request(b'{"text": "hello"}', max_bytes=LIMIT)
    assert request == FeedbackRequest(text="hello")
    assert request.language == "en"
    assert request.request_id is None
    assert request.max_tokens is None


def test_full_request() -> None:
    data = {
        "request_id": "r-1",
        "text": "An essay.",
        "instructions": "Focus on structure.",
        "language": "pt-BR",
        "max_tokens": 2048,
    }
    assert parse_request(json.dumps(data).encode(), max_bytes=LIMIT).model_dump() == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", Reason.INVALID_UTF8),
        (b"not json", Reason.INVALID_JSON),
        (b"", Reason.INVALID_JSON),
        (b"[" * 100_000, Reason.INVALID_JSON),
        (b"42", Reason.NOT_AN_OBJECT),
        (b'"text"', Reason.NOT_AN_OBJECT),
        (b"{}", Reason.INVALID_SCHEMA),
        (b'{"text": ""}', Reason.INVALID_SCHEMA),
        (b'{"text": " \\n\\t"}', Reason.INVALID_SCHEMA),
        (b'{"text": 5}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "max_tokens": 0}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "max_tokens": 2049}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "max_tokens": "10"}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "max_tokens": 10.0}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "max_tokens": true}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "request_id": ""}', Reason.INVALID_SCHEMA),
        (json.dumps({"text": "x", "request_id": "r" * 129}).encode(), Reason.INVALID_SCHEMA),
        (b'{"text": "x", "language": "english!"}', Reason.INVALID_SCHEMA),
        (b'{"text": "x", "unknown": 1}', Reason.INVALID_SCHEMA),
    ],
)
def test_malformed_requests_name_their_reason(data: bytes, reason: Reason) -> None:
    assert reason_of(data) == reason


def test_size_limit_is_checked_before_parsing() -> None:
    assert reason_of(b'{"text": "' + b"a" * 2000 + b'"}', max_bytes=1024) == Reason.TOO_LARGE


def test_schema_error_keeps_a_valid_request_id_and_names_the_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request(b'{"request_id": "abc", "max_tokens": 0}', max_bytes=LIMIT)
    assert info.value.request_id == "abc"
    assert "text" in info.value.detail
    assert "max_tokens" in info.value.detail


@given(st.binary(max_size=300))
def test_any_bytes_either_parse_or_raise_invalid_request(data: bytes) -> None:
    try:
        parse_request(data, max_bytes=LIMIT)
    except InvalidRequest as exc:
        error = exc
    else:
        return
    assert error.reason in Reason
    assert error.detail


@given(st.text(max_size=3000))
def test_clipped_attributes_fit_pubsub(value: str) -> None:
    clipped = clip_attribute(value)
    assert len(clipped.encode()) <= ATTRIBUTE_VALUE_LIMIT
    if len(value.encode()) <= ATTRIBUTE_VALUE_LIMIT:
        assert clipped == value
