"""Pure parts of the map sources: definitions, and rows / answers -> graph with dict payloads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared_code.domain.maps import Direction, EdgeKind, MapWindow, NodeKind, Protocol
from shared_code.domain.mapsources import MapSourceDefinition, ServerGroupKind
from shared_code.errors import InvalidInputError
from shared_code.mapsources import flowlogs, servicemap, vminsights
from shared_code.mapsources.logquery import kql_list, kql_string
from shared_code.ports.maps import ServerMapResult, ServerRef

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
WINDOW = MapWindow(start=NOW - timedelta(hours=1), end=NOW)
SUB = "6e0c4b1a-0000-4000-8000-0000000000aa"
WS = f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.OperationalInsights/workspaces/ws-one"
GUID = "11111111-2222-3333-4444-555555555555"


def _parse(**fields: Any) -> MapSourceDefinition:
    data: dict[str, Any] = {
        "name": "maps-1",
        "kind": "vminsights",
        "workspaces": [{"resource_id": WS, "customer_id": GUID}],
        "group": {"computers": ["web01"]},
    }
    data.update(fields)
    return MapSourceDefinition.parse(data)


# -- definitions -----------------------------------------------------------------------------------
def test_definition_defaults_and_normalised_workspace() -> None:
    definition = _parse(
        workspaces=[
            {"resource_id": WS.upper().replace("WORKSPACES", "workspaces"), "customer_id": GUID.upper()}
        ]
    )
    workspace = definition.workspaces[0]
    assert workspace.customer_id == GUID
    assert workspace.subscription_id == SUB
    assert workspace.resource_id.endswith("/providers/Microsoft.OperationalInsights/workspaces/WS-ONE")
    assert (definition.window_minutes, definition.enabled, definition.timeout_seconds) == (60, True, 120)
    assert definition.window_ending(NOW) == WINDOW


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "servicemap", "window_minutes": 61}, "window_minutes is at most 60"),
        ({"window_minutes": 1441}, "less than or equal to 1440"),
        ({"workspaces": [{"resource_id": WS}]}, "customer_id (the workspace ID) is required"),
        ({"workspaces": []}, "needs at least one workspace"),
        (
            {"group": {"kind": "machineGroup", "machine_group": GUID}},
            "machine groups exist only in Service Map",
        ),
        ({"group": {"computers": []}}, "the server group is empty"),
        ({"group": {"kind": "resourceGroup", "scope": "/subscriptions/nope"}}, "scope must be"),
        ({"group": {"computers": ['web"01']}}, "entry 1 is not a computer name"),
        ({"kind": "migrate"}, "takes no workspace"),
        ({"name": "no spaces"}, "name: use 1-50 letters"),
        ({"timeout_seconds": 601}, "timeout_seconds"),
        ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
    ],
)
def test_definition_refuses_what_it_cannot_use(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid map source") as caught:
        _parse(**fields)
    assert message in str(caught.value)


def test_definition_errors_do_not_echo_values() -> None:
    secret = "s3cr3t-value-that-must-not-leak"
    with pytest.raises(InvalidInputError) as caught:
        _parse(workspaces=[{"resource_id": f"/subscriptions/{secret}", "customer_id": secret}])
    assert secret not in str(caught.value)
    assert "workspaces.0.resource_id" in str(caught.value)
    assert "workspaces.0.customer_id" in str(caught.value)


def test_groups_of_each_kind() -> None:
    names = _parse(group={"computers": ["web01", "WEB01", " db01 "]}).group
    assert names.computers == ("web01", "db01")
    scope = _parse(group={"kind": "subscription", "scope": f"/subscriptions/{SUB.upper()}/"}).group
    assert (scope.kind, scope.scope_id) == (ServerGroupKind.SUBSCRIPTION, f"/subscriptions/{SUB}")
    group = _parse(kind="servicemap", group={"kind": "machineGroup", "machine_group": GUID}).group
    assert group.machine_group == GUID
    migrate = MapSourceDefinition.parse({"name": "csv", "kind": "migrate"})
    assert migrate.workspaces == ()


def test_query_literals_refuse_what_would_need_escaping() -> None:
    assert kql_list(["m-1", "web01"]) == 'dynamic(["m-1","web01"])'
    for bad in ('a"b', "a\\b", "a\nb"):
        with pytest.raises(ValueError, match="cannot be used"):
            kql_string(bad)


def test_a_result_holds_a_map_or_an_error() -> None:
    with pytest.raises(ValueError, match="either a map or an error"):
        ServerMapResult(server=ServerRef(computer="x"))


# -- VM Insights rows -> graph --------------------------------------------------------------------
def _link(machine: str, direction: str, remote: str, port: int, **extra: Any) -> dict[str, Any]:
    local_ip = {"m-a": "10.0.0.1", "m-b": "10.0.0.2"}[machine]
    src, dst = (local_ip, remote) if direction == "outbound" else (remote, local_ip)
    return {
        "RowKind": "connection",
        "Machine": machine,
        "Process": f"p-{machine}",
        "ProcessName": "svc",
        "Direction": direction,
        "SourceIp": src,
        "DestinationIp": dst,
        "DestinationPort": port,
        "Protocol": "tcp",
        "RemoteIp": remote,
        "LinksEstablished": 1,
        "LinksFailed": 0,
    } | extra


ROWS: list[dict[str, Any]] = [
    {"RowKind": "machine", "Machine": "m-a", "Computer": "a01", "Ipv4Addresses": '["10.0.0.1"]'},
    {"RowKind": "machine", "Machine": "m-b", "Computer": "b01", "Ipv4Addresses": ["10.0.0.2"]},
    {"RowKind": "port", "Machine": "m-b", "Process": "p-m-b", "Ip": "::", "Port": 5000, "Protocol": "tcp"},
    _link("m-a", "outbound", "10.0.0.2", 5000),
    _link("m-a", "outbound", "10.0.0.2", 5000, LinksEstablished=2),
    _link("m-b", "inbound", "10.0.0.1", 5000),
    _link("m-b", "inbound", "172.16.0.9", 5000),
    _link("m-b", "outbound", "8.8.8.8", 53, Protocol="udp", LinksEstablished=0, LinksFailed=4),
]
SERVERS = [ServerRef(computer="a01", machine_id="m-a"), ServerRef(computer="b01", machine_id="m-b")]


def _vmi_results(
    rows: list[dict[str, Any]], servers: list[ServerRef] = SERVERS, **kwargs: Any
) -> dict[str, Any]:
    results = vminsights.build_maps(rows, servers, source="s", window=WINDOW, imported_at=NOW, **kwargs)
    return {result.server.computer: result for result in results}


def test_vminsights_rows_become_one_map_per_server() -> None:
    results = _vmi_results(ROWS)
    a = results["a01"].map
    assert a is not None
    (connection,) = [e for e in a.edges if e.kind is EdgeKind.CONNECTION]
    # the wildcard bind (::) of b01's process is the port a01 connects to, counts summed
    assert connection.target == "port|m-b|::|5000|tcp"
    assert (connection.links_established, connection.direction) == (3, Direction.OUTBOUND)
    assert ("listens", "process|m-b|p-m-b", "port|m-b|::|5000|tcp") in {
        (e.kind.value, e.source, e.target) for e in a.edges
    }
    b = results["b01"].map
    assert b is not None
    sources = sorted(e.source for e in b.edges if e.direction is Direction.INBOUND)
    assert sources == ["clientGroup|m-b|5000|tcp", "machine|m-a"]  # monitored client vs. unmonitored
    dns = next(e for e in b.edges if e.port == 53)
    assert (dns.failed, dns.protocol, dns.target) == (True, Protocol.UDP, "external|8.8.8.8")


def test_vminsights_bad_rows_fail_only_their_server_and_partial_is_a_warning() -> None:
    rows = [*ROWS, _link("m-b", "sideways", "10.0.0.1", 5000)]
    results = _vmi_results(rows, partial_error="PartialError: truncated")
    assert "Direction is neither inbound nor outbound" in results["b01"].error
    assert results["a01"].ok
    assert results["a01"].warnings == ("partial data from Log Analytics: PartialError: truncated",)
    unknown = _vmi_results(ROWS, servers=[ServerRef(computer="ghost")])
    assert "no VM Insights data" in unknown["ghost"].error


# -- flow logs rows -> graph ------------------------------------------------------------------------
def _flow_row(
    src: str, dst: str, direction: str, *, allowed: int = 1, denied: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "SrcIp": src,
        "DestIp": dst,
        "DestPort": 443,
        "L4Protocol": "T",
        "FlowDirection": direction,
        "FlowStatus": "Denied" if denied else "Allowed",
        "SrcVm": "",
        "DestVm": "",
        "AllowedFlows": allowed,
        "DeniedFlows": denied,
        "BytesSrcToDest": 10,
        "BytesDestToSrc": 20,
    } | extra


def test_flows_seen_at_both_ends_count_once() -> None:
    merged = flowlogs.merge_flows(
        [
            _flow_row("10.0.0.1", "10.0.0.2", "Outbound", allowed=5),
            _flow_row("10.0.0.1", "10.0.0.2", "Inbound", allowed=4, DestVm="s/rg/b"),
            _flow_row("10.0.0.1", "10.0.0.2", "Inbound", allowed=0, denied=2),
        ]
    )
    assert len(merged) == 1
    assert (merged[0].allowed, merged[0].denied, merged[0].dest_vm) == (5, 2, "s/rg/b")
    with pytest.raises(ValueError, match="L4Protocol"):
        flowlogs.merge_flows([_flow_row("10.0.0.1", "10.0.0.2", "Outbound", L4Protocol="I")])


def test_flowlogs_denied_only_is_failed_and_unknown_clients_are_grouped() -> None:
    server = ServerRef(computer="b", machine_id="s/rg/b", ips=("10.0.0.2",))
    rows = [
        _flow_row("10.0.0.2", "10.0.0.3", "Outbound", allowed=0, denied=3, DestVm="s/rg/c"),
        _flow_row("192.0.2.1", "10.0.0.2", "Inbound"),
        _flow_row("192.0.2.2", "10.0.0.2", "Inbound"),
    ]
    (result,) = flowlogs.build_maps(rows, [server], source="f", window=WINDOW, imported_at=NOW)
    assert result.map is not None
    outbound = next(e for e in result.map.edges if e.direction is Direction.OUTBOUND)
    assert (outbound.failed, outbound.links_failed, outbound.target) == (
        True,
        3,
        "port|s/rg/c|10.0.0.3|443|tcp",
    )
    group = next(n for n in result.map.nodes if n.kind is NodeKind.CLIENT_GROUP)
    assert (group.ips, group.properties["clients"]) == (("192.0.2.1", "192.0.2.2"), "2")


# -- Service Map answer -> graph --------------------------------------------------------------------
def _machine(name: str, monitored: bool = True) -> dict[str, Any]:
    return {
        "kind": "machine",
        "id": f"/api/workspaces/w/machines/{name}",
        "name": name,
        "properties": {"monitoringState": "monitored" if monitored else "discovered", "computerName": name},
    }


def _ref(kind: str, rid: str, machine: str, **props: Any) -> dict[str, Any]:
    return {
        "kind": f"ref:{kind}",
        "id": rid,
        "properties": {
            "machine": {"kind": "ref:machine", "id": f"/api/workspaces/w/machines/{machine}"},
            **props,
        },
    }


def test_servicemap_answer_becomes_the_servers_part_of_the_map() -> None:
    pa = _ref("process", "/api/workspaces/w/machines/m-a/processes/p-a", "m-a")
    pb = _ref("process", "/api/workspaces/w/machines/m-b/processes/p-b", "m-b")
    port_b = _ref(
        "port", "/api/workspaces/w/machines/m-b/ports/b-1_80", "m-b", ipAddress="10.0.0.2", portNumber=80
    )
    clients = {"id": "/api/workspaces/w/clientGroups/m!m-b!p!p-b", "kind": "clientGroup"}
    answer = {
        "map": {
            "nodes": {
                "machines": [_machine("m-a"), _machine("m-b", monitored=False)],
                "processes": [pa, pb],
                "ports": [port_b],
                "clientGroups": [{**clients, "properties": {"clientsOf": pb}}],
            },
            "edges": {
                "connections": [
                    {
                        "properties": {
                            "source": pa,
                            "destination": pb,
                            "serverPort": port_b,
                            "failureState": "failed",
                        }
                    },
                    {
                        "properties": {
                            "source": clients,
                            "destination": pb,
                            "serverPort": port_b,
                            "failureState": "ok",
                        }
                    },
                ],
                "acceptors": [{"properties": {"source": port_b, "destination": pb}}],
            },
        }
    }
    a = servicemap.build_server_map(
        ServerRef(computer="m-a", machine_id="/api/workspaces/w/machines/m-a"),
        answer,
        source="sm",
        window=WINDOW,
        imported_at=NOW,
    )
    (edge,) = [e for e in a.edges if e.kind is EdgeKind.CONNECTION]
    assert (edge.direction, edge.port, edge.failed) == (Direction.OUTBOUND, 80, True)
    assert not next(n for n in a.nodes if n.name == "m-b").monitored
    b = servicemap.build_server_map(
        ServerRef(computer="m-b", machine_id="/api/workspaces/w/machines/m-b"),
        answer,
        source="sm",
        window=WINDOW,
        imported_at=NOW,
    )
    inbound = sorted(e.source.split("|")[0] for e in b.edges if e.direction is Direction.INBOUND)
    assert inbound == ["clientGroup", "process"]
    broken = {"map": {"nodes": {"machines": [{"kind": "machine"}]}, "edges": {}}}
    with pytest.raises(ValueError, match="reference has no id"):
        servicemap.build_server_map(
            ServerRef(computer="m-a", machine_id="x"), broken, source="sm", window=WINDOW, imported_at=NOW
        )
