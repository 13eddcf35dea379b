"""decode_json_body: what the webhook refuses before any schema check, and how it says so."""

from __future__ import annotations

import codecs
import json

import pytest

from shared_code.alerts.intake import decode_json_body
from shared_code.errors import MalformedPayloadError

JSON = "application/json"


@pytest.mark.parametrize(
    ("body", "where", "code_point"),
    [
        (b'{"data": {"essentials": {"alertId": "\\ud800"}}}', "data.essentials.alertId", "\\ud800"),
        (
            b'{"data": {"essentials": {"alertRule": "cpu \\uDFFF high"}}}',
            "data.essentials.alertRule",
            "\\udfff",
        ),
        (b'{"a": ["ok", "\\ud83d"]}', "a[1]", "\\ud83d"),  # the first half of a pair, alone
        (b'{"a": "\\ude00\\ud83d"}', "a", "\\ude00"),  # both halves, in the wrong order
        (b'{"a": {"\\ud800": 1}}', "a.\\ud800", "\\ud800"),  # a member name
        (b'"\\udbff"', "the body", "\\udbff"),
        (b'{"a": "\xed\xa0\x80"}', "a", "\\ud800"),  # a surrogate encoded as UTF-8 (CESU-8)
        ('{"a": "x"}'.encode("utf-16-le").replace(b"x\x00", b"\x00\xd8"), "a", "\\ud800"),  # UTF-16 body
    ],
    ids=[
        "alert-id",
        "alert-rule",
        "list-item",
        "reversed-pair",
        "member-name",
        "top-level",
        "cesu-8",
        "utf-16",
    ],
)
def test_text_with_a_lone_surrogate_is_refused_with_its_path(
    body: bytes, where: str, code_point: str
) -> None:
    with pytest.raises(MalformedPayloadError) as info:
        decode_json_body(body, JSON)
    message = str(info.value)
    assert where in message
    assert code_point in message
    assert "surrogate" in message
    message.encode("utf-8")  # the message itself is clean text


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    assert decode_json_body(b'{"a": "\\ud83d\\ude00"}', JSON) == {"a": "\N{GRINNING FACE}"}
    assert decode_json_body(b'{"a": "\\\\ud800"}', JSON) == {"a": "\\ud800"}  # a backslash, then text
    assert decode_json_body('{"a": "\U0001f600 \u00e9"}'.encode(), JSON) == {"a": "\U0001f600 \u00e9"}
    assert decode_json_body(codecs.BOM_UTF8 + b'{"a": 1}', JSON) == {"a": 1}


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": ' + b"9" * 5_000 + b"}",
        b'{"a": [1, -' + b"1" * 4_301 + b"]}",
    ],
    ids=["positive", "negative-in-a-list"],
)
def test_an_integer_beyond_the_digit_limit_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedPayloadError, match="more than 4,300 digits"):
        decode_json_body(body, JSON)


def test_an_integer_at_the_digit_limit_is_fine() -> None:
    assert decode_json_body(b'{"a": ' + b"9" * 4_300 + b"}", JSON) == {"a": int("9" * 4_300)}


def test_a_large_clean_body_is_decoded_as_it_was_sent() -> None:
    payload = {"items": [{"name": f"vm-{i}", "tags": ["a", "\u00e9", "\u4e2d"]} for i in range(2_000)]}
    assert decode_json_body(json.dumps(payload).encode(), JSON) == payload
