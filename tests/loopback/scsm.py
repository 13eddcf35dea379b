"""A loopback Cireson Portal in front of a System Center Service Manager, on 127.0.0.1.

SCSM has no REST API; the Cireson portal's ``/api/V3`` is what SCSM shops reach it through. This
server answers the part of it the SCSM connector speaks, with the shapes the portal uses:

* ``POST /api/V3/Authorization/GetToken`` (JSON ``UserName`` / ``Password`` / ``LanguageCode``)
  answers the token as a JSON string; every other call needs ``Authorization: Token <token>``
  (tokens expire after ``token_lifetime``), else 401 ``{"Message": "Authorization has been denied
  for this request."}`` as ASP.NET Web API says it.
* ``GET /api/V3/Projection/CreateProjectionByTemplate?id=&createdById=`` a new, unsaved incident
  projection from a template (``Id`` "IR{0}", ``BaseId`` null, the template's values).
* ``POST /api/V3/Projection/Commit`` with ``{"formJson": {"original", "current"}}``: ``original``
  null creates, else the differences are applied after a concurrency check (``original``'s
  ``LastModified`` must be the stored one); action-log entries (``AppliesToTroubleTicket``) in
  ``current`` but not in ``original`` are appended. Refusals are errors inside a 200 answer:
  ``{"success": false, "exception": "..."}`` (unknown enumeration values or users, values too
  long, a closed incident, a lost concurrency check).
* ``POST /api/V3/Projection/GetProjectionByCriteria`` with ``{"Id": projection, "Criteria":
  {"Base": {"Expression": ...}}}``: ``SimpleExpression`` on a ``GenericProperty`` (``Id`` = BaseId,
  ``LastModified``, ``DisplayName``, ``TimeAdded``) or a ``Property`` written
  ``$Context/Property[Type='<class>']/<name>$``, operators Equal, NotEqual, Greater(Equal),
  Less(Equal) and Like (SQL wildcards, ``[x]`` classes), grouped by ``And`` / ``Or``. Every match is
  answered at once (the endpoint has no paging). Unknown projections or properties answer 500 with
  ASP.NET's ``{"Message": "An error has occurred.", "ExceptionMessage": ...}``. ``LastModified``
  ranges use a sorted index (bisect), so 20,000 rows answer quickly.
* ``GET /api/V3/User/GetUserList?userFilter=`` ``[{"Id", "Name"}]`` of matching users.
* Business rules of a stock SCSM: numbers (IR/CR), priority from impact and urgency, resolved and
  closed dates and users stamped on status changes, closed incidents read-only, LastModified
  moving forward on every change.

Test hooks: ``fail_next`` (JSON error, IIS HTML error page, an HTML sign-in page with 200, a
dropped connection before or after the request is processed, 429 with Retry-After), ``mangle``
(answer an object with fields dropped or replaced: missing fields, unknown statuses, bad dates),
``expire_tokens``, a request log, a controllable clock, bulk seeding, and control endpoints under
``/__loopback/`` (no auth) for other processes.

Run standalone (benchmark)::

    python -m tests.loopback.scsm --seed incident=20000 --span-days 119.9

prints ``READY <url>`` and serves until stdin closes (or it is killed).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
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
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from tests.loopback.base import LoopbackHandler, LoopbackServer

DEFAULT_USERNAME = "CONTOSO\\svc-azmon"
DEFAULT_PASSWORD = "loopback-scsm-password"
DEFAULT_DISPLAY_NAME = "Azure Monitor Integration"
TOKEN_LIFETIME = timedelta(hours=1)

INCIDENT, CHANGE, CI = "incident", "change", "ci"
KINDS = (INCIDENT, CHANGE)

WORK_ITEM_CLASS = "f59821e2-0364-ed2c-19e3-752efbb1ece9"
INCIDENT_CLASS = "a604b942-4c7b-2fb2-28dc-61dc6f465c68"
CHANGE_CLASS = "e6c9cf6e-d7fe-1b5d-216c-c3f5d2c7670c"
CONFIG_ITEM_CLASS = "62f0be9f-ecea-e73a-5590-9ac1f5a6f9aa"
COMPUTER_CLASS = "ea99500d-8d52-fc52-b5a5-10dcd1e9d2bd"
INCIDENT_PROJECTION = "285cb0a2-f276-bccb-563e-bb721df7cdec"
CHANGE_PROJECTION = "674194d8-0246-7b90-d871-e1ea015b2ea7"
CONFIG_ITEM_PROJECTION = "8ab27adb-13b1-2b7b-56e6-91598417cbee"
DEFAULT_INCIDENT_TEMPLATE = "a77bb0c9-e201-dd93-230c-799a66d9e8fa"
OBJECT_ACTIVE = "acdcedb7-100c-8c91-d664-4629a218bd94"

ACTIVE = "5e2d3932-ca6d-1515-7310-6f58584df73e"
PENDING = "b6679968-e84e-96fa-1fec-8cd4ab39c3de"
RESOLVED = "2b8830b6-59f0-f574-9c2a-f4b4682f1681"
CLOSED = "bd0ae7c4-3315-2eb3-7933-82dfc482dbaf"

Obj = dict[str, Any]


def _site_value(name: str) -> str:
    """A GUID for an enumeration value a site defines itself (support groups, classifications)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"loopback-scsm:{name}"))


