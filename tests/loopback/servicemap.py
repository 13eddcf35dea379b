"""A loopback Service Map API (api-version 2015-11-01-preview), mounted inside the loopback ARM.

The shapes follow the REST API specification's examples (``specification/service-map`` in
Azure/azure-rest-api-specs): machines, processes, ports and client groups are resources with
``id`` (``/api/workspaces/{guid}/machines/m-...``), ``kind``, ``type``, ``name`` and
``properties``; references carry ``kind: ref:machine | ref:process | ref:port``. Served under
``/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.OperationalInsights/workspaces/{w}``:

* ``GET .../features/serviceMap/machines`` (``live``, ``startTime``, ``endTime``, ``timestamp``,
  ``$top`` up to 200, ``$skipToken``; ``nextLink`` on every page but the last);
* ``GET .../features/serviceMap/machineGroups/{name}``;
* ``POST .../features/serviceMap/generateMap`` with ``map:single-machine-dependency``,
  ``map:machine-list-dependency`` or ``map:machine-group-dependency`` (400 ``InvalidRequest`` for
  a window over one hour or an unknown kind, 404 for an unknown machine);
* ``GET {workspace}`` the workspace resource with ``properties.customerId``.

``ServiceMapApi`` holds the state and is mounted in ``AlertsManagementLoopback`` (the stack's one
ARM endpoint), which checks the ARM bearer token first. Faults per machine (``fault_for``): a
status (with ``Retry-After``) for any generateMap naming it, or ``malformed`` (its connections lose
their server port).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

API_VERSION = "2015-11-01-preview"
WORKSPACE_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.operationalinsights"
    r"/workspaces/(?P<ws>[^/]+)(?P<rest>/.*)?$",
    re.IGNORECASE,
)
MAX_WINDOW = timedelta(hours=1)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _time(value: str) -> datetime:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class _Fault:
    kind: str
    remaining: int
    status: int = 503
    retry_after: float | None = None


@dataclass
class SmWorkspace:
    customer_id: str
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)  # lower id -> resource
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    ports: dict[str, dict[str, Any]] = field(default_factory=dict)
    client_groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    connections: list[dict[str, Any]] = field(default_factory=list)
    acceptors: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"/api/workspaces/{self.customer_id}"


def _ref(resource: dict[str, Any]) -> dict[str, Any]:
    kind = resource["kind"]
    ref: dict[str, Any] = {
        "kind": f"ref:{kind.lower()}",
        "id": resource["id"],
        "type": resource["type"],
        "name": resource["name"],
    }
    if kind in ("process", "port"):
        props = {"machine": resource["properties"]["machine"]}
        if kind == "port":
            props |= {k: resource["properties"][k] for k in ("ipAddress", "portNumber")}
        ref["properties"] = props
    return ref


class ServiceMapApi:
    """State and protocol of the loopback Service Map; ``dispatch`` is called by the ARM loopback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workspaces: dict[tuple[str, str, str], SmWorkspace] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self.calls: list[tuple[str, str, dict[str, Any]]] = []  # (method, operation, body or query)

    # -- seeding ----------------------------------------------------------------------------------
    def add_workspace(self, resource_id: str, customer_id: str) -> SmWorkspace:
        match = WORKSPACE_PATH.match(resource_id)
        if not match:
            raise ValueError("not a workspace resource id")
        key = (match["sub"].lower(), match["rg"].lower(), match["ws"].lower())
        with self._lock:
            return self._workspaces.setdefault(key, SmWorkspace(customer_id.lower()))

    def add_machine(
        self,
        ws: SmWorkspace,
        computer: str,
        ips: list[str],
        *,
        monitored: bool = True,
        resource_id: str = "",
        machine: str | None = None,
    ) -> dict[str, Any]:
        name = machine or (f"m-{uuid.uuid4()}" if monitored else f"t-{uuid.uuid4().hex[:8]}")
        resource: dict[str, Any] = {
            "kind": "machine",
            "id": f"{ws.prefix}/machines/{name}",
            "type": "workspaces/machines",
            "name": name,
            "properties": {
                "monitoringState": "monitored" if monitored else "discovered",
                "virtualizationState": "virtual",
                "displayName": computer,
                "computerName": computer,
                "fullyQualifiedDomainName": f"{computer}.corp.example",
                "networking": {
                    "ipv4Interfaces": [{"ipAddress": ip, "subnetMask": "255.255.255.0"} for ip in ips]
                },
                "operatingSystem": {"family": "linux", "fullName": "Ubuntu 22.04", "bitness": "64bit"},
            },
        }
        if resource_id:
            resource["properties"]["hosting"] = {"kind": "provider:azure", "resourceId": resource_id}
        with self._lock:
            ws.machines[resource["id"].lower()] = resource
        return resource

    def add_process(
        self, ws: SmWorkspace, machine: dict[str, Any], display: str, executable: str
    ) -> dict[str, Any]:
        name = f"p-{uuid.uuid4().hex}"
        resource: dict[str, Any] = {
            "kind": "process",
            "id": f"{machine['id']}/processes/{name}",
            "type": "workspaces/machines/processes",
            "name": name,
            "properties": {
                "monitoringState": machine["properties"]["monitoringState"],
                "machine": _ref(machine),
                "executableName": executable,
                "displayName": display,
            },
        }
        with self._lock:
            ws.processes[resource["id"].lower()] = resource
        return resource

    def add_port(self, ws: SmWorkspace, process: dict[str, Any], ip: str, port: int) -> dict[str, Any]:
        machine_ref = process["properties"]["machine"]
        hex_ip = "".join(f"{int(part):02x}" for part in ip.split("."))
        name = f"b-{hex_ip}_{port}"
        resource: dict[str, Any] = {
            "kind": "port",
            "id": f"{machine_ref['id']}/ports/{name}",
            "type": "workspaces/machines/ports",
            "name": name,
            "properties": {
                "monitoringState": "monitored",
                "machine": machine_ref,
                "displayName": f":{port}",
                "ipAddress": ip,
                "portNumber": port,
            },
        }
        acceptor = {
            "kind": "rel:acceptor",
            "id": f"{ws.prefix}/acceptors/{uuid.uuid4().hex}",
            "type": "workspaces/acceptors",
            "name": uuid.uuid4().hex,
            "properties": {"source": _ref(resource), "destination": _ref(process)},
        }
        with self._lock:
            ws.ports[resource["id"].lower()] = resource
            ws.acceptors.append(acceptor)
        return resource

    def add_connection(
        self,
        ws: SmWorkspace,
        source: dict[str, Any],
        server_process: dict[str, Any],
        port: dict[str, Any],
        *,
        failed: bool = False,
    ) -> None:
        """``source`` is a process (on another machine) or None-like: a client group of the server process."""
        if source["kind"] == "clientGroup":
            source_ref = {"id": source["id"], "type": source["type"], "name": source["name"]}
        else:
            source_ref = _ref(source)
        connection = {
            "kind": "rel:connection",
            "id": f"{ws.prefix}/connections/{uuid.uuid4().hex}",
            "type": "workspaces/connections",
            "name": uuid.uuid4().hex,
            "properties": {
                "source": source_ref,
                "destination": _ref(server_process),
                "serverPort": _ref(port),
                "failureState": "failed" if failed else "ok",
            },
        }
        with self._lock:
            ws.connections.append(connection)

    def add_client_group(self, ws: SmWorkspace, process: dict[str, Any]) -> dict[str, Any]:
        machine_name = process["properties"]["machine"]["name"]
        name = f"m!{machine_name}!p!{process['name']}"
        resource: dict[str, Any] = {
            "kind": "clientGroup",
            "id": f"{ws.prefix}/clientGroups/{name}",
            "type": "workspaces/clientGroups",
            "name": name,
            "properties": {"clientsOf": _ref(process)},
        }
        with self._lock:
            ws.client_groups[resource["id"].lower()] = resource
        return resource

    def add_machine_group(self, ws: SmWorkspace, display: str, machines: list[dict[str, Any]]) -> str:
        name = str(uuid.uuid4())
        group = {
            "kind": "machineGroup",
            "id": f"{ws.prefix}/machineGroups/{name}",
            "type": "workspaces/machineGroups",
            "name": name,
            "etag": str(uuid.uuid4()),
            "properties": {
                "groupType": "user",
                "displayName": display,
                "count": len(machines),
                "machines": [{**_ref(m), "kind": "ref:machinewithhints"} for m in machines],
            },
        }
        with self._lock:
            ws.groups[name.lower()] = group
        return name

    def fault_for(
        self,
        machine_id: str,
        kind: str,
        *,
        times: int = 1_000_000,
        status: int = 503,
        retry_after: float | None = None,
    ) -> None:
        """generateMap calls naming ``machine_id`` get ``status`` (kind ``status``) or a map whose
        connections of that machine have no server port (kind ``malformed``), ``times`` times."""
        with self._lock:
            self._faults.setdefault(machine_id.lower(), []).append(_Fault(kind, times, status, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def operations(self) -> list[str]:
        with self._lock:
            return [operation for _, operation, _ in self.calls]

    # -- protocol ----------------------------------------------------------------------------------
    def handles(self, path: str) -> bool:
        return WORKSPACE_PATH.match(path) is not None

    def dispatch(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes, base_url: str
    ) -> tuple[int, Any, dict[str, str]]:
        match = WORKSPACE_PATH.match(path)
        assert match is not None
        with self._lock:
            ws = self._workspaces.get((match["sub"].lower(), match["rg"].lower(), match["ws"].lower()))
        if ws is None:
            return 404, _error("ResourceNotFound", f"The workspace '{match['ws']}' was not found."), {}
        rest = (match["rest"] or "").rstrip("/")
        api_version = (query.get("api-version") or [""])[0]
        if not api_version:
            return (
                400,
                _error("MissingApiVersionParameter", "The api-version query parameter is required."),
                {},
            )
        if rest == "" and method == "GET":
            return 200, {"id": path, "name": match["ws"], "properties": {"customerId": ws.customer_id}}, {}
        if api_version != API_VERSION:
            return (
                400,
                _error("InvalidApiVersionParameter", f"The api-version '{api_version}' is invalid."),
                {},
            )
        parts = [p for p in rest.split("/") if p]
        if parts[:2] != ["features", "serviceMap"] and [p.lower() for p in parts[:2]] != [
            "features",
            "servicemap",
        ]:
            return 404, _error("InvalidResourceType", f"No route for {path}"), {}
        operation = "/".join(parts[2:])
        if method == "GET" and operation.lower() == "machines":
            self._log("GET", "machines", {k: v[0] for k, v in query.items()})
            return self._machines(ws, path, query, base_url)
        if method == "GET" and operation.lower().startswith("machinegroups/") and len(parts) == 4:
            self._log("GET", "machineGroup", {})
            with self._lock:
                group = ws.groups.get(parts[3].lower())
            if group is None:
                return 404, _error("NotFound", f"Machine group {parts[3]} not found."), {}
            return 200, copy.deepcopy(group), {}
        if method == "POST" and operation.lower() == "generatemap":
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                return 400, _error("InvalidRequest", "The request body is not JSON."), {}
            self._log("POST", str(body.get("kind")), body)
            return self._generate(ws, body)
        return 404, _error("InvalidResourceType", f"No route for {method} {path}"), {}

    def _log(self, method: str, operation: str, body: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((method, operation, body))

    def _machines(
        self, ws: SmWorkspace, path: str, query: dict[str, list[str]], base_url: str
    ) -> tuple[int, Any, dict[str, str]]:
        top = min(200, int((query.get("$top") or ["100"])[0]))
        skip = int((query.get("$skipToken") or ["0"])[0])
        with self._lock:
            machines = sorted(ws.machines.values(), key=lambda m: m["id"])
        page = machines[skip : skip + top]
        body: dict[str, Any] = {"value": copy.deepcopy(page)}
        if skip + top < len(machines):
            params = {k: v[0] for k, v in query.items() if k != "$skipToken"} | {
                "$skipToken": str(skip + top)
            }
            body["nextLink"] = f"{base_url}{path}?{urlencode(params)}"
        return 200, body, {}

    def _take_fault(self, machine_ids: list[str]) -> tuple[str, _Fault] | None:
        with self._lock:
            for machine in machine_ids:
                for fault in self._faults.get(machine.lower(), []):
                    if fault.remaining > 0:
                        fault.remaining -= 1
                        return machine.lower(), fault
        return None

    def _generate(self, ws: SmWorkspace, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        kind = body.get("kind")
        try:
            start, end = _time(str(body["startTime"])), _time(str(body["endTime"]))
        except (KeyError, ValueError):
            return 400, _error("InvalidRequest", "startTime and endTime are required."), {}
        if end - start > MAX_WINDOW or end < start:
            return 400, _error("InvalidRequest", "The time interval must be at most one hour."), {}
        if kind == "map:single-machine-dependency":
            machine_ids = [str(body.get("machineId") or "")]
        elif kind == "map:machine-list-dependency":
            machine_ids = [str(m) for m in body.get("machineIds") or []]
        elif kind == "map:machine-group-dependency":
            with self._lock:
                group = ws.groups.get(str(body.get("machineGroupId") or "").rsplit("/", 1)[-1].lower())
            if group is None:
                return 404, _error("NotFound", "Machine group not found."), {}
            machine_ids = [m["id"] for m in group["properties"]["machines"]]
        else:
            return 400, _error("InvalidRequest", f"Unknown map request kind '{kind}'."), {}
        with self._lock:
            unknown = [m for m in machine_ids if m.lower() not in ws.machines]
        if unknown or not machine_ids:
            return 404, _error("NotFound", f"Machine '{(unknown or [''])[0]}' not found."), {}
        faulted = self._take_fault(machine_ids)
        if faulted is not None and faulted[1].kind == "status":
            fault = faulted[1]
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return fault.status, _error("ServiceUnavailable", "Injected fault"), headers
        wanted = {m.lower() for m in machine_ids}
        with self._lock:
            answer = self._map(ws, wanted)
        if faulted is not None and faulted[1].kind == "malformed":
            for connection in answer["map"]["edges"]["connections"]:
                owners = {
                    connection["properties"]["destination"]["properties"]["machine"]["id"].lower(),
                    _owner(ws, connection["properties"]["source"]).lower(),
                }
                if faulted[0] in owners:
                    connection["properties"]["serverPort"] = {"kind": "ref:port"}
        answer["startTime"], answer["endTime"] = body["startTime"], body["endTime"]
        return 200, answer, {}

    def _map(self, ws: SmWorkspace, wanted: set[str]) -> dict[str, Any]:
        connections = [
            c
            for c in ws.connections
            if _owner(ws, c["properties"]["source"]).lower() in wanted
            or c["properties"]["destination"]["properties"]["machine"]["id"].lower() in wanted
        ]
        machine_ids, process_ids, port_ids, group_ids = set(wanted), set(), set(), set()
        for c in connections:
            props = c["properties"]
            source_id = props["source"]["id"].lower()
            if "/clientgroups/" in source_id:
                group_ids.add(source_id)
            else:
                process_ids.add(source_id)
                machine_ids.add(props["source"]["properties"]["machine"]["id"].lower())
            process_ids.add(props["destination"]["id"].lower())
            machine_ids.add(props["destination"]["properties"]["machine"]["id"].lower())
            port_ids.add(props["serverPort"]["id"].lower())
        acceptors = [a for a in ws.acceptors if a["properties"]["source"]["id"].lower() in port_ids]
        return {
            "map": {
                "nodes": {
                    "machines": [
                        copy.deepcopy(ws.machines[m]) for m in sorted(machine_ids) if m in ws.machines
                    ],
                    "processes": [
                        copy.deepcopy(ws.processes[p]) for p in sorted(process_ids) if p in ws.processes
                    ],
                    "ports": [copy.deepcopy(ws.ports[p]) for p in sorted(port_ids) if p in ws.ports],
                    "clientGroups": [copy.deepcopy(ws.client_groups[g]) for g in sorted(group_ids)],
                },
                "edges": {"connections": copy.deepcopy(connections), "acceptors": copy.deepcopy(acceptors)},
            }
        }


def _owner(ws: SmWorkspace, ref: dict[str, Any]) -> str:
    if "/clientgroups/" in ref["id"].lower():
        group = ws.client_groups[ref["id"].lower()]
        return str(group["properties"]["clientsOf"]["properties"]["machine"]["id"])
    return str(ref["properties"]["machine"]["id"])
