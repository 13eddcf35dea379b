"""ServiceNow encoded queries (``sysparm_query``) built so values can never change their structure.

An encoded query is ``field<op>value`` terms joined by ``^``; ``^OR``, ``^NQ`` and ``^ORDERBY``
are separators with meaning. A value taken from an alert (a CI name, a correlation id) could hold
any of them, so every value goes through ``escape_value``: a literal ``^`` is written ``^^`` (the
instance's own escape) and line breaks are refused. A value that begins with ``javascript:`` is
refused too: the instance runs it as a server-side script and compares with its result, so such a
"name" could match any record. Field names are checked against a strict pattern, and operators
come from a fixed set, so only values are ever free text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"
"""ServiceNow's internal date-time format; values in queries are read as UTC."""

_FIELD = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")
_LINE_BREAKS = ("\r", "\n", "\x00")
_SCRIPT_PREFIX = "javascript:"


def escape_value(value: str) -> str:
    """``value`` as a literal inside an encoded query: ``^`` becomes ``^^``; line breaks and a
    leading ``javascript:`` (in any case, after blanks) are refused."""
    if any(ch in value for ch in _LINE_BREAKS):
        raise ValueError("a query value must not contain line breaks or NUL characters")
    if value.strip().lower().startswith(_SCRIPT_PREFIX):
        raise ValueError(
            "a query value must not begin with 'javascript:' (ServiceNow would run it as a script)"
        )
    return value.replace("^", "^^")


def format_datetime(moment: datetime) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC; a naive datetime is refused (its zone would be a guess)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("query datetimes must be timezone-aware")
    return moment.astimezone(UTC).strftime(DATETIME_FORMAT)


def _field(name: str) -> str:
    if not _FIELD.match(name):
        raise ValueError(f"not a ServiceNow field name: {name!r}")
    return name


def _value(value: str | int | datetime) -> str:
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return escape_value(value)


@dataclass(frozen=True)
class Query:
    """An immutable AND of conditions plus an ordering; every method returns a new query.

    ``Query().eq("name", ci).gt("sys_updated_on", ts).order_by("sys_updated_on").encode()``
    """

    terms: tuple[str, ...] = ()
    ordering: tuple[str, ...] = ()

    def _with(self, field: str, operator: str, value: str | int | datetime) -> Query:
        return Query((*self.terms, f"{_field(field)}{operator}{_value(value)}"), self.ordering)

    def eq(self, field: str, value: str | int | datetime) -> Query:
        return self._with(field, "=", value)

    def ne(self, field: str, value: str | int | datetime) -> Query:
        return self._with(field, "!=", value)

    def gt(self, field: str, value: str | int | datetime) -> Query:
        return self._with(field, ">", value)

    def ge(self, field: str, value: str | int | datetime) -> Query:
        return self._with(field, ">=", value)

    def lt(self, field: str, value: str | int | datetime) -> Query:
        return self._with(field, "<", value)

    def le(self, field: str, value: str | int | datetime) -> Query:
        return self._with(field, "<=", value)

    def like(self, field: str, value: str) -> Query:
        """``field`` contains ``value`` (case-insensitive on an instance)."""
        return self._with(field, "LIKE", value)

    def order_by(self, field: str) -> Query:
        return Query(self.terms, (*self.ordering, f"ORDERBY{_field(field)}"))

    def order_by_desc(self, field: str) -> Query:
        return Query(self.terms, (*self.ordering, f"ORDERBYDESC{_field(field)}"))

    def encode(self) -> str:
        """The ``sysparm_query`` value (conditions first, then the ordering terms)."""
        return "^".join((*self.terms, *self.ordering))

    def __str__(self) -> str:
        return self.encode()
