"""The dependency-map graph: one model for every source (VM Insights, Service Map, flow logs, Migrate).

A ``ServerMap`` is the dependency map of one server over one time window: the server's machine,
its processes and the ports they listen on in the middle; client groups and remote machines that
connect in; remote machines, processes, ports and external endpoints it connects out to. Nodes and
edges carry stable ids built from what the source says (machine id or computer name, process name,
ip, port, protocol), so two imports of the same estate produce the same keys and a diff between
them is a set difference.

The JSON form (``to_json``) is the public contract of ``GET /api/maps/{server}?format=json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NodeKind(StrEnum):
    MACHINE = "machine"
    PROCESS = "process"
    PORT = "port"
    CLIENT_GROUP = "clientGroup"
    EXTERNAL = "external"


class EdgeKind(StrEnum):
    CONNECTION = "connection"  # a process (or machine) talks to a port / process / machine
    OWNS = "owns"  # a machine owns a process
    LISTENS = "listens"  # a process listens on a port


class Direction(StrEnum):
    """Seen from the mapped server: inbound connections come from clients, outbound go to dependencies."""

    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


def node_id(kind: NodeKind, *parts: str) -> str:
    """A stable node id: the kind and the identifying parts, lower-cased, joined by ``|``.

    Parts are what the source identifies the node by (machine id or computer name; machine and
    process name; machine, ip, port and protocol). Over 200 characters the tail is a hash, so the id
    stays usable as a Table Storage row key.
    """
    text = "|".join([kind.value, *(part.strip().lower() for part in parts)])
    if len(text) > 200:
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        text = f"{text[:160]}~{digest}"
    return text


class MapNode(BaseModel):
    """A machine, process, port, client group or external endpoint."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1, max_length=256)
    kind: NodeKind
    name: str = Field(min_length=1, max_length=1024, description="what people read: computer or process name")
    machine: str = Field(
        default="", description="id of the machine node this process / port / client group belongs to"
    )
    monitored: bool = Field(default=False, description="the source has agent data for it (machines)")
    ips: tuple[str, ...] = ()
    port: int | None = Field(default=None, ge=0, le=65535)
    protocol: Protocol | None = None
    properties: dict[str, str] = Field(
        default_factory=dict,
        description="source details shown in views: fqdn, os, executable, company, azure resource id...",
    )


class MapEdge(BaseModel):
    """A connection, an ownership (machine owns process) or a listening port."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    kind: EdgeKind
    port: int | None = Field(default=None, ge=0, le=65535)
    protocol: Protocol | None = None
    direction: Direction | None = None
    failed: bool = Field(default=False, description="every link of it failed in the window")
    links_established: int = Field(default=0, ge=0)
    links_terminated: int = Field(default=0, ge=0)
    links_failed: int = Field(default=0, ge=0)
    links_live: int = Field(default=0, ge=0)
    bytes_sent: int = Field(default=0, ge=0)
    bytes_received: int = Field(default=0, ge=0)
    responses: int = Field(default=0, ge=0)

    @property
    def key(self) -> str:
        """Identity of the dependency across imports (counts and byte totals are not part of it)."""
        port = "" if self.port is None else str(self.port)
        protocol = self.protocol.value if self.protocol else ""
        return f"{self.kind.value}|{self.source}|{self.target}|{port}|{protocol}"


class MapWindow(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: datetime
    end: datetime

    @model_validator(mode="after")
    def _ordered(self) -> MapWindow:
        if self.end < self.start:
            raise ValueError("window end is before its start")
        return self


class MapChanges(BaseModel):
    """Dependencies (connection edge keys) added and removed since the previous import."""

    model_config = ConfigDict(frozen=True)

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return bool(self.added or self.removed)


class ServerMap(BaseModel):
    """The dependency map of one server over one window, as one source saw it."""

    model_config = ConfigDict(frozen=True)

    server: str = Field(min_length=1, description="the server's computer name")
    machine_id: str = Field(default="", description="the source's machine id (VM Insights / Service Map)")
    source: str = Field(min_length=1, description="name of the map source definition it came from")
    source_kind: str = ""
    window: MapWindow
    imported_at: datetime
    nodes: tuple[MapNode, ...] = ()
    edges: tuple[MapEdge, ...] = ()
    changes: MapChanges = MapChanges()

    @model_validator(mode="after")
    def _edges_join_nodes(self) -> ServerMap:
        ids = {node.id for node in self.nodes}
        if len(ids) != len(self.nodes):
            raise ValueError("two nodes share an id")
        for edge in self.edges:
            if edge.source not in ids or edge.target not in ids:
                raise ValueError(f"edge {edge.key!r} names a node that is not in the map")
        return self

    @property
    def root_id(self) -> str:
        """Id of the mapped server's own machine node."""
        for node in self.nodes:
            if node.kind is NodeKind.MACHINE and node.name.lower() == self.server.lower():
                return node.id
        return ""

    def node(self, node_id_: str) -> MapNode | None:
        for node in self.nodes:
            if node.id == node_id_:
                return node
        return None

    def dependency_keys(self) -> frozenset[str]:
        return frozenset(edge.key for edge in self.edges if edge.kind is EdgeKind.CONNECTION)

    def with_changes_since(self, previous: ServerMap | None) -> ServerMap:
        """This map with ``changes`` set against ``previous`` (no previous: everything is added)."""
        return self.model_copy(update={"changes": diff(previous, self)})

    def to_json(self) -> dict[str, Any]:
        """The public JSON shape (camelCase keys), stable for other tools."""
        return {
            "server": self.server,
            "machineId": self.machine_id,
            "source": self.source,
            "sourceKind": self.source_kind,
            "window": {"start": self.window.start.isoformat(), "end": self.window.end.isoformat()},
            "importedAt": self.imported_at.isoformat(),
            "nodes": [_node_json(node) for node in self.nodes],
            "edges": [_edge_json(edge) for edge in self.edges],
            "changes": {"added": list(self.changes.added), "removed": list(self.changes.removed)},
        }


