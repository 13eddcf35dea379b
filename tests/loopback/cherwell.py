"""A loopback Cherwell Service Management server: the OAuth token endpoint and the REST API.

One in-memory store behind one lock, answering the documented REST API (``/CherwellAPI``) closely
enough that the Cherwell connector cannot tell it from a server:

* ``POST /CherwellAPI/token?auth_mode=...``: form-encoded ``password`` and ``refresh_token``
  grants (an OWIN OAuth server: refused grants are HTTP 400 ``invalid_grant``/``invalid_client``);
  each refresh token works once (a new one comes with every access token); access tokens expire
  after ``access_token_lifespan`` seconds of the server's clock.
* ``api/V1``: ``getbusinessobjectsummary/busobname``, ``getbusinessobjectschema`` (with
  relationships), ``getbusinessobjecttemplate``, ``savebusinessobject``,
  ``saverelatedbusinessobject``, ``getrelatedbusinessobject``, ``getbusinessobject``,
  ``fieldvalueslookup``, ``getsearchresults``, ``serviceinfo``. Anything else is a Web API 404.
* Business objects ``Incident``, ``ChangeRequest``, ``JournalNote`` (a member of the ``Journal``
  group, related to incidents through ``Incident Owns Journals``) and ``ConfigServer``. Field ids
  and business object ids are hex strings; every value travels as a string, date-times in the
  en-US culture (``5/6/2024 7:00:00 AM``) and the server's time zone, whole seconds.
* Business rules: RecIDs, IncidentIDs/ChangeIDs, created/modified stamps, Priority from Impact and
  Urgency, resolved/closed stamps, the allowed values of Status, Impact and Urgency, required
  fields, and (``require_close_description``) a close description to resolve.
* Errors as Cherwell gives them: ``hasError`` with ``errorCode``/``errorMessage``/
  ``fieldValidationErrors`` inside HTTP 200 answers (validation, unknown field ids), 404 with the
  same body for a missing record, ``{"Message": ...}`` for Web API errors (401, 404, 405, 400).
* ``getsearchresults``: filters (``eq``, ``gt``, ``lt``, ``contains``, ``startswith``; filters on
  one field are OR-ed, on different fields AND-ed), ``sorting`` (``sortDirection`` 1 ascending,
  0 or -1 descending), ``pageNumber`` (from 1) / ``pageSize``, ``totalRows``. Keyset queries on
  ``LastModifiedDateTime`` (and ``RecID`` within one second) are answered by bisect on a
  per-object index.

Test hooks: ``fail_next`` (JSON, HTML or ``hasError`` answers, optionally with ``Retry-After``),
``lose_answers`` (the request is processed, the connection closed without an answer),
``mangle_search`` (edit the records of the next search answers), ``recreate_field`` (a new field
id, as when a site re-creates a field), a controllable ``clock``, a request log, store accessors,
a bulk generator (``seed_work_items``) and ``touch``, and control endpoints under ``/__loopback/``.

Run standalone (benchmarks)::

    python -m tests.loopback.cherwell --seed Incident=20000 --span-days 120

prints ``READY <url>`` and serves until stdin closes (or it is killed).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
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
from datetime import UTC, datetime, timedelta, tzinfo
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote
from zoneinfo import ZoneInfo

from tests.loopback.base import LoopbackHandler, LoopbackServer

API_ROOT = "/CherwellAPI"
DEFAULT_CLIENT_ID = "5d4f6f1b-f0de-4442-8791-4582816b04de"
DEFAULT_CLIENT_SECRET = "loopback-cherwell-native-secret"
DEFAULT_USERNAME = "svc.azuremonitor"
DEFAULT_PASSWORD = "loopback-cherwell-password"
ACCESS_TOKEN_LIFESPAN = 1199  # a stock REST API client: 20 minutes
REFRESH_TOKEN_LIFESPAN = 1440 * 60
SYSTEM_USER = "CSM Administrator"

INCIDENT_STATUSES = ("New", "Assigned", "In Progress", "Pending", "Resolved", "Closed", "Reopened")
CHANGE_STATUSES = (
    "New",
    "Classify",
    "Pending Approval",
    "Scheduled",
    "Implementing",
    "Review",
    "Closed",
    "Cancelled",
)
LEVELS = ("High", "Medium", "Low")
_PRIORITY = {(i, u): str(i + u + 1) for i in range(3) for u in range(3)}  # High/High -> 1 .. Low/Low -> 5


def _hex_id(*parts: str, length: int = 32) -> str:
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:length]


@dataclass
class FieldDef:
    name: str
    field_id: str
    type: str = "Text"  # Text, Number, DateTime, Logical
    required: bool = False
    read_only: bool = False
    default: str = ""
    display_name: str = ""

    def definition(self) -> dict[str, Any]:
        return {
            "autoFill": False,
            "calculated": False,
            "category": "",
            "decimalDigits": 0,
            "description": "",
            "details": "",
            "displayName": self.display_name or _display(self.name),
            "enabled": True,
            "fieldId": self.field_id,
            "hasDate": self.type == "DateTime",
            "hasTime": self.type == "DateTime",
            "isFullTextSearchable": self.type == "Text",
            "maximumSize": "",
            "name": self.name,
            "readOnly": self.read_only,
            "required": self.required,
            "type": self.type,
            "typeLocalized": self.type,
            "validated": False,
            "wholeDigits": 0,
        }


@dataclass
class Relationship:
    relationship_id: str
    display_name: str
    target: str  # busObId of the target (a group: its members may be saved through it)
    members: tuple[str, ...] = ()


@dataclass
class ObjectDef:
    name: str
    bus_ob_id: str
    fields: list[FieldDef]
    public_id_field: str = ""
    public_id_start: int = 100_001
    statuses: tuple[str, ...] = ()
    default_status: str = ""
    relationships: list[Relationship] = field(default_factory=list)
    group: bool = False

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        self.by_id = {f.field_id: f for f in self.fields}
        self.by_name = {f.name.lower(): f for f in self.fields}

    def has(self, name: str) -> bool:
        return name.lower() in self.by_name


def _display(name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)


def _fields(
    obj: str, spec: Iterable[tuple[str, str]], required: Iterable[str] = (), read_only: Iterable[str] = ()
) -> list[FieldDef]:
    req, ro = set(required), set(read_only)
    return [FieldDef(name, _hex_id(obj, name), kind, name in req, name in ro) for name, kind in spec]


_SYSTEM = (
    ("RecID", "Text"),
    ("CreatedDateTime", "DateTime"),
    ("CreatedBy", "Text"),
    ("LastModifiedDateTime", "DateTime"),
    ("LastModifiedBy", "Text"),
)
_READ_ONLY = ("RecID", "CreatedDateTime", "CreatedBy", "LastModifiedDateTime", "LastModifiedBy")


def _stock_objects() -> dict[str, ObjectDef]:
    incident_id, change_id = _hex_id("bo", "Incident"), _hex_id("bo", "ChangeRequest")
    journal_id, note_id = _hex_id("bo", "Journal"), _hex_id("bo", "JournalNote")
    ci_group_id, server_id = _hex_id("bo", "ConfigurationItem"), _hex_id("bo", "ConfigServer")
    incident = ObjectDef(
        "Incident",
        incident_id,
        _fields(
            "Incident",
            (
                *_SYSTEM,
                ("IncidentID", "Number"),
                ("Status", "Text"),
                ("ShortDescription", "Text"),
                ("Description", "Text"),
                ("Impact", "Text"),
                ("Urgency", "Text"),
                ("Priority", "Text"),
                ("CustomerDisplayName", "Text"),
                ("OwnedBy", "Text"),
                ("OwnedByTeam", "Text"),
                ("Service", "Text"),
                ("Category", "Text"),
                ("Subcategory", "Text"),
                ("Source", "Text"),
                ("ConfigItemRecID", "Text"),
                ("ConfigItemDisplayName", "Text"),
                ("CloseDescription", "Text"),
                ("ResolvedDateTime", "DateTime"),
                ("ResolvedBy", "Text"),
                ("ClosedDateTime", "DateTime"),
                ("ClosedBy", "Text"),
            ),
            required=("ShortDescription", "Description"),
            read_only=(*_READ_ONLY, "IncidentID", "Priority"),
        ),
        public_id_field="IncidentID",
        public_id_start=100_001,
        statuses=INCIDENT_STATUSES,
        default_status="New",
        relationships=[
            Relationship(
                _hex_id("rel", "Incident", "Journals"), "Incident Owns Journals", journal_id, (note_id,)
            ),
            Relationship(
                _hex_id("rel", "Incident", "CIs"),
                "Incident Links Configuration Items",
                ci_group_id,
                (server_id,),
            ),
        ],
    )
    change = ObjectDef(
        "ChangeRequest",
        change_id,
        _fields(
            "ChangeRequest",
            (
                *_SYSTEM,
                ("ChangeID", "Number"),
                ("Status", "Text"),
                ("Title", "Text"),
                ("Description", "Text"),
                ("Type", "Text"),
                ("Risk", "Text"),
                ("Priority", "Text"),
                ("Impact", "Text"),
                ("Urgency", "Text"),
                ("OwnedBy", "Text"),
                ("Category", "Text"),
                ("ConfigItemDisplayName", "Text"),
                ("RequestedDateTime", "DateTime"),
                ("ScheduledStartDate", "DateTime"),
                ("ScheduledEndDate", "DateTime"),
                ("ActualStartDate", "DateTime"),
                ("ActualEndDate", "DateTime"),
                ("ClosedDateTime", "DateTime"),
                ("ClosedBy", "Text"),
            ),
            required=("Title",),
            read_only=(*_READ_ONLY, "ChangeID"),
        ),
        public_id_field="ChangeID",
        public_id_start=30_001,
        statuses=CHANGE_STATUSES,
        default_status="New",
    )
    journal = ObjectDef(
        "Journal", journal_id, _fields("Journal", (*_SYSTEM, ("Details", "Text"))), group=True
    )
    note = ObjectDef(
        "JournalNote",
        note_id,
        _fields(
            "JournalNote",
            (
                *_SYSTEM,
                ("Details", "Text"),
                ("Priority", "Text"),
                ("MarkedAsRead", "Logical"),
                ("ParentRecID", "Text"),
            ),
            required=("Details",),
            read_only=(*_READ_ONLY, "ParentRecID"),
        ),
    )
    for item in note.fields:
        if item.name == "Priority":
            item.default = "Low"
        if item.name == "MarkedAsRead":
            item.default = "False"
    ci_group = ObjectDef("ConfigurationItem", ci_group_id, _fields("ConfigurationItem", _SYSTEM), group=True)
    server = ObjectDef(
        "ConfigServer",
        server_id,
        _fields(
            "ConfigServer",
            (*_SYSTEM, ("FriendlyName", "Text"), ("HostName", "Text"), ("OperatingSystem", "Text")),
            required=("FriendlyName",),
            read_only=_READ_ONLY,
        ),
    )
    return {o.name.lower(): o for o in (incident, change, journal, note, ci_group, server)}


Record = dict[str, Any]  # field name -> str, or datetime (UTC) for DateTime fields


@dataclass
class _Fault:
    remaining: int
    status: int
    retry_after: int | None
    path_contains: str | None
    kind: str  # json, html, has_error


_WEB_API_404 = "No HTTP resource was found that matches the request URI '{uri}'."
_DENIED = {"Message": "Authorization has been denied for this request."}
_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>{status} - {phrase}</title></head><body>"
    "<h1>Server Error</h1><h2>{status} - {phrase}.</h2>"
    "<p>The page cannot be displayed because an internal server error has occurred.</p></body></html>"
)
_SIGN_IN_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in</title></head><body><form method='post' action='/adfs/ls'>"
    "<input name='UserName'/><input name='Password' type='password'/></form></body></html>"
)


class _ApiError(Exception):
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        super().__init__(str(body))


def _has_error(code: str, message: str, http_status: str, **extra: Any) -> dict[str, Any]:
    return {
        "errorCode": code,
        "errorMessage": message,
        "hasError": True,
        "httpStatusCode": http_status,
    } | extra


class _Answer:
    """What the handler writes: status, JSON (or raw text with a content type), headers."""

    def __init__(
        self,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        raw: str | None = None,
        content_type: str = "application/json; charset=utf-8",
        drop: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.raw = raw
        self.content_type = content_type
        self.drop = drop


class CherwellHandler(LoopbackHandler):
    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        path, query = self.parsed()
        body = self.read_body()
        try:
            answer = self.app.handle_request(method, path, query, body, self.headers.get("Authorization"))
        except Exception as exc:  # a bug here must not take the connection down silently
            answer = _Answer(500, {"Message": "An error has occurred.", "ExceptionMessage": repr(exc)})
        if answer.drop:
            self.close_connection = True  # processed, but no answer: the client sees a reset
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if answer.raw is not None:
            data = answer.raw.encode()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_json(answer.status, answer.body, answer.headers)


_API_PATH = re.compile(r"^/CherwellAPI/api/V1/(?P<op>[a-z]+)(?P<rest>(/[^/]+)*)/?$", re.IGNORECASE)


class CherwellLoopback(LoopbackServer):
    """A loopback Cherwell server (see the module docstring). ``url`` is the server's base URL; the
    REST API is under ``api_url`` (``{url}/CherwellAPI``)."""

    handler_class = CherwellHandler

    def __init__(
        self,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str | None = None,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        auth_mode: str = "Internal",
        access_token_lifespan: int = ACCESS_TOKEN_LIFESPAN,
        time_zone: str = "UTC",
        clock: Callable[[], datetime] | None = None,
        tls: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls=tls, host=host, port=port)
        self.client_id = client_id
        self.client_secret = client_secret  # set: a native client, which must send it
        self.username = username
        self.password = password
        self.auth_mode = auth_mode
        self.access_token_lifespan = access_token_lifespan
        self.zone: tzinfo = UTC if time_zone.upper() == "UTC" else ZoneInfo(time_zone)
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.require_close_description = True
        self.delay_seconds = 0.0
        self.requests: list[tuple[str, str, Any]] = []
        self._lock = threading.RLock()
        self._passwords = {username.lower(): password}
        self._access: dict[str, tuple[str, datetime]] = {}
        self._refresh: dict[str, tuple[str, datetime]] = {}
        self._issued: list[str] = []
        self._faults: list[_Fault] = []
        self._lost: list[list[Any]] = []  # [remaining, path_contains]
        self._manglers: list[Callable[[list[dict[str, Any]]], None]] = []
        self._objects = _stock_objects()
        self._store: dict[str, dict[str, Record]] = {name: {} for name in self._objects}
        self._index: dict[str, list[tuple[datetime, str, str]]] = {name: [] for name in self._objects}
        self._counters = {name: o.public_id_start for name, o in self._objects.items()}
        self._touch_rng = random.Random(99)
        self._sequence = 0  # creation order within one second

    @property
    def api_url(self) -> str:
        return f"{self.url}{API_ROOT}"

    def __enter__(self) -> CherwellLoopback:
        self.start()
        return self

    # -- configuration and auth hooks ------------------------------------------------------------------

    def definition(self, name: str) -> ObjectDef:
        return self._objects[name.lower()]

    def set_required(self, object_name: str, *names: str) -> None:
        """The fields a save of ``object_name`` must leave non-empty (a site's form rules)."""
        with self._lock:
            obj = self.definition(object_name)
            wanted = {n.lower() for n in names}
            for item in obj.fields:
                item.required = item.name.lower() in wanted

    def set_statuses(self, object_name: str, statuses: Sequence[str]) -> None:
        with self._lock:
            self.definition(object_name).statuses = tuple(statuses)

    def drop_field(self, object_name: str, name: str) -> None:
        """The site has no such field (schema and template no longer offer it)."""
        with self._lock:
            obj = self.definition(object_name)
            obj.fields = [f for f in obj.fields if f.name.lower() != name.lower()]
            obj.reindex()

    def recreate_field(self, object_name: str, name: str) -> str:
        """The field gets a new id (an administrator deleted and re-created it); returns the new id."""
        with self._lock:
            obj = self.definition(object_name)
            item = obj.by_name[name.lower()]
            item.field_id = _hex_id(object_name, name, secrets.token_hex(4))
            obj.reindex()
            return item.field_id

    def add_user(self, user_name: str, password: str) -> None:
        with self._lock:
            self._passwords[user_name.lower()] = password

    def expire_access_tokens(self) -> None:
        """Every access token issued so far stops working (API calls answer 401)."""
        with self._lock:
            self._access.clear()

    def revoke_refresh_tokens(self) -> None:
        with self._lock:
            self._refresh.clear()

    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def token_grants(self) -> list[str]:
        """The grant types of every token request so far, in order."""
        with self._lock:
            return [
                body.get("grant_type", "") for method, path, body in self.requests if path.endswith("/token")
            ]

    # -- faults and the request log ----------------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int = 503,
        retry_after: int | None = None,
        path_contains: str | None = None,
        kind: str = "json",
    ) -> None:
        """The next ``count`` API requests (or any request whose path contains ``path_contains``, the
        token endpoint included) are answered without being processed: ``kind`` json (a Web API error
        body), html (an IIS error page, or a sign-in page for a 200) or has_error (a 200 with hasError
        and ``httpStatusCode`` of ``status``)."""
        if kind not in ("json", "html", "has_error"):
            raise ValueError(kind)
        with self._lock:
            self._faults.append(_Fault(count, status, retry_after, path_contains, kind))

    def lose_answers(self, count: int, path_contains: str) -> None:
        """The next ``count`` requests whose path contains ``path_contains`` are processed, then the
        connection is closed without an answer (a reset or a timeout to the client)."""
        with self._lock:
            self._lost.append([count, path_contains])

    def mangle_search(self, mangle: Callable[[list[dict[str, Any]]], None], count: int = 1) -> None:
        """Edit the rendered records of the next ``count`` search answers (missing fields, bad values)."""
        with self._lock:
            self._manglers.extend([mangle] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._lost.clear()
            self._manglers.clear()
            self.delay_seconds = 0.0

    def reset_request_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def calls(self, operation: str) -> list[Any]:
        """The JSON bodies (or None) of the requests to one API operation, oldest first."""
        op = operation.lower()
        with self._lock:
            return [body for method, path, body in self.requests if _operation(path) == op]

    def write_count(self) -> int:
        """Saves received (injected failures included)."""
        with self._lock:
            return sum(1 for _, path, _ in self.requests if _operation(path).startswith("save"))

    # -- store accessors -----------------------------------------------------------------------------

    def records(self, object_name: str) -> list[dict[str, str]]:
        with self._lock:
            key = object_name.lower()
            return [self._plain(key, rec) for rec in self._store[key].values()]

    def record(self, object_name: str, rec_id: str) -> dict[str, str] | None:
        with self._lock:
            key = object_name.lower()
            rec = self._store[key].get(rec_id)
            return self._plain(key, rec) if rec is not None else None

    def count(self, object_name: str) -> int:
        with self._lock:
            return len(self._store[object_name.lower()])

    def notes(self, incident_rec_id: str) -> list[str]:
        """The Details of an incident's journal notes, oldest first."""
        with self._lock:
            notes = [
                r for r in self._store["journalnote"].values() if r.get("ParentRecID") == incident_rec_id
            ]
            notes.sort(key=lambda r: (r["CreatedDateTime"], r.get("_seq", 0)))
            return [str(r.get("Details", "")) for r in notes]

    def insert_record(
        self, object_name: str, /, *, user: str = SYSTEM_USER, **values: object
    ) -> dict[str, str]:
        """Create a record as a person in the Browser Client would (business rules apply; values in
        the API's string form). Raises ValueError with the validation errors."""
        with self._lock:
            key = object_name.lower()
            obj = self._objects[key]
            try:
                rec = self._create(obj, {n: _str(v) for n, v in values.items()}, user)
            except _ApiError as exc:
                raise ValueError(json.dumps(exc.body)) from None
            return self._plain(key, rec)

    def update_record(
        self, object_name: str, rec_id: str, /, *, user: str = SYSTEM_USER, **values: object
    ) -> dict[str, str]:
        with self._lock:
            key = object_name.lower()
            obj = self._objects[key]
            rec = self._store[key][rec_id]
            try:
                self._modify(obj, rec, {n: _str(v) for n, v in values.items()}, user)
            except _ApiError as exc:
                raise ValueError(json.dumps(exc.body)) from None
            return self._plain(key, rec)

    def put_raw(self, object_name: str, values: Mapping[str, Any]) -> None:
        """Store a record as given, no rules (a bad import): for records the API answers oddly."""
        with self._lock:
            key = object_name.lower()
            rec: Record = dict(values)
            rec.setdefault("RecID", secrets.token_hex(21))
            self._store[key][rec["RecID"]] = rec
            self._reindex_one(key, rec, None)

    def seed_work_items(
        self, object_name: str, count: int, *, start: datetime, end: datetime, rng_seed: int = 1
    ) -> list[str]:
        """Bulk-create incidents or change requests with LastModifiedDateTime spread over [start, end]
        (a third of them in bursts sharing one second). Returns their RecIDs."""
        key = object_name.lower()
        if key not in ("incident", "changerequest"):
            raise ValueError(f"seed_work_items supports Incident and ChangeRequest, not {object_name}")
        rng = random.Random(rng_seed)
        with self._lock:
            obj = self._objects[key]
            rows = _generate(obj, count, start, end, rng)
            rows.sort(key=lambda r: r["CreatedDateTime"])
            store = self._store[key]
            for rec in rows:
                rec[obj.public_id_field] = str(self._counters[key])
                self._counters[key] += 1
                store[rec["RecID"]] = rec
            index = self._index[key]
            index.extend((rec["LastModifiedDateTime"], rec["RecID"].lower(), rec["RecID"]) for rec in rows)
            index.sort()
            return [rec["RecID"] for rec in rows]

    def touch(self, object_name: str, count: int) -> list[str]:
        """Edit ``count`` random records now, as people do (status moves on). Returns RecIDs."""
        key = object_name.lower()
        with self._lock:
            obj = self._objects[key]
            ids = list(self._store[key])
            chosen = self._touch_rng.sample(ids, min(count, len(ids)))
            for rec_id in chosen:
                rec = self._store[key][rec_id]
                self._modify(obj, rec, _touch_values(obj, rec, self._touch_rng), SYSTEM_USER)
            return chosen

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "objects": {o.name: len(self._store[k]) for k, o in self._objects.items()},
                "request_count": len(self.requests),
                "write_count": self.write_count(),
            }

    # -- HTTP entry point ------------------------------------------------------------------------------

    def handle_request(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorization: str | None
    ) -> _Answer:
        if path.startswith("/__loopback/"):
            return self._control(method, path, body)
        flat = {k.lower(): v[-1] for k, v in query.items()}
        is_token = path.rstrip("/").lower() == f"{API_ROOT}/token".lower()
        logged: Any = _form(body) if is_token else _json_or_none(body)
        if is_token and isinstance(logged, dict):
            logged = {
                k: ("***" if k in ("password", "client_secret", "refresh_token") else v)
                for k, v in logged.items()
            }
        with self._lock:
            self.requests.append((method, path, logged))
            fault = self._take_fault(path, api=path.lower().startswith(f"{API_ROOT}/api/".lower()))
            lose = self._take_lost(path)
        if self.delay_seconds > 0:
            time.sleep(self.delay_seconds)
        if fault is not None:
            return _fault_answer(fault)
        if is_token:
            if method != "POST":
                return _Answer(
                    405, {"Message": f"The requested resource does not support http method '{method}'."}
                )
            answer = self._token(flat, _form(body))
        else:
            answer = self._api(method, path, flat, body, authorization)
        if lose:
            answer.drop = True
        return answer

    def _take_fault(self, path: str, *, api: bool) -> _Fault | None:
        for fault in self._faults:
            applies = api if fault.path_contains is None else fault.path_contains.lower() in path.lower()
            if applies and fault.remaining > 0:
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                return fault
        return None

    def _take_lost(self, path: str) -> bool:
        for lost in self._lost:
            if lost[1].lower() in path.lower() and lost[0] > 0:
                lost[0] -= 1
                self._lost = [entry for entry in self._lost if entry[0] > 0]
                return True
        return False

    # -- OAuth -------------------------------------------------------------------------------------

    def _token(self, query: dict[str, str], form: dict[str, str]) -> _Answer:
        headers = {"Cache-Control": "no-cache", "Pragma": "no-cache"}
        grant = form.get("grant_type", "")
        with self._lock:
            if form.get("client_id") != self.client_id:
                return _Answer(
                    400, {"error": "invalid_client", "error_description": "Invalid client id"}, headers
                )
            if self.client_secret is not None and form.get("client_secret") != self.client_secret:
                return _Answer(
                    400, {"error": "invalid_client", "error_description": "Invalid client secret"}, headers
                )
            if grant == "password":
                mode = query.get("auth_mode", "Internal")
                user = form.get("username", "")
                if mode.lower() != self.auth_mode.lower() or self._passwords.get(user.lower()) != form.get(
                    "password"
                ):
                    return _Answer(
                        400,
                        {
                            "error": "invalid_grant",
                            "error_description": "The user name or password is incorrect.",
                        },
                        headers,
                    )
            elif grant == "refresh_token":
                old = form.get("refresh_token", "")
                entry = self._refresh.pop(old, None)  # a refresh token works once
                if entry is None or entry[1] <= self._now():
                    return _Answer(
                        400,
                        {"error": "invalid_grant", "error_description": "The refresh token is invalid."},
                        headers,
                    )
                user = entry[0]
            else:
                return _Answer(400, {"error": "unsupported_grant_type"}, headers)
            now = self._now()
            access, refresh = secrets.token_urlsafe(48), secrets.token_hex(16)
            self._access[access] = (user, now + timedelta(seconds=self.access_token_lifespan))
            self._refresh[refresh] = (user, now + timedelta(seconds=REFRESH_TOKEN_LIFESPAN))
            self._issued += [access, refresh]
        return _Answer(
            200,
            {
                "access_token": access,
                "token_type": "bearer",
                "expires_in": self.access_token_lifespan,
                "refresh_token": refresh,
                "as:client_id": self.client_id,
                "username": user,
                ".issued": _http_date(now),
                ".expires": _http_date(now + timedelta(seconds=self.access_token_lifespan)),
            },
            headers,
        )

    def _authenticate(self, authorization: str | None) -> str | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        entry = self._access.get(token.strip())
        if entry is None or entry[1] <= self._now():
            return None
        return entry[0]

    def _now(self) -> datetime:
        return self.clock().astimezone(UTC).replace(microsecond=0)

    # -- the REST API ----------------------------------------------------------------------------------

    def _api(
        self, method: str, path: str, query: dict[str, str], body: bytes, authorization: str | None
    ) -> _Answer:
        match = _API_PATH.match(path)
        if match is None:
            return _Answer(404, {"Message": _WEB_API_404.format(uri=f"{self.url}{path}")})
        with self._lock:
            user = self._authenticate(authorization)
        if user is None:
            return _Answer(401, _DENIED, {"WWW-Authenticate": "Bearer"})
        op = match["op"].lower()
        rest = [unquote(part) for part in match["rest"].split("/") if part]
        args = dict(zip(rest[0::2], rest[1::2], strict=False))
        routes: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "serviceinfo"): self._service_info,
            ("GET", "getbusinessobjectsummary"): lambda: self._summary(args),
            ("GET", "getbusinessobjectschema"): lambda: self._schema(args, query),
            ("POST", "getbusinessobjecttemplate"): lambda: self._template(_json_object(body)),
            ("POST", "savebusinessobject"): lambda: self._save(_json_object(body), user),
            ("POST", "saverelatedbusinessobject"): lambda: self._save_related(_json_object(body), user),
            ("GET", "getrelatedbusinessobject"): lambda: self._related(args, query),
            ("GET", "getbusinessobject"): lambda: self._read(args),
            ("POST", "fieldvalueslookup"): lambda: self._lookup(_json_object(body)),
            ("POST", "getsearchresults"): lambda: self._search(_json_object(body)),
        }
        route = routes.get((method, op))
        if route is None:
            if any(key[1] == op for key in routes):
                return _Answer(
                    405, {"Message": f"The requested resource does not support http method '{method}'."}
                )
            return _Answer(404, {"Message": _WEB_API_404.format(uri=f"{self.url}{path}")})
        try:
            with self._lock:
                result = route()
        except _ApiError as exc:
            return _Answer(exc.status, exc.body, exc.headers)
        return result if isinstance(result, _Answer) else _Answer(200, result)

    def _service_info(self) -> dict[str, Any]:
        return {
            "apiVersion": "10.5.0",
            "csmCulture": "en-US",
            "csmVersion": "10.5.0",
            "systemDateTime": _http_date(self._now()),
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
        }

    def _object_by_id(self, bus_ob_id: str, status: int = 200) -> ObjectDef:
        for obj in self._objects.values():
            if obj.bus_ob_id.lower() == (bus_ob_id or "").lower():
                return obj
        raise _ApiError(
            status, _has_error("BUSOBNOTFOUND", f"Business object {bus_ob_id} not found", "NotFound")
        )

    def _summary(self, args: dict[str, str]) -> list[dict[str, Any]]:
        obj = self._objects.get(args.get("busobname", "").lower())
        if obj is None:
            return []
        status = obj.by_name.get("status")
        return [
            {
                "firstRecIdField": obj.by_name["recid"].field_id,
                "groupSummaries": [],
                "recIdFields": obj.by_name["recid"].field_id,
                "stateFieldId": status.field_id if status else "",
                "states": ",".join(obj.statuses),
                "busObId": obj.bus_ob_id,
                "displayName": _display(obj.name),
                "group": obj.group,
                "lookup": False,
                "major": bool(obj.public_id_field),
                "name": obj.name,
                "supporting": not obj.public_id_field and not obj.group,
            }
        ]

    def _schema(self, args: dict[str, str], query: dict[str, str]) -> dict[str, Any]:
        obj = self._object_by_id(args.get("busobid", ""))
        with_relationships = query.get("includerelationships", "false").lower() == "true"
        status = obj.by_name.get("status")
        relationships = []
        if with_relationships:
            for rel in obj.relationships:
                target = self._object_by_id(rel.target)
                relationships.append(
                    {
                        "cardinality": "Many",
                        "description": rel.display_name,
                        "displayName": rel.display_name,
                        "fieldDefinitions": [f.definition() for f in target.fields],
                        "relationshipId": rel.relationship_id,
                        "target": rel.target,
                    }
                )
        return {
            "busObId": obj.bus_ob_id,
            "fieldDefinitions": [f.definition() for f in obj.fields],
            "firstRecIdField": obj.by_name["recid"].field_id,
            "gridDefinitions": [],
            "name": obj.name,
            "recIdFields": obj.by_name["recid"].field_id,
            "relationships": relationships,
            "stateFieldId": status.field_id if status else "",
            "states": ",".join(obj.statuses),
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
        }

    def _template(self, request: dict[str, Any]) -> dict[str, Any]:
        obj = self._object_by_id(str(request.get("busObId", "")))
        wanted: list[FieldDef] = []
        if request.get("includeAll"):
            wanted = list(obj.fields)
        else:
            names = {str(n).lower() for n in request.get("fieldNames") or []}
            ids = {str(i) for i in request.get("fieldIds") or []}
            unknown = [n for n in names if n not in obj.by_name] + [i for i in ids if i not in obj.by_id]
            if unknown:
                return _has_error("FIELDNOTFOUND", f"Field not found: {unknown[0]}", "BadRequest", fields=[])
            wanted = [
                f
                for f in obj.fields
                if f.name.lower() in names
                or f.field_id in ids
                or (request.get("includeRequired") and f.required)
            ]
        return {
            "fields": [_template_item(obj, f, self._default(obj, f)) for f in wanted],
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
        }

    def _default(self, obj: ObjectDef, item: FieldDef) -> str:
        if item.name == "Status":
            return obj.default_status
        return item.default

    def _changes(self, obj: ObjectDef, fields: Any) -> dict[str, str]:
        """The dirty fields of a save request by name; an unknown field id is an error in a 200."""
        if not isinstance(fields, list):
            raise _ApiError(200, _has_error("GENERALFAILURE", "fields must be a list", "BadRequest"))
        changes: dict[str, str] = {}
        for item in fields:
            if not isinstance(item, dict):
                raise _ApiError(200, _has_error("GENERALFAILURE", "a field must be an object", "BadRequest"))
            definition = obj.by_id.get(str(item.get("fieldId", "")))
            if definition is None:
                raise _ApiError(
                    200, _has_error("FIELDNOTFOUND", f"Field not found: {item.get('fieldId')}", "BadRequest")
                )
            if item.get("dirty") in (True, "true", "True"):
                changes[definition.name] = _str(item.get("value"))
        return changes

    def _save(self, request: dict[str, Any], user: str) -> Any:
        obj = self._object_by_id(str(request.get("busObId", "")))
        changes = self._changes(obj, request.get("fields"))
        rec_id = str(request.get("busObRecId") or "")
        public = str(request.get("busObPublicId") or "")
        store = self._store[obj.name.lower()]
        if rec_id or public:
            rec = store.get(rec_id) if rec_id else self._by_public(obj, public)
            if rec is None:
                raise _ApiError(404, _has_error("RECORDNOTFOUND", "Record not found", "NotFound"))
            self._modify(obj, rec, changes, user)
        else:
            rec = self._create(obj, changes, user)
        return _save_response(obj, rec)

    def _save_related(self, request: dict[str, Any], user: str) -> Any:
        parent_obj = self._object_by_id(str(request.get("parentBusObId", "")))
        parent = self._store[parent_obj.name.lower()].get(str(request.get("parentBusObRecId") or ""))
        if parent is None:
            raise _ApiError(404, _has_error("RECORDNOTFOUND", "Parent record not found", "NotFound"))
        relationship = next(
            (r for r in parent_obj.relationships if r.relationship_id == request.get("relationshipId")), None
        )
        if relationship is None:
            raise _ApiError(200, _has_error("RELATIONSHIPNOTFOUND", "Relationship not found", "BadRequest"))
        child_obj = self._object_by_id(str(request.get("busObId", "")))
        if child_obj.bus_ob_id not in (relationship.target, *relationship.members):
            raise _ApiError(
                200,
                _has_error(
                    "GENERALFAILURE", f"{child_obj.name} is not related by this relationship", "BadRequest"
                ),
            )
        changes = self._changes(child_obj, request.get("fields"))
        changes["ParentRecID"] = parent["RecID"]
        rec = self._create(child_obj, changes, user)
        return {
            "parentBusObId": parent_obj.bus_ob_id,
            "parentBusObPublicId": _str(parent.get(parent_obj.public_id_field, "")),
            "parentBusObRecId": parent["RecID"],
            "relationshipId": relationship.relationship_id,
            "busObPublicId": rec["RecID"],
            "busObRecId": rec["RecID"],
            "cacheKey": None,
            "fieldValidationErrors": [],
            "notificationTriggers": [],
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
            "httpStatusCode": None,
        }

    def _related(self, args: dict[str, str], query: dict[str, str]) -> dict[str, Any]:
        parent_obj = self._object_by_id(args.get("parentbusobid", ""))
        parent = self._store[parent_obj.name.lower()].get(args.get("parentbusobrecid", ""))
        if parent is None:
            raise _ApiError(404, _has_error("RECORDNOTFOUND", "Parent record not found", "NotFound"))
        relationship = next(
            (r for r in parent_obj.relationships if r.relationship_id == args.get("relationshipid")), None
        )
        if relationship is None:
            raise _ApiError(200, _has_error("RELATIONSHIPNOTFOUND", "Relationship not found", "BadRequest"))
        children: list[tuple[ObjectDef, Record]] = []
        for member in (relationship.target, *relationship.members):
            obj = self._object_by_id(member)
            children += [
                (obj, r)
                for r in self._store[obj.name.lower()].values()
                if r.get("ParentRecID") == parent["RecID"]
            ]
        children.sort(key=lambda pair: (pair[1]["CreatedDateTime"], pair[1].get("_seq", 0)))
        page_size = _int(query.get("pagesize"), 10, minimum=1)
        page = _int(query.get("pagenumber"), 1, minimum=1)
        chunk = children[(page - 1) * page_size : page * page_size]
        return {
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
            "links": [],
            "pageNumber": page,
            "pageSize": page_size,
            "parentBusObId": parent_obj.bus_ob_id,
            "parentBusObPublicId": _str(parent.get(parent_obj.public_id_field, "")),
            "parentBusObRecId": parent["RecID"],
            "relatedBusinessObjects": [self._read_response(obj, rec, None) for obj, rec in chunk],
            "relationshipId": relationship.relationship_id,
            "totalRecords": len(children),
        }

    def _read(self, args: dict[str, str]) -> dict[str, Any]:
        obj = self._object_by_id(args.get("busobid", ""), status=404)
        key = obj.name.lower()
        rec = self._store[key].get(args.get("busobrecid", "")) if "busobrecid" in args else None
        if rec is None and "publicid" in args:
            rec = self._by_public(obj, args["publicid"])
        if rec is None:
            raise _ApiError(404, _has_error("RECORDNOTFOUND", "Record not found", "NotFound"))
        return self._read_response(obj, rec, None)

    def _lookup(self, request: dict[str, Any]) -> dict[str, Any]:
        obj = self._object_by_id(str(request.get("busObId", "")))
        definition = obj.by_id.get(str(request.get("fieldId", "")))
        if definition is None and request.get("fieldName"):
            definition = obj.by_name.get(str(request["fieldName"]).lower())
        if definition is None:
            return _has_error(
                "FIELDNOTFOUND", f"Field not found: {request.get('fieldId')}", "BadRequest", values=[]
            )
        values: Sequence[str] = []
        if definition.name == "Status":
            values = obj.statuses
        elif definition.name in ("Impact", "Urgency"):
            values = LEVELS
        return {"values": list(values), "errorCode": None, "errorMessage": None, "hasError": False}

    # -- search --------------------------------------------------------------------------------------

    def _search(self, request: dict[str, Any]) -> dict[str, Any]:
        obj = self._object_by_id(str(request.get("busObId", "")))
        key = obj.name.lower()
        try:
            page_size = max(1, int(request.get("pageSize") or 10))
            page = max(1, int(request.get("pageNumber") or 1))
        except (TypeError, ValueError):
            return _has_error("GENERALFAILURE", "pageNumber and pageSize must be numbers", "BadRequest")
        groups: dict[str, list[tuple[str, str]]] = {}
        for item in request.get("filters") or []:
            definition = obj.by_id.get(str(item.get("fieldId", "")))
            if definition is None:
                return _has_error("FIELDNOTFOUND", f"Field not found: {item.get('fieldId')}", "BadRequest")
            operator = str(item.get("operator", "")).lower()
            if operator not in ("eq", "gt", "lt", "contains", "startswith", "startwith"):
                return _has_error("GENERALFAILURE", f"Unknown operator {operator}", "BadRequest")
            groups.setdefault(definition.name, []).append((operator, _str(item.get("value"))))
        sorting: list[tuple[str, bool]] = []
        for item in request.get("sorting") or []:
            definition = obj.by_id.get(str(item.get("fieldId", "")))
            if definition is None:
                return _has_error("FIELDNOTFOUND", f"Field not found: {item.get('fieldId')}", "BadRequest")
            sorting.append((definition.name, int(item.get("sortDirection", 1)) == 1))
        wanted: list[FieldDef] | None = None
        if not request.get("includeAllFields"):
            wanted = []
            for field_id in request.get("fields") or []:
                definition = obj.by_id.get(str(field_id))
                if definition is None:
                    return _has_error("FIELDNOTFOUND", f"Field not found: {field_id}", "BadRequest")
                wanted.append(definition)
        try:
            conditions = {
                name: [(op, self._typed(obj, name, value)) for op, value in ors]
                for name, ors in groups.items()
            }
        except ValueError as exc:
            return _has_error("GENERALFAILURE", str(exc), "BadRequest")
        rows, total = self._select(obj, key, conditions, sorting, (page - 1) * page_size, page_size)
        records = [self._read_response(obj, rec, wanted) for rec in rows]
        if self._manglers:
            self._manglers.pop(0)(records)
        return {
            "businessObjects": records,
            "hasPrompts": False,
            "links": [],
            "prompts": [],
            "searchResultsFields": [],
            "simpleResults": None,
            "totalRows": total,
            "hasMoreRecords": (page - 1) * page_size + len(rows) < total,
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
            "httpStatusCode": None,
        }

    def _typed(self, obj: ObjectDef, name: str, value: str) -> Any:
        kind = obj.by_name[name.lower()].type
        if kind == "DateTime":
            parsed = _parse_local(value, self.zone)
            if parsed is None:
                raise ValueError(f"Invalid date value {value!r}")
            return parsed
        if kind == "Number":
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"Invalid number value {value!r}") from None
        return value.lower()

    def _select(
        self,
        obj: ObjectDef,
        key: str,
        conditions: dict[str, list[tuple[str, Any]]],
        sorting: list[tuple[str, bool]],
        offset: int,
        limit: int,
    ) -> tuple[list[Record], int]:
        plan = self._keyset_plan(conditions, sorting)
        if plan is not None:
            index = self._index[key]
            lo, hi, rec_after = plan(index)
            if rec_after is None:
                candidates = index[lo:hi]
            else:
                candidates = [entry for entry in index[lo:hi] if entry[1] > rec_after]
            total = len(candidates)
            store = self._store[key]
            return [store[entry[2]] for entry in candidates[offset : offset + limit]], total
        matched = [rec for rec in self._store[key].values() if self._matches(obj, rec, conditions)]
        for name, ascending in reversed(sorting):
            matched.sort(key=_sort_key(obj, name), reverse=not ascending)
        return matched[offset : offset + limit], len(matched)

    @staticmethod
    def _keyset_plan(
        conditions: dict[str, list[tuple[str, Any]]], sorting: list[tuple[str, bool]]
    ) -> Callable[[list[tuple[datetime, str, str]]], tuple[int, int, str | None]] | None:
        """The sync's two queries, answered from the (LastModifiedDateTime, RecID) index."""
        names = set(conditions)
        modified = conditions.get("LastModifiedDateTime")
        if not modified or len(modified) != 1 or not names <= {"LastModifiedDateTime", "RecID"}:
            return None
        op, at = modified[0]
        rec = conditions.get("RecID")
        if op == "gt" and rec is None and sorting == [("LastModifiedDateTime", True), ("RecID", True)]:
            return lambda index: (bisect.bisect_right(index, (at, "\uffff", "")), len(index), None)
        if (
            op == "eq"
            and rec is not None
            and len(rec) == 1
            and rec[0][0] == "gt"
            and sorting in ([("RecID", True)], [("LastModifiedDateTime", True), ("RecID", True)])
        ):
            after = str(rec[0][1])
            return lambda index: (
                bisect.bisect_left(index, (at, "", "")),
                bisect.bisect_right(index, (at, "\uffff", "")),
                after,
            )
        return None

    def _matches(self, obj: ObjectDef, rec: Record, conditions: dict[str, list[tuple[str, Any]]]) -> bool:
        for name, ors in conditions.items():
            kind = obj.by_name[name.lower()].type
            raw = rec.get(name)
            if kind == "DateTime":
                value: Any = raw if isinstance(raw, datetime) else None
            elif kind == "Number":
                try:
                    value = float(raw) if raw not in (None, "") else None
                except ValueError:
                    value = None
            else:
                value = _str(raw).lower()
            if not any(_compare(value, op, operand) for op, operand in ors):
                return False
        return True

    # -- records ---------------------------------------------------------------------------------------

    def _by_public(self, obj: ObjectDef, public: str) -> Record | None:
        if not obj.public_id_field:
            return self._store[obj.name.lower()].get(public)
        return next(
            (r for r in self._store[obj.name.lower()].values() if _str(r.get(obj.public_id_field)) == public),
            None,
        )

    def _create(self, obj: ObjectDef, changes: dict[str, str], user: str) -> Record:
        now = self._now()
        self._sequence += 1
        rec: Record = {"RecID": secrets.token_hex(21), "_seq": self._sequence}
        for item in obj.fields:
            if item.type != "DateTime" and item.name != "RecID":
                rec[item.name] = self._default(obj, item)
        self._apply(obj, rec, changes, user, now, created=True)
        key = obj.name.lower()
        if obj.public_id_field:
            rec[obj.public_id_field] = str(self._counters[key])
            self._counters[key] += 1
        self._store[key][rec["RecID"]] = rec
        self._reindex_one(key, rec, None)
        return rec

    def _modify(self, obj: ObjectDef, rec: Record, changes: dict[str, str], user: str) -> None:
        before = rec.get("LastModifiedDateTime")
        candidate = dict(rec)
        self._apply(obj, candidate, changes, user, self._now(), created=False)
        rec.clear()
        rec.update(candidate)
        self._reindex_one(obj.name.lower(), rec, before if isinstance(before, datetime) else None)

    def _apply(
        self, obj: ObjectDef, rec: Record, changes: dict[str, str], user: str, now: datetime, *, created: bool
    ) -> None:
        """Business rules of one save; validation errors answer in a 200 with hasError."""
        errors: list[dict[str, str]] = []
        old_status = _str(rec.get("Status"))
        for name, value in changes.items():
            definition = obj.by_name[name.lower()]
            if definition.read_only and name != "ParentRecID":
                continue
            if definition.type == "DateTime":
                parsed = _parse_local(value, self.zone) if value else None
                if value and parsed is None:
                    errors.append(_validation(definition, "INVALIDVALUE", f"'{value}' is not a valid date"))
                    continue
                rec[name] = parsed
            else:
                rec[name] = value
        if obj.statuses and _str(rec.get("Status")) not in obj.statuses:
            errors.append(
                _validation(
                    obj.by_name["status"], "INVALIDVALUE", f"'{rec.get('Status')}' is not a valid Status"
                )
            )
        for name in ("Impact", "Urgency"):
            if obj.has(name) and _str(rec.get(name)) and _str(rec.get(name)) not in LEVELS:
                errors.append(
                    _validation(obj.by_name[name.lower()], "INVALIDVALUE", f"'{rec.get(name)}' is not valid")
                )
        for item in obj.fields:
            if item.required and not _str(rec.get(item.name)).strip():
                errors.append(_validation(item, "REQUIRED", f"{_display(item.name)} is required"))
        status = _str(rec.get("Status"))
        if (
            self.require_close_description
            and obj.has("CloseDescription")
            and status in ("Resolved", "Closed")
            and status != old_status
            and not _str(rec.get("CloseDescription")).strip()
        ):
            errors.append(
                _validation(
                    obj.by_name["closedescription"], "REQUIRED", "Close Description is required to resolve"
                )
            )
        if errors:
            raise _ApiError(
                200,
                {
                    "busObPublicId": None,
                    "busObRecId": None,
                    "cacheKey": None,
                    "fieldValidationErrors": errors,
                    "notificationTriggers": [],
                    "errorCode": "VALIDATIONERROR",
                    "errorMessage": "One or more fields failed validation",
                    "hasError": True,
                    "httpStatusCode": "BadRequest",
                },
            )
        if (
            obj.has("Priority")
            and obj.has("Impact")
            and _str(rec.get("Impact")) in LEVELS
            and _str(rec.get("Urgency")) in LEVELS
        ):
            rec["Priority"] = _PRIORITY[(LEVELS.index(rec["Impact"]), LEVELS.index(rec["Urgency"]))]
        if created:
            rec["CreatedDateTime"], rec["CreatedBy"] = now, user
        rec["LastModifiedDateTime"], rec["LastModifiedBy"] = now, user
        if status != old_status:
            if status == "Resolved" and obj.has("ResolvedDateTime"):
                rec["ResolvedDateTime"], rec["ResolvedBy"] = now, user
            if status in ("Closed", "Cancelled") and obj.has("ClosedDateTime"):
                rec["ClosedDateTime"], rec["ClosedBy"] = now, user

    def _reindex_one(self, key: str, rec: Record, before: datetime | None) -> None:
        index = self._index[key]
        if before is not None:
            entry = (before, rec["RecID"].lower(), rec["RecID"])
            at = bisect.bisect_left(index, entry)
            if at < len(index) and index[at] == entry:
                del index[at]
        modified = rec.get("LastModifiedDateTime")
        if isinstance(modified, datetime):
            bisect.insort(index, (modified, rec["RecID"].lower(), rec["RecID"]))

    def _render(self, value: Any) -> str:
        if isinstance(value, datetime):
            return _format_local(value, self.zone)
        return _str(value)

    def _read_response(
        self, obj: ObjectDef, rec: Record, wanted: Sequence[FieldDef] | None
    ) -> dict[str, Any]:
        fields = obj.fields if wanted is None else wanted
        return {
            "busObId": obj.bus_ob_id,
            "busObPublicId": _str(rec.get(obj.public_id_field)) if obj.public_id_field else rec.get("RecID"),
            "busObRecId": rec.get("RecID"),
            "fields": [
                {
                    "dirty": False,
                    "displayName": _display(f.name),
                    "fieldId": f.field_id,
                    "fullFieldId": f"BO:{obj.bus_ob_id},FI:{f.field_id}",
                    "html": None,
                    "name": f.name,
                    "value": self._render(rec.get(f.name)),
                }
                for f in fields
            ],
            "links": [],
            "errorCode": None,
            "errorMessage": None,
            "hasError": False,
            "httpStatusCode": None,
        }

    def _plain(self, key: str, rec: Record) -> dict[str, str]:
        return {name: self._render(value) for name, value in rec.items() if not name.startswith("_")}

    # -- control endpoints (other processes: the benchmark) ----------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> _Answer:
        action = path[len("/__loopback/") :].strip("/")
        args = _json_or_none(body) or {}
        if action == "stats" and method == "GET":
            return _Answer(200, self.stats())
        if method != "POST" or not isinstance(args, dict):
            return _Answer(405, {"error": "use POST with a JSON object"})
        if action == "touch":
            ids = self.touch(str(args.get("object", "Incident")), int(args.get("count", 1)))
            return _Answer(200, {"updated": len(ids)})
        if action == "reset":
            self.reset_request_log()
            self.clear_faults()
            return _Answer(200, {"ok": True})
        return _Answer(404, {"error": f"unknown control action {action}"})


