"""A loopback Dataverse environment (Provance ITSM runs on it): the Web API v9.2 on 127.0.0.1.

One in-memory store behind one lock, answering the documented protocol closely enough that the
Provance connector cannot tell it from an environment:

* Bearer tokens from the loopback Entra ID, for the environment's own audience
  (``https://127.0.0.1:PORT/.default``, as Dataverse's resource is the environment URL), and only for
  clients that have an application user here (others get 403 0x80072560, as Dataverse answers an
  app registration without one). A missing, expired or foreign token gets 401 with
  ``WWW-Authenticate: Bearer authorization_uri=...``.
* ``WhoAmI``; ``EntityDefinitions(LogicalName='x')`` with ``$select`` and
  ``$expand=Attributes($select=LogicalName)`` (404 for an unknown table).
* ``{set}`` list with ``$select`` / ``$filter`` / ``$orderby`` / ``$top``, ``Prefer:
  odata.maxpagesize`` (default and maximum 5,000) and ``@odata.nextLink`` with a ``$skiptoken`` paging
  cookie, formatted values when ``Prefer: odata.include-annotations`` asks for them; ``{set}(id)``
  read, ``POST {set}`` create (the caller may choose the primary key; a second create with it is 412
  0x80040237), ``PATCH {set}(id)`` update (``If-Match: *``) with state/status validation, and the
  ``CloseIncident`` action (an incidentresolution, the incident resolved). Errors are Dataverse's
  ``{"error": {"code": "0x...", "message": ...}}``, unknown properties included.
* Tables: the Customer Service ``incident`` (customer required, stock state and status reasons),
  ``annotation`` (notes, ``objectid_<table>@odata.bind``), ``incidentresolution``, ``account``,
  ``contact``, ``systemuser``, ``team`` and a custom ``new_changerequest`` (Active/Inactive), as a
  site's own Provance tables would be; ``add_column`` adds a custom column.
* Service protection: more than ``max_concurrent`` requests in flight get 429 0x80072326 with
  ``Retry-After``; ``fail_next`` injects 429 (0x80072322 with ``Retry-After``), 5xx, HTML error
  pages, a 200 HTML sign-in page, or a failure *after* the request was carried out (the answer is
  lost, the write landed).

Keyset queries ordered by ``modifiedon asc,versionnumber asc`` are answered from a sorted index
(bisect to the filter's lower bound on ``modifiedon``); anything else is a scan and a sort.

Standalone (the benchmark runs it so that its CPU is not in the measuring process), with an Entra ID
of its own, the app registration and application user of ``register_app``, the ``PEOPLE`` and an
account ``Contoso``::

    python -m tests.loopback.provance --seed incident=20000 --span-days 25

prints ``READY <environment url> <authority host> <tenant id> <account id> <incidents>`` and serves
until stdin closes (or it is killed).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import itertools
import json
import os
import random
import re
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from tests.loopback.base import LoopbackHandler, LoopbackServer
from tests.loopback.entra import EntraLoopback

API = "/api/data/v9.2/"
TS = "%Y-%m-%dT%H:%M:%SZ"
MAX_PAGE = 5000
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
LOOKUP_NAME = "@Microsoft.Dynamics.CRM.lookuplogicalname"
CHANGE_TABLE = "new_changerequest"
RESOLVED_READ_ONLY = (
    "This case has already been resolved. Close and reopen the case record to see the updates."
)

Row = dict[str, Any]


# -- schema ---------------------------------------------------------------------------------------


@dataclass
class Column:
    kind: str  # uniqueidentifier, string, memo, picklist, state, status, datetime, bigint, lookup, owner
    max_length: int = 0
    choices: dict[int, str] = field(default_factory=dict)
    targets: tuple[str, ...] = ()  # lookups: the tables they point at
    required: bool = False


@dataclass
class TableDef:
    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    columns: dict[str, Column]
    states: dict[int, tuple[str, dict[int, str]]]  # statecode -> (label, {statuscode: label})
    default_status: dict[int, int]
    change_tracking: bool = False
    object_type_code: int = 10000


_STATES_INCIDENT = {
    0: ("Active", {1: "In Progress", 2: "On Hold", 3: "Waiting for Details", 4: "Researching"}),
    1: ("Resolved", {5: "Problem Solved", 1000: "Information Provided"}),
    2: ("Cancelled", {6: "Cancelled", 2000: "Merged"}),
}
_STATES_CUSTOM = {0: ("Active", {1: "Active"}), 1: ("Inactive", {2: "Inactive"})}


def _system_columns() -> dict[str, Column]:
    return {
        "createdon": Column("datetime"),
        "modifiedon": Column("datetime"),
        "versionnumber": Column("bigint"),
        "createdby": Column("lookup", targets=("systemuser",)),
        "modifiedby": Column("lookup", targets=("systemuser",)),
    }


def _owned(states: dict[int, tuple[str, dict[int, str]]]) -> dict[str, Column]:
    state_labels = {code: label for code, (label, _) in states.items()}
    status_labels = {code: label for _, (_, statuses) in states.items() for code, label in statuses.items()}
    return {
        "statecode": Column("state", choices=state_labels),
        "statuscode": Column("status", choices=status_labels),
        "ownerid": Column("owner", targets=("systemuser", "team")),
        **_system_columns(),
    }


def _schema() -> dict[str, TableDef]:
    incident = TableDef(
        "incident",
        "incidents",
        "incidentid",
        "title",
        {
            "incidentid": Column("uniqueidentifier"),
            "ticketnumber": Column("string", max_length=100),
            "title": Column("string", max_length=200, required=True),
            "description": Column("memo", max_length=2000),
            "prioritycode": Column("picklist", choices={1: "High", 2: "Normal", 3: "Low"}),
            "caseorigincode": Column(
                "picklist",
                choices={
                    1: "Phone",
                    2: "Email",
                    3: "Web",
                    2483: "Facebook",
                    3986: "Twitter",
                    700610000: "IoT",
                },
            ),
            "casetypecode": Column("picklist", choices={1: "Question", 2: "Problem", 3: "Request"}),
            "severitycode": Column("picklist", choices={1: "Default Value"}),
            "customerid": Column("customer", targets=("account", "contact"), required=True),
            "primarycontactid": Column("lookup", targets=("contact",)),
            **_owned(_STATES_INCIDENT),
        },
        _STATES_INCIDENT,
        {0: 1, 1: 5, 2: 6},
        change_tracking=True,
        object_type_code=112,
    )
    change = TableDef(
        CHANGE_TABLE,
        "new_changerequests",
        "new_changerequestid",
        "new_name",
        {
            "new_changerequestid": Column("uniqueidentifier"),
            "new_name": Column("string", max_length=200, required=True),
            "new_number": Column("string", max_length=100),
            "description": Column("memo", max_length=4000),
            **_owned(_STATES_CUSTOM),
        },
        _STATES_CUSTOM,
        {0: 1, 1: 2},
        object_type_code=10042,
    )
    annotation = TableDef(
        "annotation",
        "annotations",
        "annotationid",
        "subject",
        {
            "annotationid": Column("uniqueidentifier"),
            "subject": Column("string", max_length=500),
            "notetext": Column("memo", max_length=100_000),
            "objectid": Column("lookup", targets=("incident", CHANGE_TABLE)),
            "objecttypecode": Column("string", max_length=100),
            **_system_columns(),
        },
        {},
        {},
        object_type_code=5,
    )
    resolution = TableDef(
        "incidentresolution",
        "incidentresolutions",
        "activityid",
        "subject",
        {
            "activityid": Column("uniqueidentifier"),
            "subject": Column("string", max_length=200, required=True),
            "description": Column("memo", max_length=2000),
            "incidentid": Column("lookup", targets=("incident",), required=True),
            **_system_columns(),
        },
        {},
        {},
        object_type_code=4206,
    )
    plain = [
        ("account", "accounts", "accountid", "name", 1),
        ("contact", "contacts", "contactid", "fullname", 2),
        ("systemuser", "systemusers", "systemuserid", "fullname", 8),
        ("team", "teams", "teamid", "name", 9),
    ]
    tables = {t.logical_name: t for t in (incident, change, annotation, resolution)}
    for logical, entity_set, primary, name, code in plain:
        tables[logical] = TableDef(
            logical,
            entity_set,
            primary,
            name,
            {
                primary: Column("uniqueidentifier"),
                name: Column("string", max_length=200),
                **_system_columns(),
            },
            {},
            {},
            object_type_code=code,
        )
    return tables


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def _no_property(name: str, table: str) -> ApiError:
    return ApiError(
        400,
        "0x80060888",
        f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{table}'.",
    )


def _not_exist(table: str, record: str) -> ApiError:
    return ApiError(404, "0x80040217", f"{table} With Id = {record} Does Not Exist")


# -- OData $filter ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<open>\()|(?P<close>\))|(?P<comma>,)"
    r"|(?P<string>'(?:[^']|'')*')"
    r"|(?P<datetime>\d{4}-\d\d-\d\dT\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:\d\d))"
    r"|(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"|(?P<number>-?\d+(?:\.\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_./]*))"
)
_COMPARE = {"eq", "ne", "gt", "ge", "lt", "le"}


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class Prop:
    name: str


@dataclass(frozen=True)
class Compare:
    op: str
    left: Prop
    right: Literal


@dataclass(frozen=True)
class Call:
    function: str
    prop: Prop
    value: Literal


@dataclass(frozen=True)
class Logic:
    op: str  # and, or
    parts: tuple[Any, ...]


@dataclass(frozen=True)
class Not:
    part: Any


class FilterError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at = 0
    while at < len(text):
        if text[at:].strip() == "":
            break
        match = _TOKEN.match(text, at)
        if not match or match.end() == at:
            raise FilterError(f"Syntax error at position {at} in '{text}'.")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        at = match.end()
    return out


def _literal(kind: str, text: str) -> Literal:
    if kind == "string":
        return Literal(text[1:-1].replace("''", "'"))
    if kind == "datetime":
        return Literal(datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC))
    if kind == "guid":
        return Literal(text.lower())
    if kind == "number":
        return Literal(float(text) if "." in text else int(text))
    raise FilterError(f"unexpected {text}")


def parse_filter(text: str) -> Any:
    tokens = _tokens(text)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> tuple[str, str]:
        nonlocal pos
        if pos >= len(tokens):
            raise FilterError(f"Syntax error: '{text}' ends too early.")
        pos += 1
        return tokens[pos - 1]

    def word(value: str) -> bool:
        token = peek()
        return token is not None and token[0] == "name" and token[1] == value

    def expression() -> Any:
        parts = [conjunction()]
        while word("or"):
            take()
            parts.append(conjunction())
        return parts[0] if len(parts) == 1 else Logic("or", tuple(parts))

    def conjunction() -> Any:
        parts = [negation()]
        while word("and"):
            take()
            parts.append(negation())
        return parts[0] if len(parts) == 1 else Logic("and", tuple(parts))

    def negation() -> Any:
        if word("not"):
            take()
            return Not(negation())
        return primary()

    def primary() -> Any:
        kind, value = take()
        if kind == "open":
            inner = expression()
            if take()[0] != "close":
                raise FilterError("Syntax error: ')' expected.")
            return inner
        if kind != "name":
            raise FilterError(f"Syntax error at '{value}'.")
        if value in ("contains", "startswith", "endswith") and peek() == ("open", "("):
            take()
            prop = take()
            if take()[0] != "comma":
                raise FilterError("Syntax error: ',' expected.")
            arg_kind, arg = take()
            if take()[0] != "close":
                raise FilterError("Syntax error: ')' expected.")
            return Call(value, Prop(prop[1]), _literal(arg_kind, arg))
        op_kind, op = take()
        if op_kind != "name" or op not in _COMPARE:
            raise FilterError(f"Syntax error: operator expected after '{value}'.")
        right_kind, right = take()
        if right_kind == "name" and right in ("null", "true", "false"):
            literal = Literal({"null": None, "true": True, "false": False}[right])
        else:
            literal = _literal(right_kind, right)
        return Compare(op, Prop(value), literal)

    tree = expression()
    if pos != len(tokens):
        raise FilterError(f"Syntax error at '{tokens[pos][1]}'.")
    return tree


def filter_props(tree: Any) -> set[str]:
    if isinstance(tree, Compare | Call):
        return {tree.left.name if isinstance(tree, Compare) else tree.prop.name}
    if isinstance(tree, Logic):
        return set().union(*(filter_props(part) for part in tree.parts))
    if isinstance(tree, Not):
        return filter_props(tree.part)
    return set()


def _comparable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.strftime(TS)
    return value


def evaluate(tree: Any, row: Mapping[str, Any]) -> bool:
    if isinstance(tree, Compare):
        left = row.get(tree.left.name)
        right = tree.right.value
        if isinstance(right, datetime) and right.microsecond:
            # whole-second columns against a fractional literal: compare with the next second
            after = (right.replace(microsecond=0) + timedelta(seconds=1)).strftime(TS)
            op = {"gt": "ge", "ge": "ge", "lt": "lt", "le": "lt"}.get(tree.op)
            if op is None:
                return tree.op == "ne"
            right_value: Any = after
        else:
            op = tree.op
            right_value = _comparable(right)
        if isinstance(left, str) and isinstance(right_value, str) and len(right_value) == 36:
            left = left.lower()
        if op == "eq":
            return bool(left == right_value)
        if op == "ne":
            return bool(left != right_value)
        if left is None or right_value is None:
            return False
        try:
            if op == "gt":
                return bool(left > right_value)
            if op == "ge":
                return bool(left >= right_value)
            if op == "lt":
                return bool(left < right_value)
            return bool(left <= right_value)
        except TypeError:
            return False
    if isinstance(tree, Call):
        value = row.get(tree.prop.name)
        needle = str(tree.value.value).lower()
        if not isinstance(value, str):
            return False
        hay = value.lower()
        if tree.function == "contains":
            return needle in hay
        if tree.function == "startswith":
            return hay.startswith(needle)
        return hay.endswith(needle)
    if isinstance(tree, Logic):
        if tree.op == "and":
            return all(evaluate(part, row) for part in tree.parts)
        return any(evaluate(part, row) for part in tree.parts)
    if isinstance(tree, Not):
        return not evaluate(tree.part, row)
    raise FilterError("unsupported filter")


def lower_bound(tree: Any, prop: str) -> str | None:
    """The smallest ``prop`` value a row matching ``tree`` can have (for the index), or None."""
    if isinstance(tree, Compare) and tree.left.name == prop and tree.op in ("gt", "ge", "eq"):
        value = tree.right.value
        if isinstance(value, datetime):
            return value.replace(microsecond=0).strftime(TS)
        return None
    if isinstance(tree, Logic):
        bounds = [lower_bound(part, prop) for part in tree.parts]
        if tree.op == "and":
            known = [b for b in bounds if b is not None]
            return max(known) if known else None
        if all(b is not None for b in bounds):
            return min(b for b in bounds if b is not None)
    return None


# -- the server ---------------------------------------------------------------------------------


@dataclass
class Fault:
    remaining: int
    status: int
    retry_after: int | None
    path_contains: str | None
    kind: str  # json, html, html200, landed
    method: str | None = None


class DataverseHandler(LoopbackHandler):
    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        body = self.read_body()
        try:
            status, payload, headers = self.app.handle(method, self.path, dict(self.headers.items()), body)
        except Exception as exc:  # a bug here must answer, not drop the connection
            status, payload, headers = 500, {"error": {"code": "0x80040216", "message": repr(exc)}}, {}
        if isinstance(payload, bytes):
            self.send_response(status)
            self.send_header("Content-Type", headers.pop("Content-Type", "text/html; charset=utf-8"))
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            return
        base = {"OData-Version": "4.0"} | headers
        self.send_json(status, payload, base)


_HTML_ERROR = (
    "<!DOCTYPE html><html><head><title>{status} {phrase}</title></head><body><h1>{phrase}</h1>"
    "<p>The service is unavailable. Please try again later.</p></body></html>"
)
_SIGN_IN = (
    '<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body><form method="post" '
    'action="https://login.microsoftonline.com/common/login"><input name="loginfmt"/></form></body></html>'
)


class DataverseLoopback(LoopbackServer):
    """A loopback Dataverse environment (see the module docstring). ``url`` is the environment URL."""

    handler_class = DataverseHandler

    def __init__(
        self,
        entra: EntraLoopback,
        *,
        clock: Callable[[], datetime] | None = None,
        max_concurrent: int = 52,
        tls: bool = True,
    ) -> None:
        super().__init__(tls=tls)
        self.entra = entra
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.max_concurrent = max_concurrent
        self.tables = _schema()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.RLock()
        self._rows: dict[str, dict[str, Row]] = {name: {} for name in self.tables}
        self._index: dict[str, list[tuple[str, int, str]]] = {name: [] for name in self.tables}
        self._version = itertools.count(1_000_000)
        self._tickets = itertools.count(1001)
        self._app_users: dict[str, str] = {}
        self._expired: set[str] = set()
        self._faults: list[Fault] = []
        self._in_flight = 0
        self._token_clients: dict[str, str] = {}
        self.organization_id = str(uuid.uuid4())
        self.business_unit_id = str(uuid.uuid4())
        self._rng = random.Random(7)
        self.system_user = self._insert_plain("systemuser", "SYSTEM")

    def start(self) -> DataverseLoopback:
        super().start()
        return self

    def __enter__(self) -> DataverseLoopback:
        return self.start()

    # -- set-up (tests) ------------------------------------------------------------------------------

    def add_app_user(self, client_id: str, name: str = "# ITSM connector") -> str:
        """An application user for an Entra app registration (its systemuserid)."""
        with self._lock:
            user = self._insert_plain("systemuser", name)
            self._app_users[client_id.lower()] = user
            return user

    def app_user_id(self, client_id: str) -> str:
        with self._lock:
            return self._app_users[client_id.lower()]

    def add_account(self, name: str) -> str:
        with self._lock:
            return self._insert_plain("account", name)

    def add_contact(self, name: str) -> str:
        with self._lock:
            return self._insert_plain("contact", name)

    def add_team(self, name: str) -> str:
        with self._lock:
            return self._insert_plain("team", name)

    def add_user(self, name: str) -> str:
        with self._lock:
            return self._insert_plain("systemuser", name)

    def add_column(self, table: str, name: str, *, kind: str = "string", max_length: int = 100) -> None:
        with self._lock:
            self.tables[table].columns[name] = Column(kind, max_length=max_length)

    def expire_tokens(self) -> None:
        """Every token seen so far is refused from now on (401), as after a revocation."""
        with self._lock:
            self._expired.update(self._token_clients)

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        retry_after: int | None = None,
        path_contains: str | None = None,
        kind: str = "json",
        method: str | None = None,
    ) -> None:
        """The next ``count`` requests (whose path contains ``path_contains``, if given) fail:
        ``json`` a Dataverse error, ``html`` an HTML error page, ``html200`` a 200 sign-in page,
        ``landed`` carried out first and then answered ``status`` (the answer is lost)."""
        with self._lock:
            self._faults.append(Fault(count, status, retry_after, path_contains, kind, method))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- store accessors (tests) ----------------------------------------------------------------------

    def records(self, table: str) -> list[Row]:
        with self._lock:
            return [dict(row) for row in self._rows[table].values()]

    def record(self, table: str, record: str) -> Row | None:
        with self._lock:
            row = self._rows[table].get(record.lower())
            return dict(row) if row is not None else None

    def notes(self, record: str) -> list[Row]:
        with self._lock:
            rows = [dict(r) for r in self._rows["annotation"].values() if r.get("_objectid_value") == record]
        return sorted(rows, key=lambda r: (r["createdon"], r["versionnumber"]))

    def resolutions(self, record: str) -> list[Row]:
        with self._lock:
            return [
                dict(r)
                for r in self._rows["incidentresolution"].values()
                if r.get("_incidentid_value") == record
            ]

    def write_count(self) -> int:
        with self._lock:
            return sum(1 for method, _, _ in self.requests if method in ("POST", "PATCH", "DELETE"))

    def insert_record(self, table: str, **fields: Any) -> Row:
        """Create a record as a person in the app would (system columns stamped now)."""
        with self._lock:
            return dict(self._create(self.tables[table], dict(fields), self.system_user))

    def update_record(self, table: str, record: str, **fields: Any) -> Row:
        """Change a record as a person would: modifiedon now, a new row version."""
        with self._lock:
            row = self._rows[table][record.lower()]
            self._stamp(self.tables[table], row, fields, self.system_user)
            return dict(row)

    def seed(self, table: str, count: int, *, start: datetime, end: datetime, rng_seed: int = 1) -> list[str]:
        """Bulk-create ``count`` realistic records of ``table`` modified over [start, end], some
        sharing a second (bulk edits), row versions in modification order. Returns their ids."""
        rng = random.Random(rng_seed)
        definition = self.tables[table]
        span = max(0, int((end - start).total_seconds()))
        base = start.astimezone(UTC).replace(microsecond=0)
        offsets: list[int] = []
        while len(offsets) < count:
            at = rng.randrange(span + 1)
            offsets.extend([at] * (1 if rng.random() < 0.7 else rng.randint(2, 25)))
        del offsets[count:]
        offsets.sort()
        with self._lock:
            owners = [r for r in self._rows["systemuser"] if r not in self._app_users.values()]
            customer = self._insert_plain("account", f"Contoso {rng_seed}")
            ids: list[str] = []
            for offset in offsets:
                modified = base + timedelta(seconds=offset)
                created = modified - timedelta(seconds=rng.randrange(0, 14 * 86400))
                record = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                state = (
                    rng.choice((0, 0, 0, 0, 0, 0, 1, 1, 1, 2))
                    if table == "incident"
                    else rng.choice((0, 0, 1))
                )
                statuses = list(definition.states[state][1])
                row: Row = {
                    definition.primary_id: record,
                    "statecode": state,
                    "statuscode": rng.choice(statuses),
                    "createdon": created.strftime(TS),
                    "modifiedon": modified.strftime(TS),
                    "versionnumber": next(self._version),
                    "_ownerid_value": rng.choice(owners),
                    "_createdby_value": rng.choice(owners),
                    "_modifiedby_value": rng.choice(owners),
                }
                if table == "incident":
                    row |= {
                        "ticketnumber": self._ticket(),
                        "title": rng.choice(_TITLES).format(n=rng.randrange(1, 200)),
                        "description": "Raised by monitoring; see the alert for details.",
                        "prioritycode": rng.choice((1, 2, 2, 3)),
                        "caseorigincode": rng.choice((1, 2, 3)),
                        "casetypecode": rng.choice((1, 2, 3)),
                        "severitycode": 1,
                        "_customerid_value": customer,
                    }
                else:
                    row |= {
                        definition.primary_name: rng.choice(_CHANGES).format(n=rng.randrange(1, 200)),
                        "new_number": f"CHG-{next(self._tickets):06d}",
                        "description": "Planned maintenance.",
                    }
                self._put(definition, row)
                ids.append(record)
            return ids

    # -- HTTP entry point ----------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        path, _, query_string = target.partition("?")
        query = {k: v[-1] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
        lowered = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            self.requests.append((method, path, query))
            self._in_flight += 1
            busy = self._in_flight > self.max_concurrent
        try:
            if busy:
                return self._throttled(
                    "0x80072326",
                    f"Number of concurrent requests exceeded the limit of {self.max_concurrent}.",
                    1,
                )
            if not path.startswith(API):
                return (
                    404,
                    {"error": {"code": "0x80060888", "message": "Resource not found for the segment."}},
                    {},
                )
            caller, denied = self._authorize(lowered.get("authorization"))
            if denied is not None:
                return denied
            with self._lock:
                fault = self._take_fault(method, path)
            if fault is not None and fault.kind != "landed":
                return self._fault_answer(fault)
            try:
                answer = self._route(method, path[len(API) :], query, lowered, body, caller)
            except ApiError as exc:
                answer = (exc.status, exc.body(), exc.headers)
            except FilterError as exc:
                answer = (400, {"error": {"code": "0x80060888", "message": str(exc)}}, {})
            if fault is not None:
                return self._fault_answer(fault)
            return answer
        finally:
            with self._lock:
                self._in_flight -= 1

    # -- auth -----------------------------------------------------------------------------------------

    def _authorize(self, authorization: str | None) -> tuple[str, tuple[int, Any, dict[str, str]] | None]:
        """The calling application user's id, or the answer that refuses the request."""
        scheme, _, value = (authorization or "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" and value.strip() else None
        challenge = {
            "WWW-Authenticate": f"Bearer authorization_uri={self.entra.url}/{self.entra.tenant_id}"
            f"/oauth2/authorize, resource_id={self.url}/"
        }
        problem = "missing" if token is None else self.entra.token_problem(token, self.url)
        with self._lock:
            if token is not None and token in self._expired:
                problem = "expired"
        if problem is not None:
            return "", (401, None, challenge)
        assert token is not None
        with self._lock:
            client = self._token_clients.get(token)
        if client is None:
            issued = next((t for t in self.entra.issued_tokens() if t.token == token), None)
            client = issued.client_id.lower() if issued else ""
            with self._lock:
                self._token_clients[token] = client
        with self._lock:
            caller = self._app_users.get(client, "")
        if not caller:
            refused = {
                "error": {"code": "0x80072560", "message": "The user is not a member of the organization."}
            }
            return "", (403, refused, {})
        return caller, None

    # -- faults ---------------------------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self._faults:
            if fault.method is not None and fault.method != method:
                continue
            if fault.remaining > 0 and (fault.path_contains is None or fault.path_contains in path):
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                return fault
        return None

    def _throttled(self, code: str, message: str, retry_after: int) -> tuple[int, Any, dict[str, str]]:
        return 429, {"error": {"code": code, "message": message}}, {"Retry-After": str(retry_after)}

    def _fault_answer(self, fault: Fault) -> tuple[int, Any, dict[str, str]]:
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        if fault.kind == "html200":
            return 200, _SIGN_IN.encode(), {"Content-Type": "text/html; charset=utf-8"}
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "Error"
        if fault.kind == "html":
            page = _HTML_ERROR.format(status=fault.status, phrase=phrase).encode()
            return fault.status, page, {"Content-Type": "text/html; charset=utf-8", **headers}
        if fault.status == 429:
            return (
                429,
                {
                    "error": {
                        "code": "0x80072322",
                        "message": "Number of requests exceeded the limit "
                        "of 6000 over time window of 300 seconds.",
                    }
                },
                headers,
            )
        return (
            fault.status,
            {"error": {"code": "0x80040216", "message": f"{phrase} (loopback fault)"}},
            headers,
        )

    # -- routing --------------------------------------------------------------------------------------

    _RECORD = re.compile(r"^(?P<set>[A-Za-z_][A-Za-z0-9_]*)(?:\((?P<id>[^)]*)\))?$")

    def _route(
        self, method: str, rest: str, query: dict[str, str], headers: dict[str, str], body: bytes, caller: str
    ) -> tuple[int, Any, dict[str, str]]:
        rest = unquote(rest).rstrip("/")
        if rest == "WhoAmI" and method == "GET":
            return (
                200,
                {
                    "@odata.context": f"{self.url}{API}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
                    "BusinessUnitId": self.business_unit_id,
                    "UserId": caller,
                    "OrganizationId": self.organization_id,
                },
                {},
            )
        if rest.startswith("EntityDefinitions") and method == "GET":
            return self._entity_definition(rest, query)
        if rest == "CloseIncident":
            if method != "POST":
                raise ApiError(405, "0x8006088a", "The requested resource does not support http method.")
            return self._close_incident(_json_object(body), caller)
        match = self._RECORD.match(rest)
        definition = next((t for t in self.tables.values() if match and t.entity_set == match["set"]), None)
        if match is None or definition is None:
            raise ApiError(404, "0x80060888", f"Resource not found for the segment '{rest.split('(')[0]}'.")
        record = match["id"]
        prefer = headers.get("prefer", "")
        if record is None:
            if method == "GET":
                return self._list(definition, query, prefer)
            if method == "POST":
                with self._lock:
                    row = self._create(definition, _json_object(body), caller)
                return self._created(definition, row, query, prefer)
            raise ApiError(405, "0x8006088a", "The requested resource does not support http method.")
        record = record.lower()
        if not _GUID.match(record):
            raise ApiError(400, "0x80060888", f"Bad Request - Error in query syntax: key '{record}'.")
        if method == "GET":
            with self._lock:
                found = self._rows[definition.logical_name].get(record)
                if found is None:
                    raise _not_exist(definition.logical_name, record)
                return 200, self._render(definition, found, self._select(definition, query), prefer), {}
        if method == "PATCH":
            with self._lock:
                existing = self._rows[definition.logical_name].get(record)
                if existing is None:
                    if headers.get("if-match") == "*":
                        raise _not_exist(definition.logical_name, record)
                    payload = _json_object(body) | {definition.primary_id: record}
                    self._create(definition, payload, caller)
                    return 204, None, {}
                self._update(definition, existing, _json_object(body), caller)
            return 204, None, {}
        if method == "DELETE":
            with self._lock:
                if self._rows[definition.logical_name].pop(record, None) is None:
                    raise _not_exist(definition.logical_name, record)
                self._index[definition.logical_name] = [
                    key for key in self._index[definition.logical_name] if key[2] != record
                ]
            return 204, None, {}
        raise ApiError(405, "0x8006088a", "The requested resource does not support http method.")

    # -- metadata -------------------------------------------------------------------------------------

    def _entity_definition(self, rest: str, query: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        match = re.fullmatch(r"EntityDefinitions\(LogicalName='([^']*)'\)", rest)
        if match is None:
            raise ApiError(400, "0x80060888", "Only EntityDefinitions(LogicalName='...') is served here.")
        definition = self.tables.get(match[1])
        if definition is None:
            raise ApiError(
                404,
                "0x80040217",
                f"Could not find entity with name '{match[1]}'. The entity with a name = '{match[1]}' with "
                "namemapping = 'Logical' was not found in the MetadataCache.",
            )
        full: dict[str, Any] = {
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_OID, definition.logical_name)),
            "LogicalName": definition.logical_name,
            "SchemaName": definition.logical_name.title(),
            "EntitySetName": definition.entity_set,
            "PrimaryIdAttribute": definition.primary_id,
            "PrimaryNameAttribute": definition.primary_name,
            "ChangeTrackingEnabled": definition.change_tracking,
            "ObjectTypeCode": definition.object_type_code,
            "IsCustomEntity": definition.logical_name.startswith("new_"),
        }
        selected = [name for name in query.get("$select", "").split(",") if name]
        unknown = [name for name in selected if name not in full]
        if unknown:
            raise ApiError(
                400,
                "0x80060888",
                f"Could not find a property named '{unknown[0]}' on type "
                "'Microsoft.Dynamics.CRM.EntityMetadata'.",
            )
        out: dict[str, Any] = {
            "@odata.context": f"{self.url}{API}$metadata#EntityDefinitions(...)/$entity",
            "MetadataId": full["MetadataId"],
        }
        out |= {name: full[name] for name in (selected or list(full))}
        if query.get("$expand", "").startswith("Attributes"):
            with self._lock:
                names = sorted(definition.columns)
            out["Attributes"] = [
                {
                    "LogicalName": name,
                    "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_OID, f"{definition.logical_name}.{name}")),
                }
                for name in names
            ]
        return 200, out, {}

    # -- queries --------------------------------------------------------------------------------------

    def _property(self, definition: TableDef, name: str) -> str:
        """A Web API property name -> the stored key (``_ownerid_value`` stays as it is)."""
        lookup = re.fullmatch(r"_([a-z0-9_]+)_value", name)
        column = definition.columns.get(lookup[1] if lookup else name)
        if column is None or (lookup is None and column.kind in ("lookup", "owner", "customer")):
            raise _no_property(name, definition.logical_name)
        return name

    def _select(self, definition: TableDef, query: dict[str, str]) -> list[str]:
        text = query.get("$select", "")
        if not text:
            return [
                f"_{name}_value" if column.kind in ("lookup", "owner", "customer") else name
                for name, column in definition.columns.items()
            ]
        return [self._property(definition, name.strip()) for name in text.split(",") if name.strip()]

    def _list(
        self, definition: TableDef, query: dict[str, str], prefer: str
    ) -> tuple[int, Any, dict[str, str]]:
        select = self._select(definition, query)
        if definition.primary_id not in select:
            select = [definition.primary_id, *select]
        tree = parse_filter(query["$filter"]) if query.get("$filter") else None
        for name in filter_props(tree):
            self._property(definition, name)
        order = [part.split() for part in query.get("$orderby", "").split(",") if part.strip()]
        orderby = [(p[0], (p[1].lower() if len(p) > 1 else "asc")) for p in order]
        for name, _ in orderby:
            self._property(definition, name)
        size_match = re.search(r"odata\.maxpagesize=(\d+)", prefer)
        page_size = min(int(size_match[1]), MAX_PAGE) if size_match else MAX_PAGE
        top = int(query["$top"]) if query.get("$top", "").isdigit() else None
        cookie = _read_cookie(query.get("$skiptoken", ""))
        with self._lock:
            rows, more, last = self._query(
                definition, tree, orderby, page_size if top is None else top, cookie
            )
            rendered = [self._render(definition, row, select, prefer) for row in rows]
        body: dict[str, Any] = {
            "@odata.context": f"{self.url}{API}$metadata#{definition.entity_set}({','.join(select)})",
            "value": rendered,
        }
        if more and top is None:
            page_number = int(cookie.get("page", 1)) + 1
            token = _write_cookie({"page": page_number, **last})
            params = {k: v for k, v in query.items() if k != "$skiptoken"} | {"$skiptoken": token}
            body["@odata.nextLink"] = (
                f"{self.url}{API}{definition.entity_set}?{urlencode(params, quote_via=quote)}"
            )
        applied = [
            p
            for p in (
                f"odata.maxpagesize={page_size}" if size_match else "",
                'odata.include-annotations="*"' if "include-annotations" in prefer else "",
            )
            if p
        ]
        return 200, body, ({"Preference-Applied": ",".join(applied)} if applied else {})

    def _query(
        self,
        definition: TableDef,
        tree: Any,
        orderby: list[tuple[str, str]],
        limit: int,
        cookie: dict[str, Any],
    ) -> tuple[list[Row], bool, dict[str, Any]]:
        table = definition.logical_name
        store = self._rows[table]
        if orderby == [("modifiedon", "asc"), ("versionnumber", "asc")]:
            index = self._index[table]
            if "after" in cookie:
                start = bisect.bisect_right(index, (cookie["after"][0], cookie["after"][1], "~"))
            else:
                bound = lower_bound(tree, "modifiedon") if tree is not None else None
                start = bisect.bisect_left(index, (bound, -1, "")) if bound else 0
            found: list[Row] = []
            for key in itertools.islice(index, start, None):
                row = store[key[2]]
                if tree is None or evaluate(tree, row):
                    found.append(row)
                    if len(found) > limit:
                        break
            more = len(found) > limit
            page = found[:limit]
            last = {"after": [page[-1]["modifiedon"], page[-1]["versionnumber"]]} if page else {}
            return page, more, last
        matched = [row for row in store.values() if tree is None or evaluate(tree, row)]
        for name, direction in reversed(orderby or [(definition.primary_id, "asc")]):
            matched.sort(key=_sort_key(name), reverse=direction == "desc")
        offset = int(cookie.get("offset", 0))
        page = matched[offset : offset + limit]
        return page, offset + limit < len(matched), {"offset": offset + limit}

    def _render(self, definition: TableDef, row: Row, select: list[str], prefer: str) -> dict[str, Any]:
        annotate = "include-annotations" in prefer
        out: dict[str, Any] = {"@odata.etag": f'W/"{row.get("versionnumber", 0)}"'}
        for name in select:
            value = row.get(name)
            out[name] = value
            if not annotate or value is None:
                continue
            lookup = re.fullmatch(r"_([a-z0-9_]+)_value", name)
            if lookup:
                target = row.get(f"{name}{LOOKUP_NAME}") or self._target_of(definition, lookup[1], value)
                out[name + FORMATTED] = self._name_of(target, value)
                out[name + LOOKUP_NAME] = target
                continue
            column = definition.columns.get(name)
            if column is None:
                continue
            if column.choices:
                out[name + FORMATTED] = column.choices.get(value, str(value))
            elif column.kind == "datetime":
                moment = datetime.strptime(value, TS)
                out[name + FORMATTED] = (
                    f"{moment.month}/{moment.day}/{moment.year} {moment:%I:%M %p}".replace(" 0", " ")
                )
        return out

    def _target_of(self, definition: TableDef, column: str, value: str) -> str:
        targets = definition.columns[column].targets
        return next((t for t in targets if value in self._rows[t]), targets[0] if targets else "")

    def _name_of(self, table: str, record: str) -> str:
        row = self._rows.get(table, {}).get(record)
        if row is None:
            return ""
        return str(row.get(self.tables[table].primary_name) or "")

    # -- writes ---------------------------------------------------------------------------------------

    def _created(
        self, definition: TableDef, row: Row, query: dict[str, str], prefer: str
    ) -> tuple[int, Any, dict[str, str]]:
        location = f"{self.url}{API}{definition.entity_set}({row[definition.primary_id]})"
        headers = {"OData-EntityId": location}
        if "return=representation" in prefer:
            with self._lock:
                rendered = self._render(definition, row, self._select(definition, query), prefer)
            rendered["@odata.context"] = f"{self.url}{API}$metadata#{definition.entity_set}/$entity"
            return 201, rendered, headers
        return 204, None, headers

    def _apply(self, definition: TableDef, row: Row, payload: Mapping[str, Any], *, creating: bool) -> None:
        """Validate ``payload`` against the table and copy it into ``row`` (binds become lookups)."""
        for key, value in payload.items():
            if key.startswith("@"):
                continue
            if key.endswith("@odata.bind"):
                nav = key[: -len("@odata.bind")]
                column_name, target = self._navigation(definition, nav)
                bound = re.fullmatch(r"/?([A-Za-z_][A-Za-z0-9_]*)\(([0-9a-fA-F-]{36})\)", str(value))
                target_def = next(
                    (t for t in self.tables.values() if bound and t.entity_set == bound[1]), None
                )
                if bound is None or target_def is None or (target and target_def.logical_name != target):
                    raise ApiError(
                        400,
                        "0x80048d19",
                        f"Error identified in Payload provided by the user for "
                        f"Entity :'{definition.entity_set}': invalid reference for {nav}.",
                    )
                if target_def.logical_name not in definition.columns[column_name].targets:
                    raise ApiError(400, "0x80048d19", f"{nav} cannot point at {target_def.logical_name}.")
                record = bound[2].lower()
                if record not in self._rows[target_def.logical_name]:
                    raise _not_exist(target_def.logical_name, record)
                row[f"_{column_name}_value"] = record
                row[f"_{column_name}_value{LOOKUP_NAME}"] = target_def.logical_name
                if column_name == "objectid":
                    row["objecttypecode"] = target_def.logical_name
                continue
            column = definition.columns.get(key)
            if column is None or column.kind in ("lookup", "owner", "customer"):
                raise ApiError(
                    400,
                    "0x80048d19",
                    "Error identified in Payload provided by the user for Entity "
                    f":'{definition.entity_set}', ----> InnerException : Microsoft.OData.ODataException: "
                    f"The property '{key}' does not exist on type "
                    f"'Microsoft.Dynamics.CRM.{definition.logical_name}'. Make sure to only use property "
                    "names that are defined by the type or mark the type as open type.",
                )
            if key in ("createdon", "modifiedon", "versionnumber") or (
                key == definition.primary_id and not creating
            ):
                continue
            if column.kind in ("string", "memo"):
                if value is not None and not isinstance(value, str):
                    raise ApiError(
                        400,
                        "0x80048d19",
                        f"Cannot convert the literal '{value}' to the expected type 'Edm.String'.",
                    )
                if value is not None and column.max_length and len(value) > column.max_length:
                    raise ApiError(
                        400,
                        "0x80044331",
                        f"A validation error occurred. The length of the '{key}' attribute of the "
                        f"'{definition.logical_name}' entity exceeded the maximum allowed length of "
                        f"'{column.max_length}'.",
                    )
            elif column.kind in ("picklist", "state", "status"):
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                    raise ApiError(
                        400,
                        "0x80048d19",
                        f"Cannot convert the literal '{value}' to the expected type 'Edm.Int32'.",
                    )
                if column.kind == "picklist" and value is not None and value not in column.choices:
                    raise ApiError(
                        400, "0x8004431a", f"{value} is not a valid value for the {key} attribute."
                    )
            elif column.kind == "uniqueidentifier":
                if not isinstance(value, str) or not _GUID.match(value.lower()):
                    raise ApiError(
                        400,
                        "0x80048d19",
                        f"Cannot convert the literal '{value}' to the expected type 'Edm.Guid'.",
                    )
                row[key] = value.lower()
                continue
            row[key] = value

    def _navigation(self, definition: TableDef, nav: str) -> tuple[str, str]:
        """``customerid_account`` -> (customerid, account); ``ownerid`` -> (ownerid, "")."""
        if nav in definition.columns and definition.columns[nav].kind in ("lookup", "owner"):
            return nav, ""
        for name, column in definition.columns.items():
            for target in column.targets:
                if nav == f"{name}_{target}" and column.kind in ("customer", "lookup"):
                    return name, target
        raise ApiError(
            400,
            "0x80048d19",
            f"An undeclared property '{nav}' which only has property annotations in the payload but no "
            "property value was found in the payload. In OData, only declared navigation properties and "
            "declared named "
            "streams can be represented as properties without values.",
        )

    def _create(self, definition: TableDef, payload: dict[str, Any], user: str) -> Row:
        table = definition.logical_name
        record = str(payload.get(definition.primary_id) or uuid.uuid4()).lower()
        if record in self._rows[table]:
            raise ApiError(412, "0x80040237", "A record with matching key values already exists.")
        if ("statecode" in payload or "statuscode" in payload) and table == "incident":
            raise ApiError(400, "0x80040203", "statecode and statuscode cannot be set on create of incident.")
        row: Row = {definition.primary_id: record}
        self._apply(definition, row, payload, creating=True)
        row[definition.primary_id] = record
        for name, column in definition.columns.items():
            key = f"_{name}_value" if column.kind in ("lookup", "owner", "customer") else name
            if column.required and not row.get(key):
                if name == "customerid":
                    raise ApiError(400, "0x80040203", "You should specify a parent contact or account.")
                raise ApiError(400, "0x80040203", f"Attribute {name} cannot be NULL")
        if definition.states:
            row.setdefault("statecode", 0)
            row.setdefault("statuscode", definition.default_status[0])
            row.setdefault("_ownerid_value", user)
        if table == "incident":
            row["ticketnumber"] = self._ticket()
        now = self._now()
        row |= {"createdon": now, "_createdby_value": user}
        self._stamp(definition, row, {}, user)
        return row

    def _update(self, definition: TableDef, row: Row, payload: dict[str, Any], user: str) -> None:
        state = payload.get("statecode", row.get("statecode"))
        status = payload.get("statuscode")
        if definition.states and ("statecode" in payload or "statuscode" in payload):
            if state not in definition.states:
                raise ApiError(
                    400, "0x80040203", f"{state} is not a valid state code on {definition.logical_name}."
                )
            if definition.logical_name == "incident" and state == 1 and row.get("statecode") != 1:
                raise ApiError(
                    400,
                    "0x80040203",
                    "This message can not be used to set the state of incident to Resolved. In order to set "
                    "state "
                    "of incident to Resolved, use the CloseIncidentRequest message instead.",
                )
            if status is None:
                status = definition.default_status[state]
            if status not in definition.states[state][1]:
                raise ApiError(
                    400,
                    "0x80040203",
                    f"{status} is not a valid status code for state code {definition.logical_name}State."
                    f"{definition.states[state][0]} on {definition.logical_name} with Id "
                    f"{row[definition.primary_id]}.",
                )
            payload = payload | {"statecode": state, "statuscode": status}
        elif definition.logical_name == "incident" and row.get("statecode") != 0:
            raise ApiError(
                400,
                "0x80040203",
                RESOLVED_READ_ONLY,
            )
        self._stamp(definition, row, payload, user)

    def _stamp(self, definition: TableDef, row: Row, payload: Mapping[str, Any], user: str) -> None:
        """Apply ``payload`` and the system columns of a write; keep the keyset index in step."""
        table = definition.logical_name
        old = (row.get("modifiedon"), row.get("versionnumber"), row[definition.primary_id])
        self._apply(definition, row, payload, creating=False)
        row |= {"modifiedon": self._now(), "versionnumber": next(self._version), "_modifiedby_value": user}
        self._put(definition, row, old if old[0] is not None else None)
        assert table in self._rows

    def _put(self, definition: TableDef, row: Row, old: tuple[Any, Any, str] | None = None) -> None:
        table = definition.logical_name
        index = self._index[table]
        if old is not None:
            at = bisect.bisect_left(index, old)
            if at < len(index) and index[at] == old:
                del index[at]
        self._rows[table][row[definition.primary_id]] = row
        bisect.insort(index, (row["modifiedon"], row["versionnumber"], row[definition.primary_id]))

    def _close_incident(self, params: dict[str, Any], caller: str) -> tuple[int, Any, dict[str, str]]:
        resolution = params.get("IncidentResolution")
        status = params.get("Status")
        if not isinstance(resolution, dict) or not isinstance(status, int):
            raise ApiError(400, "0x80040203", "IncidentResolution and Status are required parameters.")
        bind = str(resolution.get("incidentid@odata.bind", ""))
        match = re.fullmatch(r"/?incidents\(([0-9a-fA-F-]{36})\)", bind)
        if match is None:
            raise ApiError(400, "0x80040203", "The incident resolution has no incident.")
        with self._lock:
            incident = self._rows["incident"].get(match[1].lower())
            if incident is None:
                raise _not_exist("incident", match[1].lower())
            if incident["statecode"] != 0:
                raise ApiError(
                    400,
                    "0x80040203",
                    RESOLVED_READ_ONLY,
                )
            if status not in _STATES_INCIDENT[1][1]:
                raise ApiError(
                    400,
                    "0x80040203",
                    f"{status} is not a valid status code for state code IncidentState.Resolved on incident.",
                )
            fields = {k: v for k, v in resolution.items() if not k.startswith("@")}
            self._create(self.tables["incidentresolution"], fields, caller)
            self._stamp(self.tables["incident"], incident, {"statecode": 1, "statuscode": status}, caller)
        return 204, None, {}

    # -- helpers --------------------------------------------------------------------------------------

    def _insert_plain(self, table: str, name: str) -> str:
        definition = self.tables[table]
        record = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        now = self._now()
        row: Row = {
            definition.primary_id: record,
            definition.primary_name: name,
            "createdon": now,
            "modifiedon": now,
            "versionnumber": next(self._version),
        }
        self._put(definition, row)
        return record

    def _ticket(self) -> str:
        suffix = "".join(self._rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(6))
        return f"CAS-{next(self._tickets):05d}-{suffix}"

    def _now(self) -> str:
        return self.clock().astimezone(UTC).strftime(TS)


