"""What an incident says of its server's map: ``domain.maps.summarise``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
    summarise,
)

AT = datetime(2026, 11, 1, 12, tzinfo=UTC)


def test_clients_dependencies_and_failed_ones_are_named_by_machine_and_port() -> None:
    web = node_id(NodeKind.MACHINE, "web01")
    nginx = node_id(NodeKind.PROCESS, "web01", "nginx")
    port = node_id(NodeKind.PORT, "web01", "10.0.0.4", "443", "tcp")
    db = node_id(NodeKind.MACHINE, "db01")
    db_port = node_id(NodeKind.PORT, "db01", "10.0.0.9", "5432", "tcp")
    group = node_id(NodeKind.CLIENT_GROUP, "web01", "443", "tcp")
    app = node_id(NodeKind.MACHINE, "app01")
    nodes = (
        MapNode(id=web, kind=NodeKind.MACHINE, name="web01", monitored=True),
        MapNode(id=nginx, kind=NodeKind.PROCESS, name="nginx", machine=web),
        MapNode(id=port, kind=NodeKind.PORT, name="443/tcp", machine=web, port=443, protocol=Protocol.TCP),
        MapNode(id=db, kind=NodeKind.MACHINE, name="db01", monitored=True),
        MapNode(id=db_port, kind=NodeKind.PORT, name="5432/tcp", machine=db, port=5432),
        MapNode(
            id=group,
            kind=NodeKind.CLIENT_GROUP,
            name="Clients of :443",
            machine=web,
            ips=("198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"),
            properties={"clients": "4"},
        ),
        MapNode(id=app, kind=NodeKind.MACHINE, name="app01", monitored=True),
    )
    edges = (
        MapEdge(source=group, target=port, kind=EdgeKind.CONNECTION, port=443, direction=Direction.INBOUND),
        MapEdge(source=app, target=port, kind=EdgeKind.CONNECTION, port=443, direction=Direction.INBOUND),
        MapEdge(
            source=nginx,
            target=db_port,
            kind=EdgeKind.CONNECTION,
            port=5432,
            direction=Direction.OUTBOUND,
            failed=True,
        ),
        MapEdge(source=web, target=nginx, kind=EdgeKind.OWNS),
    )
    server_map = ServerMap(
        server="web01",
        source="vmi",
        window=MapWindow(start=AT - timedelta(hours=1), end=AT),
        imported_at=AT,
        nodes=nodes,
        edges=edges,
    )
    summary = summarise(server_map)
    assert summary.clients == (
        "app01",
        "Clients of :443 (4 unmonitored: 198.51.100.1, 198.51.100.2, 198.51.100.3, ...)",
    )
    assert summary.dependencies == ("db01:5432",)
    assert summary.failed == ("db01:5432",)
    assert (summary.total_clients, summary.total_dependencies, summary.total_failed) == (2, 1, 1)
    assert "web01" not in summary.clients  # the server is never its own client
