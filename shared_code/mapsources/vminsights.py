"""The VM Insights Map tables as a map source: VMComputer, VMProcess, VMConnection, VMBoundPort.

What the Dependency Agent reports (the documented model, kept as it is):

* ``VMConnection``: one row per logical connection per minute (a 1-minute aggregate): the
  reporting ``Machine`` and ``Process``, ``Direction`` (inbound / outbound), ``SourceIp``,
  ``DestinationIp``, ``DestinationPort``, ``Protocol``, ``RemoteIp`` (the other side) and the
  counters ``LinksEstablished`` / ``LinksTerminated`` / ``LinksFailed`` / ``LinksLive``,
  ``BytesSent`` / ``BytesReceived``, ``Responses``;
* ``VMComputer``: one inventory row per machine and hour (``Computer``, ``DisplayName``,
  ``Ipv4Addresses``, ``DnsNames``, OS, Azure resource id);
* ``VMProcess``: one inventory row per process and hour (``ExecutableName``, ``DisplayName``,
  company, product);
* ``VMBoundPort``: the ports processes listen on (``Machine``, ``Process``, ``Ip``, ``Port``,
  ``Protocol``; ``Ip`` is 0.0.0.0 / :: for a wildcard bind).

One query per batch of servers (``vminsights-map``) returns all four, tagged by ``RowKind``:

* ``connection``: VMConnection rows of the batch's machines in the window, summed per logical
  connection over the window (``LinksLive`` is the peak, not a sum: it is a level, not a count);
* ``machine``: the newest VMComputer row of each batch machine and of every machine owning one of
  the connections' remote IPs (how a remote IP is resolved to a monitored machine);
* ``port``: the bound ports of the batch machines and of resolved remote machines on the
  connections' destination ports (how the remote process behind a connection is found);
* ``process``: the newest VMProcess row of every process those rows name.

The pure function ``build_maps`` turns those rows into one ``ServerMap`` per server. Inbound
clients that are not monitored become one client group per local port; unresolved remote IPs of
outbound connections become external endpoints. A connection whose every link failed in the window
is marked failed. Command lines are never read (they may carry secrets).

These tables retire with the Dependency Agent on 30 June 2028; see docs/maps-sources.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

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
from shared_code.domain.mapsources import MapSourceDefinition, ServerGroupKind, ServerMapResult, ServerRef
from shared_code.errors import MapSourceError
from shared_code.mapsources.logquery import (
    LogQueryRunner,
    batch_answer,
    in_batches,
    is_ip,
    kql_datetime,
    kql_list,
    kql_string,
    row_count,
    row_text,
)

log = logging.getLogger(__name__)

SERVERS_TEMPLATE = "itsm-connector:vminsights-servers v1"
MAP_TEMPLATE = "itsm-connector:vminsights-map v1"
CHECK_TEMPLATE = "itsm-connector:vminsights-check v1"
INVENTORY_LOOKBACK = timedelta(hours=1)
"""VMComputer / VMProcess rows come about hourly: look that far before the window for them."""
DEFAULT_BATCH_SIZE = 50
MAX_CLIENT_IPS = 50
WILDCARD_IPS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - a value read from data, not a bind


def servers_query(group_computers: Sequence[str], scope: str, start: datetime, end: datetime) -> str:
    """The members of a server group with their machine ids and IPs (newest VMComputer row)."""
    return f"""// {SERVERS_TEMPLATE}
let computers = {kql_list(group_computers)};
let scope = {kql_string(scope)};
let inventoryStart = {kql_datetime(start)};
let windowEnd = {kql_datetime(end)};
VMComputer
| where TimeGenerated >= inventoryStart and TimeGenerated < windowEnd
| extend ShortName = tostring(split(Computer, ".")[0])
| where (array_length(computers) > 0 and (Computer in~ (computers) or ShortName in~ (computers)
    or DisplayName in~ (computers) or HostName in~ (computers)))
    or (strlen(scope) > 0 and AzureResourceId startswith scope)
| summarize arg_max(TimeGenerated, Computer, DisplayName, Ipv4Addresses, AzureResourceId) by Machine
| project Machine, Computer, DisplayName, Ipv4Addresses, AzureResourceId
"""


def map_query(machine_ids: Sequence[str], window: MapWindow) -> str:
    """Connections, machines, bound ports and processes of a batch of machines in one answer."""
    return f"""// {MAP_TEMPLATE}