# enumeration list -> {value id: name}; stock values where SCSM ships them, site values otherwise
ENUMS: dict[str, dict[str, str]] = {
    "IncidentStatus": {
        ACTIVE: "Active",
        PENDING: "Pending",
        "b7ba8903-66a1-485f-4418-00d06abf1235": "Updated by Affected User",
        RESOLVED: "Resolved",
        CLOSED: "Closed",
    },
    "Impact": {
        "d2b5e816-2d24-8e7d-a61f-2cceaeac2664": "High",
        "80cc222b-2653-2f68-8cee-3a7dd3b723c1": "Medium",
        "8f1a713e-53aa-9d8a-31b9-a9540074f305": "Low",
    },
    "Urgency": {
        "2f8f0747-b6cb-7996-fd4a-84d09743f218": "High",
        "02625c30-08c6-4181-b2ed-222fa473280e": "Medium",
        "725a4cad-088c-4f55-a845-000db8872e01": "Low",
    },
    "Source": {
        "76480d55-a19d-7cef-4446-0f1ccaef11ce": "Console",
        "92b68e4f-c5bf-52ec-9bda-f55b43a9f4b5": "E-Mail",
        "7b417fee-0516-a75a-c62c-426905fda768": "Phone",
        "6ef191ce-3124-2974-94fb-020c677f4017": "Portal",
        "564c1afc-6453-4b25-5564-b46d84155545": "Operations Manager",
    },
    "Classification": {
        _site_value(f"class:{n}"): n for n in ("Hardware", "Software", "Networking", "E-Mail")
    },
    "TierQueue": {_site_value(f"tier:{n}"): n for n in ("Tier 1", "Tier 2", "Server Operations")},
    "ResolutionCategory": {_site_value(f"res:{n}"): n for n in ("Fixed by analyst", "Monitoring cleared")},
    "ChangeStatus": {
        "a87c003e-8c19-a25f-f8b2-151b56670e5c": "New",
        "504f294c-ae38-2a65-f395-bff4f085698b": "Submitted",
        "6d6c64dd-07ac-aaf5-f812-6a7cceb5154d": "In Progress",
        "dd6b0870-bcea-1520-993d-9f1337e39d4d": "On Hold",
        "68277330-a0d3-cfdd-298d-d5c31d1d126f": "Completed",
        "85f00ead-2603-6c68-dfec-531c83bf900f": "Failed",
        "877defb6-0d21-7d19-89d5-a1107d621270": "Cancelled",
        "f228d50b-2b5a-010f-b1a4-5c7d95703a9b": "Closed",
    },
    "ChangeCategory": {
        "357662a7-451c-df62-ed68-3147bdff324e": "Emergency",
        "02d2f92f-d925-5ad6-eb1f-67020701697a": "Standard",
        "e9ee7044-3a42-a34b-1237-ec0d32f2377a": "Major",
        "c0126730-ab4a-4c62-26e0-7706bc176413": "Minor",
    },
    "ChangeRisk": {_site_value(f"risk:{n}"): n for n in ("High", "Medium", "Low")},
    "ChangePriority": {_site_value(f"cprio:{n}"): n for n in ("High", "Medium", "Low")},
    "ChangeArea": {_site_value(f"area:{n}"): n for n in ("Infrastructure", "Applications", "Network")},
}
ENUM_OF_PROPERTY: dict[str, dict[str, str]] = {
    INCIDENT: {
        "Status": "IncidentStatus",
        "Impact": "Impact",
        "Urgency": "Urgency",
        "Source": "Source",
        "Classification": "Classification",
        "TierQueue": "TierQueue",
        "ResolutionCategory": "ResolutionCategory",
    },
    CHANGE: {
        "Status": "ChangeStatus",
        "Category": "ChangeCategory",
        "Risk": "ChangeRisk",
        "Impact": "Impact",
        "Priority": "ChangePriority",
        "Area": "ChangeArea",
    },
}
ALL_ENUM_VALUES = {value: name for values in ENUMS.values() for value, name in values.items()}
SUPPORT_GROUPS = dict(ENUMS["TierQueue"])
RESOLUTION_CATEGORIES = dict(ENUMS["ResolutionCategory"])
RANK = {"High": 1, "Medium": 2, "Low": 3}

USER_RELATIONS = {
    "CreatedWorkItem",
    "AssignedWorkItem",
    "RequestedWorkItem",
    "TroubleTicketResolvedByUser",
    "TroubleTicketClosedByUser",
}
READ_ONLY = {
    "BaseId",
    "Id",
    "ClassTypeId",
    "ClassName",
    "FullName",
    "DisplayName",
    "LastModified",
    "TimeAdded",
    "CreatedDate",
    "Priority",
    "ObjectStatus",
    "CreatedWorkItem",
    "TroubleTicketResolvedByUser",
    "TroubleTicketClosedByUser",
}
DATE_PROPERTIES = {
    "LastModified",
    "TimeAdded",
    "CreatedDate",
    "ResolvedDate",
    "ClosedDate",
    "ScheduledStartDate",
    "ScheduledEndDate",
    "ActualStartDate",
    "ActualEndDate",
    "RequiredBy",
}
CLASS_PROPERTIES: dict[str, dict[str, set[str]]] = {
    INCIDENT: {
        WORK_ITEM_CLASS: {"Id", "Title", "Description", "CreatedDate"},
        INCIDENT_CLASS: {
            "Id",
            "Title",
            "Description",
            "CreatedDate",
            "Status",
            "Impact",
            "Urgency",
            "Priority",
            "Source",
            "Classification",
            "TierQueue",
            "ResolvedDate",
            "ClosedDate",
            "ResolutionDescription",
            "ResolutionCategory",
        },
    },
    CHANGE: {
        WORK_ITEM_CLASS: {"Id", "Title", "Description", "CreatedDate"},
        CHANGE_CLASS: {
            "Id",
            "Title",
            "Description",
            "CreatedDate",
            "Status",
            "Category",
            "Risk",
            "Impact",
            "Priority",
            "Area",
            "ScheduledStartDate",
            "ScheduledEndDate",
            "ActualStartDate",
            "ActualEndDate",
        },
    },
    CI: {CONFIG_ITEM_CLASS: {"DisplayName"}, COMPUTER_CLASS: {"DisplayName", "PrincipalName"}},
}
GENERIC_PROPERTIES = {
    "Id": "BaseId",
    "LastModified": "LastModified",
    "TimeAdded": "TimeAdded",
    "DisplayName": "DisplayName",
}
OPERATORS = {"Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "Like"}
_PROPERTY_PATH = re.compile(r"^\$Context/Property\[Type='([0-9A-Fa-f-]{36})'\]/([A-Za-z_][A-Za-z0-9_]*)\$$")
TITLE_LIMIT, DESCRIPTION_LIMIT, COMMENT_LIMIT = 200, 4000, 4000


def ts(moment: datetime) -> str:
    """The portal's date-time: UTC, milliseconds, a Z (lexicographic order is time order)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_ts(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def web_api_error(
    message: str, exception: str | None = None, kind: str = "System.InvalidOperationException"
) -> Obj:
    """ASP.NET Web API's error body (what the portal answers for unhandled exceptions)."""
    body: Obj = {"Message": message}
    if exception is not None:
        body |= {"ExceptionMessage": exception, "ExceptionType": kind, "StackTrace": None}
    return body


DENIED = {"Message": "Authorization has been denied for this request."}
IIS_ERROR_PAGE = """<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" \
"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">
<html xmlns="http://www.w3.org/1999/xhtml"><head>
<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"/>
<title>{status} - {phrase}</title></head>
<body><div id="header"><h1>Server Error</h1></div>
<div id="content"><fieldset><h2>{status} - {phrase}</h2>
<h3>The page cannot be displayed because an internal server error has occurred.</h3></fieldset></div>
</body></html>"""
SIGN_IN_PAGE = """<!DOCTYPE html><html><head><title>Sign In</title></head>
<body><form method="post" action="/adfs/ls/"><input type="text" name="UserName"/>
<input type="password" name="Password"/><button type="submit">Sign in</button></form></body></html>"""


@dataclass
class Answer:
    status: int
    content: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering


def json_answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps(body).encode(), headers=headers or {})


