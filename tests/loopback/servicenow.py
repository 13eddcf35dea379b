"""A loopback ServiceNow instance: OAuth (``/oauth_token.do``) and the Table API on 127.0.0.1.

One in-memory store behind one lock, answering the documented REST protocol closely enough that
the ServiceNow connector cannot tell it from an instance:

* ``POST /oauth_token.do`` (password and refresh_token grants, optional refresh-token rotation);
  HTTP Basic with the user/password works on the API too.
* ``/api/now/table/{table}[/{sys_id}]`` (also ``/api/now/v1/...`` and ``/api/now/v2/...``):
  list with ``sysparm_query`` / ``_fields`` / ``_limit`` / ``_offset`` / ``_display_value`` /
  ``_exclude_reference_link`` / ``_no_count``, create, read, update (PATCH and PUT), delete.
* Tables ``incident``, ``change_request`` (both extend ``task``), ``cmdb_ci`` and its child
  ``cmdb_ci_server``, ``sys_user``, ``sys_user_group`` and the read-only ``sys_journal_field``.
* Event Management: ``POST /api/global/em/jsonv2`` (``{"records": [...]}``, role
  ``evt_mgmt_integration``) writes ``em_event`` rows and processes them into ``em_alert`` rows by
  message key: a new key opens an alert (Alert0010001), a repeat updates it (severity, description,
  event count), severity 0 (Clear) closes it, and an event for a closed alert reopens it within
  ``active_interval_seconds`` (``evt_mgmt.active_interval``) or opens a new one after. Both tables
  are read-only through the Table API. ``defer_event_processing`` keeps events unprocessed (state
  Ready) until ``process_events()``, as the instance's background job would.
* The Identification and Reconciliation API (``POST /api/now/identifyreconcile``): server CIs
  identified by name, else by IP address (case-insensitive), inserted / updated / left alone;
  relationships (``cmdb_rel_ci``) of the types in ``cmdb_rel_type`` de-duplicated on (parent,
  child, type); refusals reported inside a 200 answer, per item and relation, as the instance
  does: an unregistered ``sysparm_data_source``, an unknown class, no identifying value, a
  duplicate item in one payload, an unknown relationship type, a relation to a refused item.
* Business logic of a stock instance: numbers (INC0010001, CHG0030001), priority from
  impact/urgency, active from state, resolved_at/closed_at stamps, journal fields, and the incident
  data policy (Resolution code and notes are mandatory to resolve or close).
* Encoded queries: ``^`` AND, ``^OR`` OR (binding to the previous condition), ``^NQ`` OR of
  whole groups, ``^^`` a literal caret, ``ORDERBY`` / ``ORDERBYDESC``. Invalid conditions (bad
  syntax, unknown fields) are ignored, as a stock instance does (``glide.invalid_query.returns_no_rows``
  is false by default), so a typo widens the result rather than failing.
* Keyset-style sync queries on ``sys_updated_on`` (and ``sys_id`` within one second) are answered
  by bisect on a per-table ``(sys_updated_on, sys_id)`` index; ``last_plan`` says which way the last
  list query went ("index" or "scan").

Test hooks: ``fail_next`` / ``delay_seconds`` / ``answer_late`` fault injection, a request log,
accessors for the store, a bulk generator (``seed_work_items``), a controllable ``clock``, and
control endpoints under ``/__loopback/`` (no auth) for other processes.

Run standalone (benchmarks, demo)::

    python -m tests.loopback.servicenow --seed incident=100000 --span-days 120 [--no-tls]

prints ``READY <url>`` and serves until killed (or until stdin closes, when stdin is a pipe).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from operator import itemgetter
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from tests import canary
from tests.loopback.base import LoopbackHandler, LoopbackServer

TS = "%Y-%m-%d %H:%M:%S"
DEFAULT_CLIENT_ID = "loopback-servicenow-client"
DEFAULT_CLIENT_SECRET = canary.CLIENT_SECRET  # the suite's canary: tests/canary.py
DEFAULT_USERNAME = "itsm.connector"
DEFAULT_PASSWORD = canary.PASSWORD
ADMIN_USERNAME = "admin"
ACCESS_TOKEN_LIFESPAN = 1799
REFRESH_TOKEN_LIFESPAN = 8_640_000  # 100 days, the instance default
DEFAULT_LIMIT = 10_000

Record = dict[str, str]

# -- schema --------------------------------------------------------------------------------------

_SYS_FIELDS = (
    "sys_id",
    "sys_class_name",
    "sys_created_on",
    "sys_created_by",
    "sys_updated_on",
    "sys_updated_by",
    "sys_mod_count",
)
_TASK_FIELDS = (
    "number",
    "active",
    "state",
    "impact",
    "urgency",
    "priority",
    "opened_at",
    "opened_by",
    "short_description",
    "description",
    "cmdb_ci",
    "assigned_to",
    "assignment_group",
    "correlation_id",
    "correlation_display",
    "contact_type",
    "close_notes",
    "closed_at",
    "closed_by",
    "work_notes",
    "comments",
    "due_date",
    "business_service",
    "company",
    "location",
    "watch_list",
    "work_notes_list",
    "approval",
    "escalation",
    "made_sla",
    "parent",
    "reassignment_count",
)
_INCIDENT_FIELDS = (
    "caller_id",
    "category",
    "subcategory",
    "close_code",
    "resolved_at",
    "resolved_by",
    "incident_state",
    "severity",
    "hold_reason",
    "problem_id",
    "reopen_count",
)
_CHANGE_FIELDS = (
    "type",
    "risk",
    "category",
    "close_code",
    "start_date",
    "end_date",
    "work_start",
    "work_end",
    "requested_by",
    "requested_by_date",
    "implementation_plan",
    "backout_plan",
    "test_plan",
    "justification",
    "reason",
    "on_hold",
    "phase",
)
_CI_FIELDS = (
    "name",
    "short_description",
    "category",
    "subcategory",
    "operational_status",
    "install_status",
    "ip_address",
    "fqdn",
    "dns_domain",
    "serial_number",
    "asset_tag",
    "manufacturer",
    "location",
    "company",
    "assigned_to",
    "managed_by",
    "owned_by",
    "support_group",
    "correlation_id",
    "discovery_source",
)
_EVENT_FIELDS = (
    "source",
    "event_class",
    "node",
    "type",
    "resource",
    "metric_name",
    "message_key",
    "severity",
    "description",
    "additional_info",
    "time_of_event",
    "resolution_state",
    "state",
    "alert",
    "processed",
)
_ALERT_FIELDS = (
    "number",
    "source",
    "event_class",
    "node",
    "type",
    "resource",
    "metric_name",
    "message_key",
    "severity",
    "state",
    "description",
    "additional_info",
    "initial_event_time",
    "last_event_time",
    "event_count",
    "reopen_count",
    "cmdb_ci",
)
_EVENT_SEVERITIES = {"0": "Clear", "1": "Critical", "2": "Major", "3": "Minor", "4": "Warning", "5": "OK"}
EVENT_ROLE = "evt_mgmt_integration"
_SERVER_FIELDS = ("host_name", "os", "os_version", "cpu_count", "ram", "disk_space", "virtual")
_USER_FIELDS = ("user_name", "name", "first_name", "last_name", "email", "title", "active", "manager")
_GROUP_FIELDS = ("name", "description", "email", "manager", "active")
_JOURNAL_FIELDS = ("sys_id", "element", "element_id", "name", "value", "sys_created_on", "sys_created_by")

_IMPACT = {"1": "1 - High", "2": "2 - Medium", "3": "3 - Low"}
_PRIORITY = {"1": "1 - Critical", "2": "2 - High", "3": "3 - Moderate", "4": "4 - Low", "5": "5 - Planning"}
_INCIDENT_STATES = {
    "1": "New",
    "2": "In Progress",
    "3": "On Hold",
    "6": "Resolved",
    "7": "Closed",
    "8": "Canceled",
}
_CHANGE_STATES = {
    "-5": "New",
    "-4": "Assess",
    "-3": "Authorize",
    "-2": "Scheduled",
    "-1": "Implement",
    "0": "Review",
    "3": "Closed",
    "4": "Canceled",
}
_TASK_STATES = {
    "-5": "Pending",
    "1": "Open",
    "2": "Work in Progress",
    "3": "Closed Complete",
    "4": "Closed Incomplete",
    "7": "Closed Skipped",
}
_TASK_CHOICES = {"impact": _IMPACT, "urgency": _IMPACT, "priority": _PRIORITY, "state": _TASK_STATES}
_INACTIVE_STATES = {"incident": {"6", "7", "8"}, "change_request": {"3", "4"}, "task": {"3", "4", "7"}}

_REFERENCES = {
    "cmdb_ci": "cmdb_ci",
    "assigned_to": "sys_user",
    "caller_id": "sys_user",
    "opened_by": "sys_user",
    "resolved_by": "sys_user",
    "closed_by": "sys_user",
    "requested_by": "sys_user",
    "managed_by": "sys_user",
    "owned_by": "sys_user",
    "manager": "sys_user",
    "assignment_group": "sys_user_group",
    "support_group": "sys_user_group",
    "parent": "task",
    "problem_id": "task",
}
_NUMERIC = frozenset(
    {
        "state",
        "impact",
        "urgency",
        "priority",
        "sys_mod_count",
        "incident_state",
        "severity",
        "risk",
        "hold_reason",
        "reopen_count",
        "reassignment_count",
        "operational_status",
        "install_status",
        "cpu_count",
        "ram",
        "disk_space",
    }
)
_JOURNAL_ELEMENTS = {"work_notes": "Work notes", "comments": "Additional comments"}
_SYS_ID_RE = re.compile(r"[0-9a-f]{32}")
_FIELD_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class _TableDef:
    name: str
    fields: tuple[str, ...]
    parent: str | None = None
    prefix: str = ""
    first_number: int = 0
    display_field: str = "name"
    choices: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    read_only: bool = False


TABLES: dict[str, _TableDef] = {
    t.name: t
    for t in (
        _TableDef(
            "task",
            _SYS_FIELDS + _TASK_FIELDS,
            prefix="TASK",
            first_number=10001,
            display_field="number",
            choices=_TASK_CHOICES,
        ),
        _TableDef(
            "incident",
            _INCIDENT_FIELDS,
            parent="task",
            prefix="INC",
            first_number=10001,
            display_field="number",
            choices={**_TASK_CHOICES, "state": _INCIDENT_STATES, "incident_state": _INCIDENT_STATES},
        ),
        _TableDef(
            "change_request",
            _CHANGE_FIELDS,
            parent="task",
            prefix="CHG",
            first_number=30001,
            display_field="number",
            choices={
                **_TASK_CHOICES,
                "state": _CHANGE_STATES,
                "type": {"normal": "Normal", "standard": "Standard", "emergency": "Emergency"},
                "risk": {"1": "Very High", "2": "High", "3": "Moderate", "4": "Low"},
            },
        ),
        _TableDef(
            "cmdb_ci",
            _SYS_FIELDS + _CI_FIELDS,
            choices={"operational_status": {"1": "Operational", "2": "Non-Operational", "6": "Retired"}},
        ),
        _TableDef(
            "cmdb_ci_server",
            _SERVER_FIELDS,
            parent="cmdb_ci",
            choices={"operational_status": {"1": "Operational", "2": "Non-Operational", "6": "Retired"}},
        ),
        _TableDef("cmdb_rel_type", (*_SYS_FIELDS, "name", "parent_descriptor", "child_descriptor")),
        _TableDef("cmdb_rel_ci", (*_SYS_FIELDS, "parent", "child", "type"), display_field="type"),
        _TableDef("sys_user", _SYS_FIELDS + _USER_FIELDS),
        _TableDef("sys_user_group", _SYS_FIELDS + _GROUP_FIELDS),
        _TableDef("sys_journal_field", _JOURNAL_FIELDS, display_field="value", read_only=True),
        _TableDef(
            "em_event",
            _SYS_FIELDS + _EVENT_FIELDS,
            display_field="message_key",
            choices={"severity": _EVENT_SEVERITIES},
            read_only=True,
        ),
        _TableDef(
            "em_alert",
            _SYS_FIELDS + _ALERT_FIELDS,
            prefix="Alert",
            first_number=10001,
            display_field="number",
            choices={"severity": _EVENT_SEVERITIES},
            read_only=True,
        ),
    )
}
_DEFAULTS: dict[str, dict[str, str]] = {
    "task": {
        "state": "1",
        "impact": "3",
        "urgency": "3",
        "approval": "not requested",
        "escalation": "0",
        "made_sla": "true",
        "reassignment_count": "0",
    },
    "incident": {"state": "1", "severity": "3", "reopen_count": "0"},
    "change_request": {
        "state": "-5",
        "type": "normal",
        "risk": "3",
        "phase": "requested",
        "on_hold": "false",
    },
    "cmdb_ci": {"operational_status": "1", "install_status": "1"},
    "sys_user": {"active": "true"},
    "sys_user_group": {"active": "true"},
}


def _lineage(table: str) -> list[str]:
    out: list[str] = []
    current: str | None = table
    while current is not None:
        out.append(current)
        current = TABLES[current].parent
    return out


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TS)


def _error(message: str, detail: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "detail": detail}, "status": "failure"}


_NOT_AUTHENTICATED = _error("User Not Authenticated", "Required to provide Auth information")
_NO_RECORD = _error("No Record found", "Record doesn't exist or ACL restricts the record retrieval")
_OAUTH_DENIED = {"error_description": "access_denied", "error": "server_error"}


class DataPolicyError(ValueError):
    """An update a stock instance's data policy refuses (the API answers 403)."""


