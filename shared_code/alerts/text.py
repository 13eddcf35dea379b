"""Plain-text helpers for alert summaries and notes: short, single-line, bounded, never raising.

Everything an alert carries is shown to people in a ticket, and any of it may be huge, nested or of
an unexpected type; these helpers turn any JSON value into readable text of a bounded length.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

from shared_code.errors import shown

__all__ = ["shown"]  # re-exported: the alert modules take every text helper from here

QUERY_LIMIT = 1_000
VALUE_LIMIT = 300
COMMUNICATION_LIMIT = 1_200
MAX_ITEMS = 10
MAX_PAIRS = 20
_TAG = re.compile(r"<[^>]*>")
_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/tr|/h\d)\s*/?\s*>", re.IGNORECASE)


def strip_html(text: str) -> str:
    """Service Health communications are HTML; tickets want plain text with the paragraphs kept."""
    decoded = html.unescape(_TAG.sub("", _BREAK.sub("\n", text))).replace("\xa0", " ")
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in decoded.split("\n")]
    return "\n".join(line for line in lines if line)


TRUNCATED = "… (summary truncated)"


def join_bounded(lines: list[str], limit: int) -> str:
    """Whole lines up to ``limit`` characters, then a marker, so a cut never lands mid-fact."""
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    size = len(TRUNCATED)
    for line in lines:
        if size + len(line) + 1 > limit:
            break
        kept.append(line)
        size += len(line) + 1
    if not kept:  # one giant first line: cut it instead of dropping everything
        return clip(text, limit)
    return "\n".join([*kept, TRUNCATED])


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)].rstrip() + "…"


def one_line(text: str, limit: int = VALUE_LIMIT) -> str:
    return clip(" ".join(text[: limit * 4].split()), limit)


def plain(value: object, limit: int = VALUE_LIMIT) -> str:
    """A scalar as short single-line text; containers and null give '' (they are summarised elsewhere)."""
    if value is None or isinstance(value, Mapping | list | tuple):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return one_line(str(value), limit)


def labelled(label: str, value: object, sep: str = ": ", limit: int = VALUE_LIMIT) -> str:
    """'Label: value', or '' when the value is empty, so absent facts leave no empty lines."""
    text = plain(value, limit)
    return f"{label}{sep}{text}" if text else ""


def query_text(value: object) -> str:
    """A query keeps its line breaks' meaning as spaces and is cut at a readable length."""
    return plain(value, QUERY_LIMIT) or "(none)"


def https_link(value: object) -> str:
    text = value.strip() if isinstance(value, str) else ""
    return text if text.lower().startswith("https://") and len(text) <= 4_000 else ""


def window_line(start: object, end: object) -> str:
    start_text, end_text = plain(start), plain(end)
    if not start_text and not end_text:
        return ""
    return f"Window: {start_text or '?'} - {end_text or '?'}"


def pairs(mapping: Mapping[Any, Any]) -> str:
    shown_pairs = [
        f"{plain(key, 60)}={plain(value, 256) or compact(value, 256)}"
        for key, value in list(mapping.items())[:MAX_PAIRS]
    ]
    more = len(mapping) - MAX_PAIRS
    return ", ".join(shown_pairs) + (f", … (+{more} more)" if more > 0 else "")


def dimensions(value: object) -> str:
    """[{"name": "Computer", "value": "vm-web-01"}] -> 'Computer=vm-web-01'."""
    if isinstance(value, Mapping):
        return pairs(value)
    if not isinstance(value, list):
        return ""
    named = {
        plain(item.get("name"), 60): item.get("value")
        for item in value[: MAX_PAIRS * 2]
        if isinstance(item, Mapping) and plain(item.get("name"))
    }
    return pairs(named)


def failing_periods(value: object) -> str:
    if not isinstance(value, Mapping):
        return ""
    failing, total = (
        plain(value.get("minFailingPeriodsToAlert")),
        plain(value.get("numberOfEvaluationPeriods")),
    )
    return f"failing {failing} of {total} periods" if failing and total else ""


def more_line(count: int, noun: str, shown: int = MAX_ITEMS) -> str:
    return f"… and {count - shown} more {noun}" if count > shown else ""


def compact(value: object, limit: int = VALUE_LIMIT) -> str:
    """Short text for any JSON value; big containers are cut before they are serialised whole."""
    head: object
    if isinstance(value, Mapping):
        head = dict(list(value.items())[:MAX_PAIRS])
    elif isinstance(value, list | tuple):
        head = list(value[:MAX_PAIRS])
    else:
        return plain(value, limit)
    suffix = " …" if len(value) > MAX_PAIRS else ""
    try:
        text = json.dumps(head, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(head)
    return one_line(text[: limit * 2] + suffix, limit)