_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TITLES = (
    "Disk space low on web-{n:03d}",
    "High CPU on app-{n:03d}",
    "db-{n:03d} not responding",
    "Certificate expiring on edge-{n:03d}",
)
_CHANGES = ("Patch web-{n:03d}", "Resize app-{n:03d}", "Rotate certificate on edge-{n:03d}")


def _sort_key(name: str) -> Callable[[Row], tuple[bool, Any]]:
    def key(row: Row) -> tuple[bool, Any]:
        value = row.get(name)
        return (value is not None, value if value is not None else 0)

    return key


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body) if body.strip() else {}
    except ValueError:
        raise ApiError(
            400, "0x80048d19", "Error identified in Payload provided by the user: invalid JSON."
        ) from None
    if not isinstance(payload, dict):
        raise ApiError(400, "0x80048d19", "Error identified in Payload provided by the user: not an object.")
    return payload


def _write_cookie(values: dict[str, Any]) -> str:
    inner = base64.urlsafe_b64encode(json.dumps(values).encode()).decode()
    return f'<cookie pagenumber="{values["page"]}" pagingcookie="{quote(inner)}" istracking="False" />'


def _read_cookie(token: str) -> dict[str, Any]:
    if not token:
        return {}
    match = re.search(r'pagingcookie="([^"]*)"', token)
    if match is None:
        raise ApiError(400, "0x80060888", "The $skiptoken is not valid.")
    try:
        value = json.loads(base64.urlsafe_b64decode(unquote(match[1]).encode()))
    except ValueError:
        raise ApiError(400, "0x80060888", "The $skiptoken is not valid.") from None
    return value if isinstance(value, dict) else {}