class _ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


# -- encoded queries -----------------------------------------------------------------------------

_OPERATORS = "NOT LIKE|NOT IN|ISNOTEMPTY|ISEMPTY|STARTSWITH|ENDSWITH|LIKE|IN|BETWEEN|ANYTHING|!=|>=|<=|=|>|<"
_CONDITION_RE = re.compile(rf"([a-z_][a-z0-9_.]*)({_OPERATORS})(.*)", re.S)
_DATE_GENERATE_RE = re.compile(r"javascript:gs\.dateGenerate\('(\d{4}-\d\d-\d\d)',\s*'(\d\d:\d\d:\d\d)'\)")


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: str


Clause = list[Condition]  # OR of conditions
Group = list[Clause]  # AND of clauses


@dataclass
class EncodedQuery:
    """``groups`` are OR-ed (``^NQ``); each is an AND of clauses; each clause an OR of conditions."""

    groups: list[Group]
    orders: list[tuple[str, bool]]  # (field, descending)
    ignored: list[str]


def split_encoded_query(query: str) -> list[str]:
    """Split on ``^`` with ``^^`` read as a literal caret (left to right, like the instance)."""
    return [part.replace("\x00", "^") for part in query.replace("^^", "\x00").split("^")]


def parse_encoded_query(query: str) -> EncodedQuery:
    groups: list[Group] = [[]]
    orders: list[tuple[str, bool]] = []
    ignored: list[str] = []
    for part in split_encoded_query(query):
        raw = part
        if raw in ("", "EQ"):
            continue
        if raw.startswith("ORDERBYDESC"):
            orders.append((raw[len("ORDERBYDESC") :], True))
            continue
        if raw.startswith("ORDERBY"):
            orders.append((raw[len("ORDERBY") :], False))
            continue
        if raw.startswith(("GROUPBY", "RLQUERY", "ENDRLQUERY")):
            ignored.append(raw)
            continue
        is_or = False
        if raw.startswith("NQ"):
            groups.append([])
            raw = raw[2:]
        elif raw.startswith("OR"):
            is_or = True
            raw = raw[2:]
        match = _CONDITION_RE.fullmatch(raw)
        if match is None:
            ignored.append(raw)
            continue
        name, op, value = match.groups()
        dated = _DATE_GENERATE_RE.fullmatch(value)
        if dated is not None:
            value = f"{dated.group(1)} {dated.group(2)}"
        elif value.startswith("javascript:"):
            ignored.append(raw)
            continue
        condition = Condition(name, op, value)
        if is_or and groups[-1]:
            groups[-1][-1].append(condition)
        else:
            groups[-1].append([condition])
    return EncodedQuery(groups, orders, ignored)


def _num(value: str) -> tuple[int, float | str]:
    if value == "":
        return (0, 0.0)
    try:
        return (1, float(value))
    except ValueError:
        return (2, value)


def _sort_key(name: str) -> Callable[[str], Any]:
    root = name.rsplit(".", 1)[-1]
    return _num if root in _NUMERIC else str


@dataclass
class _Fault:
    remaining: int
    status: int
    retry_after: int | None
    path_contains: str | None


@dataclass
class _LateAnswer:
    """Answer after ``seconds``: the request is carried out (and committed) at once, as an instance
    does that finishes the work but answers after the client stopped waiting."""

    remaining: int
    seconds: float
    method: str | None
    path_contains: str | None


# -- the server ----------------------------------------------------------------------------------


class ServiceNowHandler(LoopbackHandler):
    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this Nagle + delayed ACK cost ~40 ms
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        path, query = self.parsed()
        body = self.read_body()
        try:
            status, payload, headers = self.app.handle_request(
                method, path, query, body, self.headers.get("Authorization")
            )
        except Exception as exc:  # a bug here must not take the connection down silently
            status, payload, headers = 500, _error("Internal server error", repr(exc)), {}
        with contextlib.suppress(OSError):  # a client that stopped waiting (``answer_late``) is gone
            self.send_json(status, payload, headers)


EVENTS_PATH = "/api/global/em/jsonv2"
_IRE_PATH_RE = re.compile(r"/api/now(?:/v[12])?/identifyreconcile/?")
IRE_CLASSES = frozenset({"cmdb_ci_server"})
"""CI classes the loopback's identification rules cover (the hardware rule: name, then IP)."""
DEFAULT_DATA_SOURCES = frozenset({"ServiceNow", "Manual Entry", "Other Automated"})
DEFAULT_RELATION_TYPES = (
    ("Depends on::Used by", "Depends on", "Used by"),
    ("Runs on::Runs", "Runs on", "Runs"),
)


_API_PATH_RE = re.compile(r"/api/now(?:/v[12])?/table/([^/]+)(?:/([^/]*))?/?")