# -- helpers -----------------------------------------------------------------------------------------


def _operation(path: str) -> str:
    match = _API_PATH.match(path)
    if match:
        return match["op"].lower()
    return "token" if path.rstrip("/").lower().endswith("/token") else ""


def _str(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _int(raw: str | None, default: int, *, minimum: int) -> int:
    try:
        return max(minimum, int(raw)) if raw else default
    except ValueError:
        return default


def _form(body: bytes) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body.strip() else None
    except ValueError:
        return None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body) if body.strip() else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise _ApiError(400, {"Message": "The request is invalid."})
    return payload


def _http_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _format_local(moment: datetime, zone: tzinfo) -> str:
    local = moment.astimezone(zone)
    hour = local.hour % 12 or 12
    half = "AM" if local.hour < 12 else "PM"
    return f"{local.month}/{local.day}/{local.year} {hour}:{local.minute:02d}:{local.second:02d} {half}"


_LOCAL = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})\s+(\d{1,2}):(\d{2})(?::(\d{2}))?\s*([AaPp][Mm])?$")


def _parse_local(text: str, zone: tzinfo) -> datetime | None:
    """The server reads filter and field values in its culture (en-US) and time zone."""
    match = _LOCAL.match(text.strip())
    if not match:
        return None
    month, day, year, hour, minute, second, half = match.groups()
    hours = int(hour)
    if half:
        hours = hours % 12 + (12 if half.lower() == "pm" else 0)
    try:
        local = datetime(int(year), int(month), int(day), hours, int(minute), int(second or 0), tzinfo=zone)
    except ValueError:
        return None
    return local.astimezone(UTC)


