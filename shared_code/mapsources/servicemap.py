"""The Service Map REST API as a map source (workspaces that still have the solution).

Through ARM (``ARM_ENDPOINT``), api-version 2015-11-01-preview, under
``/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.OperationalInsights/workspaces/{w}/features/serviceMap``:

* ``GET .../machines?live=true&startTime=&endTime=&$top=`` lists the machines (paged by
  ``nextLink``); a machine is ``{"id": "/api/workspaces/{guid}/machines/m-...", "kind": "machine",
  "properties": {"computerName", "displayName", "monitoringState", "networking": {"ipv4Interfaces"},
  "hosting": {"resourceId", ...}}}``;
* ``GET .../machineGroups/{name}`` a machine group with ``properties.machines`` (references);
* ``POST .../generateMap`` with ``{"kind": "map:machine-list-dependency", "machineIds": [...],
  "filterProcesses": false, "startTime", "endTime"}`` (or ``map:single-machine-dependency`` with
  ``machineId``) answers ``{"startTime", "endTime", "map": {"nodes": {"machines", "processes",
  "ports", "clientGroups"}, "edges": {"connections", "acceptors"}}}``; a connection has ``source``,
  ``destination``, ``serverPort`` (references) and ``failureState`` (ok / failed / mixed).

One machine-list map per batch of servers saves calls; when a batch fails or its answer does not
parse, each of its servers is asked for alone, so one bad server costs only its own map. The API
serves at most one hour per request, hence the 60-minute window limit. Ports are TCP (the API has
no protocol); connections carry no link counts, only the failure state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from azure.core.credentials import TokenCredential
from pydantic import ValidationError

from shared_code.domain.maps import (
    Direction,
    EdgeKind,
    MapEdge,
    MapNode,
    MapWindow,
    NodeKind,
    Protocol,
    ServerMap,
    node_id,
)
from shared_code.domain.mapsources import (
    SERVICE_MAP_MAX_WINDOW_MINUTES,
    MapSourceDefinition,
    ServerGroupKind,
    ServerMapResult,
    ServerRef,
    Workspace,
)
from shared_code.errors import MapSourceError
from shared_code.httpretry import RetryPolicy
from shared_code.mapsources.arm import TokenCredentialAuth, arm_scope, error_text, send

log = logging.getLogger(__name__)

API_VERSION = "2015-11-01-preview"
PAGE_SIZE = 200
MAX_PAGES = 500
DEFAULT_BATCH_SIZE = 10
MAX_WINDOW = timedelta(minutes=SERVICE_MAP_MAX_WINDOW_MINUTES)


def _iso(moment: datetime) -> str:
    value = moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _props(resource: Mapping[str, Any]) -> Mapping[str, Any]:
    value = resource.get("properties")
    return value if isinstance(value, Mapping) else {}


def _ref_id(ref: Any) -> str:
    if not isinstance(ref, Mapping) or not isinstance(ref.get("id"), str) or not ref["id"]:
        raise ValueError("a reference has no id")
    return str(ref["id"])


def machine_name(machine: Mapping[str, Any]) -> str:
    props = _props(machine)
    for key in ("computerName", "displayName"):
        value = props.get(key)
        if isinstance(value, str) and value.strip() and value.strip() != "???":
            return value.strip()
    return str(machine.get("name") or machine.get("id") or "")


def machine_ips(machine: Mapping[str, Any]) -> tuple[str, ...]:
    networking = _props(machine).get("networking")
    interfaces = networking.get("ipv4Interfaces") if isinstance(networking, Mapping) else None
    if not isinstance(interfaces, list):
        return ()
    return tuple(str(i["ipAddress"]) for i in interfaces if isinstance(i, Mapping) and i.get("ipAddress"))[
        :20
    ]


# ------------------------------------------------------------------------------------------------
# map answer -> one server's graph (pure)
# ------------------------------------------------------------------------------------------------
class _MapIndex:
    """The nodes of a generateMap answer by id (lower-case), and who owns each."""

    def __init__(self, answer: Mapping[str, Any]) -> None:
        graph = answer.get("map")
        if not isinstance(graph, Mapping):
            raise ValueError("the answer has no map")
        nodes = graph.get("nodes")
        edges = graph.get("edges")
        if not isinstance(nodes, Mapping) or not isinstance(edges, Mapping):
            raise ValueError("the map has no nodes or edges")
        self.resources: dict[str, Mapping[str, Any]] = {}
        for group in ("machines", "processes", "ports", "clientGroups"):
            items = nodes.get(group) or []
            if not isinstance(items, list):
                raise ValueError(f"map.nodes.{group} is not a list")
            for item in items:
                self.resources[_ref_id(item).lower()] = item
        self.connections = edges.get("connections") or []
        self.acceptors = edges.get("acceptors") or []
        if not isinstance(self.connections, list) or not isinstance(self.acceptors, list):
            raise ValueError("map.edges is not a list of connections and acceptors")

    def owner(self, ref: Any) -> str:
        """The machine id a process, port, machine or client-group reference belongs to."""
        rid = _ref_id(ref)
        kind = str(ref.get("kind") or "") if isinstance(ref, Mapping) else ""
        resource = self.resources.get(rid.lower(), ref)
        if "/clientgroups/" in rid.lower():
            return self.owner(_props(resource).get("clientsOf"))
        if kind in ("machine", "ref:machine") or (
            "/processes/" not in rid.lower() and "/ports/" not in rid.lower()
        ):
            return rid
        machine = _props(resource).get("machine") or _props(ref).get("machine")
        return _ref_id(machine)


class _Graph:
    def __init__(self, index: _MapIndex) -> None:
        self.index = index
        self.nodes: dict[str, MapNode] = {}
        self.edges: dict[str, MapEdge] = {}

    def machine(self, machine_id: str) -> str:
        nid = node_id(NodeKind.MACHINE, machine_id)
        if nid not in self.nodes:
            resource = self.index.resources.get(machine_id.lower(), {"id": machine_id})
            props = _props(resource)
            properties = {"machineId": machine_id}
            fqdn = props.get("fullyQualifiedDomainName")
            if isinstance(fqdn, str) and fqdn:
                properties["fqdn"] = fqdn
            os = props.get("operatingSystem")
            if isinstance(os, Mapping) and os.get("fullName"):
                properties["os"] = str(os["fullName"])
            hosting = props.get("hosting")
            if isinstance(hosting, Mapping) and hosting.get("resourceId"):
                properties["azureResourceId"] = str(hosting["resourceId"])
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.MACHINE,
                name=machine_name(resource) or machine_id.rsplit("/", 1)[-1],
                monitored=props.get("monitoringState") == "monitored",
                ips=machine_ips(resource),
                properties=properties,
            )
        return nid

    def process(self, ref: Any) -> str:
        rid = _ref_id(ref)
        owner = self.index.owner(ref)
        machine = self.machine(owner)
        nid = node_id(NodeKind.PROCESS, owner, rid.rsplit("/", 1)[-1])
        if nid not in self.nodes:
            props = _props(self.index.resources.get(rid.lower(), ref))
            name = ""
            for key in ("displayName", "executableName", "group"):
                value = props.get(key)
                if isinstance(value, str) and value.strip() and value.strip() != "???":
                    name = value.strip()
                    break
            properties = {"processId": rid}
            for key, label in (("executableName", "executable"), ("role", "role"), ("group", "group")):
                if isinstance(props.get(key), str) and props[key]:
                    properties[label] = str(props[key])
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.PROCESS,
                name=name or rid.rsplit("/", 1)[-1],
                machine=machine,
                properties=properties,
            )
            self.edge(EdgeKind.OWNS, machine, nid)
        return nid

    def port(self, ref: Any) -> str:
        rid = _ref_id(ref)
        owner = self.index.owner(ref)
        machine = self.machine(owner)
        props = _props(self.index.resources.get(rid.lower(), ref)) or _props(ref)
        number = props.get("portNumber")
        if not isinstance(number, int) or not 0 <= number <= 65535:
            raise ValueError("a port has no portNumber")
        ip = str(props.get("ipAddress") or "")
        nid = node_id(NodeKind.PORT, owner, ip, str(number), Protocol.TCP.value)
        if nid not in self.nodes:
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.PORT,
                name=f"{ip}:{number}" if ip else f":{number}",
                machine=machine,
                ips=(ip,) if ip else (),
                port=number,
                protocol=Protocol.TCP,
            )
        return nid

    def client_group(self, ref: Any, server_machine: str, port: int) -> str:
        rid = _ref_id(ref)
        nid = node_id(NodeKind.CLIENT_GROUP, rid)
        if nid not in self.nodes:
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.CLIENT_GROUP,
                name=f"Clients of :{port}",
                machine=self.machine(server_machine),
                port=port,
                protocol=Protocol.TCP,
            )
        return nid

    def edge(self, kind: EdgeKind, source: str, target: str, **fields: Any) -> MapEdge:
        edge = MapEdge(source=source, target=target, kind=kind, **fields)
        self.edges.setdefault(edge.key, edge)
        return edge


def build_server_map(
    server: ServerRef, answer: Mapping[str, Any], *, source: str, window: MapWindow, imported_at: datetime
) -> ServerMap:
    """The part of a generateMap answer that concerns one machine (raises ValueError if malformed)."""
    index = _MapIndex(answer)
    graph = _Graph(index)
    me = server.machine_id.lower()
    root = graph.machine(server.machine_id)
    for connection in index.connections:
        props = _props(connection)
        source_ref, destination, port_ref = (
            props.get("source"),
            props.get("destination"),
            props.get("serverPort"),
        )
        # a client group stands for machines Service Map does not monitor: it belongs to no machine
        from_clients = "/clientgroups/" in _ref_id(source_ref).lower()
        source_owner = "" if from_clients else index.owner(source_ref).lower()
        destination_owner = index.owner(destination).lower()
        if me not in (source_owner, destination_owner) or source_owner == destination_owner:
            continue
        port_node = graph.port(port_ref)
        number = graph.nodes[port_node].port
        failed = props.get("failureState") == "failed"
        listener = graph.process(destination) if "/processes/" in _ref_id(destination).lower() else None
        if listener is not None:
            graph.edge(EdgeKind.LISTENS, listener, port_node)
        if source_owner == me:
            local = graph.process(source_ref) if "/processes/" in _ref_id(source_ref).lower() else root
            graph.edge(
                EdgeKind.CONNECTION,
                local,
                port_node,
                port=number,
                protocol=Protocol.TCP,
                direction=Direction.OUTBOUND,
                failed=failed,
            )
        else:
            rid = _ref_id(source_ref).lower()
            if from_clients:
                client = graph.client_group(source_ref, server.machine_id, number or 0)
            elif "/processes/" in rid:
                client = graph.process(source_ref)
            else:
                client = graph.machine(index.owner(source_ref))
            graph.edge(
                EdgeKind.CONNECTION,
                client,
                port_node,
                port=number,
                protocol=Protocol.TCP,
                direction=Direction.INBOUND,
                failed=failed,
            )
    for acceptor in index.acceptors:
        props = _props(acceptor)
        port_ref, process_ref = props.get("source"), props.get("destination")
        if index.owner(port_ref).lower() == me:
            graph.edge(EdgeKind.LISTENS, graph.process(process_ref), graph.port(port_ref))
    return ServerMap(
        server=server.computer,
        machine_id=server.machine_id,
        source=source,
        source_kind="servicemap",
        window=window,
        imported_at=imported_at,
        nodes=tuple(sorted(graph.nodes.values(), key=lambda node: node.id)),
        edges=tuple(sorted(graph.edges.values(), key=lambda edge: edge.key)),
    )


def _malformed(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "malformed map from Service Map: a node or edge is invalid"
    return f"malformed map from Service Map: {str(exc)[:200] or type(exc).__name__}"


# ------------------------------------------------------------------------------------------------
# the source
# ------------------------------------------------------------------------------------------------
class ServiceMapSource:
    """``MapSource`` over the Service Map API of the definition's workspaces."""

    def __init__(
        self,
        definition: MapSourceDefinition,
        http: httpx.Client,
        credential: TokenCredential,
        *,
        arm_endpoint: str = "https://management.azure.com",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch_size: int = DEFAULT_BATCH_SIZE,
        retry_policy: RetryPolicy | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.definition = definition
        self.page_size = max(1, min(page_size, PAGE_SIZE))
        self._http = http
        self._arm = arm_endpoint.rstrip("/")
        self._auth = TokenCredentialAuth(credential, arm_scope(arm_endpoint))
        self._clock = clock
        self.batch_size = max(1, batch_size)
        self._policy = retry_policy
        self._timeout = httpx.Timeout(float(definition.timeout_seconds), connect=10.0)
        self._by_resource = {ws.resource_id.lower(): ws for ws in definition.workspaces}

    def _base(self, workspace: Workspace) -> str:
        return f"{self._arm}{workspace.resource_id}/features/serviceMap"

    def _call(
        self, method: str, url: str, *, params: dict[str, str] | None, body: Any = None
    ) -> httpx.Response:
        return send(
            self._http,
            self._auth,
            method,
            url,
            params=params,
            json_body=body,
            policy=self._policy,
            what="Service Map",
            timeout=self._timeout,
        )

    def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code in (401, 403):
            raise MapSourceError(
                f"Service Map refused the app's identity ({error_text(response)}); it needs Log Analytics "
                "Reader on the workspace",
                status=response.status_code,
            )
        if response.status_code != 200:
            raise MapSourceError(f"{what}: {error_text(response)}", status=response.status_code)
        try:
            return response.json()
        except ValueError as exc:
            raise MapSourceError(f"{what}: the answer is not JSON") from exc

    def list_machines(self, workspace: Workspace, window: MapWindow) -> list[Mapping[str, Any]]:
        """Every machine live in ``window`` (follows ``nextLink``, at most ``MAX_PAGES`` pages)."""
        url = f"{self._base(workspace)}/machines"
        params: dict[str, str] | None = {
            "api-version": API_VERSION,
            "live": "true",
            "startTime": _iso(window.start),
            "endTime": _iso(window.end),
            "$top": str(self.page_size),
        }
        machines: list[Mapping[str, Any]] = []
        for _ in range(MAX_PAGES):
            page = self._json(self._call("GET", url, params=params), f"listing machines of {workspace.name}")
            values = page.get("value") if isinstance(page, Mapping) else None
            if not isinstance(values, list):
                raise MapSourceError(f"listing machines of {workspace.name}: the answer has no value list")
            machines += [item for item in values if isinstance(item, Mapping) and item.get("id")]
            next_link = page.get("nextLink")
            if not next_link:
                return machines
            if not str(next_link).lower().startswith(self._arm.lower() + "/"):
                raise MapSourceError("Service Map's nextLink points outside the ARM endpoint; not followed")
            url, params = str(next_link), None  # the link carries its own query
        raise MapSourceError(f"listing machines of {workspace.name}: more than {MAX_PAGES} pages")

    def _group_members(self, workspace: Workspace, window: MapWindow) -> set[str] | None:
        name = self.definition.group.machine_group
        response = self._call(
            "GET",
            f"{self._base(workspace)}/machineGroups/{name}",
            params={"api-version": API_VERSION, "startTime": _iso(window.start), "endTime": _iso(window.end)},
        )
        if response.status_code == 404:
            return None
        group = self._json(response, f"reading machine group {name}")
        members = _props(group).get("machines") if isinstance(group, Mapping) else None
        if not isinstance(members, list):
            raise MapSourceError(f"machine group {name}: the answer has no machine list")
        return {
            _ref_id(member).lower() for member in members if isinstance(member, Mapping) and member.get("id")
        }

    def servers(self) -> list[ServerRef]:
        group = self.definition.group
        now = self._clock()
        window = MapWindow(start=now - timedelta(minutes=self.definition.window_minutes), end=now)
        found: dict[str, ServerRef] = {}
        names = {name.lower() for name in group.computers}
        scope = group.scope_id.lower()
        group_found = False
        for workspace in self.definition.workspaces:
            members: set[str] | None = None
            if group.kind is ServerGroupKind.MACHINE_GROUP:
                members = self._group_members(workspace, window)
                if members is None:
                    continue
                group_found = True
            for machine in self.list_machines(workspace, window):
                mid = str(machine["id"])
                props = _props(machine)
                name = machine_name(machine)
                hosting = props.get("hosting") if isinstance(props.get("hosting"), Mapping) else {}
                resource_id = str(hosting.get("resourceId") or "") if isinstance(hosting, Mapping) else ""
                if group.kind is ServerGroupKind.COMPUTERS:
                    fqdn = str(props.get("fullyQualifiedDomainName") or "")
                    keep = bool(
                        {
                            name.lower(),
                            name.split(".")[0].lower(),
                            fqdn.lower(),
                            str(props.get("displayName") or "").lower(),
                        }
                        & names
                    )
                elif group.kind is ServerGroupKind.MACHINE_GROUP:
                    keep = members is not None and mid.lower() in members
                else:
                    keep = bool(scope) and resource_id.lower().startswith(scope + "/")
                if keep and props.get("monitoringState", "monitored") == "monitored":
                    found.setdefault(
                        mid.lower(),
                        ServerRef(
                            computer=name,
                            machine_id=mid,
                            workspace=workspace.resource_id,
                            ips=machine_ips(machine),
                            resource_id=resource_id,
                        ),
                    )
        if group.kind is ServerGroupKind.MACHINE_GROUP and not group_found:
            raise MapSourceError(f"machine group {group.machine_group} is in none of the workspaces")
        refs = sorted(found.values(), key=lambda ref: ref.computer.lower())
        if group.kind is ServerGroupKind.COMPUTERS:
            named = {ref.computer.lower() for ref in refs} | {
                ref.computer.split(".")[0].lower() for ref in refs
            }
            refs += [ServerRef(computer=name) for name in group.computers if name.lower() not in named]
        return refs

    def fetch(self, servers: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        if window.end - window.start > MAX_WINDOW:
            raise MapSourceError(
                f"the Service Map API serves at most {SERVICE_MAP_MAX_WINDOW_MINUTES} minutes per request"
            )
        by_workspace: dict[str, list[ServerRef]] = {}
        for server in servers:
            workspace = self._by_resource.get(server.workspace.lower())
            if not server.machine_id or workspace is None:
                yield ServerMapResult(
                    server=server, error="not a live Service Map machine in the workspaces during the window"
                )
                continue
            by_workspace.setdefault(workspace.resource_id.lower(), []).append(server)
        for key, members in by_workspace.items():
            workspace = self._by_resource[key]
            for start in range(0, len(members), self.batch_size):
                yield from self._fetch_batch(workspace, members[start : start + self.batch_size], window)

    def _generate(self, workspace: Workspace, request: dict[str, Any]) -> Mapping[str, Any]:
        response = self._call(
            "POST", f"{self._base(workspace)}/generateMap", params={"api-version": API_VERSION}, body=request
        )
        answer = self._json(response, "generateMap")
        if not isinstance(answer, Mapping):
            raise MapSourceError("generateMap: the answer is not an object")
        return answer

    def _fetch_batch(
        self, workspace: Workspace, batch: Sequence[ServerRef], window: MapWindow
    ) -> Iterator[ServerMapResult]:
        times = {"startTime": _iso(window.start), "endTime": _iso(window.end)}
        if len(batch) > 1:
            request = {
                "kind": "map:machine-list-dependency",
                "machineIds": [server.machine_id for server in batch],
                "filterProcesses": False,
                **times,
            }
            try:
                answer = self._generate(workspace, request)
                maps = [self._build(server, answer, window) for server in batch]
            except (MapSourceError, ValueError, TypeError, KeyError, ValidationError) as exc:
                log.warning("Service Map batch of %d failed (%s); asking per machine", len(batch), exc)
            else:
                for server, server_map in zip(batch, maps, strict=True):
                    yield ServerMapResult(server=server, map=server_map)
                return
        for server in batch:
            yield self._fetch_one(workspace, server, window, times)

    def _fetch_one(
        self, workspace: Workspace, server: ServerRef, window: MapWindow, times: dict[str, str]
    ) -> ServerMapResult:
        request = {"kind": "map:single-machine-dependency", "machineId": server.machine_id, **times}
        try:
            answer = self._generate(workspace, request)
        except MapSourceError as exc:
            return ServerMapResult(server=server, error=str(exc))
        try:
            return ServerMapResult(server=server, map=self._build(server, answer, window))
        except (ValueError, TypeError, KeyError, ValidationError) as exc:
            return ServerMapResult(server=server, error=_malformed(exc))

    def _build(self, server: ServerRef, answer: Mapping[str, Any], window: MapWindow) -> ServerMap:
        return build_server_map(
            server, answer, source=self.definition.name, window=window, imported_at=self._clock()
        )

    def check(self) -> str:
        now = self._clock()
        window = MapWindow(start=now - timedelta(minutes=SERVICE_MAP_MAX_WINDOW_MINUTES), end=now)
        counts = [len(self.list_machines(workspace, window)) for workspace in self.definition.workspaces]
        total = sum(counts)
        if total == 0:
            raise MapSourceError("Service Map lists no live machine in the last hour in these workspaces")
        return f"{total} live Service Map machines in the last hour"

    def close(self) -> None:
        return  # the HTTP client is the container's, shared with other callers
