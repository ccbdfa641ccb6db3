"""Hypothesis generators of payloads for the bad-input phase: malformed ones of every kind,
each with the dead-letter reason its kind implies, oversized ones and valid requests; and
the oracle that checks the generator against the worker's own parser."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cohost_shared.messages import MAX_TOKENS_LIMIT, InvalidRequest, Reason, parse_request
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from .config import MAX_REQUEST_BYTES
from .stack import SuiteError

# Byte sequences that are never valid UTF-8 wherever they are spliced in.
BAD_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",  # overlong, 3 bytes
    b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\x80",  # lone continuation byte
    b"\xc3",  # truncated 2-byte sequence (followed by ASCII)
)
FIELDS = ("request_id", "text", "instructions", "language", "max_tokens")


@dataclass(frozen=True)
class Payload:
    kind: str  # what the generator meant to break
    reason: str  # the dead-letter reason that kind implies ("" for valid requests)
    data: bytes


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _text() -> st.SearchStrategy[str]:
    # Any Unicode but lone surrogates (JSON text cannot carry those as UTF-8).
    return st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=150).filter(
        lambda t: bool(t.strip())
    )


def _language() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["en", "de", "fr", "pt-BR", "zh-Hant", "es-419", "sr-Latn-RS"]),
        st.from_regex(r"\A[a-z]{2,3}(-[A-Z]{2})?\Z"),
    )


def _valid_fields() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {"text": _text()},
        optional={
            "request_id": st.text(st.characters(codec="ascii"), min_size=1, max_size=40).map(
                lambda s: "bad-" + s
            ),
            "instructions": st.text(max_size=50),
            "language": _language(),
            "max_tokens": st.integers(1, 16),
        },
    )


def _json_value() -> st.SearchStrategy[object]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=8,
    )


def _not_a_string() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    )


def _schema_breakers() -> st.SearchStrategy[Payload]:
    def payload(kind: str) -> Callable[[dict[str, object]], Payload]:
        return lambda obj: Payload(kind, Reason.INVALID_SCHEMA.value, dumps(obj))

    base = _valid_fields()
    blank = st.text(st.sampled_from(" \t\n\r\u00a0\u2003\u3000"), max_size=20)
    return st.one_of(
        base.map(lambda d: {k: v for k, v in d.items() if k != "text"}).map(
            payload("missing text")
        ),
        st.tuples(base, _not_a_string())
        .map(lambda t: {**t[0], "text": t[1]})
        .map(payload("text not a string")),
        st.tuples(base, blank).map(lambda t: {**t[0], "text": t[1]}).map(payload("blank text")),
        st.tuples(
            base,
            st.text(min_size=1, max_size=20).filter(lambda k: k not in FIELDS),
            _json_value(),
        )
        .map(lambda t: {**t[0], t[1]: t[2]})
        .map(payload("unknown field")),
        st.tuples(
            base,
            st.one_of(
                st.integers(max_value=0),
                st.integers(min_value=MAX_TOKENS_LIMIT + 1),
                st.floats(allow_nan=False),
                st.booleans(),
                st.text(st.sampled_from("0123456789"), min_size=1, max_size=4),
            ),
        )
        .map(lambda t: {**t[0], "max_tokens": t[1]})
        .map(payload("max_tokens out of range")),
        st.tuples(
            base,
            st.one_of(
                st.text(max_size=50).filter(
                    lambda s: re.fullmatch(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*", s) is None
                ),
                st.integers(),
            ),
        )
        .map(lambda t: {**t[0], "language": t[1]})
        .map(payload("bad language tag")),
        st.tuples(
            base,
            st.one_of(
                st.just(""),
                st.text(min_size=129, max_size=300),
                st.integers(),
                st.lists(st.text(max_size=3), max_size=2),
            ),
        )
        .map(lambda t: {**t[0], "request_id": t[1]})
        .map(payload("bad request_id")),
        st.tuples(base, _not_a_string().filter(lambda v: v is not None))
        .map(lambda t: {**t[0], "instructions": t[1]})
        .map(payload("instructions not a string")),
    )


def _json_breakers() -> st.SearchStrategy[Payload]:
    def bad(kind: str) -> Callable[[bytes], Payload]:
        return lambda data: Payload(kind, Reason.INVALID_JSON.value, data)

    valid = _valid_fields().map(dumps)
    return st.one_of(
        st.tuples(valid, st.integers(1, 10_000))
        .map(lambda t: t[0][: max(1, len(t[0]) - 1 - t[1] % len(t[0]))])
        .filter(_not_json)
        .map(bad("truncated")),
        st.tuples(valid, st.sampled_from([b"}", b"]", b"x", b",", b'{"a":1}']))
        .map(lambda t: t[0] + t[1])
        .map(bad("trailing garbage")),
        _valid_fields().map(lambda d: repr(d).encode()).filter(_not_json).map(bad("python repr")),
        st.text(min_size=1, max_size=200).map(str.encode).filter(_not_json).map(bad("plain text")),
        # Far deeper than any recursion limit (Hypothesis raises it while it runs), within
        # the 1 MiB byte limit.
        st.tuples(st.integers(20_000, 150_000), st.sampled_from([("[", "]"), ('{"a":', "}")]))
        .map(lambda t: (t[1][0] * t[0] + ("1" if t[1][1] == "}" else "") + t[1][1] * t[0]).encode())
        .map(bad("nested too deep")),
        st.integers(4_400, 20_000)
        .map(lambda n: b'{"text": "x", "max_tokens": ' + b"9" * n + b"}")
        .map(bad("integer too long")),
        valid.map(lambda d: b"\xef\xbb\xbf" + d).map(bad("UTF-8 byte order mark")),
    )


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return True
    return False


def malformed_payload() -> st.SearchStrategy[Payload]:
    """One malformed payload; the kinds are weighted so each appears plenty of times."""
    utf8 = st.tuples(_valid_fields().map(dumps), st.sampled_from(BAD_UTF8), st.integers(0)).map(
        lambda t: Payload(
            "invalid UTF-8 spliced in",
            Reason.INVALID_UTF8.value,
            t[0][: t[2] % len(t[0])] + t[1] + t[0][t[2] % len(t[0]) :],
        )
    )
    raw_binary = (
        st.binary(min_size=1, max_size=300)
        .filter(lambda b: not _is_utf8(b))
        .map(lambda b: Payload("random bytes", Reason.INVALID_UTF8.value, b))
    )
    not_object = (
        _json_value()
        .filter(lambda v: not isinstance(v, dict))
        .map(lambda v: Payload("JSON but not an object", Reason.NOT_AN_OBJECT.value, dumps(v)))
    )
    # Hypothesis picks one_of's branches about evenly; repeating a branch weights it.
    schema = _schema_breakers()
    json_ = _json_breakers()
    return st.one_of(utf8, utf8, raw_binary, not_object, not_object, json_, json_, json_,
                     schema, schema, schema, schema)  # fmt: skip


def oversized_payload() -> st.SearchStrategy[Payload]:
    """Over the worker's byte limit: drawn apart, as 1 MiB each is too much traffic for
    one kind in thirteen."""
    return st.tuples(_valid_fields(), st.integers(1, 4096)).map(
        lambda t: Payload(
            "over the byte limit",
            Reason.TOO_LARGE.value,
            dumps({**t[0], "text": "x" * (MAX_REQUEST_BYTES + t[1])}),
        )
    )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def valid_request() -> st.SearchStrategy[Payload]:
    return _valid_fields().map(lambda d: Payload("valid", "", dumps(d)))


def generate(strategy: st.SearchStrategy[Payload], count: int, seed_value: int) -> list[Payload]:
    """`count` examples of `strategy`, the same every run for the same seed."""
    out: list[Payload] = []
    round_ = 0
    while len(out) < count:

        @settings(
            max_examples=count - len(out),
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @seed(seed_value + round_)
        @given(strategy)
        def draw(p: Payload) -> None:
            out.append(p)

        draw()
        round_ += 1
    return out[:count]


def check_oracle(payloads: Sequence[Payload]) -> None:
    """The generator must produce what it means to: the worker's parser agrees with the
    kind's reason before anything is sent (so a mismatch later is the worker's)."""
    for p in payloads:
        try:
            parse_request(p.data, max_bytes=MAX_REQUEST_BYTES)
            got = ""
        except InvalidRequest as exc:
            got = exc.reason.value
        if got != p.reason:
            raise SuiteError(f"generator bug: {p.kind} payload parses as {got!r}: {p.data[:200]!r}")