let machineIds = {kql_list(machine_ids)};
let windowStart = {kql_datetime(window.start)};
let windowEnd = {kql_datetime(window.end)};
let inventoryStart = {kql_datetime(window.start - INVENTORY_LOOKBACK)};
let links = VMConnection
| where TimeGenerated >= windowStart and TimeGenerated < windowEnd and Machine in (machineIds)
| summarize LinksEstablished = sum(LinksEstablished), LinksTerminated = sum(LinksTerminated),
    LinksFailed = sum(LinksFailed), LinksLive = max(LinksLive), BytesSent = sum(BytesSent),
    BytesReceived = sum(BytesReceived), Responses = sum(Responses)
    by Machine, Direction, Process, ProcessName, SourceIp, DestinationIp, DestinationPort, Protocol, RemoteIp;
let remoteIps = toscalar(links | summarize make_set(RemoteIp));
let outboundPorts = toscalar(links | where Direction == "outbound" | summarize make_set(DestinationPort));
let computers = VMComputer
| where TimeGenerated >= inventoryStart and TimeGenerated < windowEnd
| summarize arg_max(TimeGenerated, Computer, DisplayName, Ipv4Addresses, DnsNames, OperatingSystemFullName,
    AzureResourceId) by Machine
| where Machine in (machineIds) or array_length(set_intersect(Ipv4Addresses, remoteIps)) > 0;
let known = computers | project Machine;
let ports = VMBoundPort
| where TimeGenerated >= inventoryStart and TimeGenerated < windowEnd
| where Machine in (known) and (Machine in (machineIds) or Port in (outboundPorts))
| summarize by Machine, Process, ProcessName, Ip, Port, Protocol;
let processIds = toscalar(union (links | project Process), (ports | project Process)
    | summarize make_set(Process));
let processes = VMProcess
| where TimeGenerated >= inventoryStart and TimeGenerated < windowEnd and Process in (processIds)
| summarize arg_max(TimeGenerated, Machine, ExecutableName, DisplayName, CompanyName, ProductName) by Process;
union
    (links | extend RowKind = "connection"),
    (computers | project-away TimeGenerated | extend RowKind = "machine"),
    (ports | extend RowKind = "port"),
    (processes | project-away TimeGenerated | extend RowKind = "process")
"""


def check_query(start: datetime, end: datetime) -> str:
    """How many machines reported VM Insights Map data lately: proves access and data."""
    return f"""// {CHECK_TEMPLATE}
let windowStart = {kql_datetime(start)};
let windowEnd = {kql_datetime(end)};
VMComputer
| where TimeGenerated >= windowStart and TimeGenerated < windowEnd
| summarize Machines = dcount(Machine)
"""


# ------------------------------------------------------------------------------------------------
# rows -> graph (pure)
# ------------------------------------------------------------------------------------------------
def _port(row: Mapping[str, Any], name: str) -> int:
    value = row.get(name)
    if value is None or value == "":
        raise ValueError(f"{name} is missing")
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{name} is not a port number")
    return number


def _protocol(row: Mapping[str, Any]) -> Protocol:
    text = row_text(row, "Protocol").lower()
    if text not in ("tcp", "udp"):
        raise ValueError("Protocol is neither tcp nor udp")
    return Protocol(text)


def _strings(value: Any) -> tuple[str, ...]:
    """A dynamic array column (a list, or its JSON text) as strings."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        import json  # noqa: PLC0415 - rare: the SDK usually parses dynamic columns already

        try:
            value = json.loads(value)
        except ValueError:
            return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(item) for item in value if item not in (None, ""))
    return (str(value),)


@dataclass
class _Counters:
    established: int = 0
    terminated: int = 0
    failed: int = 0
    live: int = 0
    sent: int = 0
    received: int = 0
    responses: int = 0

    def add(self, row: Mapping[str, Any]) -> None:
        self.established += row_count(row, "LinksEstablished")
        self.terminated += row_count(row, "LinksTerminated")
        self.failed += row_count(row, "LinksFailed")
        self.live = max(self.live, row_count(row, "LinksLive"))
        self.sent += row_count(row, "BytesSent")
        self.received += row_count(row, "BytesReceived")
        self.responses += row_count(row, "Responses")


