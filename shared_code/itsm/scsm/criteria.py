"""Criteria for the Cireson Portal's ``GetProjectionByCriteria``, built so values cannot change them.

The body names a type projection and an SCSM criteria expression as JSON::

    {"Id": "<type projection GUID>",
     "Criteria": {"Base": {"Expression": {"SimpleExpression": {
         "ValueExpressionLeft": {"GenericProperty": "LastModified"},
         "Operator": "Greater",
         "ValueExpressionRight": {"Value": "2024-05-06T07:00:00.000Z"}}}}}}

with ``{"And": {"Expression": [...]}}`` / ``{"Or": ...}`` for groups. The left side is a generic
property of every object (``Id`` is the object's BaseId, ``LastModified``, ``DisplayName``) or a
class property written ``$Context/Property[Type='<class GUID>']/<name>$``. Values travel as JSON
strings, so they cannot change the expression; only a ``Like`` pattern has wildcards of its own
(SQL's ``%``, ``_`` and ``[``), and ``like_literal`` escapes them in text taken from elsewhere.
Property and class names are checked against strict patterns: only values are ever free text.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

Expression = dict[str, Any]

OPERATORS = frozenset({"Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "Like"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_LIKE_SPECIAL = re.compile(r"([%_\[])")


def format_datetime(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.fffZ`` in UTC (milliseconds: what SCSM stores); naive is refused."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("criteria date-times must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def like_literal(text: str) -> str:
    """``text`` as a literal inside a ``Like`` pattern: ``%``, ``_`` and ``[`` become ``[%]`` etc."""
    if any(ch in text for ch in ("\r", "\n", "\x00")):
        raise ValueError("a criteria value must not contain line breaks or NUL characters")
    return _LIKE_SPECIAL.sub(r"[\1]", text)


def generic(name: str) -> dict[str, str]:
    if not _NAME.match(name):
        raise ValueError(f"not a generic property name: {name!r}")
    return {"GenericProperty": name}


def prop(class_id: str, name: str) -> dict[str, str]:
    if not _GUID.match(class_id) or not _NAME.match(name):
        raise ValueError(f"not a class property: {class_id!r}/{name!r}")
    return {"Property": f"$Context/Property[Type='{class_id}']/{name}$"}


def simple(left: dict[str, str], operator: str, value: str | datetime) -> Expression:
    if operator not in OPERATORS:
        raise ValueError(f"not a criteria operator: {operator!r}")
    text = format_datetime(value) if isinstance(value, datetime) else value
    if any(ch in text for ch in ("\r", "\n", "\x00")):
        raise ValueError("a criteria value must not contain line breaks or NUL characters")
    return {
        "SimpleExpression": {
            "ValueExpressionLeft": left,
            "Operator": operator,
            "ValueExpressionRight": {"Value": text},
        }
    }


def all_of(*expressions: Expression) -> Expression:
    """AND of the expressions (one expression stays as it is, as the portal expects)."""
    if not expressions:
        raise ValueError("an AND needs at least one expression")
    if len(expressions) == 1:
        return expressions[0]
    return {"And": {"Expression": list(expressions)}}


def query(projection_id: str, expression: Expression) -> dict[str, Any]:
    """The ``GetProjectionByCriteria`` body for one type projection."""
    if not _GUID.match(projection_id):
        raise ValueError(f"not a type projection GUID: {projection_id!r}")
    return {"Id": projection_id, "Criteria": {"Base": {"Expression": expression}}}