def _compare(value: Any, op: str, operand: Any) -> bool:
    if value is None or value == "":
        return op == "eq" and operand in ("", None)
    if op == "eq":
        return bool(value == operand)
    if op == "gt":
        return bool(value > operand)
    if op == "lt":
        return bool(value < operand)
    if op == "contains":
        return isinstance(value, str) and str(operand) in value
    return isinstance(value, str) and value.startswith(str(operand))


def _sort_key(obj: ObjectDef, name: str) -> Callable[[Record], Any]:
    kind = obj.by_name[name.lower()].type
    floor = datetime.min.replace(tzinfo=UTC)

    def key(rec: Record) -> Any:
        raw = rec.get(name)
        if kind == "DateTime":
            return raw if isinstance(raw, datetime) else floor
        if kind == "Number":
            try:
                return float(raw) if raw not in (None, "") else float("-inf")
            except ValueError:
                return float("-inf")
        return _str(raw).lower()

    return key


def _template_item(obj: ObjectDef, item: FieldDef, value: str) -> dict[str, Any]:
    return {
        "dirty": False,
        "displayName": _display(item.name),
        "fieldId": item.field_id,
        "fullFieldId": f"BO:{obj.bus_ob_id},FI:{item.field_id}",
        "html": None,
        "name": item.name,
        "value": value,
    }