@dataclass
class _PendingEdge:
    kind: EdgeKind
    source: str
    target: str
    port: int | None
    protocol: Protocol | None
    direction: Direction | None
    counts: _Counters = field(default_factory=_Counters)


@dataclass
class _Inventory:
    """The batch's machine, port and process rows, indexed for the per-server build."""

    machines: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    by_ip: dict[str, list[str]] = field(default_factory=dict)
    ports: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)  # machine -> rows
    processes: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    connections: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)  # machine -> rows
    problems: list[str] = field(default_factory=list)


def index_rows(rows: Iterable[Mapping[str, Any]]) -> _Inventory:
    """Sort the union's rows by kind; rows that cannot be attributed are counted as problems."""
    inventory = _Inventory()
    for row in rows:
        kind = row_text(row, "RowKind")
        machine = row_text(row, "Machine")
        if kind == "connection":
            if not machine:
                inventory.problems.append("a connection row has no Machine")
                continue
            inventory.connections.setdefault(machine.lower(), []).append(row)
        elif kind == "machine":
            if not machine:
                inventory.problems.append("a machine row has no Machine")
                continue
            inventory.machines[machine.lower()] = row
            for ip in _strings(row.get("Ipv4Addresses")):
                owners = inventory.by_ip.setdefault(ip, [])
                if machine.lower() not in owners:
                    owners.append(machine.lower())
        elif kind == "port":
            if machine:
                inventory.ports.setdefault(machine.lower(), []).append(row)
        elif kind == "process":
            process = row_text(row, "Process")
            if process:
                inventory.processes[process.lower()] = row
        else:
            inventory.problems.append("a row has no known RowKind")
    for owners in inventory.by_ip.values():
        owners.sort()
    return inventory