def diff(previous: ServerMap | None, current: ServerMap) -> MapChanges:
    before = previous.dependency_keys() if previous is not None else frozenset()
    after = current.dependency_keys()
    return MapChanges(added=tuple(sorted(after - before)), removed=tuple(sorted(before - after)))


def _node_json(node: MapNode) -> dict[str, Any]:
    body: dict[str, Any] = {"id": node.id, "kind": node.kind.value, "name": node.name}
    if node.machine:
        body["machine"] = node.machine
    body["monitored"] = node.monitored
    if node.ips:
        body["ips"] = list(node.ips)
    if node.port is not None:
        body["port"] = node.port
    if node.protocol is not None:
        body["protocol"] = node.protocol.value
    if node.properties:
        body["properties"] = dict(node.properties)
    return body


def _edge_json(edge: MapEdge) -> dict[str, Any]:
    return {
        "source": edge.source,
        "target": edge.target,
        "kind": edge.kind.value,
        "port": edge.port,
        "protocol": edge.protocol.value if edge.protocol else None,
        "direction": edge.direction.value if edge.direction else None,
        "failed": edge.failed,
        "linksEstablished": edge.links_established,
        "linksTerminated": edge.links_terminated,
        "linksFailed": edge.links_failed,
        "linksLive": edge.links_live,
        "bytesSent": edge.bytes_sent,
        "bytesReceived": edge.bytes_received,
        "responses": edge.responses,
    }


class DependencySummary(BaseModel):
    """Who depends on a server and what it depends on: the context an incident carries."""

    model_config = ConfigDict(frozen=True)

    server: str
    imported_at: datetime
    source: str = ""  # the map source definition the map came from
    clients: tuple[str, ...] = ()  # machines / client groups that connect in
    dependencies: tuple[str, ...] = ()  # "name:port" the server connects out to
    failed: tuple[str, ...] = ()  # outbound dependencies whose links all failed
    total_clients: int = 0  # before the lists above were cut to their limit
    total_dependencies: int = 0
    total_failed: int = 0