class ServiceNowLoopback(LoopbackServer):
    """A loopback ServiceNow instance (see the module docstring). ``url`` is the instance URL."""

    handler_class = ServiceNowHandler

    def __init__(
        self,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        rotate_refresh_tokens: bool = False,
        clock: Callable[[], datetime] | None = None,
        tls: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls=tls, host=host, port=port)
        self.client_id = client_id
        self.client_secret = client_secret
        self.username = username
        self.password = password
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.delay_seconds: float = 0.0
        self.last_plan: str = ""
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.RLock()
        self._passwords: dict[str, str] = {username: password}
        self._access: dict[str, tuple[str, datetime]] = {}
        self._refresh: dict[str, tuple[str, datetime]] = {}
        self._issued: list[str] = []
        self._faults: list[_Fault] = []
        self._late: list[_LateAnswer] = []
        self._store: dict[str, dict[str, Record]] = {name: {} for name in TABLES}
        self._index: dict[str, list[tuple[str, str]]] = {name: [] for name in TABLES}
        self._extra_fields: dict[str, list[str]] = {name: [] for name in TABLES}
        self._field_cache: dict[str, tuple[str, ...]] = {}
        self._counters: dict[str, int] = {name: t.first_number for name, t in TABLES.items() if t.prefix}
        self._journal: dict[str, list[Record]] = {}
        self._user_ids: dict[str, str] = {}
        self._seeded_users: list[str] = []
        self._seeded_cis: list[str] = []
        self._seeded_groups: list[str] = []
        self._touch_rng = random.Random(99)
        self._roles: dict[str, set[str]] = {username: {"itil", EVENT_ROLE}}
        self.active_interval_seconds: float = 3600.0
        self.defer_event_processing = False
        self._event_sequence = itertools.count(1)
        self.data_sources: set[str] = set(DEFAULT_DATA_SOURCES)
        self._insert_system_user(ADMIN_USERNAME, "System Administrator")
        if username != ADMIN_USERNAME:
            self._insert_system_user(username, username)
        for name, parent_descriptor, child_descriptor in DEFAULT_RELATION_TYPES:
            self._insert(
                "cmdb_rel_type",
                {"name": name, "parent_descriptor": parent_descriptor, "child_descriptor": child_descriptor},
                ADMIN_USERNAME,
            )

    def start(self) -> ServiceNowLoopback:
        """As the base, but polling for shutdown every 50 ms so ``stop()`` returns quickly."""
        httpd = self._httpd
        self._thread = threading.Thread(
            target=lambda: httpd.serve_forever(poll_interval=0.05), name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def __enter__(self) -> ServiceNowLoopback:
        return self.start()

    # -- configuration / auth hooks --------------------------------------------------------------
    def add_user(self, user_name: str, password: str, name: str | None = None) -> str:
        """Another API user (Basic or password grant); returns its sys_user sys_id."""
        with self._lock:
            self._passwords[user_name] = password
            return self._user_ids.get(user_name) or self._insert_system_user(user_name, name or user_name)

    def set_roles(self, user_name: str, roles: Iterable[str]) -> None:
        """The roles of an API user (``admin`` has every role)."""
        with self._lock:
            self._roles[user_name] = set(roles)

    def process_events(self) -> int:
        """Process the events still waiting (``defer_event_processing``), oldest first; how many."""
        with self._lock:
            waiting = sorted(
                (rec for rec in self._store["em_event"].values() if rec.get("state") == "Ready"),
                key=itemgetter("sys_created_on", "processed"),
            )
            for event in waiting:
                self._process_event(event)
            return len(waiting)

    def mint_access_token(self, user_name: str | None = None) -> str:
        """An access token without the OAuth round trip (for hand-crafted requests)."""
        with self._lock:
            return self._issue_access(user_name or self.username)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working (API calls answer 401)."""
        with self._lock:
            self._access.clear()

    def revoke_refresh_tokens(self) -> None:
        """Every refresh token issued so far is revoked (the refresh grant answers 401)."""
        with self._lock:
            self._refresh.clear()

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token issued so far, expired or revoked ones included (for
        tests that check that none of them leaks)."""
        with self._lock:
            return list(self._issued)

    # -- fault injection and request log -------------------------------------------------------------
    def fail_next(
        self, count: int, status: int = 503, retry_after: int | None = None, path_contains: str | None = None
    ) -> None:
        """The next ``count`` API requests (or, with ``path_contains``, any request whose path contains
        it, the OAuth endpoint included) answer ``status`` with a JSON error body."""
        with self._lock:
            self._faults.append(_Fault(count, status, retry_after, path_contains))

    def answer_late(
        self, count: int, seconds: float, *, method: str | None = None, path_contains: str | None = None
    ) -> None:
        """The next ``count`` API requests (only ``method`` ones, only paths containing
        ``path_contains``, when given) are carried out at once but answered ``seconds`` later."""
        with self._lock:
            self._late.append(_LateAnswer(count, seconds, method, path_contains))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._late.clear()

    def write_count(self) -> int:
        """POST/PATCH/PUT requests received on the Table API (injected failures included)."""
        with self._lock:
            return sum(
                1
                for method, path, _ in self.requests
                if method in ("POST", "PATCH", "PUT") and _API_PATH_RE.fullmatch(path)
            )

    def reset_request_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # -- store accessors (tests) ---------------------------------------------------------------
    def record(self, table: str, sys_id: str) -> Record | None:
        """The record with every field of the table ("" when empty, references as sys_ids)."""
        with self._lock:
            rec = self._store[table].get(sys_id)
            return self._full(table, rec) if rec is not None else None

    def records(self, table: str) -> list[Record]:
        with self._lock:
            return [self._full(table, rec) for rec in self._store[table].values()]

    def find(self, table: str, **field_equals: object) -> list[Record]:
        wanted = {k: _to_str(v) for k, v in field_equals.items()}
        with self._lock:
            return [
                self._full(table, rec)
                for rec in self._store[table].values()
                if all(rec.get(k, "") == v for k, v in wanted.items())
            ]

    def count(self, table: str) -> int:
        with self._lock:
            return len(self._store[table])

    def journal(self, sys_id: str) -> list[Record]:
        """Journal entries (``sys_journal_field`` rows) of a record, oldest first."""
        with self._lock:
            return [dict(entry) for entry in self._journal.get(sys_id, [])]

    def insert_record(self, table: str, /, *, user: str = ADMIN_USERNAME, **fields: object) -> Record:
        """Create a record as ``user`` would in the UI (business rules and data policy apply)."""
        with self._lock:
            rec = self._insert(table, fields, user)
            return self._full(table, rec)

    def update_record(
        self, table: str, sys_id: str, /, *, user: str = ADMIN_USERNAME, **fields: object
    ) -> Record:
        """Edit a record as a person in the UI: stamps sys_updated_on/by, journals notes, sets
        resolved_at etc. Raises KeyError when missing, DataPolicyError when the policy refuses."""
        with self._lock:
            rec = self._store[table].get(sys_id)
            if rec is None:
                raise KeyError(sys_id)
            try:
                self._update(rec, fields, user)
            except _ApiError as exc:
                raise DataPolicyError(str(exc.body["error"]["detail"])) from None
            return self._full(table, rec)

    def seed_users(self, names: Iterable[str]) -> list[str]:
        """sys_user records for display names ("Alice Smith" -> user_name "alice.smith"); sys_ids."""
        out: list[str] = []
        with self._lock:
            for name in names:
                user_name = ".".join(name.lower().split())
                sys_id = self._user_ids.get(user_name) or self._insert_system_user(user_name, name)
                if sys_id not in self._seeded_users:
                    self._seeded_users.append(sys_id)
                out.append(sys_id)
        return out

    def seed_groups(self, names: Iterable[str]) -> list[str]:
        out: list[str] = []
        with self._lock:
            for name in names:
                rec = self._insert("sys_user_group", {"name": name}, ADMIN_USERNAME)
                self._seeded_groups.append(rec["sys_id"])
                out.append(rec["sys_id"])
        return out

    def seed_cis(self, names: Iterable[str], table: str = "cmdb_ci_server") -> list[str]:
        """Configuration items (servers by default, so also found through cmdb_ci); sys_ids."""
        out: list[str] = []
        with self._lock:
            for name in names:
                host = name.split(".")[0]
                fields: dict[str, object] = {"name": name}
                if table == "cmdb_ci_server":
                    fields |= {"host_name": host, "os": "Linux Red Hat", "fqdn": f"{host}.corp.example"}
                rec = self._insert(table, fields, ADMIN_USERNAME)
                self._seeded_cis.append(rec["sys_id"])
                out.append(rec["sys_id"])
        return out

    def seed_work_items(
        self, table: str, count: int, *, start: datetime, end: datetime, rng_seed: int = 1
    ) -> list[str]:
        """Bulk-create realistic incidents or change requests with sys_updated_on spread over
        [start, end] (a third of them in bursts sharing one second). Returns their sys_ids."""
        if table not in ("incident", "change_request"):
            raise ValueError(f"seed_work_items supports incident and change_request, not {table}")
        rng = random.Random(rng_seed)
        with self._lock:
            self._ensure_seed_references()
            rows = _generate_work_items(
                table,
                count,
                start,
                end,
                rng,
                list(self._seeded_users),
                list(self._seeded_cis),
                list(self._seeded_groups),
                self._user_names(),
            )
            store = self._store[table]
            rows.sort(key=itemgetter("sys_created_on"))
            prefix = TABLES[table].prefix
            counter = self._counters[table]
            for rec in rows:
                while rec["sys_id"] in store:
                    rec["sys_id"] = f"{rng.getrandbits(128):032x}"
                rec["number"] = f"{prefix}{counter:07d}"
                counter += 1
            self._counters[table] = counter
            for name in _lineage(table):
                target = self._store[name]
                for rec in rows:
                    target[rec["sys_id"]] = rec
                index = self._index[name]
                index.extend((rec["sys_updated_on"], rec["sys_id"]) for rec in rows)
                index.sort()
            return [rec["sys_id"] for rec in rows]

    def touch(self, table: str, count: int, *, user: str | None = None) -> list[str]:
        """Update ``count`` random existing rows now, like people editing them. Returns sys_ids."""
        with self._lock:
            ids = list(self._store[table])
            if not ids:
                return []
            chosen = self._touch_rng.sample(ids, min(count, len(ids)))
            users = self._user_names() or [ADMIN_USERNAME]
            for sys_id in chosen:
                rec = self._store[table][sys_id]
                self._update(
                    rec, _touch_changes(table, rec, self._touch_rng), user or self._touch_rng.choice(users)
                )
            return chosen

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tables": {name: len(rows) for name, rows in self._store.items()},
                "write_count": self.write_count(),
                "request_count": len(self.requests),
            }

    # -- HTTP entry point ------------------------------------------------------------------------
    def handle_request(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorization: str | None
    ) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            late = self._take_late(method, path) if path.startswith("/api/") else None
        answer = self._handle(method, path, query, body, authorization)
        if late is not None:
            time.sleep(late.seconds)
        return answer

    def _handle(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorization: str | None
    ) -> tuple[int, Any, dict[str, str]]:
        if path.startswith("/__loopback/"):
            return self._control(method, path, body)
        flat = {k: v[-1] for k, v in query.items()}
        api = path.startswith("/api/")
        with self._lock:
            self.requests.append((method, path, flat))
            fault = self._take_fault(path, api)
        if api and self.delay_seconds > 0:
            time.sleep(self.delay_seconds)
        if fault is not None:
            return self._fault_response(fault)
        if path == "/oauth_token.do":
            if method != "POST":
                return 405, _error("Method not Supported", "Method not supported"), {}
            return self._oauth(body)
        if _IRE_PATH_RE.fullmatch(path):
            with self._lock:
                user = self._authenticate(authorization)
            if user is None:
                return 401, _NOT_AUTHENTICATED, {"WWW-Authenticate": 'BASIC realm="Service-now"'}
            if method != "POST":
                return 405, _error("Method not Supported", f"{method} method not supported for API"), {}
            try:
                return self._identify_reconcile(flat, body, user)
            except _ApiError as exc:
                return exc.status, exc.body, {}
        match = _API_PATH_RE.fullmatch(path)
        if match is None and path != EVENTS_PATH:
            return 400, _error("Requested URI does not represent any resource", None), {}
        with self._lock:
            user = self._authenticate(authorization)
        if user is None:
            return 401, _NOT_AUTHENTICATED, {"WWW-Authenticate": 'BASIC realm="Service-now"'}
        if match is None:
            return self._events_api(method, body, user)
        table, sys_id = match.group(1), match.group(2)
        try:
            return self._table_api(method, table, sys_id or None, flat, body, user)
        except _ApiError as exc:
            return exc.status, exc.body, {}

    # -- Identification and Reconciliation ------------------------------------------------------
    def register_data_source(self, name: str) -> None:
        """Add ``name`` to the discovery_source choices (what an admin does for a new integration)."""
        with self._lock:
            self.data_sources.add(name)

    def relationships(self, type_name: str = "Depends on::Used by") -> list[tuple[str, str]]:
        """(parent CI name, child CI name) of every relationship of that type, sorted."""
        with self._lock:
            types = {
                sys_id for sys_id, rec in self._store["cmdb_rel_type"].items() if rec["name"] == type_name
            }
            cis = self._store["cmdb_ci"]
            return sorted(
                (cis[rec["parent"]].get("name", ""), cis[rec["child"]].get("name", ""))
                for rec in self._store["cmdb_rel_ci"].values()
                if rec.get("type") in types and rec.get("parent") in cis and rec.get("child") in cis
            )

    def _identify_reconcile(
        self, params: dict[str, str], body: bytes, user: str
    ) -> tuple[int, Any, dict[str, str]]:
        payload = _parse_json_object(body)
        items = payload.get("items")
        relations = payload.get("relations", [])
        if not isinstance(items, list) or not isinstance(relations, list):
            raise _ApiError(400, _error("Invalid payload", "items must be an array of objects"))
        source = params.get("sysparm_data_source", "")
        with self._lock:
            source_error = (
                None
                if source in self.data_sources
                else {"error": "INVALID_INPUT_DATA", "message": f"Invalid data source: '{source}'"}
            )
            item_results: list[dict[str, Any]] = []
            ids: list[str | None] = []
            seen: set[str] = set()
            for item in items:
                result, sys_id = self._ire_item(item, source, source_error, seen, user)
                item_results.append(result)
                ids.append(sys_id)
            relation_results = [self._ire_relation(rel, ids, source_error, user) for rel in relations]
        return 200, {"result": {"items": item_results, "relations": relation_results}}, {}

    def _ire_item(
        self, item: object, source: str, source_error: dict[str, str] | None, seen: set[str], user: str
    ) -> tuple[dict[str, Any], str | None]:
        if not isinstance(item, dict):
            return {"errors": [{"error": "INVALID_INPUT_DATA", "message": "item is not an object"}]}, None
        class_name = str(item.get("className", ""))
        out: dict[str, Any] = {"className": class_name, "operation": "NO_CHANGE"}

        def refused(code: str, message: str) -> tuple[dict[str, Any], None]:
            out.pop("operation", None)
            out["errors"] = [{"error": code, "message": message}]
            return out, None

        if source_error is not None:
            return refused(source_error["error"], source_error["message"])
        if class_name not in IRE_CLASSES:
            return refused("INVALID_INPUT_DATA", f"Invalid className '{class_name}'")
        values = item.get("values")
        if not isinstance(values, dict):
            return refused("INVALID_INPUT_DATA", "values must be an object")
        name = _to_str(values.get("name")).strip()
        ip = _to_str(values.get("ip_address")).strip()
        if not name and not ip:
            return refused(
                "MISSING_MATCHING_ATTRIBUTES",
                f"In payload no matching attributes found for identification rule of {class_name}: "
                "name, ip_address",
            )
        key = (name or ip).lower()
        if key in seen:
            return refused("DUPLICATE_PAYLOAD_RECORDS", f"Duplicate items in payload for {name or ip}")
        seen.add(key)
        store = self._store[class_name]
        found = next((r for r in store.values() if name and r.get("name", "").lower() == name.lower()), None)
        if found is None and ip:
            found = next((r for r in store.values() if r.get("ip_address", "") == ip), None)
        wanted = {
            k: _to_str(v) for k, v in values.items() if isinstance(k, str) and _FIELD_NAME_RE.fullmatch(k)
        }
        if found is None:
            rec = self._insert(class_name, wanted | {"discovery_source": source}, user)
            out["operation"] = "INSERT"
        else:
            rec = found
            changes = {k: v for k, v in wanted.items() if v and rec.get(k, "") != v}
            if changes:
                self._update(rec, changes, user)
                out["operation"] = "UPDATE"
        out["sys_id"] = rec["sys_id"]
        out["identifierEntrySysId"] = "loopback-hardware-rule"
        return out, rec["sys_id"]

    def _ire_relation(
        self, relation: object, ids: list[str | None], source_error: dict[str, str] | None, user: str
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"className": "cmdb_rel_ci"}

        def refused(code: str, message: str) -> dict[str, Any]:
            out["errors"] = [{"error": code, "message": message}]
            return out

        if source_error is not None:
            return refused(source_error["error"], source_error["message"])
        if not isinstance(relation, dict):
            return refused("INVALID_INPUT_DATA", "relation is not an object")
        parent, child, type_name = (
            relation.get("parent"),
            relation.get("child"),
            str(relation.get("type", "")),
        )
        if not all(isinstance(i, int) and 0 <= i < len(ids) for i in (parent, child)):
            return refused("INVALID_INPUT_DATA", "parent and child must be indexes of items in the payload")
        assert isinstance(parent, int)
        assert isinstance(child, int)
        rel_type = next(
            (sid for sid, r in self._store["cmdb_rel_type"].items() if r["name"] == type_name), None
        )
        if rel_type is None:
            return refused("INVALID_INPUT_DATA", f"Invalid relation type '{type_name}'")
        parent_id, child_id = ids[parent], ids[child]
        if parent_id is None or child_id is None:
            return refused("ABANDONED", "Abandoned due to an error in a related item")
        existing = next(
            (
                r
                for r in self._store["cmdb_rel_ci"].values()
                if r.get("parent") == parent_id and r.get("child") == child_id and r.get("type") == rel_type
            ),
            None,
        )
        if existing is None:
            existing = self._insert(
                "cmdb_rel_ci", {"parent": parent_id, "child": child_id, "type": rel_type}, user
            )
            out["operation"] = "INSERT"
        else:
            out["operation"] = "NO_CHANGE"
        out["sys_id"] = existing["sys_id"]
        return out

    # -- faults ----------------------------------------------------------------------------------
    def _take_fault(self, path: str, api: bool) -> _Fault | None:
        for fault in self._faults:
            applies = api if fault.path_contains is None else fault.path_contains in path
            if applies and fault.remaining > 0:
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                return fault
        return None

    def _take_late(self, method: str, path: str) -> _LateAnswer | None:
        for late in self._late:
            applies = (late.method is None or late.method == method) and (
                late.path_contains is None or late.path_contains in path
            )
            if applies and late.remaining > 0:
                late.remaining -= 1
                self._late = [other for other in self._late if other.remaining > 0]
                return late
        return None

    @staticmethod
    def _fault_response(fault: _Fault) -> tuple[int, Any, dict[str, str]]:
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        if fault.status == 429:
            body = _error("Too Many Requests", "Rate limit exceeded: too many requests in the last hour")
        else:
            try:
                phrase = HTTPStatus(fault.status).phrase
            except ValueError:
                phrase = "Error"
            body = _error(phrase, "Injected failure (loopback)")
        return fault.status, body, headers

    # -- OAuth -----------------------------------------------------------------------------------
    def _oauth(self, body: bytes) -> tuple[int, Any, dict[str, str]]:
        form = {
            k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()
        }
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        grant = form.get("grant_type", "")
        with self._lock:
            if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
                return 401, _OAUTH_DENIED, headers
            if grant == "password":
                user = form.get("username", "")
                if user not in self._passwords or self._passwords[user] != form.get("password"):
                    return 401, _OAUTH_DENIED, headers
                refresh = self._issue_refresh(user)
            elif grant == "refresh_token":
                old = form.get("refresh_token", "")
                entry = self._refresh.get(old)
                if entry is None or entry[1] <= self._now():
                    return 401, _OAUTH_DENIED, headers
                user = entry[0]
                if self.rotate_refresh_tokens:
                    del self._refresh[old]
                    refresh = self._issue_refresh(user)
                else:
                    refresh = old
            else:
                return 400, {"error_description": "access_denied", "error": "unsupported_grant_type"}, headers
            access = self._issue_access(user)
        return (
            200,
            {
                "access_token": access,
                "refresh_token": refresh,
                "scope": "useraccount",
                "token_type": "Bearer",
                "expires_in": ACCESS_TOKEN_LIFESPAN,
            },
            headers,
        )

    def _issue_access(self, user: str) -> str:
        token = secrets.token_urlsafe(64)
        self._access[token] = (user, self._now() + timedelta(seconds=ACCESS_TOKEN_LIFESPAN))
        self._issued.append(token)
        return token

    def _issue_refresh(self, user: str) -> str:
        token = secrets.token_urlsafe(64)
        self._refresh[token] = (user, self._now() + timedelta(seconds=REFRESH_TOKEN_LIFESPAN))
        self._issued.append(token)
        return token

    def _authenticate(self, authorization: str | None) -> str | None:
        scheme, _, credentials = (authorization or "").partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            entry = self._access.get(credentials)
            if entry is None or entry[1] <= self._now():
                return None
            return entry[0]
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            user, _, password = decoded.partition(":")
            return user if user in self._passwords and self._passwords[user] == password else None
        return None

    def _now(self) -> datetime:
        return self.clock()

    # -- Table API -------------------------------------------------------------------------------
    def _table_api(
        self, method: str, table: str, sys_id: str | None, params: dict[str, str], body: bytes, user: str
    ) -> tuple[int, Any, dict[str, str]]:
        if table not in TABLES:
            return 400, _error(f"Invalid table {table}", None), {}
        if method == "GET" and sys_id is None:
            return self._list(table, params)
        if method in ("POST", "PATCH", "PUT"):
            if (method == "POST") != (sys_id is None):
                return 405, _error("Method not Supported", f"{method} method not supported for API"), {}
            payload = _parse_json_object(body)
            with self._lock:
                if TABLES[table].read_only:
                    action = "Insert" if method == "POST" else "Update"
                    raise _ApiError(
                        403,
                        _error(
                            "Operation Failed", f"ACL Exception {action} Failed due to security constraints"
                        ),
                    )
                if sys_id is None:
                    rec = self._insert(table, payload, user)
                    out = self._render_one(table, rec, params)
                    location = f"{self.url}/api/now/table/{table}/{rec['sys_id']}"
                    return 201, {"result": out}, {"Location": location}
                rec = self._get(table, sys_id)
                self._update(rec, payload, user)
                return 200, {"result": self._render_one(table, rec, params)}, {}
        if method == "GET":
            assert sys_id is not None
            with self._lock:
                rec = self._get(table, sys_id)
                return 200, {"result": self._render_one(table, rec, params)}, {}
        if method == "DELETE" and sys_id is not None:
            with self._lock:
                if TABLES[table].read_only:
                    raise _ApiError(
                        403,
                        _error("Operation Failed", "ACL Exception Delete Failed due to security constraints"),
                    )
                rec = self._get(table, sys_id)
                self._delete(rec)
            return 204, None, {}
        return 405, _error("Method not Supported", f"{method} method not supported for API"), {}

    def _get(self, table: str, sys_id: str) -> Record:
        rec = self._store[table].get(sys_id)
        if rec is None:
            raise _ApiError(404, _NO_RECORD)
        return rec

    def _list(self, table: str, params: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        limit = _int_param(params.get("sysparm_limit"), DEFAULT_LIMIT, minimum=1)
        offset = _int_param(params.get("sysparm_offset"), 0, minimum=0)
        want_count = params.get("sysparm_no_count", "false").lower() != "true"
        query = parse_encoded_query(params.get("sysparm_query", ""))
        with self._lock:
            compiled = self._compile(table, query)
            rows, total = self._select(table, compiled, offset, limit, want_count)
            fields, mode, exclude = self._render_options(table, params)
            result = [self._render(table, rec, fields, mode, exclude) for rec in rows]
        headers: dict[str, str] = {}
        if total is not None:
            headers["X-Total-Count"] = str(total)
            links = self._links(table, params, offset, limit, total)
            if links:
                headers["Link"] = links
        return 200, {"result": result}, headers

    def _links(self, table: str, params: dict[str, str], offset: int, limit: int, total: int) -> str:
        def link(rel: str, at: int) -> str:
            query = urlencode(
                {**params, "sysparm_offset": str(at), "sysparm_limit": str(limit)}, quote_via=quote
            )
            return f'<{self.url}/api/now/table/{table}?{query}>;rel="{rel}"'

        parts = [link("first", 0)]
        if offset > 0:
            parts.append(link("prev", max(0, offset - limit)))
        if offset + limit < total:
            parts.append(link("next", offset + limit))
        parts.append(link("last", max(0, (total - 1) // limit * limit)))
        return ",".join(parts)

    # -- query evaluation ------------------------------------------------------------------------
    def _known_field(self, table: str, name: str) -> bool:
        head, _, rest = name.partition(".")
        if head not in self._fields(table):
            return False
        if not rest:
            return True
        target = _REFERENCES.get(head)
        return target is not None and self._known_field(target, rest)

    def _compile(self, table: str, query: EncodedQuery) -> EncodedQuery:
        """Drop conditions on unknown fields (the instance ignores them) and unknown sort fields."""
        groups: list[Group] = []
        ignored = list(query.ignored)
        for group in query.groups:
            clauses: Group = []
            for clause in group:
                kept = [c for c in clause if self._known_field(table, c.field)]
                ignored.extend(f"{c.field}{c.op}{c.value}" for c in clause if c not in kept)
                if kept:
                    clauses.append(kept)
            groups.append(clauses)
        orders = [(f, d) for f, d in query.orders if self._known_field(table, f)]
        return EncodedQuery(groups, orders, ignored)

    def _value(self, table: str, rec: Record, name: str) -> str:
        if "." not in name:
            return rec.get(name, "")
        head, rest = name.split(".", 1)
        target_table = _REFERENCES[head]
        target = self._store[target_table].get(rec.get(head, ""))
        return self._value(target_table, target, rest) if target is not None else ""

    def _condition_matches(self, table: str, rec: Record, cond: Condition) -> bool:
        actual = self._value(table, rec, cond.field)
        op, expected = cond.op, cond.value
        numeric = cond.field.rsplit(".", 1)[-1] in _NUMERIC
        if op == "=":
            return actual == expected or (numeric and actual != "" and _num(actual) == _num(expected))
        if op == "!=":
            return not (actual == expected or (numeric and actual != "" and _num(actual) == _num(expected)))
        if op in (">", ">=", "<", "<="):
            if actual == "":
                return False
            a: Any = _num(actual) if numeric else actual
            b: Any = _num(expected) if numeric else expected
            if op == ">":
                return bool(a > b)
            if op == ">=":
                return bool(a >= b)
            if op == "<":
                return bool(a < b)
            return bool(a <= b)
        if op in ("LIKE", "NOT LIKE"):
            return (expected.lower() in actual.lower()) == (op == "LIKE")
        if op == "STARTSWITH":
            return actual.lower().startswith(expected.lower())
        if op == "ENDSWITH":
            return actual.lower().endswith(expected.lower())
        if op in ("IN", "NOT IN"):
            options = expected.split(",")
            hit = actual in options or (
                numeric and actual != "" and _num(actual) in {_num(o) for o in options}
            )
            return hit == (op == "IN")
        if op == "ISEMPTY":
            return actual == ""
        if op == "ISNOTEMPTY":
            return actual != ""
        if op == "BETWEEN":
            low, _, high = expected.partition("@")
            if actual == "":
                return False
            if numeric:
                return _num(low) <= _num(actual) <= _num(high)
            return low <= actual <= high
        return op == "ANYTHING"

    def _group_matches(self, table: str, rec: Record, group: Group) -> bool:
        return all(any(self._condition_matches(table, rec, c) for c in clause) for clause in group)

    def _matches(self, table: str, rec: Record, query: EncodedQuery) -> bool:
        return any(self._group_matches(table, rec, group) for group in query.groups)

    def _select(
        self, table: str, query: EncodedQuery, offset: int, limit: int, want_count: bool
    ) -> tuple[list[Record], int | None]:
        plan = self._index_plan(table, query)
        if plan is not None:
            self.last_plan = "index"
            return self._select_indexed(table, plan, offset, limit, want_count)
        self.last_plan = "scan"
        rows = [rec for rec in self._store[table].values() if self._matches(table, rec, query)]
        for name, descending in reversed(query.orders):
            rows.sort(key=self._row_key(table, name), reverse=descending)
        return rows[offset : offset + limit], len(rows)

    def _row_key(self, table: str, name: str) -> Callable[[Record], Any]:
        key = _sort_key(name)
        return lambda rec: key(self._value(table, rec, name))

    def _index_plan(self, table: str, query: EncodedQuery) -> list[tuple[int, int, Group]] | None:
        """Per ``^NQ`` group: the index slice [lo, hi) its sys_updated_on / sys_id conditions allow,
        and the residual clauses to check per row. None when the order is not the index order."""
        if any(desc for _, desc in query.orders):
            return None
        names = [name for name, _ in query.orders]
        if names not in (["sys_updated_on", "sys_id"], ["sys_updated_on"], ["sys_id"]):
            return None
        keys = self._index[table]
        plans: list[tuple[int, int, Group]] = []
        pinned: set[str] = set()
        for group in query.groups:
            lo, hi = 0, len(keys)
            equal: str | None = None
            residual: Group = []
            id_conditions: list[Condition] = []
            for clause in group:
                cond = clause[0]
                if len(clause) != 1 or cond.op not in ("=", ">", ">=", "<", "<="):
                    residual.append(clause)
                elif cond.field == "sys_updated_on":
                    value = cond.value
                    if cond.op in ("=", ">="):
                        lo = max(lo, bisect.bisect_left(keys, value, key=itemgetter(0)))
                    if cond.op in ("=", "<="):
                        hi = min(hi, bisect.bisect_right(keys, value, key=itemgetter(0)))
                    if cond.op == ">":
                        lo = max(lo, bisect.bisect_right(keys, value, key=itemgetter(0)))
                    if cond.op == "<":
                        hi = min(hi, bisect.bisect_left(keys, value, key=itemgetter(0)))
                    if cond.op == "=":
                        if equal is not None and equal != value:
                            hi = lo
                        equal = value
                elif cond.field == "sys_id":
                    id_conditions.append(cond)
                else:
                    residual.append(clause)
            for cond in id_conditions:
                if equal is None:
                    residual.append([cond])
                    continue
                probe = (equal, cond.value)
                if cond.op in ("=", ">="):
                    lo = max(lo, bisect.bisect_left(keys, probe))
                if cond.op in ("=", "<="):
                    hi = min(hi, bisect.bisect_right(keys, probe))
                if cond.op == ">":
                    lo = max(lo, bisect.bisect_right(keys, probe))
                if cond.op == "<":
                    hi = min(hi, bisect.bisect_left(keys, probe))
            if names == ["sys_id"]:
                if equal is None:
                    return None
                pinned.add(equal)
            plans.append((lo, max(lo, hi), residual))
        if len(pinned) > 1:
            return None
        return plans

    def _select_indexed(
        self, table: str, plans: list[tuple[int, int, Group]], offset: int, limit: int, want_count: bool
    ) -> tuple[list[Record], int | None]:
        keys = self._index[table]
        store = self._store[table]
        bounds = sorted({p for lo, hi, _ in plans for p in (lo, hi)})
        rows: list[Record] = []
        skipped = 0
        total = 0
        for a, b in itertools.pairwise(bounds):
            active = [residual for lo, hi, residual in plans if lo <= a and b <= hi]
            if not active:
                continue
            unconditional = any(not residual for residual in active)
            if unconditional:
                total += b - a
                # whole segment matches: jump over the offset, take what the page still needs
                start = a + max(0, min(offset - skipped, b - a))
                skipped += start - a
                while start < b and len(rows) < limit:
                    rows.append(store[keys[start][1]])
                    start += 1
                if len(rows) >= limit and not want_count:
                    break
                continue
            for position in range(a, b):
                if len(rows) >= limit and not want_count:
                    break
                rec = store[keys[position][1]]
                if not any(self._group_matches(table, rec, residual) for residual in active):
                    continue
                total += 1
                if skipped < offset:
                    skipped += 1
                elif len(rows) < limit:
                    rows.append(rec)
            if len(rows) >= limit and not want_count:
                break
        return rows, (total if want_count else None)

    # -- rendering -------------------------------------------------------------------------------
    def _fields(self, table: str) -> tuple[str, ...]:
        cached = self._field_cache.get(table)
        if cached is None:
            names: list[str] = []
            for name in reversed(_lineage(table)):
                names.extend(TABLES[name].fields)
                names.extend(self._extra_fields[name])
            cached = tuple(dict.fromkeys(names))
            self._field_cache[table] = cached
        return cached

    def _full(self, table: str, rec: Record) -> Record:
        out = {name: rec.get(name, "") for name in self._fields(table)}
        for name in self._fields(rec.get("sys_class_name") or table):
            out.setdefault(name, rec.get(name, ""))
        return out

    def _render_options(self, table: str, params: dict[str, str]) -> tuple[tuple[str, ...], str, bool]:
        requested = [f.strip() for f in params.get("sysparm_fields", "").split(",") if f.strip()]
        fields = (
            tuple(f for f in requested if self._known_field(table, f)) if requested else self._fields(table)
        )
        mode = params.get("sysparm_display_value", "false").lower()
        if mode not in ("true", "all"):
            mode = "false"
        exclude = params.get("sysparm_exclude_reference_link", "false").lower() == "true"
        return fields, mode, exclude

    def _render_one(self, table: str, rec: Record, params: dict[str, str]) -> dict[str, Any]:
        fields, mode, exclude = self._render_options(table, params)
        return self._render(table, rec, fields, mode, exclude)

    def _render(
        self, table: str, rec: Record, fields: Sequence[str], mode: str, exclude: bool
    ) -> dict[str, Any]:
        get = rec.get
        if mode == "false":
            out: dict[str, Any] = {name: get(name, "") for name in fields}
            for name in fields:
                if name in _REFERENCES and not exclude and out[name]:
                    target = _REFERENCES[name]
                    out[name] = {"link": f"{self.url}/api/now/table/{target}/{out[name]}", "value": out[name]}
                elif "." in name:
                    out[name] = self._value(table, rec, name)
            return out
        return {name: self._render_field(table, rec, name, mode, exclude) for name in fields}

    def _render_field(self, table: str, rec: Record, name: str, mode: str, exclude: bool) -> Any:
        if "." in name:
            head, rest = name.split(".", 1)
            target_table = _REFERENCES[head]
            target = self._store[target_table].get(rec.get(head, ""))
            if target is None:
                return {"display_value": "", "value": ""} if mode == "all" else ""
            return self._render_field(target_table, target, rest, mode, exclude)
        value = rec.get(name, "")
        display = self._display(table, rec, name, value)
        link = None
        if name in _REFERENCES and value and not exclude:
            link = f"{self.url}/api/now/table/{_REFERENCES[name]}/{value}"
        if mode == "all":
            out: dict[str, str] = {"display_value": display, "value": value}
            if link is not None:
                out["link"] = link
            return out
        if link is not None:
            return {"display_value": display, "link": link}
        return display

    def _display(self, table: str, rec: Record, name: str, value: str) -> str:
        if name in _JOURNAL_ELEMENTS and table != "sys_journal_field":
            return self._journal_display(rec.get("sys_id", ""), name)
        if not value:
            return value
        target_table = _REFERENCES.get(name)
        if target_table is not None:
            target = self._store[target_table].get(value)
            if target is None:
                return ""
            display_field = TABLES[target.get("sys_class_name") or target_table].display_field
            return target.get(display_field, "")
        choices = TABLES[rec.get("sys_class_name") or table].choices.get(name)
        if choices is not None:
            return choices.get(value, value)
        return value

    def _journal_display(self, sys_id: str, element: str) -> str:
        entries = [e for e in self._journal.get(sys_id, []) if e["element"] == element]
        parts = []
        for entry in reversed(entries):
            who = self._user_display(entry["sys_created_by"])
            parts.append(
                f"{entry['sys_created_on']} - {who} ({_JOURNAL_ELEMENTS[element]})\n{entry['value']}\n\n"
            )
        return "".join(parts)

    def _user_display(self, user_name: str) -> str:
        sys_id = self._user_ids.get(user_name)
        user = self._store["sys_user"].get(sys_id or "")
        return user.get("name", user_name) if user is not None else user_name

    def _user_names(self) -> list[str]:
        users = self._store["sys_user"]
        return [users[s]["user_name"] for s in self._seeded_users if s in users]

    # -- writes ----------------------------------------------------------------------------------
    def _clean(
        self, table: str, payload: Mapping[str, object], *, insert: bool
    ) -> tuple[Record, list[tuple[str, str]]]:
        """Wire values to stored strings; journal inputs split off; unknown names become columns."""
        values: Record = {}
        notes: list[tuple[str, str]] = []
        fields = self._fields(table)
        for name, raw in payload.items():
            value = _to_str(raw)
            if name in _JOURNAL_ELEMENTS and name in fields:
                if value.strip():
                    notes.append((name, value))
                continue
            if name.startswith("sys_"):
                if name == "sys_id" and insert and _SYS_ID_RE.fullmatch(value):
                    values[name] = value
                continue  # system fields are the instance's
            if not _FIELD_NAME_RE.fullmatch(name):
                continue
            if name not in fields:
                self._extra_fields[table].append(name)
                self._field_cache.clear()
                fields = self._fields(table)
            if name in _REFERENCES and value:
                value = self._resolve_reference(_REFERENCES[name], value)
            values[name] = value
        return values, notes

    def _resolve_reference(self, table: str, value: str) -> str:
        """A sys_id stays; otherwise look the value up by display value (as the instance does)."""
        store = self._store[table]
        if value in store:
            return value
        display_field = TABLES[table].display_field
        for sys_id, rec in store.items():
            if rec.get(display_field) == value or (table == "sys_user" and rec.get("user_name") == value):
                return sys_id
        return value

    def _insert(self, table: str, payload: Mapping[str, object], user: str) -> Record:
        values, notes = self._clean(table, payload, insert=True)
        now = _ts(self._now())
        sys_id = values.pop("sys_id", "") or secrets.token_hex(16)
        if sys_id in self._store[table]:
            raise _ApiError(403, _error("Operation Failed", "Error during insert of " + table))
        rec: Record = {}
        for name in reversed(_lineage(table)):
            rec.update(_DEFAULTS.get(name, {}))
        rec.update(
            {
                "sys_id": sys_id,
                "sys_class_name": table,
                "sys_created_on": now,
                "sys_created_by": user,
                "sys_updated_on": now,
                "sys_updated_by": user,
                "sys_mod_count": "0",
            }
        )
        if "task" in _lineage(table):
            rec["opened_at"] = now
            rec["opened_by"] = self._user_ids.get(user, "")
        rec.update({k: v for k, v in values.items() if v != "" or k not in rec})
        if TABLES[table].prefix and not rec.get("number"):
            counter = self._counters[table]
            self._counters[table] = counter + 1
            rec["number"] = f"{TABLES[table].prefix}{counter:07d}"
        self._business_rules(table, None, rec, user, now)
        self._check_policy(table, rec)
        rec = {k: v for k, v in rec.items() if v != ""}
        for name in _lineage(table):
            self._store[name][sys_id] = rec
            bisect.insort(self._index[name], (rec["sys_updated_on"], sys_id))
        for element, text in notes:
            self._add_journal(table, sys_id, element, text, user, now)
        return rec

    def _update(self, rec: Record, payload: Mapping[str, object], user: str) -> None:
        table = rec["sys_class_name"]
        values, notes = self._clean(table, payload, insert=False)
        new = dict(rec)
        for name, value in values.items():
            if value == "":
                new.pop(name, None)
            else:
                new[name] = value
        now = _ts(self._now())
        self._business_rules(table, rec, new, user, now)
        new = {k: v for k, v in new.items() if v != ""}
        if new == rec and not notes:
            return  # nothing changed: the instance does not touch the record
        self._check_policy(table, new)
        old_key = (rec["sys_updated_on"], rec["sys_id"])
        new["sys_updated_on"] = now
        new["sys_updated_by"] = user
        new["sys_mod_count"] = str(int(rec.get("sys_mod_count", "0") or 0) + 1)
        rec.clear()
        rec.update(new)  # same dict object: every table of the lineage sees the change
        new_key = (now, rec["sys_id"])
        if new_key != old_key:
            for name in _lineage(table):
                index = self._index[name]
                position = bisect.bisect_left(index, old_key)
                if position < len(index) and index[position] == old_key:
                    del index[position]
                bisect.insort(index, new_key)
        for element, text in notes:
            self._add_journal(table, rec["sys_id"], element, text, user, now)

    def _delete(self, rec: Record) -> None:
        key = (rec["sys_updated_on"], rec["sys_id"])
        for name in _lineage(rec["sys_class_name"]):
            del self._store[name][rec["sys_id"]]
            index = self._index[name]
            position = bisect.bisect_left(index, key)
            if position < len(index) and index[position] == key:
                del index[position]

    def _business_rules(self, table: str, old: Record | None, new: Record, user: str, now: str) -> None:
        lineage = _lineage(table)
        if "task" not in lineage:
            return
        impact, urgency = new.get("impact", ""), new.get("urgency", "")
        if impact in ("1", "2", "3") and urgency in ("1", "2", "3"):
            new["priority"] = str(int(impact) + int(urgency) - 1)
        state = new.get("state", "")
        previous = old.get("state", "") if old is not None else None
        inactive = _INACTIVE_STATES.get(table, _INACTIVE_STATES["task"])
        new["active"] = "false" if state in inactive else "true"
        user_id = self._user_ids.get(user, "")
        if table == "incident":
            new["incident_state"] = state
            if state == "6" and previous != "6":
                new["resolved_at"] = now
                new["resolved_by"] = user_id
            if state == "7" and previous != "7":
                new["closed_at"] = now
                new["closed_by"] = user_id
                if not new.get("resolved_at"):
                    new["resolved_at"] = now
                    new["resolved_by"] = user_id
        elif state in inactive and previous not in inactive:
            new["closed_at"] = now
            new["closed_by"] = user_id

    @staticmethod
    def _check_policy(table: str, rec: Record) -> None:
        if table != "incident" or rec.get("state") not in ("6", "7"):
            return
        missing = [
            label
            for name, label in (("close_code", "Resolution code"), ("close_notes", "Resolution notes"))
            if not rec.get(name, "").strip()
        ]
        if missing:
            detail = (
                "Data Policy Exception: \n\tThe following fields are mandatory: " + ", ".join(missing) + "\n"
            )
            raise _ApiError(403, _error("Operation Failed", detail))

    def _add_journal(self, table: str, sys_id: str, element: str, text: str, user: str, now: str) -> None:
        entry: Record = {
            "sys_id": secrets.token_hex(16),
            "sys_class_name": "sys_journal_field",
            "element": element,
            "element_id": sys_id,
            "name": table,
            "value": text,
            "sys_created_on": now,
            "sys_created_by": user,
        }
        self._journal.setdefault(sys_id, []).append(entry)
        self._store["sys_journal_field"][entry["sys_id"]] = entry
        bisect.insort(self._index["sys_journal_field"], ("", entry["sys_id"]))

    def _insert_system_user(self, user_name: str, name: str) -> str:
        first, _, last = name.partition(" ")
        fields = {
            "user_name": user_name,
            "name": name,
            "first_name": first,
            "last_name": last,
            "email": f"{user_name}@example.com",
        }
        rec = self._insert("sys_user", fields, ADMIN_USERNAME if self._user_ids else "system")
        self._user_ids[user_name] = rec["sys_id"]
        return rec["sys_id"]

    def _ensure_seed_references(self) -> None:
        if not self._seeded_users:
            self.seed_users(_DEFAULT_PEOPLE)
        if not self._seeded_groups:
            self.seed_groups(
                ["Service Desk", "Network", "Database", "Linux Operations", "Windows Operations"]
            )
        if not self._seeded_cis:
            self.seed_cis([f"{kind}-{n:03d}" for kind in ("web", "app", "db", "cache") for n in range(1, 51)])

    # -- Event Management ------------------------------------------------------------------------
    def _events_api(self, method: str, body: bytes, user: str) -> tuple[int, Any, dict[str, str]]:
        if method != "POST":
            return 405, _error("Method not Supported", f"{method} method not supported for API"), {}
        with self._lock:
            if user != ADMIN_USERNAME and EVENT_ROLE not in self._roles.get(user, set()):
                return 403, _error("User Not Authorized", f"The user lacks the {EVENT_ROLE} role"), {}
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            return 400, _error("Exception while reading request", "The payload is not valid JSON"), {}
        records = payload.get("records") if isinstance(payload, dict) else None
        if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
            return 400, _error("Invalid request", "Expected a 'records' array of event objects"), {}
        for number, raw in enumerate(records, 1):
            severity = _to_str(raw.get("severity", ""))
            if severity not in _EVENT_SEVERITIES:
                return 400, _error("Invalid request", f"Record {number}: severity must be 0..5"), {}
            if not _to_str(raw.get("source", "")).strip():
                return 400, _error("Invalid request", f"Record {number}: source is mandatory"), {}
        with self._lock:
            for raw in records:
                fields = {name: _to_str(raw.get(name, "")) for name in _EVENT_FIELDS if name in raw}
                fields |= {"state": "Ready", "processed": f"{next(self._event_sequence):012d}"}
                event = self._insert("em_event", fields, user)
                if not self.defer_event_processing:
                    self._process_event(event)
        return 200, {"result": {"Default Bulk Endpoint": f"{len(records)} events were inserted"}}, {}

    def _process_event(self, event: Record) -> None:
        """Fold one event into its alert by message key (or the default key of its identity fields)."""
        key = event.get("message_key") or "".join(
            event.get(name, "") for name in ("source", "node", "type", "resource", "metric_name")
        )
        severity = event.get("severity", "")
        alerts = sorted(
            (rec for rec in self._store["em_alert"].values() if rec.get("message_key") == key),
            key=itemgetter("sys_created_on", "number"),
        )
        alert = alerts[-1] if alerts else None
        now = self._now()
        update = {
            name: event[name]
            for name in (
                "severity",
                "description",
                "additional_info",
                "node",
                "type",
                "resource",
                "metric_name",
            )
            if event.get(name)
        } | {"last_event_time": event.get("time_of_event") or _ts(now)}
        outcome = "Ignored"
        if alert is not None and alert.get("state") != "Closed":
            count = str(int(alert.get("event_count", "0")) + 1)
            if severity == "0":
                self._update(alert, update | {"state": "Closed", "event_count": count}, "system")
            else:
                self._update(alert, update | {"event_count": count}, "system")
            outcome = "Processed"
        elif severity != "0":
            updated = datetime.strptime(alert["sys_updated_on"], TS).replace(tzinfo=UTC) if alert else None
            if (
                alert is not None
                and updated is not None
                and (now - updated).total_seconds() <= (self.active_interval_seconds)
            ):
                reopened = str(int(alert.get("reopen_count", "0")) + 1)
                count = str(int(alert.get("event_count", "0")) + 1)
                fields = update | {"state": "Reopen", "event_count": count, "reopen_count": reopened}
                self._update(alert, fields, "system")
            else:
                fields = {
                    name: event.get(name, "")
                    for name in ("source", "event_class", "node", "type", "resource", "metric_name")
                }
                fields |= update | {
                    "message_key": key,
                    "state": "Open",
                    "event_count": "1",
                    "initial_event_time": update["last_event_time"],
                }
                node = event.get("node", "")
                ci = next(
                    (
                        sys_id
                        for sys_id, rec in self._store["cmdb_ci"].items()
                        if node and rec.get("name") == node
                    ),
                    "",
                )
                if ci:
                    fields["cmdb_ci"] = ci
                alert = self._insert("em_alert", fields, "system")
            outcome = "Processed"
        changes = {"state": outcome}
        if alert is not None and outcome == "Processed":
            changes["alert"] = alert["sys_id"]
        self._update(event, changes, "system")

    # -- control endpoints -------------------------------------------------------------------------
    def _control(self, method: str, path: str, body: bytes) -> tuple[int, Any, dict[str, str]]:
        action = path[len("/__loopback/") :].strip("/")
        try:
            args = json.loads(body) if body else {}
        except ValueError:
            return 400, {"error": "invalid JSON"}, {}
        if not isinstance(args, dict):
            return 400, {"error": "expected a JSON object"}, {}
        try:
            if action == "stats" and method == "GET":
                return 200, self.stats(), {}
            if method != "POST":
                return 405, {"error": "use POST"}, {}
            if action == "seed":
                now = self._now()
                ids = self.seed_work_items(
                    args.get("table", "incident"),
                    int(args["count"]),
                    start=now - timedelta(days=float(args.get("span_days", 30))),
                    end=now,
                    rng_seed=int(args.get("rng_seed", 1)),
                )
                return 200, {"created": len(ids)}, {}
            if action == "touch":
                ids = self.touch(args.get("table", "incident"), int(args["count"]))
                return 200, {"updated": len(ids), "sys_ids": ids}, {}
            if action == "fail":
                self.fail_next(
                    int(args.get("count", 1)),
                    int(args.get("status", 503)),
                    args.get("retry_after"),
                    args.get("path_contains"),
                )
                return 200, {"ok": True}, {}
            if action == "delay":
                self.delay_seconds = float(args.get("seconds", 0))
                return 200, {"ok": True}, {}
            if action == "data_source":
                self.register_data_source(str(args["name"]))
                return 200, {"ok": True}, {}
            if action == "relationships":
                return 200, {"relationships": self.relationships()}, {}
            if action == "expire_tokens":
                self.expire_access_tokens()
                return 200, {"ok": True}, {}
            if action == "reset":
                self.reset_request_log()
                self.clear_faults()
                self.delay_seconds = 0.0
                return 200, {"ok": True}, {}
        except (KeyError, ValueError, TypeError) as exc:
            return 400, {"error": repr(exc)}, {}
        return 404, {"error": f"unknown control action {action}"}, {}


# -- helpers -------------------------------------------------------------------------------------


def _to_str(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return _to_str(value.get("value", ""))
    if isinstance(value, list | tuple):
        return ",".join(_to_str(v) for v in value)
    return str(value)


def _int_param(raw: str | None, default: int, *, minimum: int) -> int:
    if not raw:
        return default
    try:
        return max(minimum, int(raw))
    except ValueError:
        return default


def _parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body) if body.strip() else {}
    except ValueError:
        raise _ApiError(
            400, _error("Exception while reading request", "The payload is not valid JSON.")
        ) from None
    if not isinstance(payload, dict):
        raise _ApiError(400, _error("Exception while reading request", "The payload is not a JSON object."))
    return payload


_DEFAULT_PEOPLE = [
    "Abel Tuter",
    "Beth Anglin",
    "Bud Richman",
    "Charlie Whitherspoon",
    "David Loo",
    "Don Goodliffe",
    "Fred Luddy",
    "Howard Johnson",
    "ITIL User",
    "Jerrod Bennett",
    "Joe Employee",
    "Luke Wilson",
    "Margaret Grey",
    "Pat Boyle",
    "Rick Berzle",
    "Ron Kettering",
    "Sam Sorokin",
    "Tanya Shu",
]
_INCIDENT_TEMPLATES = [
    ("Disk space low on {ci}", "Free space on /var dropped below 10 percent.", "hardware"),
    ("High CPU on {ci}", "CPU above 95 percent for 15 minutes.", "software"),
    ("{ci} not responding to ping", "Heartbeat lost; the host does not answer ICMP.", "network"),
    ("Database connections exhausted on {ci}", "Connection pool at maximum; requests queueing.", "database"),
    ("Certificate expiring on {ci}", "TLS certificate expires in 7 days.", "software"),
    ("Memory pressure on {ci}", "Available memory below 5 percent; OOM killer active.", "hardware"),
    ("Failed logins spike on {ci}", "More than 200 failed logins in 5 minutes.", "inquiry"),
]
_CLOSE_CODES = [
    "Solved (Permanently)",
    "Solved (Work Around)",
    "Solved Remotely (Permanently)",
    "Not Solved (Not Reproducible)",
    "Closed/Resolved by Caller",
]
_CHANGE_TEMPLATES = [
    "Patch {ci} to the latest kernel",
    "Resize {ci}",
    "Rotate TLS certificate on {ci}",
    "Upgrade database engine on {ci}",
    "Decommission {ci}",
    "Firewall rule update for {ci}",
]


def _generate_work_items(
    table: str,
    count: int,
    start: datetime,
    end: datetime,
    rng: random.Random,
    users: list[str],
    cis: list[str],
    groups: list[str],
    user_names: list[str],
) -> list[Record]:
    span = max(0, int((end - start).total_seconds()))
    base = start.astimezone(UTC).replace(microsecond=0)
    offsets: list[int] = []
    while len(offsets) < count:
        at = rng.randrange(span + 1)
        burst = 1 if rng.random() < 0.7 else rng.randint(2, 25)  # bulk edits share one second
        offsets.extend([at] * burst)
    del offsets[count:]
    formatted: dict[int, str] = {}

    def stamp(offset: int) -> str:
        text = formatted.get(offset)
        if text is None:
            text = formatted[offset] = (base + timedelta(seconds=offset)).strftime(TS)
        return text

    ci_names = {ci: f"ci-{n}" for n, ci in enumerate(cis)}
    rows: list[Record] = []
    randrange, random_, choice = rng.randrange, rng.random, rng.choice
    incident = table == "incident"
    for updated_at in offsets:
        created_at = updated_at - randrange(0, 14 * 86400) if random_() < 0.8 else updated_at
        created, updated = stamp(created_at), stamp(updated_at)
        impact, urgency = choice("123"), choice("123")
        who = choice(user_names) if user_names else ADMIN_USERNAME
        ci = choice(cis) if cis else ""
        rec: Record = {
            "sys_id": f"{rng.getrandbits(128):032x}",
            "sys_class_name": table,
            "sys_created_on": created,
            "sys_created_by": who,
            "sys_updated_on": updated,
            "sys_updated_by": choice(user_names) if user_names else ADMIN_USERNAME,
            "sys_mod_count": "0" if created_at == updated_at else str(randrange(1, 12)),
            "opened_at": created,
            "impact": impact,
            "urgency": urgency,
            "priority": str(int(impact) + int(urgency) - 1),
            "assignment_group": choice(groups) if groups else "",
            "contact_type": choice(("monitoring", "email", "phone", "self-service")),
            "approval": "not requested",
            "escalation": "0",
            "made_sla": "true",
            "reassignment_count": "0",
        }
        if ci:
            rec["cmdb_ci"] = ci
        if users and random_() < 0.85:
            rec["assigned_to"] = choice(users)
        if incident:
            title, text, category = choice(_INCIDENT_TEMPLATES)
            state = choice("1122236677778") if created_at != updated_at else "1"
            rec |= {
                "short_description": title.format(ci=ci_names.get(ci, "server")),
                "description": text,
                "category": category,
                "state": state,
                "incident_state": state,
                "severity": "3",
                "reopen_count": "0",
                "active": "false" if state in "678" else "true",
            }
            if users:
                rec["caller_id"] = choice(users)
            if random_() < 0.3:
                rec["correlation_id"] = f"/subscriptions/0000/alerts/{rng.getrandbits(64):016x}"
                rec["correlation_display"] = "Azure Monitor"
            if state in "678":
                resolver = choice(users) if users else ""
                rec |= {
                    "close_code": choice(_CLOSE_CODES),
                    "close_notes": "Fixed and verified by monitoring.",
                    "resolved_at": updated,
                    "resolved_by": resolver,
                }
                if state == "7":
                    rec |= {"closed_at": updated, "closed_by": resolver}
        else:
            state = choice(("-5", "-4", "-3", "-2", "-2", "-1", "0", "3", "3", "3", "4"))
            planned = base + timedelta(seconds=created_at + randrange(86400, 10 * 86400))
            rec |= {
                "short_description": choice(_CHANGE_TEMPLATES).format(ci=ci_names.get(ci, "server")),
                "description": "Planned maintenance raised from the change calendar.",
                "state": state,
                "type": choice(("normal", "normal", "standard", "emergency")),
                "risk": choice("234"),
                "phase": "requested",
                "on_hold": "false",
                "start_date": planned.strftime(TS),
                "end_date": (planned + timedelta(hours=2)).strftime(TS),
                "requested_by_date": (planned - timedelta(days=1)).strftime(TS),
                "active": "false" if state in ("3", "4") else "true",
            }
            if users:
                rec["requested_by"] = choice(users)
            if state in ("-1", "0", "3"):
                rec |= {
                    "work_start": planned.strftime(TS),
                    "work_end": (planned + timedelta(hours=1)).strftime(TS),
                }
            if state in ("3", "4"):
                rec |= {
                    "close_code": "successful" if state == "3" else "unsuccessful",
                    "close_notes": "Implemented as planned.",
                    "closed_at": updated,
                }
        rows.append(rec)
    return rows


def _touch_changes(table: str, rec: Record, rng: random.Random) -> dict[str, str]:
    """What a person typically does to a record: move the state on and leave a note."""
    note: dict[str, str] = {"work_notes": f"Checked again at {rng.randrange(10_000)}"}
    state = rec.get("state", "")
    if table == "incident":
        if state in ("1", "2", "3"):
            nxt = rng.choice(("2", "3", "6"))
            if nxt == "6":
                return note | {
                    "state": "6",
                    "close_code": rng.choice(_CLOSE_CODES),
                    "close_notes": "Resolved.",
                }
            return note | {"state": nxt}
        if state == "6":
            return note | {"state": "7"}
        return {"comments": "Customer follow-up noted."}
    if table == "change_request":
        order = ["-5", "-4", "-3", "-2", "-1", "0", "3"]
        if state in order[:-1]:
            nxt = order[order.index(state) + 1]
            extra: dict[str, str] = {"close_code": "successful", "close_notes": "Done."} if nxt == "3" else {}
            return note | {"state": nxt} | extra
        return note
    return {"short_description": rec.get("short_description", "") + "."}


# -- subprocess mode -----------------------------------------------------------------------------


def _parse_seed(values: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for value in values:
        table, _, count = value.partition("=")
        out.append((table.strip(), int(count)))
    return out


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
        prog="python -m tests.loopback.servicenow", description="Loopback ServiceNow instance"
    )
    parser.add_argument("--seed", action="append", default=[], metavar="TABLE=COUNT")
    parser.add_argument("--span-days", type=float, default=120.0)
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rotate-refresh-tokens", action="store_true")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    parser.add_argument("--username", default=DEFAULT_USERNAME)
    parser.add_argument("--password", default=DEFAULT_PASSWORD)
    args = parser.parse_args(argv)
    server = ServiceNowLoopback(
        client_id=args.client_id,
        client_secret=args.client_secret,
        username=args.username,
        password=args.password,
        rotate_refresh_tokens=args.rotate_refresh_tokens,
        tls=args.tls,
        port=args.port,
    )
    end = server.clock()
    for n, (table, count) in enumerate(_parse_seed(args.seed)):
        server.seed_work_items(
            table, count, start=end - timedelta(days=args.span_days), end=end, rng_seed=n + 1
        )
    server.start()
    print(f"READY {server.url}", flush=True)
    try:
        _wait_for_stdin_close()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