class _MapBuilder:
    """Nodes and edges of one server's map, merged by id / key as rows arrive."""

    def __init__(self, inventory: _Inventory) -> None:
        self.inventory = inventory
        self.nodes: dict[str, MapNode] = {}
        self.edges: dict[tuple[Any, ...], _PendingEdge] = {}
        self.client_ips: dict[str, set[str]] = {}

    def machine(self, machine: str, *, fallback_name: str = "") -> str:
        row = self.inventory.machines.get(machine.lower(), {})
        nid = node_id(NodeKind.MACHINE, machine)
        if nid not in self.nodes:
            name = row_text(row, "Computer") or row_text(row, "DisplayName") or fallback_name or machine
            properties = {"machineId": machine}
            for column, key in (
                ("DisplayName", "displayName"),
                ("OperatingSystemFullName", "os"),
                ("AzureResourceId", "azureResourceId"),
            ):
                if row_text(row, column):
                    properties[key] = row_text(row, column)
            dns = _strings(row.get("DnsNames"))
            if dns:
                properties["dnsNames"] = ", ".join(dns[:10])
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.MACHINE,
                name=name,
                monitored=bool(row),
                ips=_strings(row.get("Ipv4Addresses"))[:20],
                properties=properties,
            )
        return nid

    def process(self, machine_node: str, machine: str, process: str, fallback_name: str) -> str:
        nid = node_id(NodeKind.PROCESS, machine, process)
        if nid not in self.nodes:
            row = self.inventory.processes.get(process.lower(), {})
            name = row_text(row, "DisplayName") or row_text(row, "ExecutableName") or fallback_name or process
            properties = {"processId": process}
            for column, key in (
                ("ExecutableName", "executable"),
                ("CompanyName", "company"),
                ("ProductName", "product"),
            ):
                if row_text(row, column):
                    properties[key] = row_text(row, column)
            self.nodes[nid] = MapNode(
                id=nid, kind=NodeKind.PROCESS, name=name, machine=machine_node, properties=properties
            )
            self.edge(EdgeKind.OWNS, machine_node, nid)
        return nid

    def port(self, machine_node: str, machine: str, ip: str, port: int, protocol: Protocol) -> str:
        nid = node_id(NodeKind.PORT, machine, ip, str(port), protocol.value)
        if nid not in self.nodes:
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.PORT,
                name=f"{ip}:{port}" if ip and ip not in WILDCARD_IPS else f":{port}",
                machine=machine_node,
                ips=(ip,) if ip else (),
                port=port,
                protocol=protocol,
            )
        return nid

    def bound_port(self, machine: str, ip: str, port: int, protocol: Protocol) -> Mapping[str, Any] | None:
        """The machine's VMBoundPort row for ``port``: the exact IP first, else a wildcard bind."""
        wildcard = None
        for row in self.inventory.ports.get(machine.lower(), []):
            try:
                if _port(row, "Port") != port or _protocol(row) is not protocol:
                    continue
            except ValueError:
                continue
            bound_ip = row_text(row, "Ip")
            if bound_ip == ip:
                return row
            if bound_ip in WILDCARD_IPS:
                wildcard = row
        return wildcard

    def listening(self, machine_node: str, machine: str, row: Mapping[str, Any]) -> str:
        """The port node of a bound-port row, with its process listening on it."""
        port_node = self.port(machine_node, machine, row_text(row, "Ip"), _port(row, "Port"), _protocol(row))
        process = row_text(row, "Process")
        if process:
            process_node = self.process(machine_node, machine, process, row_text(row, "ProcessName"))
            self.edge(EdgeKind.LISTENS, process_node, port_node)
        return port_node

    def external(self, ip: str) -> str:
        nid = node_id(NodeKind.EXTERNAL, ip)
        if nid not in self.nodes:
            self.nodes[nid] = MapNode(id=nid, kind=NodeKind.EXTERNAL, name=ip, ips=(ip,))
        return nid

    def client_group(self, machine_node: str, machine: str, port: int, protocol: Protocol, ip: str) -> str:
        nid = node_id(NodeKind.CLIENT_GROUP, machine, str(port), protocol.value)
        if nid not in self.nodes:
            self.nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.CLIENT_GROUP,
                name=f"Clients of :{port}",
                machine=machine_node,
                port=port,
                protocol=protocol,
            )
        if ip:
            self.client_ips.setdefault(nid, set()).add(ip)
        return nid

    def edge(
        self,
        kind: EdgeKind,
        source: str,
        target: str,
        *,
        port: int | None = None,
        protocol: Protocol | None = None,
        direction: Direction | None = None,
        counters: Mapping[str, Any] | None = None,
    ) -> None:
        # the same identity as MapEdge.key, without building a model per row
        key = (kind, source, target, port, protocol)
        known = self.edges.get(key)
        if known is None:
            known = _PendingEdge(kind, source, target, port, protocol, direction)
            self.edges[key] = known
        if counters is not None:
            known.counts.add(counters)

    def _with_clients(self, node: MapNode) -> MapNode:
        ips = self.client_ips.get(node.id)
        if not ips:
            return node
        ordered = tuple(sorted(ips))
        return MapNode(
            id=node.id,
            kind=node.kind,
            name=node.name,
            machine=node.machine,
            port=node.port,
            protocol=node.protocol,
            ips=ordered[:MAX_CLIENT_IPS],
            properties={**node.properties, "clients": str(len(ordered))},
        )

    @staticmethod
    def _finish(edge: _PendingEdge) -> MapEdge:
        """The edge model, built without a second validation: every value was checked as it was
        read (``_port``, ``_count``, ``_protocol``) and the ids come from ``node_id``; the map's own
        validator still checks that each edge joins two of its nodes. A third of the mapping time
        went into re-validating what was already valid."""
        counts = edge.counts
        if edge.kind is not EdgeKind.CONNECTION:
            return MapEdge.model_construct(source=edge.source, target=edge.target, kind=edge.kind)
        return MapEdge.model_construct(
            source=edge.source,
            target=edge.target,
            kind=edge.kind,
            port=edge.port,
            protocol=edge.protocol,
            direction=edge.direction,
            failed=counts.failed > 0 and counts.established == 0,
            links_established=counts.established,
            links_terminated=counts.terminated,
            links_failed=counts.failed,
            links_live=counts.live,
            bytes_sent=counts.sent,
            bytes_received=counts.received,
            responses=counts.responses,
        )

    def result(self, server: ServerRef, machine_id: str, **fields: Any) -> ServerMap:
        nodes = [self._with_clients(node) for node in self.nodes.values()]
        edges = [self._finish(edge) for edge in self.edges.values()]
        nodes.sort(key=lambda node: node.id)
        edges.sort(key=lambda edge: edge.key)
        return ServerMap(
            server=server.computer, machine_id=machine_id, nodes=tuple(nodes), edges=tuple(edges), **fields
        )