def _validation(item: FieldDef, code: str, message: str) -> dict[str, str]:
    return {"error": message, "errorCode": code, "fieldId": item.field_id}


def _save_response(obj: ObjectDef, rec: Record) -> dict[str, Any]:
    return {
        "busObPublicId": _str(rec.get(obj.public_id_field)) if obj.public_id_field else rec["RecID"],
        "busObRecId": rec["RecID"],
        "cacheKey": None,
        "fieldValidationErrors": [],
        "notificationTriggers": [],
        "errorCode": None,
        "errorMessage": None,
        "hasError": False,
        "httpStatusCode": None,
    }


def _fault_answer(fault: _Fault) -> _Answer:
    headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
    try:
        phrase = HTTPStatus(fault.status).phrase
    except ValueError:
        phrase = "Error"
    if fault.kind == "html":
        page = _SIGN_IN_PAGE if fault.status == 200 else _HTML_PAGE.format(status=fault.status, phrase=phrase)
        return _Answer(fault.status, headers=headers, raw=page, content_type="text/html; charset=utf-8")
    if fault.kind == "has_error":
        name = "".join(part.capitalize() for part in HTTPStatus(fault.status).name.split("_"))
        return _Answer(200, _has_error("GENERALFAILURE", f"Injected failure ({phrase})", name), headers)
    if fault.status == 429:
        return _Answer(429, {"Message": "API calls quota exceeded! maximum admitted 1000 per 1m."}, headers)
    return _Answer(fault.status, {"Message": f"An error has occurred. ({phrase}, injected)"}, headers)