@dataclass
class Fault:
    remaining: int
    status: int
    retry_after: int | None
    path_contains: str | None
    body: str  # "json", "html", "html200", "drop" (not processed), "drop_after" (processed, answer lost)


class CriteriaError(ValueError):
    """Criteria the portal cannot evaluate: answered as a 500 with the exception text."""


# -- criteria -----------------------------------------------------------------------------------------


def like_regex(pattern: str) -> re.Pattern[str]:
    """SQL LIKE (``%``, ``_``, ``[...]``, ``[^...]``) as a case-insensitive regular expression."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "%":
            out.append(".*")
        elif ch == "_":
            out.append(".")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(ch))
            else:
                inner = pattern[i + 1 : end]
                negate = inner.startswith("^")
                inner = inner[1:] if negate else inner
                out.append("[" + ("^" if negate else "") + "".join(re.escape(c) for c in inner) + "]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


Predicate = Callable[[Obj], bool]


@dataclass
class Compiled:
    predicate: Predicate
    lower: tuple[str, bool] | None = None  # (LastModified, inclusive) from a top-level condition
    upper: tuple[str, bool] | None = None


def _compare(operator: str, left: Any, right: Any) -> bool:
    if operator == "Equal":
        return bool(left == right)
    if operator == "NotEqual":
        return bool(left != right)
    if left is None or right is None:
        return False
    if operator == "Greater":
        return bool(left > right)
    if operator == "GreaterEqual":
        return bool(left >= right)
    if operator == "Less":
        return bool(left < right)
    return bool(left <= right)


def compile_criteria(kind: str, expression: Any) -> Compiled:
    if not isinstance(expression, dict) or len(expression) != 1:
        raise CriteriaError("an expression must be one SimpleExpression, And or Or")
    [(name, inner)] = expression.items()
    if name in ("And", "Or"):
        parts = inner.get("Expression") if isinstance(inner, dict) else None
        if not isinstance(parts, list) or not parts:
            raise CriteriaError(f"{name} needs a list of expressions")
        children = [compile_criteria(kind, part) for part in parts]
        predicates = [c.predicate for c in children]
        if name == "Or":
            return Compiled(lambda obj: any(p(obj) for p in predicates))
        result = Compiled(lambda obj: all(p(obj) for p in predicates))
        for c in children:
            result.lower = c.lower or result.lower
            result.upper = c.upper or result.upper
        return result
    if name != "SimpleExpression" or not isinstance(inner, dict):
        raise CriteriaError(f"unknown expression {name!r}")
    left = inner.get("ValueExpressionLeft")
    operator = inner.get("Operator")
    right = inner.get("ValueExpressionRight")
    if operator not in OPERATORS:
        raise CriteriaError(f"unknown operator {operator!r}")
    if not isinstance(right, dict) or not isinstance(right.get("Value"), str):
        raise CriteriaError("ValueExpressionRight needs a Value")
    value: str = right["Value"]
    if not isinstance(left, dict) or len(left) != 1:
        raise CriteriaError("ValueExpressionLeft needs a GenericProperty or a Property")
    if "GenericProperty" in left:
        generic = left["GenericProperty"]
        if generic not in GENERIC_PROPERTIES:
            raise CriteriaError(f"'{generic}' is not a valid generic property")
        prop = GENERIC_PROPERTIES[generic]
    else:
        match = _PROPERTY_PATH.match(str(left.get("Property", "")))
        if match is None:
            raise CriteriaError(f"invalid property path {left.get('Property')!r}")
        class_id, prop = match.group(1).lower(), match.group(2)
        if prop not in CLASS_PROPERTIES[kind].get(class_id, set()):
            raise CriteriaError(
                f"the property '{prop}' is not defined on type '{class_id}' for this projection"
            )
    enum = prop in ENUM_OF_PROPERTY.get(kind, {})
    date = prop in DATE_PROPERTIES
    if date:
        try:
            wanted: Any = ts(parse_ts(value))
        except ValueError:
            raise CriteriaError(f"'{value[:40]}' is not a valid DateTime for {prop}") from None
    elif enum or prop == "BaseId":
        wanted = value.strip("{}").lower()
    else:
        wanted = value.lower()
    like = like_regex(value) if operator == "Like" else None

    def read(obj: Obj) -> Any:
        raw = obj.get(prop)
        if enum:
            raw = raw.get("Id") if isinstance(raw, dict) else None
            return raw.lower() if isinstance(raw, str) else None
        if raw is None:
            return None
        return raw if date else str(raw).lower()

    if like is not None:
        leaf = Compiled(
            lambda obj: (text := obj.get(prop)) is not None and like.fullmatch(str(text)) is not None
        )
    else:
        leaf = Compiled(lambda obj: _compare(operator, read(obj), wanted))
    if prop == "LastModified":
        if operator in ("Greater", "GreaterEqual", "Equal"):
            leaf.lower = (wanted, operator != "Greater")
        if operator in ("Less", "LessEqual", "Equal"):
            leaf.upper = (wanted, operator != "Less")
    return leaf


# -- the server -----------------------------------------------------------------------------------------


class CiresonHandler(LoopbackHandler):
    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path, query = self.parsed()
        body = self.read_body()
        try:
            answer = self.app.handle_request(method, path, query, body, self.headers.get("Authorization"))
        except Exception as exc:  # a bug here must not take the connection down silently
            answer = json_answer(500, web_api_error("An error has occurred.", repr(exc)))
        if answer.drop:
            self.close_connection = True
            return
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.content)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if answer.content:
            self.wfile.write(answer.content)


class ScsmLoopback(LoopbackServer):
    """A loopback Cireson portal over SCSM (see the module docstring). ``url`` is the portal URL."""

    handler_class = CiresonHandler

    def __init__(
        self,
        *,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        display_name: str = DEFAULT_DISPLAY_NAME,
        clock: Callable[[], datetime] | None = None,
        token_lifetime: timedelta = TOKEN_LIFETIME,
        tls: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(tls=tls, host=host, port=port)
        self.username = username
        self.password = password
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        self.token_lifetime = token_lifetime
        self.delay_seconds = 0.0
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.log_bodies = True
        self._lock = threading.RLock()
        self._users: dict[str, Obj] = {}
        self._logins: dict[str, tuple[str, str]] = {}  # lower user name -> (password, user BaseId)
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._issued: list[str] = []
        self._faults: list[Fault] = []
        self._before_commit: list[Callable[[], None]] = []
        self._mangles: dict[str, tuple[tuple[str, ...], Obj]] = {}
        self._objects: dict[str, dict[str, Obj]] = {INCIDENT: {}, CHANGE: {}, CI: {}}
        self._index: dict[str, list[tuple[str, str]]] = {INCIDENT: [], CHANGE: []}
        self._numbers = {INCIDENT: 1000, CHANGE: 2000}
        self._templates: dict[str, Obj] = {
            DEFAULT_INCIDENT_TEMPLATE: {
                "Title": None,
                "Status": ACTIVE,
                "Impact": "80cc222b-2653-2f68-8cee-3a7dd3b723c1",
                "Urgency": "02625c30-08c6-4181-b2ed-222fa473280e",
                "Source": "6ef191ce-3124-2974-94fb-020c677f4017",
            }
        }
        self._projections = {
            INCIDENT_PROJECTION: INCIDENT,
            CHANGE_PROJECTION: CHANGE,
            CONFIG_ITEM_PROJECTION: CI,
        }
        self.user_id = self.add_user(username, password, display_name)
        self._analysts = [
            self.add_user(f"CONTOSO\\{n.split()[0].lower()}", secrets.token_hex(8), n)
            for n in ("Beth Anglin", "David Loo", "Fred Luddy")
        ]
        self._seeded_cis = [self.add_ci(f"srv-{n:03d}") for n in range(1, 6)]

    def __enter__(self) -> ScsmLoopback:
        self.start()
        return self

    # -- configuration and test hooks -------------------------------------------------------------

    def add_user(self, user_name: str, password: str, display_name: str) -> str:
        with self._lock:
            base_id = str(uuid.uuid4())
            domain, _, account = user_name.rpartition("\\")
            self._users[base_id] = {
                "BaseId": base_id,
                "ClassName": "System.Domain.User",
                "UserName": account,
                "Domain": domain,
                "DisplayName": display_name,
            }
            self._logins[user_name.lower()] = (password, base_id)
            return base_id

    def set_password(self, user_name: str, password: str) -> None:
        """The account's password changes in Active Directory: sign-ins with the old one are refused."""
        with self._lock:
            _, base_id = self._logins[user_name.lower()]
            self._logins[user_name.lower()] = (password, base_id)

    def add_ci(self, name: str, *, deleted: bool = False) -> str:
        with self._lock:
            base_id = str(uuid.uuid4())
            status = "47101e64-237f-12c8-e3f5-ec5a665412fb" if deleted else OBJECT_ACTIVE
            self._objects[CI][base_id] = {
                "BaseId": base_id,
                "ClassTypeId": COMPUTER_CLASS,
                "ClassName": "Microsoft.Windows.Computer",
                "DisplayName": name,
                "PrincipalName": f"{name}.contoso.com",
                "ObjectStatus": {"Id": status, "Name": "Pending Delete" if deleted else "Active"},
                "LastModified": ts(self.clock()),
            }
            return base_id

    def add_template(self, template_id: str, **values: str | None) -> None:
        with self._lock:
            self._templates[template_id] = dict(values)

    def add_projection(self, projection_id: str, kind: str) -> None:
        with self._lock:
            self._projections[projection_id] = kind

    def user_ref(self, base_id: str) -> Obj:
        user = self._users[base_id]
        return {k: user[k] for k in ("BaseId", "DisplayName", "UserName", "Domain", "ClassName")}

    def issued_tokens(self) -> list[str]:
        with self._lock:
            return list(self._issued)

    def expire_tokens(self) -> None:
        """Every token issued so far stops working (API calls answer 401)."""
        with self._lock:
            self._tokens.clear()

    def fail_next(
        self,
        count: int,
        status: int = 503,
        *,
        retry_after: int | None = None,
        path_contains: str | None = None,
        body: str = "json",
    ) -> None:
        """The next ``count`` API requests (or those whose path contains ``path_contains``, the sign-in
        included) fail: ``body`` "json" / "html" answer ``status``; "html200" answers a sign-in page
        with 200; "drop" closes the connection unprocessed; "drop_after" processes it, then drops."""
        with self._lock:
            self._faults.append(Fault(count, status, retry_after, path_contains, body))

    def before_next_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` (say, another user's change) when the next Commit arrives, before it is applied."""
        with self._lock:
            self._before_commit.append(action)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._mangles.clear()
            self._before_commit.clear()

    def mangle(
        self, base_id: str, *, drop: Iterable[str] = (), set_fields: Mapping[str, Any] | None = None
    ) -> None:
        """Answer the object ``base_id`` with ``drop`` left out and ``set_fields`` replaced (its stored
        state does not change, so its place in the LastModified index stays valid)."""
        with self._lock:
            self._mangles[base_id] = (tuple(drop), dict(set_fields or {}))

    def reset_request_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def write_count(self) -> int:
        with self._lock:
            return sum(
                1 for method, path, _, _ in self.requests if path.lower().endswith("/projection/commit")
            )

    def objects(self, kind: str = INCIDENT) -> list[Obj]:
        with self._lock:
            return [copy.deepcopy(obj) for obj in self._objects[kind].values()]

    def object(self, kind: str, base_id: str) -> Obj | None:
        with self._lock:
            found = self._objects[kind].get(base_id)
            return copy.deepcopy(found) if found else None

    def notes(self, base_id: str) -> list[Obj]:
        found = self.object(INCIDENT, base_id)
        return list(found.get("AppliesToTroubleTicket") or []) if found else []

    def count(self, kind: str = INCIDENT) -> int:
        with self._lock:
            return len(self._objects[kind])

    def insert(self, kind: str, *, user: str | None = None, **values: Any) -> Obj:
        """A work item as an analyst would create it in the console (enumerations by name or id)."""
        with self._lock:
            now = self._now()
            obj = self._blank(kind, user or self._analysts[0], now)
            self._apply_values(kind, obj, values)
            self._number(kind, obj)
            self._business_rules(kind, obj, None, user or self._analysts[0], now)
            self._store(kind, obj)
            return copy.deepcopy(obj)

    def update(self, kind: str, base_id: str, *, user: str | None = None, **values: Any) -> Obj:
        """An analyst's change in the console: values set, business rules run, LastModified moves."""
        with self._lock:
            obj = self._objects[kind][base_id]
            old_status = (obj.get("Status") or {}).get("Id")
            self._apply_values(kind, obj, values)
            self._business_rules(kind, obj, old_status, user or self._analysts[0], self._now())
            self._touch_object(kind, obj)
            return copy.deepcopy(obj)

    def seed_work_items(
        self, kind: str, count: int, *, start: datetime, end: datetime, rng_seed: int = 1
    ) -> list[str]:
        """``count`` work items last modified between ``start`` and ``end`` (some share a millisecond:
        bulk edits come in bursts); returns their BaseIds."""
        rng = random.Random(rng_seed)
        span_ms = max(1, int((end - start).total_seconds() * 1000))
        with self._lock:
            ids: list[str] = []
            stamp = start
            for _ in range(count):
                if rng.random() < 0.1 and ids:
                    moment = stamp  # a burst: the same millisecond as the previous row
                else:
                    moment = start + timedelta(milliseconds=rng.randrange(span_ms))
                stamp = moment
                obj = self._generated(kind, rng, moment)
                self._objects[kind][obj["BaseId"]] = obj
                ids.append(obj["BaseId"])
            self._reindex(kind)
            return ids

    def touch(self, kind: str, count: int) -> list[str]:
        """``count`` random work items changed now (status moved on, an analyst comment)."""
        with self._lock:
            rng = random.Random(len(self.requests) + count)
            chosen = rng.sample(list(self._objects[kind]), min(count, len(self._objects[kind])))
            for base_id in chosen:
                obj = self._objects[kind][base_id]
                obj["Title"] = f"{obj.get('Title') or ''}".rstrip("*") + "*"
                self._touch_object(kind, obj)
            return chosen

    def stats(self) -> Obj:
        with self._lock:
            return {
                "objects": {kind: len(objs) for kind, objs in self._objects.items()},
                "request_count": len(self.requests),
            }

    # -- requests -----------------------------------------------------------------------------------

    def handle_request(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes, authorization: str | None
    ) -> Answer:
        if path.startswith("/__loopback/"):
            return self._control(method, path, body)
        params = {k: v[-1] for k, v in query.items()}
        route = path.lower().rstrip("/")
        api = route.startswith("/api/")
        logged: Any = None
        if self.log_bodies and body:
            with contextlib.suppress(ValueError):
                logged = json.loads(body)
        with self._lock:
            self.requests.append((method, path, params, logged))
            fault = self._take_fault(path, api)
        if api and self.delay_seconds > 0:
            time.sleep(self.delay_seconds)
        if fault is not None and fault.body != "drop_after":
            return self._fault_answer(fault)
        answer = self._route(method, route, path, params, body, authorization)
        if fault is not None:  # drop_after: processed, but the answer never arrives
            return Answer(0, drop=True)
        return answer

    def _route(
        self,
        method: str,
        route: str,
        path: str,
        params: dict[str, str],
        body: bytes,
        authorization: str | None,
    ) -> Answer:
        if route == "/api/v3/authorization/gettoken":
            if method != "POST":
                return json_answer(
                    405, {"Message": "The requested resource does not support http method 'GET'."}
                )
            return self._get_token(body)
        endpoints: dict[str, tuple[str, Callable[[str, dict[str, str], bytes], Answer]]] = {
            "/api/v3/projection/createprojectionbytemplate": ("GET", self._from_template),
            "/api/v3/projection/commit": ("POST", self._commit),
            "/api/v3/projection/getprojectionbycriteria": ("POST", self._by_criteria),
            "/api/v3/user/getuserlist": ("GET", self._user_list),
        }
        if route not in endpoints:
            if route.startswith("/api/"):
                return json_answer(
                    404,
                    {"Message": f"No HTTP resource was found that matches the URI '{self.url}{path}'."},
                )
            return Answer(404, IIS_ERROR_PAGE.format(status=404, phrase="Not Found").encode(), "text/html")
        expected, handler = endpoints[route]
        if method != expected:
            return json_answer(
                405, {"Message": f"The requested resource does not support http method '{method}'."}
            )
        with self._lock:
            user = self._authenticate(authorization)
        if user is None:
            return json_answer(401, DENIED, {"WWW-Authenticate": 'Token realm="Cireson"'})
        try:
            return handler(user, params, body)
        except CriteriaError as exc:
            return json_answer(
                500, web_api_error("An error has occurred.", str(exc), "System.ArgumentException")
            )

    def _take_fault(self, path: str, api: bool) -> Fault | None:
        for fault in self._faults:
            applies = api if fault.path_contains is None else fault.path_contains.lower() in path.lower()
            if applies and fault.remaining > 0:
                fault.remaining -= 1
                self._faults = [f for f in self._faults if f.remaining > 0]
                return fault
        return None

    @staticmethod
    def _fault_answer(fault: Fault) -> Answer:
        if fault.body == "drop":
            return Answer(0, drop=True)
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "Error"
        if fault.body == "html200":
            return Answer(200, SIGN_IN_PAGE.encode(), "text/html; charset=utf-8", headers)
        if fault.body == "html":
            page = IIS_ERROR_PAGE.format(status=fault.status, phrase=phrase)
            return Answer(fault.status, page.encode(), "text/html", headers)
        if fault.status == 429:
            return json_answer(429, {"Message": "Too many requests: slow down."}, headers)
        return json_answer(
            fault.status, web_api_error("An error has occurred.", f"{phrase} (loopback)"), headers
        )

    def _authenticate(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "token" or not token:
            return None
        found = self._tokens.get(token.strip())
        if found is None or self._now() >= found[1]:
            return None
        return found[0]

    def _now(self) -> datetime:
        return self.clock().astimezone(UTC)

    # -- endpoints ----------------------------------------------------------------------------------

    def _get_token(self, body: bytes) -> Answer:
        try:
            data = json.loads(body or b"null")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return json_answer(400, {"Message": "The request is invalid."})
        user_name, password = str(data.get("UserName") or ""), str(data.get("Password") or "")
        with self._lock:
            login = self._logins.get(user_name.lower())
            if login is None or not secrets.compare_digest(login[0], password):
                return json_answer(401, {"Message": "The user name or password is incorrect."})
            token = secrets.token_urlsafe(48)
            self._tokens[token] = (login[1], self._now() + self.token_lifetime)
            self._issued.append(token)
        return json_answer(200, token)

    def _from_template(self, user: str, params: dict[str, str], body: bytes) -> Answer:
        template_id = params.get("id", "").strip("{}").lower()
        creator = params.get("createdById", "").strip("{}").lower()
        with self._lock:
            template = self._templates.get(template_id)
            if template is None:
                raise CriteriaError(f"The template with id '{template_id}' was not found.")
            if creator not in self._users:
                raise CriteriaError(f"The user with id '{creator}' was not found.")
            obj = self._blank(INCIDENT, creator, None)
            self._apply_values(INCIDENT, obj, {k: v for k, v in template.items() if v is not None})
            obj["Title"] = template.get("Title")
            return json_answer(200, obj)

    def _commit(self, user: str, params: dict[str, str], body: bytes) -> Answer:
        try:
            data = json.loads(body or b"null")
            form = data["formJson"]
            original, current = form.get("original"), form["current"]
            if not isinstance(current, dict) or not (original is None or isinstance(original, dict)):
                raise TypeError("formJson.current must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            return json_answer(500, web_api_error("An error has occurred.", f"Invalid formJson: {exc}"))
        concurrency = params.get("runConcurrencyCheck", "true").lower() != "false"
        with self._lock:
            if self._before_commit:
                self._before_commit.pop(0)()
            try:
                if original is None:
                    base_id = self._create(current, user)
                else:
                    base_id = self._change(original, current, user, concurrency=concurrency)
            except _Refusal as refusal:
                return json_answer(200, {"success": False, "BaseId": None, "exception": str(refusal)})
        return json_answer(200, {"success": True, "BaseId": base_id, "exception": None})

    def _by_criteria(self, user: str, params: dict[str, str], body: bytes) -> Answer:
        try:
            data = json.loads(body or b"null")
            projection = str(data["Id"]).strip("{}").lower()
            expression = data["Criteria"]["Base"]["Expression"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CriteriaError(f"Invalid criteria: {exc!r}") from None
        with self._lock:
            kind = self._projections.get(projection)
            if kind is None:
                raise CriteriaError(f"The type projection '{projection}' was not found.")
            compiled = compile_criteria(kind, expression)
            rows = [obj for obj in self._candidates(kind, compiled) if compiled.predicate(obj)]
            rendered = [self._render(obj) for obj in rows]
            return Answer(200, json.dumps(rendered).encode())

    def _user_list(self, user: str, params: dict[str, str], body: bytes) -> Answer:
        wanted = params.get("userFilter", "").lower()
        limit = int(params.get("maxNumberOfResults", "10") or 10)
        with self._lock:
            found = [
                {"Id": u["BaseId"], "Name": u["DisplayName"]}
                for u in self._users.values()
                if wanted in u["UserName"].lower() or wanted in u["DisplayName"].lower()
            ]
        return json_answer(200, found[:limit])

    # -- the store ----------------------------------------------------------------------------------

    def _candidates(self, kind: str, compiled: Compiled) -> Iterable[Obj]:
        objects = self._objects[kind]
        if kind not in self._index or (compiled.lower is None and compiled.upper is None):
            return list(objects.values())
        index = self._index[kind]
        start, end = 0, len(index)
        if compiled.lower is not None:
            value, inclusive = compiled.lower
            start = (
                bisect.bisect_left(index, (value, ""))
                if inclusive
                else bisect.bisect_right(index, (value, "\uffff"))
            )
        if compiled.upper is not None:
            value, inclusive = compiled.upper
            end = (
                bisect.bisect_right(index, (value, "\uffff"))
                if inclusive
                else bisect.bisect_left(index, (value, ""))
            )
        return [objects[base_id] for _, base_id in index[start:end]]

    def _render(self, obj: Obj) -> Obj:
        mangled = self._mangles.get(obj["BaseId"])
        if mangled is None:
            return obj
        drop, replace = mangled
        shown = {k: v for k, v in obj.items() if k not in drop}
        shown.update(replace)
        return shown

    def _reindex(self, kind: str) -> None:
        self._index[kind] = sorted(
            (obj["LastModified"], base_id) for base_id, obj in self._objects[kind].items()
        )

    def _store(self, kind: str, obj: Obj) -> None:
        self._objects[kind][obj["BaseId"]] = obj
        bisect.insort(self._index[kind], (obj["LastModified"], obj["BaseId"]))

    def _touch_object(self, kind: str, obj: Obj) -> None:
        """LastModified moves forward (at least a millisecond) and the index follows."""
        old = obj["LastModified"]
        now = self._now()
        moment = max(now, parse_ts(old) + timedelta(milliseconds=1)) if old else now
        index = self._index[kind]
        position = bisect.bisect_left(index, (old, obj["BaseId"]))
        if position < len(index) and index[position] == (old, obj["BaseId"]):
            del index[position]
        obj["LastModified"] = ts(moment)
        bisect.insort(index, (obj["LastModified"], obj["BaseId"]))

    def _number(self, kind: str, obj: Obj) -> None:
        self._numbers[kind] += 1
        prefix = "IR" if kind == INCIDENT else "CR"
        obj["Id"] = f"{prefix}{self._numbers[kind]}"
        obj["DisplayName"] = f"{obj['Id']} - {obj.get('Title') or ''}"
        obj["FullName"] = f"{obj['ClassName']}:{obj['Id']}"

    def _blank(self, kind: str, creator: str, now: datetime | None) -> Obj:
        stamp = ts(now) if now is not None else None
        common: Obj = {
            "BaseId": None if now is None else str(uuid.uuid4()),
            "Id": "IR{0}" if kind == INCIDENT else "CR{0}",
            "DisplayName": None,
            "FullName": None,
            "Title": None,
            "Description": None,
            "CreatedDate": stamp,
            "LastModified": stamp,
            "TimeAdded": stamp,
            "ObjectStatus": {"Id": OBJECT_ACTIVE, "Name": "Active"},
            "CreatedWorkItem": self.user_ref(creator),
            "AssignedWorkItem": None,
            "AboutConfigItem": [],
        }
        if kind == INCIDENT:
            return {
                "ClassTypeId": INCIDENT_CLASS,
                "ClassName": "System.WorkItem.Incident",
                **common,
                "Status": {"Id": ACTIVE, "Name": "Active"},
                "Impact": {"Id": None, "Name": None},
                "Urgency": {"Id": None, "Name": None},
                "Priority": 9,
                "Classification": {"Id": None, "Name": None},
                "Source": {"Id": None, "Name": None},
                "TierQueue": {"Id": None, "Name": None},
                "ResolutionCategory": {"Id": None, "Name": None},
                "ResolutionDescription": None,
                "Escalated": False,
                "ResolvedDate": None,
                "ClosedDate": None,
                "RequestedWorkItem": None,
                "TroubleTicketResolvedByUser": None,
                "TroubleTicketClosedByUser": None,
                "AppliesToTroubleTicket": [],
            }
        return {
            "ClassTypeId": CHANGE_CLASS,
            "ClassName": "System.WorkItem.ChangeRequest",
            **common,
            "Status": {"Id": "a87c003e-8c19-a25f-f8b2-151b56670e5c", "Name": "New"},
            "Category": {"Id": None, "Name": None},
            "Risk": {"Id": None, "Name": None},
            "Impact": {"Id": None, "Name": None},
            "Priority": {"Id": None, "Name": None},
            "Area": {"Id": None, "Name": None},
            "Reason": None,
            "ImplementationPlan": None,
            "BackoutPlan": None,
            "ScheduledStartDate": None,
            "ScheduledEndDate": None,
            "ActualStartDate": None,
            "ActualEndDate": None,
            "RequiredBy": None,
            "AppliesToWorkItem": [],
        }

    def _enum(self, kind: str, prop: str, value: Any) -> Obj:
        """``{"Id", "Name"}`` of a value given by id, by name, or as an ``{"Id": ...}`` object."""
        values = ENUMS[ENUM_OF_PROPERTY[kind][prop]]
        raw = value.get("Id") if isinstance(value, dict) else value
        if raw is None:
            return {"Id": None, "Name": None}
        text = str(raw).strip("{}").lower()
        if text in values:
            return {"Id": text, "Name": values[text]}
        by_name = {name.lower(): value_id for value_id, name in values.items()}
        if text in by_name:
            return {"Id": by_name[text], "Name": values[by_name[text]]}
        raise _Refusal(f"The enumeration value '{raw}' of property '{prop}' is not valid.")

    def _apply_values(self, kind: str, obj: Obj, values: Mapping[str, Any]) -> None:
        for prop, value in values.items():
            if prop in ENUM_OF_PROPERTY[kind]:
                obj[prop] = self._enum(kind, prop, value)
            elif prop in USER_RELATIONS:
                obj[prop] = self._user(value)
            elif prop == "AboutConfigItem":
                obj[prop] = [self._ci_ref(item) for item in value or []]
            elif prop in DATE_PROPERTIES and isinstance(value, datetime):
                obj[prop] = ts(value)
            else:
                obj[prop] = value
        if kind == INCIDENT:
            impact = RANK.get(str((obj.get("Impact") or {}).get("Name")), 3)
            urgency = RANK.get(str((obj.get("Urgency") or {}).get("Name")), 3)
            obj["Priority"] = (impact - 1) * 3 + urgency

    def _user(self, value: Any) -> Obj | None:
        if value is None:
            return None
        raw = value.get("BaseId") if isinstance(value, dict) else value
        base_id = str(raw or "").strip("{}").lower()
        if base_id in self._users:
            return self.user_ref(base_id)
        by_name = {u["DisplayName"].lower(): b for b, u in self._users.items()}
        if base_id in by_name:
            return self.user_ref(by_name[base_id])
        raise _Refusal(f"The user with id '{raw}' was not found.")

    def _ci_ref(self, value: Any) -> Obj:
        raw = value.get("BaseId") if isinstance(value, dict) else value
        base_id = str(raw or "").strip("{}").lower()
        ci = self._objects[CI].get(base_id) or next(
            (c for c in self._objects[CI].values() if c["DisplayName"].lower() == base_id), None
        )
        if ci is None:
            raise _Refusal(f"The configuration item with id '{raw}' was not found.")
        return {"BaseId": ci["BaseId"], "DisplayName": ci["DisplayName"], "ClassName": ci["ClassName"]}

    def _validate(self, obj: Obj) -> None:
        if len(obj.get("Title") or "") > TITLE_LIMIT:
            raise _Refusal(f"The value of property 'Title' exceeds the maximum length of {TITLE_LIMIT}.")
        if len(obj.get("Description") or "") > DESCRIPTION_LIMIT:
            raise _Refusal(
                f"The value of property 'Description' exceeds the maximum length of {DESCRIPTION_LIMIT}."
            )
        for entry in obj.get("AppliesToTroubleTicket") or []:
            if len(str(entry.get("Description") or "")) > COMMENT_LIMIT:
                raise _Refusal(f"An action log entry exceeds the maximum length of {COMMENT_LIMIT}.")

    def _create(self, current: Obj, user: str) -> str:
        class_id = str(current.get("ClassTypeId") or "").lower()
        kind = {INCIDENT_CLASS: INCIDENT, CHANGE_CLASS: CHANGE}.get(class_id)
        if kind is None:
            raise _Refusal(f"The class '{class_id}' cannot be created through this projection.")
        if current.get("BaseId") and current["BaseId"] in self._objects[kind]:
            raise _Refusal(f"An object with the id '{current['BaseId']}' already exists.")
        creator = ((current.get("CreatedWorkItem") or {}).get("BaseId")) or user
        now = self._now()
        obj = self._blank(kind, creator, now)
        values = {k: v for k, v in current.items() if k not in READ_ONLY and k in obj}
        self._apply_values(kind, obj, values)
        obj["AppliesToTroubleTicket" if kind == INCIDENT else "AppliesToWorkItem"] = [
            self._entry(entry, now) for entry in current.get("AppliesToTroubleTicket") or []
        ]
        self._validate(obj)
        self._number(kind, obj)
        self._business_rules(kind, obj, None, user, now)
        self._store(kind, obj)
        return str(obj["BaseId"])

    def _change(self, original: Obj, current: Obj, user: str, *, concurrency: bool) -> str:
        base_id = str(original.get("BaseId") or "").lower()
        kind = next((k for k in KINDS if base_id in self._objects[k]), None)
        if kind is None:
            raise _Refusal(f"The object with id '{base_id}' was not found.")
        obj = self._objects[kind][base_id]
        if concurrency and original.get("LastModified") != obj["LastModified"]:
            raise _Refusal(
                "The object has been changed by another user since it was read (concurrency check). "
                "Reload it and save your changes again."
            )
        old_status = (obj.get("Status") or {}).get("Id")
        if kind == INCIDENT and old_status == CLOSED:
            raise _Refusal(f"{obj['Id']} is closed: closed incidents cannot be changed.")
        staged = copy.deepcopy(obj)
        changed = {
            k: v
            for k, v in current.items()
            if k not in READ_ONLY
            and k not in ("AppliesToTroubleTicket", "AppliesToWorkItem")
            and v != original.get(k)
        }
        self._apply_values(kind, staged, changed)
        now = self._now()
        known = {
            entry.get("Id")
            for entry in original.get("AppliesToTroubleTicket") or []
            if isinstance(entry, dict)
        }
        added = [
            e
            for e in current.get("AppliesToTroubleTicket") or []
            if isinstance(e, dict) and e.get("Id") not in known
        ]
        staged["AppliesToTroubleTicket"] = [
            *staged.get("AppliesToTroubleTicket", []),
            *(self._entry(e, now) for e in added),
        ]
        self._validate(staged)
        self._business_rules(kind, staged, old_status, user, now)
        obj.clear()
        obj.update(staged)
        obj["DisplayName"] = f"{obj['Id']} - {obj.get('Title') or ''}"
        self._touch_object(kind, obj)
        return base_id

    @staticmethod
    def _entry(entry: Obj, now: datetime) -> Obj:
        stamped = dict(entry)
        stamped.setdefault("Id", str(uuid.uuid4()))
        stamped.setdefault("EnteredDate", ts(now))
        stamped["LastModified"] = ts(now)
        return stamped

    def _business_rules(self, kind: str, obj: Obj, old_status: str | None, user: str, now: datetime) -> None:
        if kind != INCIDENT:
            return
        status = (obj.get("Status") or {}).get("Id")
        if status == old_status:
            return
        if status == RESOLVED:
            obj["ResolvedDate"] = obj.get("ResolvedDate") or ts(now)
            obj["TroubleTicketResolvedByUser"] = self.user_ref(user)
        elif status == CLOSED:
            obj["ClosedDate"] = ts(now)
            obj["TroubleTicketClosedByUser"] = self.user_ref(user)
        elif old_status in (RESOLVED, CLOSED):
            obj["ResolvedDate"] = None
            obj["TroubleTicketResolvedByUser"] = None

    def _generated(self, kind: str, rng: random.Random, moment: datetime) -> Obj:
        """One realistic work item for bulk seeding (no action log beyond a comment or two)."""
        created = moment - timedelta(hours=rng.randrange(1, 240))
        analyst = rng.choice(self._analysts)
        obj = self._blank(kind, rng.choice([self.user_id, *self._analysts]), created)
        self._numbers[kind] += 1
        prefix = "IR" if kind == INCIDENT else "CR"
        obj["Id"] = f"{prefix}{self._numbers[kind]}"
        title = rng.choice(
            ("Disk space low", "Service not responding", "High CPU", "Backup failed", "Patch window")
        )
        ci = self._objects[CI][rng.choice(self._seeded_cis)]
        obj["Title"] = f"{title} on {ci['DisplayName']}"
        obj["DisplayName"] = f"{obj['Id']} - {obj['Title']}"
        obj["FullName"] = f"{obj['ClassName']}:{obj['Id']}"
        obj["Description"] = f"{title} reported for {ci['DisplayName']}."
        obj["AssignedWorkItem"] = self.user_ref(analyst)
        obj["AboutConfigItem"] = [
            {"BaseId": ci["BaseId"], "DisplayName": ci["DisplayName"], "ClassName": ci["ClassName"]}
        ]
        props = ENUM_OF_PROPERTY[kind]
        for prop, enum_name in props.items():
            if prop in ("ResolutionCategory",):
                continue
            value_id = rng.choice(list(ENUMS[enum_name]))
            obj[prop] = {"Id": value_id, "Name": ENUMS[enum_name][value_id]}
        if kind == INCIDENT:
            impact = RANK[obj["Impact"]["Name"]]
            urgency = RANK[obj["Urgency"]["Name"]]
            obj["Priority"] = (impact - 1) * 3 + urgency
            status = obj["Status"]["Id"]
            if status in (RESOLVED, CLOSED):
                obj["ResolvedDate"] = ts(moment - timedelta(minutes=rng.randrange(1, 600)))
                obj["TroubleTicketResolvedByUser"] = self.user_ref(analyst)
            if status == CLOSED:
                obj["ClosedDate"] = ts(moment)
                obj["TroubleTicketClosedByUser"] = self.user_ref(analyst)
            obj["AppliesToTroubleTicket"] = [
                {
                    "Id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "ActionType": "AnalystComment",
                    "Title": "Analyst Comment",
                    "Description": "Looking into it.",
                    "EnteredBy": self._users[analyst]["DisplayName"],
                    "EnteredDate": ts(created),
                    "IsPrivate": False,
                }
            ]
        else:
            start = moment + timedelta(days=rng.randrange(1, 30))
            obj["ScheduledStartDate"] = ts(start)
            obj["ScheduledEndDate"] = ts(start + timedelta(hours=rng.randrange(1, 8)))
        obj["BaseId"] = str(uuid.UUID(int=rng.getrandbits(128)))
        obj["CreatedDate"] = obj["TimeAdded"] = ts(created)
        obj["LastModified"] = ts(moment)
        return obj

    # -- control endpoints (for other processes) ------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> Answer:
        action = path[len("/__loopback/") :].strip("/")
        try:
            args = json.loads(body) if body else {}
        except ValueError:
            return json_answer(400, {"error": "invalid JSON"})
        if not isinstance(args, dict):
            return json_answer(400, {"error": "expected a JSON object"})
        try:
            if action == "stats" and method == "GET":
                return json_answer(200, self.stats())
            if method != "POST":
                return json_answer(405, {"error": "use POST"})
            if action == "touch":
                ids = self.touch(args.get("kind", INCIDENT), int(args["count"]))
                return json_answer(200, {"updated": len(ids)})
            if action == "fail":
                self.fail_next(
                    int(args.get("count", 1)),
                    int(args.get("status", 503)),
                    retry_after=args.get("retry_after"),
                    path_contains=args.get("path_contains"),
                    body=str(args.get("body", "json")),
                )
                return json_answer(200, {"ok": True})
            if action == "expire_tokens":
                self.expire_tokens()
                return json_answer(200, {"ok": True})
            if action == "reset":
                self.reset_request_log()
                self.clear_faults()
                return json_answer(200, {"ok": True})
        except (KeyError, ValueError, TypeError) as exc:
            return json_answer(400, {"error": repr(exc)})
        return json_answer(404, {"error": f"unknown control action {action}"})


class _Refusal(Exception):
    """A commit the portal refuses: ``{"success": false, "exception": <message>}`` in a 200 answer."""


# -- standalone ------------------------------------------------------------------------------------------


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
        prog="python -m tests.loopback.scsm", description="Loopback Cireson portal"
    )
    parser.add_argument(
        "--seed", action="append", default=[], metavar="KIND=COUNT", help="incident=N or change=N"
    )
    parser.add_argument("--span-days", type=float, default=120.0)
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--no-request-bodies", action="store_true", help="do not keep request bodies in the log"
    )
    args = parser.parse_args(argv)
    server = ScsmLoopback(tls=args.tls, port=args.port)
    server.log_bodies = not args.no_request_bodies
    end = server.clock()
    for n, item in enumerate(args.seed):
        kind, _, count = item.partition("=")
        server.seed_work_items(
            kind.strip(), int(count), start=end - timedelta(days=args.span_days), end=end, rng_seed=n + 1
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