def seed_people(server: DataverseLoopback, names: Iterable[str]) -> list[str]:
    """System users for owners and creators of seeded records."""
    return [server.add_user(name) for name in names]


PEOPLE = ("Abel Tuter", "Beth Anglin", "Bud Richman", "David Loo", "Fred Luddy", "Tanya Shu")


def wait_idle(server: DataverseLoopback, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while server._in_flight and time.monotonic() < deadline:
        time.sleep(0.01)


# -- the app's side (tests, bench) -------------------------------------------------------------------

PROVANCE_APP_ID = "7d0c8e2a-3b1f-4c5d-9e6f-0a1b2c3d4e5f"
PROVANCE_APP_SECRET = "loopback-provance-app-secret"  # test-only value


def register_app(
    server: DataverseLoopback, client_id: str = PROVANCE_APP_ID, secret: str = PROVANCE_APP_SECRET
) -> str:
    """The Entra app registration (in the server's Entra) and its application user; the user's id."""
    server.entra.add_client(client_id, secret)
    return server.add_app_user(client_id)


def connection_options(
    server: DataverseLoopback, customer: str, client_id: str = PROVANCE_APP_ID
) -> list[str]:
    """``connections add`` options for a connection to ``server`` (the secret goes through stdin)."""
    return [
        "--type",
        "provance",
        "--url",
        server.url,
        "--private-instance",
        "--user",
        client_id,
        "--tenant-id",
        server.entra.tenant_id,
        "--customer",
        f"accounts({customer})",
        "--secrets-stdin",
    ]


# -- standalone -------------------------------------------------------------------------------------


def _wait_for_stdin_close() -> None:
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        mode = 0
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe
        return
    while True:  # stdin is a terminal or /dev/null: serve until killed
        time.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.loopback.provance", description="Loopback Dataverse (with its own Entra ID)"
    )
    parser.add_argument(
        "--seed", action="append", default=[], metavar="TABLE=COUNT", help=f"incident=N or {CHANGE_TABLE}=N"
    )
    parser.add_argument("--span-days", type=float, default=25.0)
    parser.add_argument(
        "--until-minutes", type=float, default=5.0, help="the newest seeded change is this long ago"
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as running:
        entra = EntraLoopback()
        entra.start()
        running.callback(entra.stop)
        server = DataverseLoopback(entra)
        register_app(server)
        for person in PEOPLE:
            server.add_user(person)
        account = server.add_account("Contoso")
        end = server.clock() - timedelta(minutes=args.until_minutes)
        for n, spec in enumerate(args.seed):
            table, _, count = spec.partition("=")
            if table not in server.tables:
                parser.error(f"--seed: no table {table!r} (tables: {', '.join(sorted(server.tables))})")
            server.seed(
                table, int(count), start=end - timedelta(days=args.span_days), end=end, rng_seed=n + 1
            )
        server.start()
        running.callback(server.stop)
        incidents = len(server.records("incident"))
        print(f"READY {server.url} {entra.url} {entra.tenant_id} {account} {incidents}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            _wait_for_stdin_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
