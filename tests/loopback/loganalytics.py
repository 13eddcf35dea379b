"""A loopback Log Analytics query API for the map sources (VM Insights Map tables, Traffic Analytics).

``POST /v1/workspaces/{customerId}/query`` with ``{"query", "timespan", "workspaces"?}`` and
``Prefer: wait=N``, a bearer token for ``https://api.loganalytics.io`` from the loopback Entra,
answering ``{"tables": [{"name": "PrimaryResult", "columns": [{"name", "type"}], "rows": [...]}]}``
(dynamic columns as JSON text, datetimes as ISO text, as the service sends them).

It cannot run KQL. The map sources send fixed templates (``shared_code/mapsources``) whose first
line is a marker comment (``// itsm-connector:vminsights-map v1``) and whose parameters are ``let``
statements; this server recognises each template, reads the parameters and computes the answer the
KQL defines from seeded rows (``VMConnection``, ``VMComputer``, ``VMProcess``, ``VMBoundPort``,
``NTANetAnalytics``), so a wrong aggregation in either place shows up as a test failure. Anything
else gets what the service answers a query it cannot parse: 400 ``BadArgumentError``.

Errors as the service sends them: 401 ``AuthorizationRequiredError`` (no / wrong token), 403
``InsufficientAccessError`` (``deny_workspace``), 404 ``WorkspaceNotFoundError`` (unknown
customer id). Faults: ``fail_next`` (any query: a status, optionally with ``Retry-After``) and
``fault_for`` (queries whose server list names a machine id or IP: ``status``, ``timeout`` (504
``GatewayTimeout``), ``partial`` (the rows plus a ``PartialError``), ``malformed`` (that server's
rows broken), ``garbage`` (no tables), ``nocontent`` (204)).

``seed_vminsights`` / ``seed_flows`` build estates of any size quickly (the benchmark seeds 1,000
servers x 40 connections).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from tests.loopback.base import LoopbackServer
from tests.loopback.entra import (
    NoDelayHandler,
    RecordedRequest,
    RequestLog,
    TokenValidator,
    bearer_token,
    token_problem,
)

LOGS_AUDIENCE = "https://api.loganalytics.io"
TEMPLATE = re.compile(r"^//\s*itsm-connector:(?P<name>[a-z-]+)\s+v(?P<version>\d+)\s*$")
LET = re.compile(r"^let (?P<name>\w+) = (?P<value>dynamic\(\[.*\]\)|datetime\([^)]*\)|\"[^\"]*\");$")
TABLES = ("VMConnection", "VMComputer", "VMProcess", "VMBoundPort", "NTANetAnalytics")
WILDCARD = ("0.0.0.0", "::")


def _error(code: str, message: str, inner: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if inner:
        error["innererror"] = inner
    return {"error": error}


def _parse_time(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_let(value: str) -> Any:
    if value.startswith("dynamic("):
        return json.loads(value[len("dynamic(") : -1])
    if value.startswith("datetime("):
        return _parse_time(value[len("datetime(") : -1])
    return value[1:-1]


@dataclass
class Fault:
    kind: str  # status | timeout | partial | malformed | garbage | nocontent
    remaining: int
    status: int = 503
    retry_after: float | None = None


@dataclass
class QueryRecord:
    workspace: str
    workspaces: tuple[str, ...]
    template: str
    parameters: dict[str, Any]
    prefer: str
    status: int


@dataclass
class _Workspace:
    """Seeded rows of one workspace, indexed the way the templates read them."""

    connections: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    computers: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    computers_by_ip: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    processes: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    ports: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    flows: list[dict[str, Any]] = field(default_factory=list)
    flows_by_ip: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


class LogAnalyticsHandler(NoDelayHandler):
    app: LogAnalyticsLoopback

    def do_POST(self) -> None:
        path, query = self.parsed()
        raw = self.read_body()
        problem = token_problem(self.app.auth, bearer_token(self), LOGS_AUDIENCE)
        if problem is not None:
            self.app.requests.add(RecordedRequest("POST", path, query, 401, authorized=False))
            self.send_json(
                401,
                _error("AuthorizationRequiredError", "Valid authentication was not provided"),
                headers={"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/"'},
            )
            return
        try:
            status, body, headers = self.app.handle_query(
                unquote(path), raw, self.headers.get("Prefer") or ""
            )
        except Exception as exc:  # a bug here must not kill the connection silently
            status, body, headers = 500, _error("InternalServerError", repr(exc)[:300]), {}
        self.app.requests.add(RecordedRequest("POST", path, query, status, authorized=True))
        headers = {"x-ms-request-id": str(uuid.uuid4()), **headers}
        if isinstance(body, bytes):
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_json(status, body, headers=headers)


class LogAnalyticsLoopback(LoopbackServer):
    """Loopback query API; ``auth`` validates bearer tokens (None: any bearer token)."""

    handler_class = LogAnalyticsHandler

    def __init__(self, auth: TokenValidator | None = None) -> None:
        super().__init__()
        self.auth = auth
        self._lock = threading.Lock()
        self._workspaces: dict[str, _Workspace] = {}
        self._denied: set[str] = set()
        self._faults: list[tuple[int, float | None]] = []
        self._targeted: dict[str, list[Fault]] = {}
        self.queries: list[QueryRecord] = []
        self.requests = RequestLog()

    # -- seeding and faults ---------------------------------------------------------------------
    def add_workspace(self, customer_id: str) -> None:
        with self._lock:
            self._workspaces.setdefault(customer_id.lower(), _Workspace())

    def deny_workspace(self, customer_id: str) -> None:
        """Queries of this workspace get 403 (the identity lacks Log Analytics Reader)."""
        with self._lock:
            self._denied.add(customer_id.lower())

    def add_rows(self, customer_id: str, table: str, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows (column -> value; ``TimeGenerated`` as datetime, ISO text or epoch)."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table}")
        with self._lock:
            ws = self._workspaces.setdefault(customer_id.lower(), _Workspace())
            for source in rows:
                row = dict(source)
                row["TimeGenerated"] = _parse_time(row.get("TimeGenerated", time.time()))
                if table == "VMConnection":
                    ws.connections[str(row["Machine"]).lower()].append(row)
                elif table == "VMComputer":
                    machine = str(row["Machine"]).lower()
                    ws.computers[machine].append(row)
                    for ip in row.get("Ipv4Addresses") or ():
                        ws.computers_by_ip[ip].add(machine)
                elif table == "VMProcess":
                    ws.processes[str(row["Process"]).lower()].append(row)
                elif table == "VMBoundPort":
                    ws.ports[str(row["Machine"]).lower()].append(row)
                else:
                    row["FlowStartTime"] = _parse_time(row.get("FlowStartTime", row["TimeGenerated"]))
                    index = len(ws.flows)
                    ws.flows.append(row)
                    ws.flows_by_ip[str(row.get("SrcIp", ""))].append(index)
                    if row.get("DestIp") != row.get("SrcIp"):
                        ws.flows_by_ip[str(row.get("DestIp", ""))].append(index)

    def clear(self) -> None:
        with self._lock:
            self._workspaces.clear()
            self._denied.clear()
            self._faults.clear()
            self._targeted.clear()
            self.queries.clear()
        self.requests.clear()

    def clear_faults(self) -> None:
        """Drop pending faults (the seeded workspaces stay)."""
        with self._lock:
            self._faults.clear()
            self._targeted.clear()

    def fail_next(self, count: int, status: int, retry_after: float | None = None) -> None:
        """The next ``count`` authorized queries get ``status`` (with ``Retry-After`` if given)."""
        with self._lock:
            self._faults.extend((status, retry_after) for _ in range(count))

    def fault_for(
        self,
        target: str,
        kind: str,
        *,
        times: int = 1_000_000,
        status: int = 503,
        retry_after: float | None = None,
    ) -> None:
        """Queries whose server list names ``target`` (a machine id or IP) get the fault ``times`` times."""
        if kind not in ("status", "timeout", "partial", "malformed", "garbage", "nocontent"):
            raise ValueError(f"unknown fault kind {kind}")
        with self._lock:
            self._targeted.setdefault(target.lower(), []).append(Fault(kind, times, status, retry_after))

    def templates(self) -> list[str]:
        """The template of every query answered so far (one entry per HTTP request)."""
        with self._lock:
            return [record.template for record in self.queries]

    # -- protocol --------------------------------------------------------------------------------
    def handle_query(self, path: str, raw: bytes, prefer: str) -> tuple[int, Any, dict[str, str]]:
        parts = [p for p in path.split("/") if p]
        if len(parts) != 4 or parts[0] != "v1" or parts[1] != "workspaces" or parts[3] != "query":
            return 404, _error("PathNotFoundError", f"The requested path does not exist: {path}"), {}
        customer_id = parts[2].lower()
        try:
            body = json.loads(raw or b"{}")
            query = str(body["query"])
        except (ValueError, KeyError, TypeError):
            return 400, _error("BadArgumentError", "The request had some invalid properties"), {}
        extra = [str(w).lower() for w in body.get("workspaces") or []]
        with self._lock:
            for workspace in (customer_id, *extra):
                if workspace not in self._workspaces:
                    return (
                        404,
                        _error("WorkspaceNotFoundError", f"Workspace {workspace} not found"),
                        {},
                    )
                if workspace in self._denied:
                    return (
                        403,
                        _error(
                            "InsufficientAccessError",
                            "The provided credentials have insufficient access to perform the requested "
                            "operation",
                        ),
                        {},
                    )
            fault = self._faults.pop(0) if self._faults else None
        template, parameters = self._parse(query)
        record = QueryRecord(customer_id, tuple(extra), template or "?", parameters, prefer, 0)
        if fault is not None:
            headers = {"Retry-After": f"{fault[1]:g}"} if fault[1] is not None else {}
            return self._record(record, fault[0], _error("ServiceError", "Injected fault"), headers)
        if template is None:
            return self._record(
                record,
                400,
                _error(
                    "BadArgumentError",
                    "The request had some invalid properties",
                    {"code": "SyntaxError", "message": "A recognition error occurred in the query."},
                ),
            )
        targeted = self._take_targeted(parameters)
        if targeted is not None and targeted.kind in ("status", "timeout", "garbage", "nocontent"):
            if targeted.kind == "timeout":
                return self._record(
                    record,
                    504,
                    _error("GatewayTimeout", "The query exceeded the time limit set by 'Prefer: wait'"),
                )
            if targeted.kind == "garbage":
                return self._record(record, 200, b'{"tables": "not what you expected"')
            if targeted.kind == "nocontent":
                return self._record(record, 204, None)
            headers = {"Retry-After": f"{targeted.retry_after:g}"} if targeted.retry_after is not None else {}
            return self._record(record, targeted.status, _error("ServiceError", "Injected fault"), headers)
        start, end = self._timespan(body.get("timespan"))
        with self._lock:
            workspaces = [self._workspaces[w] for w in dict.fromkeys((customer_id, *extra))]
            try:
                columns, rows = self._evaluate(template, parameters, workspaces, start, end)
            except KeyError as exc:
                return self._record(
                    record,
                    400,
                    _error(
                        "BadArgumentError",
                        "The request had some invalid properties",
                        {
                            "code": "SemanticError",
                            "message": f"Failed to resolve scalar expression named {exc}",
                        },
                    ),
                )
        if targeted is not None and targeted.kind == "malformed":
            rows = self._malform(columns, rows, targeted_value=self._target_of(parameters))
        answer: dict[str, Any] = {
            "tables": [
                {
                    "name": "PrimaryResult",
                    "columns": [{"name": n, "type": t} for n, t in columns],
                    "rows": rows,
                }
            ]
        }
        if targeted is not None and targeted.kind == "partial":
            answer["error"] = {
                "code": "PartialError",
                "message": "There were some errors when processing your query.",
                "details": [
                    {
                        "code": "EngineError",
                        "message": "Something went wrong processing your query on the server.",
                        "innererror": {"code": "-2133196797", "message": "Query result set was truncated"},
                    }
                ],
            }
        return self._record(record, 200, answer)

    def _record(
        self, record: QueryRecord, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        record.status = status
        with self._lock:
            self.queries.append(record)
        return status, body, headers or {}

    @staticmethod
    def _parse(query: str) -> tuple[str | None, dict[str, Any]]:
        lines = query.strip().splitlines()
        match = TEMPLATE.match(lines[0].strip()) if lines else None
        if match is None or match["version"] != "1":
            return None, {}
        parameters: dict[str, Any] = {}
        for line in lines[1:]:
            let = LET.match(line.strip())
            if let:
                parameters[let["name"]] = _parse_let(let["value"])
        return match["name"], parameters

    @staticmethod
    def _timespan(value: Any) -> tuple[float, float]:
        if not value:
            return float("-inf"), float("inf")
        start, _, end = str(value).partition("/")
        return _parse_time(start), _parse_time(end)

    @staticmethod
    def _target_of(parameters: dict[str, Any]) -> list[str]:
        values = parameters.get("machineIds") or parameters.get("serverIps") or []
        return [str(v).lower() for v in values]

    def _take_targeted(self, parameters: dict[str, Any]) -> Fault | None:
        with self._lock:
            for value in self._target_of(parameters):
                for fault in self._targeted.get(value, []):
                    if fault.remaining > 0:
                        fault.remaining -= 1
                        return fault
        return None

    def _malform(
        self, columns: list[tuple[str, str]], rows: list[list[Any]], targeted_value: list[str]
    ) -> list[list[Any]]:
        """Break the rows of the faulted server(s): a port that is not a number, a bogus direction."""
        names = [name for name, _ in columns]
        faulted = {target for target in targeted_value if target in self._targeted}
        broken = []
        for row in rows:
            values = dict(zip(names, row, strict=True))
            owner = str(values.get("Machine") or values.get("SrcIp") or "").lower()
            if owner in faulted or str(values.get("DestIp") or "").lower() in faulted:
                for column, bad in (
                    ("DestinationPort", "eighty"),
                    ("Direction", "sideways"),
                    ("DestPort", "eighty"),
                ):
                    if column in values:
                        values[column] = bad
                broken.append([values[name] for name in names])
            else:
                broken.append(row)
        return broken

    # -- template evaluation ----------------------------------------------------------------------
    def _evaluate(
        self, template: str, p: dict[str, Any], workspaces: Sequence[_Workspace], start: float, end: float
    ) -> tuple[list[tuple[str, str]], list[list[Any]]]:
        if template == "vminsights-servers":
            return _vminsights_servers(
                p, workspaces, max(start, p["inventoryStart"]), min(end, p["windowEnd"])
            )
        if template == "vminsights-map":
            return _vminsights_map(p, workspaces, start, end)
        if template == "vminsights-check":
            low, high = max(start, p["windowStart"]), min(end, p["windowEnd"])
            machines = {
                machine
                for ws in workspaces
                for machine, rows in ws.computers.items()
                if any(low <= row["TimeGenerated"] < high for row in rows)
            }
            return [("Machines", "long")], [[len(machines)]]
        if template == "flowlogs-servers":
            return _flowlogs_servers(p, workspaces, start, end)
        if template == "flowlogs-map":
            return _flowlogs_map(p, workspaces, start, end)
        if template == "flowlogs-check":
            low, high = max(start, p["windowStart"]), min(end, p["windowEnd"])
            count = sum(1 for ws in workspaces for row in ws.flows if low <= row["FlowStartTime"] < high)
            return [("Flows", "long")], [[count]]
        raise KeyError(template)

    def __enter__(self) -> LogAnalyticsLoopback:
        self.start()
        return self


# ------------------------------------------------------------------------------------------------
# what each template's KQL computes
# ------------------------------------------------------------------------------------------------
def _newest(rows: Iterable[dict[str, Any]], low: float, high: float) -> dict[str, Any] | None:
    best = None
    for row in rows:
        if low <= row["TimeGenerated"] < high and (
            best is None or row["TimeGenerated"] >= best["TimeGenerated"]
        ):
            best = row
    return best


def _in(value: Any, candidates: set[str]) -> bool:
    return str(value or "").lower() in candidates


def _vminsights_servers(
    p: dict[str, Any], workspaces: Sequence[_Workspace], low: float, high: float
) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    names = {str(name).lower() for name in p["computers"]}
    scope = str(p["scope"]).lower()
    newest: dict[str, dict[str, Any]] = {}
    for ws in workspaces:
        for machine, rows in ws.computers.items():
            for row in rows:
                if not low <= row["TimeGenerated"] < high:
                    continue
                computer = str(row.get("Computer", ""))
                matches = bool(names) and (
                    computer.lower() in names
                    or computer.split(".")[0].lower() in names
                    or _in(row.get("DisplayName"), names)
                    or _in(row.get("HostName"), names)
                )
                matches = matches or (
                    bool(scope) and str(row.get("AzureResourceId", "")).lower().startswith(scope)
                )
                if matches and (
                    machine not in newest or row["TimeGenerated"] >= newest[machine]["TimeGenerated"]
                ):
                    newest[machine] = row
    columns = [
        ("Machine", "string"),
        ("Computer", "string"),
        ("DisplayName", "string"),
        ("Ipv4Addresses", "dynamic"),
        ("AzureResourceId", "string"),
    ]
    out = [
        [
            row["Machine"],
            row.get("Computer", ""),
            row.get("DisplayName", ""),
            json.dumps(list(row.get("Ipv4Addresses") or [])),
            row.get("AzureResourceId", ""),
        ]
        for row in newest.values()
    ]
    return columns, out


MAP_COLUMNS: list[tuple[str, str]] = [
    ("Machine", "string"),
    ("Direction", "string"),
    ("Process", "string"),
    ("ProcessName", "string"),
    ("SourceIp", "string"),
    ("DestinationIp", "string"),
    ("DestinationPort", "int"),
    ("Protocol", "string"),
    ("RemoteIp", "string"),
    ("LinksEstablished", "long"),
    ("LinksTerminated", "long"),
    ("LinksFailed", "long"),
    ("LinksLive", "long"),
    ("BytesSent", "long"),
    ("BytesReceived", "long"),
    ("Responses", "long"),
    ("RowKind", "string"),
    ("Computer", "string"),
    ("DisplayName", "string"),
    ("Ipv4Addresses", "dynamic"),
    ("DnsNames", "dynamic"),
    ("OperatingSystemFullName", "string"),
    ("AzureResourceId", "string"),
    ("Ip", "string"),
    ("Port", "int"),
    ("ExecutableName", "string"),
    ("CompanyName", "string"),
    ("ProductName", "string"),
]
_LINK_KEY = (
    "Machine",
    "Direction",
    "Process",
    "ProcessName",
    "SourceIp",
    "DestinationIp",
    "DestinationPort",
    "Protocol",
    "RemoteIp",
)
_SUMS = ("LinksEstablished", "LinksTerminated", "LinksFailed", "BytesSent", "BytesReceived", "Responses")


def _vminsights_map(
    p: dict[str, Any], workspaces: Sequence[_Workspace], start: float, end: float
) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    ids = {str(m).lower() for m in p["machineIds"]}
    win_low, win_high = max(start, p["windowStart"]), min(end, p["windowEnd"])
    inv_low, inv_high = max(start, p["inventoryStart"]), min(end, p["windowEnd"])
    links: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ws in workspaces:
        for machine in ids:
            for row in ws.connections.get(machine, ()):
                if not win_low <= row["TimeGenerated"] < win_high:
                    continue
                key = tuple(row.get(column) for column in _LINK_KEY)
                total = links.get(key)
                if total is None:
                    total = {column: row.get(column) for column in _LINK_KEY}
                    total.update(dict.fromkeys(_SUMS, 0))
                    total["LinksLive"] = 0
                    links[key] = total
                for column in _SUMS:
                    total[column] += int(row.get(column) or 0)
                total["LinksLive"] = max(total["LinksLive"], int(row.get("LinksLive") or 0))
    remote_ips = {str(link["RemoteIp"]) for link in links.values()}
    outbound_ports = {link["DestinationPort"] for link in links.values() if link["Direction"] == "outbound"}
    computers: dict[str, dict[str, Any]] = {}
    for ws in workspaces:
        candidates = set(ids)
        for ip in remote_ips:
            candidates |= ws.computers_by_ip.get(ip, set())
        for machine in candidates:
            newest = _newest(ws.computers.get(machine, ()), inv_low, inv_high)
            if newest is None:
                continue
            row = newest
            related = machine in ids or bool(remote_ips & set(row.get("Ipv4Addresses") or ()))
            if related and (
                machine not in computers or row["TimeGenerated"] >= computers[machine]["TimeGenerated"]
            ):
                computers[machine] = row
    ports: dict[tuple[Any, ...], dict[str, Any]] = {}
    for ws in workspaces:
        for machine in computers:
            for row in ws.ports.get(machine, ()):
                if not inv_low <= row["TimeGenerated"] < inv_high:
                    continue
                if machine in ids or row.get("Port") in outbound_ports:
                    key = tuple(
                        row.get(c) for c in ("Machine", "Process", "ProcessName", "Ip", "Port", "Protocol")
                    )
                    ports[key] = row
    process_ids = {str(link["Process"]).lower() for link in links.values()} | {
        str(row.get("Process")).lower() for row in ports.values()
    }
    processes: dict[str, dict[str, Any]] = {}
    for ws in workspaces:
        for process in process_ids:
            found = _newest(ws.processes.get(process, ()), inv_low, inv_high)
            if found is not None and (
                process not in processes or found["TimeGenerated"] >= processes[process]["TimeGenerated"]
            ):
                processes[process] = found
    names = [name for name, _ in MAP_COLUMNS]
    out: list[list[Any]] = []

    def emit(values: dict[str, Any]) -> None:
        out.append([values.get(name) for name in names])

    for link in links.values():
        emit({**link, "RowKind": "connection"})
    for row in computers.values():
        emit(
            {
                "Machine": row["Machine"],
                "Computer": row.get("Computer"),
                "DisplayName": row.get("DisplayName"),
                "Ipv4Addresses": json.dumps(list(row.get("Ipv4Addresses") or [])),
                "DnsNames": json.dumps(list(row.get("DnsNames") or [])),
                "OperatingSystemFullName": row.get("OperatingSystemFullName"),
                "AzureResourceId": row.get("AzureResourceId"),
                "RowKind": "machine",
            }
        )
    for row in ports.values():
        emit(
            {c: row.get(c) for c in ("Machine", "Process", "ProcessName", "Ip", "Port", "Protocol")}
            | {"RowKind": "port"}
        )
    for process, row in processes.items():
        emit(
            {
                "Process": row.get("Process", process),
                "Machine": row.get("Machine"),
                "ExecutableName": row.get("ExecutableName"),
                "DisplayName": row.get("DisplayName"),
                "CompanyName": row.get("CompanyName"),
                "ProductName": row.get("ProductName"),
                "RowKind": "process",
            }
        )
    return MAP_COLUMNS, out


def _flow_window(p: dict[str, Any], start: float, end: float) -> tuple[float, float, float, float]:
    return max(start, float("-inf")), min(end, float("inf")), p["windowStart"], p["windowEnd"]


def _flows_in(
    ws: _Workspace, indexes: Iterable[int], start: float, end: float, low: float, high: float
) -> Iterable[dict[str, Any]]:
    for index in indexes:
        row = ws.flows[index]
        if (
            start <= row["TimeGenerated"] < end
            and low <= row["FlowStartTime"] < high
            and row.get("SubType", "FlowLog") == "FlowLog"
        ):
            yield row


def _flowlogs_servers(
    p: dict[str, Any], workspaces: Sequence[_Workspace], start: float, end: float
) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    start, end, low, high = _flow_window(p, start, end)
    names = {str(v).lower() for v in p["vms"]}
    prefix = str(p["scope"]).lower()
    found: dict[str, set[str]] = {}
    for ws in workspaces:
        for row in _flows_in(ws, range(len(ws.flows)), start, end, low, high):
            for vm_column, ip_column in (("SrcVm", "SrcIp"), ("DestVm", "DestIp")):
                vm = str(row.get(vm_column) or "")
                if not vm:
                    continue
                name = vm.split("/")[-1].lower()
                if (names and name in names) or (prefix and vm.lower().startswith(prefix)):
                    found.setdefault(vm, set()).add(str(row.get(ip_column) or ""))
    columns = [("Vm", "string"), ("Ips", "dynamic")]
    return columns, [[vm, json.dumps(sorted(ip for ip in ips if ip))] for vm, ips in found.items()]


FLOW_COLUMNS: list[tuple[str, str]] = [
    ("SrcIp", "string"),
    ("DestIp", "string"),
    ("DestPort", "int"),
    ("L4Protocol", "string"),
    ("FlowDirection", "string"),
    ("FlowStatus", "string"),
    ("SrcVm", "string"),
    ("DestVm", "string"),
    ("FlowType", "string"),
    ("AllowedFlows", "long"),
    ("DeniedFlows", "long"),
    ("BytesSrcToDest", "long"),
    ("BytesDestToSrc", "long"),
]


def _flowlogs_map(
    p: dict[str, Any], workspaces: Sequence[_Workspace], start: float, end: float
) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    start, end, low, high = _flow_window(p, start, end)
    ips = {str(ip) for ip in p["serverIps"]}
    totals: dict[tuple[Any, ...], list[int]] = {}
    for ws in workspaces:
        indexes = sorted({index for ip in ips for index in ws.flows_by_ip.get(ip, ())})
        for row in _flows_in(ws, indexes, start, end, low, high):
            if row.get("L4Protocol") not in ("T", "U"):
                continue
            key = tuple(row.get(column) for column, _ in FLOW_COLUMNS[:9])
            total = totals.setdefault(key, [0, 0, 0, 0])
            total[0] += int(row.get("AllowedInFlows") or 0) + int(row.get("AllowedOutFlows") or 0)
            total[1] += int(row.get("DeniedInFlows") or 0) + int(row.get("DeniedOutFlows") or 0)
            total[2] += int(row.get("BytesSrcToDest") or 0)
            total[3] += int(row.get("BytesDestToSrc") or 0)
    return FLOW_COLUMNS, [[*key, *total] for key, total in totals.items()]


# ------------------------------------------------------------------------------------------------
# seeders
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeededServer:
    computer: str
    machine_id: str
    ip: str


def seed_vminsights(
    server: LogAnalyticsLoopback,
    customer_id: str,
    *,
    servers: int,
    connections: int,
    now: datetime,
    prefix: str = "srv",
    resource_group: str = "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg-maps",
) -> list[SeededServer]:
    """An estate of ``servers`` machines, each with ``connections`` logical connections in the
    last hour (one 1-minute row each): outbound to other seeded servers' listening process, to
    external endpoints, and inbound from unmonitored clients. Fast enough for 1,000 x 40."""
    at = now - timedelta(minutes=30)
    inventory_at = now - timedelta(minutes=45)
    seeded = [
        SeededServer(
            f"{prefix}{i:05d}",
            f"m-{uuid.UUID(int=i + 1)}",
            f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        )
        for i in range(servers)
    ]
    computers, processes, ports, links = [], [], [], []
    for i, s in enumerate(seeded):
        computers.append(
            {
                "TimeGenerated": inventory_at,
                "Machine": s.machine_id,
                "Computer": s.computer,
                "DisplayName": s.computer,
                "Ipv4Addresses": [s.ip],
                "DnsNames": [f"{s.computer}.corp.example"],
                "OperatingSystemFullName": "Ubuntu 22.04",
                "AzureResourceId": f"{resource_group}/providers/Microsoft.Compute/virtualMachines/"
                f"{s.computer}",
            }
        )
        for name, exe in (("web", "nginx"), ("app", "java")):
            processes.append(
                {
                    "TimeGenerated": inventory_at,
                    "Machine": s.machine_id,
                    "Process": f"p-{s.machine_id[2:10]}{name}",
                    "ExecutableName": exe,
                    "DisplayName": exe,
                    "CompanyName": "",
                    "ProductName": exe,
                }
            )
        ports.append(
            {
                "TimeGenerated": inventory_at,
                "Machine": s.machine_id,
                "Process": f"p-{s.machine_id[2:10]}web",
                "ProcessName": "nginx",
                "Ip": "0.0.0.0",
                "Port": 443,
                "Protocol": "tcp",
            }
        )
        app = f"p-{s.machine_id[2:10]}app"
        web = f"p-{s.machine_id[2:10]}web"
        for c in range(connections):
            kind = c % 4
            base = {
                "TimeGenerated": at,
                "Machine": s.machine_id,
                "Computer": s.computer,
                "Protocol": "tcp",
                "LinksEstablished": 2,
                "LinksTerminated": 1,
                "LinksFailed": 0,
                "LinksLive": 1,
                "BytesSent": 1000 + c,
                "BytesReceived": 5000 + c,
                "Responses": 3,
            }
            if kind in (0, 1) and servers > 1:
                peer = seeded[(i + 1 + c) % servers]
                if peer is s:
                    peer = seeded[(i + 1) % servers]
                links.append(
                    base
                    | {
                        "Direction": "outbound",
                        "Process": app,
                        "ProcessName": "java",
                        "SourceIp": s.ip,
                        "DestinationIp": peer.ip,
                        "DestinationPort": 443,
                        "RemoteIp": peer.ip,
                    }
                )
            elif kind == 2:
                external = f"203.0.{(c >> 8) & 255}.{c & 255}"
                links.append(
                    base
                    | {
                        "Direction": "outbound",
                        "Process": app,
                        "ProcessName": "java",
                        "SourceIp": s.ip,
                        "DestinationIp": external,
                        "DestinationPort": 8000 + c,
                        "RemoteIp": external,
                    }
                )
            else:
                client = f"192.168.{(c >> 8) & 255}.{c & 255}"
                links.append(
                    base
                    | {
                        "Direction": "inbound",
                        "Process": web,
                        "ProcessName": "nginx",
                        "SourceIp": client,
                        "DestinationIp": s.ip,
                        "DestinationPort": 443,
                        "RemoteIp": client,
                    }
                )
    server.add_rows(customer_id, "VMComputer", computers)
    server.add_rows(customer_id, "VMProcess", processes)
    server.add_rows(customer_id, "VMBoundPort", ports)
    server.add_rows(customer_id, "VMConnection", links)
    return seeded