def build_server_map(
    server: ServerRef,
    inventory: _Inventory,
    *,
    source: str,
    source_kind: str,
    window: MapWindow,
    imported_at: datetime,
) -> ServerMap:
    """One server's map from the indexed rows (raises ValueError / ValidationError on bad rows)."""
    machine = server.machine_id
    builder = _MapBuilder(inventory)
    root = builder.machine(machine, fallback_name=server.computer)
    for row in inventory.ports.get(machine.lower(), []):
        builder.listening(root, machine, row)
    for row in inventory.connections.get(machine.lower(), []):
        direction = row_text(row, "Direction").lower()
        protocol = _protocol(row)
        port = _port(row, "DestinationPort")
        process = row_text(row, "Process")
        local = builder.process(root, machine, process, row_text(row, "ProcessName")) if process else root
        remote_ip = row_text(row, "RemoteIp")
        owners = [owner for owner in inventory.by_ip.get(remote_ip, []) if owner != machine.lower()]
        if direction == "outbound":
            destination_ip = row_text(row, "DestinationIp") or remote_ip
            if owners:
                remote_machine = row_text(inventory.machines[owners[0]], "Machine") or owners[0]
                remote_node = builder.machine(remote_machine)
                bound = builder.bound_port(remote_machine, destination_ip, port, protocol)
                if bound is not None:
                    target = builder.listening(remote_node, remote_machine, bound)
                else:
                    target = builder.port(remote_node, remote_machine, destination_ip, port, protocol)
            else:
                if not is_ip(remote_ip or destination_ip):
                    raise ValueError("an outbound connection has no usable remote IP")
                target = builder.external(remote_ip or destination_ip)
            builder.edge(
                EdgeKind.CONNECTION,
                local,
                target,
                port=port,
                protocol=protocol,
                direction=Direction.OUTBOUND,
                counters=row,
            )
        elif direction == "inbound":
            local_ip = row_text(row, "DestinationIp")
            bound = builder.bound_port(machine, local_ip, port, protocol)
            if bound is not None:
                target = builder.listening(root, machine, bound)
            else:
                target = builder.port(root, machine, local_ip, port, protocol)
                if local != root:
                    builder.edge(EdgeKind.LISTENS, local, target)
            if owners:
                client = builder.machine(row_text(inventory.machines[owners[0]], "Machine") or owners[0])
            else:
                client = builder.client_group(
                    root, machine, port, protocol, remote_ip or row_text(row, "SourceIp")
                )
            builder.edge(
                EdgeKind.CONNECTION,
                client,
                target,
                port=port,
                protocol=protocol,
                direction=Direction.INBOUND,
                counters=row,
            )
        else:
            raise ValueError("a connection row's Direction is neither inbound nor outbound")
    return builder.result(
        server, machine, source=source, source_kind=source_kind, window=window, imported_at=imported_at
    )


def build_maps(
    rows: Iterable[Mapping[str, Any]],
    servers: Sequence[ServerRef],
    *,
    source: str,
    window: MapWindow,
    imported_at: datetime,
    partial_error: str = "",
) -> list[ServerMapResult]:
    """One result per server of the batch from the ``vminsights-map`` rows."""
    inventory = index_rows(rows)
    warnings: tuple[str, ...] = ()
    if partial_error:
        warnings = (f"partial data from Log Analytics: {partial_error}",)
    if inventory.problems:
        warnings += (f"malformed rows skipped: {'; '.join(sorted(set(inventory.problems)))[:300]}",)
    results = []
    for server in servers:
        if not server.machine_id:
            results.append(ServerMapResult(server=server, error=_NOT_REPORTING))
            continue
        try:
            server_map = build_server_map(
                server,
                inventory,
                source=source,
                source_kind="vminsights",
                window=window,
                imported_at=imported_at,
            )
        except (ValueError, TypeError, KeyError, ValidationError) as exc:
            results.append(
                ServerMapResult(server=server, error=f"malformed data from Log Analytics: {_short(exc)}")
            )
            continue
        results.append(ServerMapResult(server=server, map=server_map, warnings=warnings))
    return results