_PEOPLE = ["Amy Adams", "Bo Brown", "Cy Clark", "Di Diaz", "Ed Evans", "Flo Ford", "Gus Gray", "Hal Hunt"]
_TEAMS = ["Service Desk", "Network", "Database", "Windows Server", "Linux Server"]
_TITLES = [
    "Disk space low on {ci}",
    "High CPU on {ci}",
    "{ci} not responding to ping",
    "Database connections exhausted on {ci}",
    "Certificate expiring on {ci}",
    "Memory pressure on {ci}",
]
_CHANGE_TITLES = ["Patch {ci}", "Resize {ci}", "Rotate the certificate of {ci}", "Decommission {ci}"]


def _generate(obj: ObjectDef, count: int, start: datetime, end: datetime, rng: random.Random) -> list[Record]:
    span = max(0, int((end - start).total_seconds()))
    base = start.astimezone(UTC).replace(microsecond=0)
    offsets: list[int] = []
    while len(offsets) < count:
        at = rng.randrange(span + 1)
        offsets.extend([at] * (1 if rng.random() < 0.7 else rng.randint(2, 25)))  # bulk edits share a second
    del offsets[count:]
    incident = obj.name == "Incident"
    statuses = obj.statuses
    rows: list[Record] = []
    for offset in offsets:
        updated = base + timedelta(seconds=offset)
        created = updated - timedelta(seconds=rng.randrange(0, 14 * 86400)) if rng.random() < 0.8 else updated
        ci = f"srv-{rng.randrange(1, 400):04d}"
        status = rng.choice(statuses) if created != updated else statuses[0]
        impact, urgency = rng.randrange(3), rng.randrange(3)
        who = rng.choice(_PEOPLE)
        rec: Record = {
            "RecID": f"{rng.getrandbits(168):042x}",
            "CreatedDateTime": created,
            "CreatedBy": who,
            "LastModifiedDateTime": updated,
            "LastModifiedBy": rng.choice(_PEOPLE),
            "Status": status,
            "Description": "Raised by monitoring." if incident else "Planned maintenance.",
            "Impact": LEVELS[impact],
            "Urgency": LEVELS[urgency],
            "Priority": _PRIORITY[(impact, urgency)],
            "OwnedBy": rng.choice(_PEOPLE),
            "Category": rng.choice(("Hardware", "Software", "Network")),
            "ConfigItemDisplayName": ci,
        }
        if incident:
            rec |= {
                "ShortDescription": rng.choice(_TITLES).format(ci=ci),
                "CustomerDisplayName": rng.choice(_PEOPLE),
                "OwnedByTeam": rng.choice(_TEAMS),
                "Service": "Infrastructure",
                "Source": rng.choice(("Event", "Phone", "Email", "Portal")),
            }
            if status in ("Resolved", "Closed"):
                rec |= {"ResolvedDateTime": updated, "ResolvedBy": who, "CloseDescription": "Fixed."}
            if status == "Closed":
                rec |= {"ClosedDateTime": updated, "ClosedBy": who}
        else:
            planned = created + timedelta(days=rng.randrange(1, 10))
            rec |= {
                "Title": rng.choice(_CHANGE_TITLES).format(ci=ci),
                "Type": rng.choice(("Normal", "Standard", "Emergency")),
                "Risk": rng.choice(("Low", "Medium", "High")),
                "RequestedDateTime": created,
                "ScheduledStartDate": planned,
                "ScheduledEndDate": planned + timedelta(hours=2),
            }
            if status in ("Closed", "Cancelled"):
                rec |= {"ClosedDateTime": updated, "ClosedBy": who}
        rows.append(rec)
    return rows


