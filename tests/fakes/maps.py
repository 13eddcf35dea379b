"""Realistic synthetic dependency maps of any size, for tests and benchmarks.

``synthetic_map(300)`` is a server with a handful of processes listening on ports, clients (machines
with processes, and client groups) connecting in, and dependencies (remote machines with processes
and ports, external endpoints) it connects out to, some of them failed; exactly ``nodes`` nodes, the
same for the same ``seed``. ``hostile=True`` names things the way an attacker (or a strange estate)
would: markup, quotes, CDATA ends, newlines, formula prefixes, unicode, 1,000-character names.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from shared_code.domain.maps import (
    Direction,
    EdgeKind,
    MapChanges,
    MapEdge,
    MapNode,
    MapWindow,
    NodeKind,
    Protocol,
    ServerMap,
    node_id,
)

IMPORTED_AT = datetime(2025, 6, 2, 9, 30, tzinfo=UTC)

HOSTILE_NAMES = (
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=1">',
    'it\'s "quoted" & <b>bold</b>',
    "]]><!-- end --><x>",
    "line one\nline two\r\nthree",
    "=cmd|' /C calc'!A0",
    "+SUM(1,2)",
    "-2+3",
    "@evil",
    "\ttabbed",
    "ünïcödé-сервер-数据库-🚀",
    "graph TD; A-->B; click A callback",
    "%%{init: {'theme':'dark'}}%%",
    "#35; `backtick` |pipe| [x] (y) {z}",
    "x" * 1000,
)

_PROCESSES = ("sqlservr", "w3wp", "nginx", "java", "dotnet", "redis-server", "postgres", "svchost", "node")
_SERVER_PORTS = (443, 80, 1433, 5432, 6379, 8080, 8443, 22, 3389, 9090)
_REMOTE_PORTS = (443, 1433, 5432, 6379, 389, 53, 88, 445, 9200, 5672, 8081, 25)


class _Builder:
    def __init__(self, server: str, seed: int, hostile: bool) -> None:
        self.rng = random.Random(seed)
        self.hostile = hostile
        self.server = server
        self.nodes: dict[str, MapNode] = {}
        self.edges: dict[str, MapEdge] = {}
        self.names = 0

    def name(self, plain: str) -> str:
        self.names += 1
        if self.hostile and self.names % 3 == 0:
            return f"{HOSTILE_NAMES[self.names // 3 % len(HOSTILE_NAMES)]} {plain}"
        return plain

    def add(self, node: MapNode) -> MapNode:
        self.nodes[node.id] = node
        return node

    def edge(self, edge: MapEdge) -> None:
        self.edges[edge.key] = edge

    def ip(self) -> str:
        return f"10.{self.rng.randrange(1, 250)}.{self.rng.randrange(1, 250)}.{self.rng.randrange(1, 250)}"


def synthetic_map(
    nodes: int = 40,
    *,
    server: str = "web-01",
    seed: int = 7,
    hostile: bool = False,
    failed_every: int = 11,
    source: str = "synthetic",
    imported_at: datetime = IMPORTED_AT,
) -> ServerMap:
    """A map of exactly ``nodes`` nodes (at least 5) around ``server``."""
    if nodes < 5:
        raise ValueError("a synthetic map needs at least 5 nodes")
    b = _Builder(server, seed, hostile)
    root = b.add(
        MapNode(
            id=node_id(NodeKind.MACHINE, server),
            kind=NodeKind.MACHINE,
            name=server,
            monitored=True,
            ips=("10.0.0.10",),
            properties={"os": "Windows Server 2022", "fqdn": f"{server}.corp.example"},
        )
    )
    process_count = max(1, min(len(_PROCESSES), nodes // 30 + 1))
    server_ports: list[MapNode] = []
    server_processes: list[MapNode] = []
    for index in range(process_count):
        process_name = b.name(_PROCESSES[index])
        process = b.add(
            MapNode(
                id=node_id(NodeKind.PROCESS, server, process_name),
                kind=NodeKind.PROCESS,
                name=process_name,
                machine=root.id,
                properties={"executable": f"C:/bin/{index}.exe"},
            )
        )
        server_processes.append(process)
        b.edge(MapEdge(source=root.id, target=process.id, kind=EdgeKind.OWNS))
        port_number = _SERVER_PORTS[index % len(_SERVER_PORTS)]
        port = b.add(
            MapNode(
                id=node_id(NodeKind.PORT, server, "10.0.0.10", str(port_number), "tcp"),
                kind=NodeKind.PORT,
                name=str(port_number),
                machine=root.id,
                ips=("10.0.0.10",),
                port=port_number,
                protocol=Protocol.TCP,
            )
        )
        server_ports.append(port)
        b.edge(
            MapEdge(
                source=process.id,
                target=port.id,
                kind=EdgeKind.LISTENS,
                port=port_number,
                protocol=Protocol.TCP,
            )
        )
    budget = nodes - len(b.nodes)
    inbound_budget = budget * 2 // 5
    connections = 0

    def connect(source_id: str, target_id: str, port: int, direction: Direction) -> None:
        nonlocal connections
        connections += 1
        failed = failed_every > 0 and connections % failed_every == 0
        links = b.rng.randrange(1, 60)
        b.edge(
            MapEdge(
                source=source_id,
                target=target_id,
                kind=EdgeKind.CONNECTION,
                port=port,
                protocol=Protocol.TCP,
                direction=direction,
                failed=failed,
                links_established=0 if failed else links,
                links_failed=links if failed else 0,
                bytes_sent=links * 1500,
                bytes_received=links * 9000,
                responses=links * 3,
            )
        )

    client = 0
    while inbound_budget > 0:
        client += 1
        port = server_ports[client % len(server_ports)]
        if inbound_budget == 1 or client % 5 == 0:
            group_name = b.name(f"clients of {port.name}")
            group = b.add(
                MapNode(
                    id=node_id(NodeKind.CLIENT_GROUP, server, port.name, str(client)),
                    kind=NodeKind.CLIENT_GROUP,
                    name=group_name,
                    machine=root.id,
                    properties={"members": str(b.rng.randrange(2, 40))},
                )
            )
            connect(group.id, port.id, port.port or 0, Direction.INBOUND)
            inbound_budget -= 1
            continue
        machine_name = b.name(f"client-{client:04d}")
        machine = b.add(
            MapNode(
                id=node_id(NodeKind.MACHINE, machine_name),
                kind=NodeKind.MACHINE,
                name=machine_name,
                monitored=client % 2 == 0,
                ips=(b.ip(),),
            )
        )
        process_name = b.name(("chrome", "java", "python", "curl")[client % 4])
        process = b.add(
            MapNode(
                id=node_id(NodeKind.PROCESS, machine_name, process_name),
                kind=NodeKind.PROCESS,
                name=process_name,
                machine=machine.id,
            )
        )
        b.edge(MapEdge(source=machine.id, target=process.id, kind=EdgeKind.OWNS))
        connect(process.id, port.id, port.port or 0, Direction.INBOUND)
        inbound_budget -= 2

    remote = 0
    while len(b.nodes) < nodes:
        remote += 1
        left = nodes - len(b.nodes)
        process = server_processes[remote % len(server_processes)]
        port_number = _REMOTE_PORTS[remote % len(_REMOTE_PORTS)]
        if left < 3 or remote % 7 == 0:
            external_name = b.name(f"api{remote}.partner.example")
            external = b.add(
                MapNode(
                    id=node_id(NodeKind.EXTERNAL, external_name, str(port_number)),
                    kind=NodeKind.EXTERNAL,
                    name=external_name,
                    ips=(f"203.0.113.{remote % 250}",),
                    port=port_number,
                    protocol=Protocol.TCP,
                )
            )
            connect(process.id, external.id, port_number, Direction.OUTBOUND)
            continue
        machine_name = b.name(f"dep-{remote:04d}")
        ip = b.ip()
        machine = b.add(
            MapNode(
                id=node_id(NodeKind.MACHINE, machine_name),
                kind=NodeKind.MACHINE,
                name=machine_name,
                monitored=remote % 3 != 0,
                ips=(ip,),
            )
        )
        remote_process_name = b.name(_PROCESSES[remote % len(_PROCESSES)])
        remote_process = b.add(
            MapNode(
                id=node_id(NodeKind.PROCESS, machine_name, remote_process_name),
                kind=NodeKind.PROCESS,
                name=remote_process_name,
                machine=machine.id,
            )
        )
        b.edge(MapEdge(source=machine.id, target=remote_process.id, kind=EdgeKind.OWNS))
        remote_port = b.add(
            MapNode(
                id=node_id(NodeKind.PORT, machine_name, ip, str(port_number), "tcp"),
                kind=NodeKind.PORT,
                name=str(port_number),
                machine=machine.id,
                ips=(ip,),
                port=port_number,
                protocol=Protocol.TCP,
            )
        )
        b.edge(
            MapEdge(
                source=remote_process.id,
                target=remote_port.id,
                kind=EdgeKind.LISTENS,
                port=port_number,
                protocol=Protocol.TCP,
            )
        )
        connect(process.id, remote_port.id, port_number, Direction.OUTBOUND)

    built = ServerMap(
        server=server,
        machine_id=f"m-{seed:04d}",
        source=source,
        source_kind="vminsights",
        window=MapWindow(start=imported_at - timedelta(hours=1), end=imported_at),
        imported_at=imported_at,
        nodes=tuple(b.nodes.values()),
        edges=tuple(b.edges.values()),
    )
    keys = sorted(built.dependency_keys())
    return built.model_copy(
        update={
            "changes": MapChanges(
                added=tuple(keys[:3]), removed=(f"connection|{root.id}|machine|gone-01|1433|tcp",)
            )
        }
    )