_NOT_REPORTING = (
    "no VM Insights data for this computer in the workspaces (no VMComputer row in the last hours: "
    "is the Dependency Agent installed and reporting?)"
)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        if errors:
            return f"{'.'.join(str(p) for p in errors[0]['loc'])}: {errors[0]['msg']}"[:200]
        return "invalid"
    return str(exc)[:200] or type(exc).__name__


# ------------------------------------------------------------------------------------------------
# the source
# ------------------------------------------------------------------------------------------------
class VmInsightsSource:
    """``MapSource`` over the VM Insights Map tables of the definition's workspaces."""

    def __init__(
        self,
        definition: MapSourceDefinition,
        runner: LogQueryRunner,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.definition = definition
        self._runner = runner
        self._clock = clock
        self.batch_size = max(1, batch_size)
        self._workspaces = [workspace.customer_id for workspace in definition.workspaces]

    def servers(self) -> list[ServerRef]:
        group = self.definition.group
        end = self._clock()
        start = end - max(INVENTORY_LOOKBACK * 2, timedelta(minutes=self.definition.window_minutes))
        computers = list(group.computers) if group.kind is ServerGroupKind.COMPUTERS else []
        scope = group.scope_id if group.kind is not ServerGroupKind.COMPUTERS else ""
        answer = self._runner.query(
            self._workspaces, servers_query(computers, scope, start, end), start=start, end=end
        )
        if answer.partial_error:
            raise MapSourceError(f"the server list is incomplete: {answer.partial_error}")
        found: dict[str, ServerRef] = {}
        for row in answer.rows:
            machine = row_text(row, "Machine")
            name = row_text(row, "Computer") or row_text(row, "DisplayName")
            if not machine or not name:
                continue
            found[machine.lower()] = ServerRef(
                computer=name,
                machine_id=machine,
                workspace=self._workspaces[0],
                ips=_strings(row.get("Ipv4Addresses"))[:20],
                resource_id=row_text(row, "AzureResourceId"),
            )
        refs = sorted(found.values(), key=lambda ref: ref.computer.lower())
        if group.kind is ServerGroupKind.COMPUTERS:
            named = {ref.computer.lower() for ref in refs} | {
                ref.computer.split(".")[0].lower() for ref in refs
            }
            for name in group.computers:
                if name.lower() not in named:
                    refs.append(ServerRef(computer=name, workspace=self._workspaces[0]))
        return refs

    def fetch(self, servers: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        return in_batches(
            servers,
            window,
            max_window_minutes=self.definition.max_window_minutes,
            usable=lambda server: bool(server.machine_id),
            unusable=_NOT_REPORTING,
            batch_size=self.batch_size,
            fetch_batch=lambda batch: self._fetch_batch(batch, window),
        )

    def _fetch_batch(self, batch: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        try:
            query = map_query([server.machine_id for server in batch], window)
        except ValueError:
            for server in batch:
                yield ServerMapResult(server=server, error="the machine id cannot be used in a query")
            return
        answer = batch_answer(
            self._runner,
            self._workspaces,
            query,
            batch,
            start=window.start - INVENTORY_LOOKBACK,
            end=window.end,
            what="VM Insights",
        )
        if isinstance(answer, list):
            yield from answer
            return
        yield from build_maps(
            answer.rows,
            batch,
            source=self.definition.name,
            window=window,
            imported_at=self._clock(),
            partial_error=answer.partial_error,
        )

    def check(self) -> str:
        end = self._clock()
        start = end - timedelta(hours=24)
        answer = self._runner.query(self._workspaces, check_query(start, end), start=start, end=end)
        machines = row_count(answer.rows[0], "Machines") if answer.rows else 0
        if machines == 0:
            raise MapSourceError(
                "no VMComputer rows in the last 24 hours: VM Insights Map data is not collected in "
                "these workspaces (Dependency Agent and the VM Insights data collection rule with "
                "processes and dependencies)"
            )
        return f"{machines} machines reported VM Insights Map data in the last 24 hours"

    def close(self) -> None:
        self._runner.close()