def _touch_values(obj: ObjectDef, rec: Record, rng: random.Random) -> dict[str, str]:
    status = _str(rec.get("Status"))
    if obj.name == "Incident" and status in ("New", "Assigned", "In Progress", "Pending", "Reopened"):
        nxt = rng.choice(("In Progress", "Pending", "Resolved"))
        return {"Status": nxt, "CloseDescription": "Resolved."} if nxt == "Resolved" else {"Status": nxt}
    return {"Description": f"{_str(rec.get('Description'))} Checked again."}


# -- standalone -----------------------------------------------------------------------------------------


def _wait_for_stdin_close() -> None:
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        mode = 0
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        sys.stdin.buffer.read()  # returns at EOF: the parent closed the pipe
        return
    while True:  # a terminal or /dev/null: serve until killed
        time.sleep(3600)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.loopback.cherwell", description="Loopback Cherwell"
    )
    parser.add_argument("--seed", action="append", default=[], metavar="OBJECT=COUNT")
    parser.add_argument("--span-days", type=float, default=120.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--time-zone", default="UTC")
    args = parser.parse_args(argv)
    server = CherwellLoopback(port=args.port, time_zone=args.time_zone)
    end = server.clock()
    for n, spec in enumerate(args.seed):
        name, _, count = spec.partition("=")
        server.seed_work_items(
            name, int(count), start=end - timedelta(days=args.span_days), end=end, rng_seed=n + 1
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