def summarise(server_map: ServerMap, *, limit: int = 20) -> DependencySummary:
    """The readable inbound / outbound lists of a map (each sorted, at most ``limit`` entries)."""
    by_id = {node.id: node for node in server_map.nodes}

    def owner_name(node_id_: str) -> str:
        node = by_id[node_id_]
        # a process or port stands for its machine; a client group is its own entry (its
        # ``machine`` is the server it connects to, not a client)
        if node.kind in (NodeKind.PROCESS, NodeKind.PORT) and node.machine in by_id:
            return by_id[node.machine].name
        if node.kind is NodeKind.CLIENT_GROUP:
            # unmonitored clients, grouped by port: say how many and show a few addresses
            count = node.properties.get("clients") or str(len(node.ips))
            shown_ips = ", ".join(node.ips[:3]) + (", ..." if len(node.ips) > 3 else "")
            return f"{node.name} ({count} unmonitored: {shown_ips})" if node.ips else node.name
        return node.name

    clients: set[str] = set()
    dependencies: set[str] = set()
    failed: set[str] = set()
    for edge in server_map.edges:
        if edge.kind is not EdgeKind.CONNECTION:
            continue
        if edge.direction is Direction.INBOUND:
            clients.add(owner_name(edge.source))
        elif edge.direction is Direction.OUTBOUND:
            target = owner_name(edge.target)
            label = f"{target}:{edge.port}" if edge.port is not None else target
            dependencies.add(label)
            if edge.failed:
                failed.add(label)

    def capped(values: Iterable[str]) -> tuple[str, ...]:
        return tuple(sorted(values, key=str.lower)[:limit])

    return DependencySummary(
        server=server_map.server,
        imported_at=server_map.imported_at,
        source=server_map.source,
        clients=capped(clients),
        dependencies=capped(dependencies),
        failed=capped(failed),
        total_clients=len(clients),
        total_dependencies=len(dependencies),
        total_failed=len(failed),
    )


MIGRATE_CSV_COLUMNS: tuple[str, ...] = (
    "Timeslot",
    "Source server name",
    "Source IP",
    "Source application",
    "Source process",
    "Destination server name",
    "Destination IP",
    "Destination application",
    "Destination process",
    "Destination port",
)
"""The columns of Azure Migrate's dependency export, in its order (the CSV view writes them, the
Migrate source reads them)."""


class MapStatus(StrEnum):
    """Outcome of a server's latest import, as the ``GET /api/maps`` listing shows it."""

    OK = "ok"
    FAILED = "failed"  # the latest import failed; the map shown is the previous one


class MapListing(BaseModel):
    """One row of the mapped-servers index: enough to pick a server without loading its graph."""

    model_config = ConfigDict(frozen=True)

    server: str = Field(min_length=1)
    machine_id: str = ""
    source: str = ""
    source_kind: str = ""
    status: MapStatus = MapStatus.OK
    last_error: str = ""
    imported_at: datetime | None = None
    nodes: int = Field(default=0, ge=0)
    clients: int = Field(default=0, ge=0, description="distinct machines / client groups connecting in")
    dependencies: int = Field(default=0, ge=0, description="outbound connection edges")
    failed: int = Field(default=0, ge=0, description="outbound connection edges whose links all failed")
    added: int = Field(default=0, ge=0)
    removed: int = Field(default=0, ge=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "machineId": self.machine_id,
            "source": self.source,
            "sourceKind": self.source_kind,
            "status": self.status.value,
            "lastError": self.last_error,
            "importedAt": self.imported_at.isoformat() if self.imported_at else None,
            "nodes": self.nodes,
            "clients": self.clients,
            "dependencies": self.dependencies,
            "failed": self.failed,
            "changes": {"added": self.added, "removed": self.removed},
        }


def listing_of(
    server_map: ServerMap, *, status: MapStatus = MapStatus.OK, last_error: str = ""
) -> MapListing:
    """The index row of a stored map (``status``/``last_error`` come from the latest import run)."""
    owners = {
        node.id: node.machine if node.machine and node.kind in (NodeKind.PROCESS, NodeKind.PORT) else node.id
        for node in server_map.nodes
    }
    clients: set[str] = set()
    dependencies = 0
    failed = 0
    for edge in server_map.edges:
        if edge.kind is not EdgeKind.CONNECTION:
            continue
        if edge.direction is Direction.INBOUND:
            clients.add(owners.get(edge.source, edge.source))
        elif edge.direction is Direction.OUTBOUND:
            dependencies += 1
            failed += edge.failed
    return MapListing(
        server=server_map.server,
        machine_id=server_map.machine_id,
        source=server_map.source,
        source_kind=server_map.source_kind,
        status=status,
        last_error=last_error,
        imported_at=server_map.imported_at,
        nodes=len(server_map.nodes),
        clients=len(clients),
        dependencies=dependencies,
        failed=failed,
        added=len(server_map.changes.added),
        removed=len(server_map.changes.removed),
    )
