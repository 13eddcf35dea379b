"""The map sources against their loopback APIs, through the real clients.

VM Insights and flow logs go through ``azure.monitor.query.LogsQueryClient`` to the loopback Log
Analytics query API; Service Map through httpx and the app's ARM bearer auth to the loopback ARM.
Tokens come from the loopback Entra via azure-identity's ClientSecretCredential. Each test seeds
its own workspace, so tests share the session's stack without seeing each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from azure.identity import ClientSecretCredential

from shared_code.domain.maps import Direction, EdgeKind, MapWindow, NodeKind, ServerMap
from shared_code.domain.mapsources import MapSourceDefinition, Workspace
from shared_code.errors import InvalidInputError, MapSourceError
from shared_code.httpretry import RetryPolicy
from shared_code.mapsources.arm import workspace_customer_id
from shared_code.mapsources.flowlogs import FlowLogsSource
from shared_code.mapsources.logquery import LogQueryRunner
from shared_code.mapsources.registry import MapSourceDeps, build_map_source
from shared_code.mapsources.servicemap import ServiceMapSource
from shared_code.mapsources.vminsights import VmInsightsSource
from shared_code.ports.maps import ServerMapResult, ServerRef
from tests.loopback.loganalytics import LogAnalyticsLoopback, seed_vminsights
from tests.loopback.servicemap import ServiceMapApi
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

NOW = datetime.now(UTC).replace(microsecond=0)
SUBSCRIPTION = "6e0c4b1a-0000-4000-8000-0000000000aa"
FAST = RetryPolicy(max_attempts=3, base_backoff=0.0, max_backoff=0.0, sleep=lambda _: None)


def _workspace_id(name: str) -> str:
    return (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-maps/providers/Microsoft.OperationalInsights/"
        f"workspaces/{name}"
    )


@pytest.fixture
def credential(stack: LoopbackStack) -> Iterator[ClientSecretCredential]:
    entra = stack.entra
    cred = ClientSecretCredential(
        entra.tenant_id,
        entra.client_id,
        entra.client_secret,
        authority=entra.url,
        disable_instance_discovery=True,
        connection_verify=loopback_tls().ca_bundle_path,
    )
    yield cred
    cred.close()


@pytest.fixture
def la(stack: LoopbackStack) -> LogAnalyticsLoopback:
    assert stack.loganalytics is not None
    stack.loganalytics.clear_faults()
    return stack.loganalytics


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(verify=loopback_tls().client_context(), timeout=10) as client:
        yield client


def _definition(
    kind: str, workspaces: list[tuple[str, str]], group: dict[str, Any], **extra: Any
) -> MapSourceDefinition:
    return MapSourceDefinition.parse(
        {
            "name": f"{kind}-test",
            "kind": kind,
            "workspaces": [
                {"resource_id": _workspace_id(name), "customer_id": cid} for name, cid in workspaces
            ],
            "group": group,
            **extra,
        }
    )


def _runner(credential: ClientSecretCredential, la: LogAnalyticsLoopback, **kwargs: Any) -> LogQueryRunner:
    return LogQueryRunner(
        credential,
        endpoint=la.url,
        connection_verify=loopback_tls().ca_bundle_path,
        retry_backoff_factor=0.0,
        timeout_seconds=30,
        **kwargs,
    )


def _edges(server_map: ServerMap) -> set[tuple[str, str, str, str | None, int | None, bool]]:
    return {
        (
            edge.kind.value,
            edge.source,
            edge.target,
            edge.direction.value if edge.direction else None,
            edge.port,
            edge.failed,
        )
        for edge in server_map.edges
    }


def _by_server(results: list[ServerMapResult]) -> dict[str, ServerMapResult]:
    return {result.server.computer: result for result in results}


# ------------------------------------------------------------------------------------------------
# VM Insights
# ------------------------------------------------------------------------------------------------
def _seed_small_estate(la: LogAnalyticsLoopback, customer_id: str) -> None:
    """web01 -> app01:8080 -> db01:5432; clients -> web01:443; app01 -> 203.0.113.7:443 (external)
    and -> db01:5433 (every link failed)."""
    inventory = NOW - timedelta(minutes=40)
    minute = NOW - timedelta(minutes=20)
    la.add_rows(
        customer_id,
        "VMComputer",
        [
            {
                "TimeGenerated": inventory,
                "Machine": "m-web",
                "Computer": "web01",
                "Ipv4Addresses": ["10.0.0.10"],
            },
            {
                "TimeGenerated": inventory,
                "Machine": "m-app",
                "Computer": "app01",
                "Ipv4Addresses": ["10.0.0.20"],
            },
            {
                "TimeGenerated": inventory - timedelta(minutes=30),
                "Machine": "m-app",
                "Computer": "app01-old-name",
                "Ipv4Addresses": ["10.0.0.20"],
            },
            {
                "TimeGenerated": inventory,
                "Machine": "m-db",
                "Computer": "db01",
                "Ipv4Addresses": ["10.0.0.30"],
            },
        ],
    )
    la.add_rows(
        customer_id,
        "VMProcess",
        [
            {
                "TimeGenerated": inventory,
                "Machine": "m-web",
                "Process": "p-web-nginx",
                "DisplayName": "nginx",
            },
            {
                "TimeGenerated": inventory,
                "Machine": "m-app",
                "Process": "p-app-java",
                "DisplayName": "Orders API",
            },
            {
                "TimeGenerated": inventory,
                "Machine": "m-db",
                "Process": "p-db-pg",
                "ExecutableName": "postgres",
            },
        ],
    )
    bound = {"TimeGenerated": inventory, "Protocol": "tcp"}
    la.add_rows(
        customer_id,
        "VMBoundPort",
        [
            bound | {"Machine": "m-web", "Process": "p-web-nginx", "Ip": "0.0.0.0", "Port": 443},
            bound | {"Machine": "m-app", "Process": "p-app-java", "Ip": "10.0.0.20", "Port": 8080},
            bound | {"Machine": "m-db", "Process": "p-db-pg", "Ip": "0.0.0.0", "Port": 5432},
        ],
    )

    def link(
        machine: str, process: str, direction: str, src: str, dst: str, port: int, remote: str, **n: Any
    ) -> dict[str, Any]:
        return {
            "TimeGenerated": n.pop("at", minute),
            "Machine": machine,
            "Process": process,
            "Direction": direction,
            "SourceIp": src,
            "DestinationIp": dst,
            "DestinationPort": port,
            "Protocol": "tcp",
            "RemoteIp": remote,
            "LinksEstablished": n.get("established", 1),
            "LinksTerminated": n.get("terminated", 1),
            "LinksFailed": n.get("failed", 0),
            "LinksLive": n.get("live", 1),
            "BytesSent": n.get("sent", 100),
            "BytesReceived": n.get("received", 200),
            "Responses": 1,
        }

    la.add_rows(
        customer_id,
        "VMConnection",
        [
            link("m-web", "p-web-nginx", "inbound", "192.168.1.5", "10.0.0.10", 443, "192.168.1.5"),
            link("m-web", "p-web-nginx", "inbound", "192.168.1.6", "10.0.0.10", 443, "192.168.1.6"),
            link("m-web", "p-web-nginx", "outbound", "10.0.0.10", "10.0.0.20", 8080, "10.0.0.20"),
            link("m-app", "p-app-java", "inbound", "10.0.0.10", "10.0.0.20", 8080, "10.0.0.10"),
            link(
                "m-app",
                "p-app-java",
                "outbound",
                "10.0.0.20",
                "10.0.0.30",
                5432,
                "10.0.0.30",
                established=2,
                sent=10,
            ),
            link(
                "m-app",
                "p-app-java",
                "outbound",
                "10.0.0.20",
                "10.0.0.30",
                5432,
                "10.0.0.30",
                established=3,
                sent=15,
                live=4,
                at=minute + timedelta(minutes=1),
            ),
            link(
                "m-app",
                "p-app-java",
                "outbound",
                "10.0.0.20",
                "10.0.0.30",
                5432,
                "10.0.0.30",
                established=50,
                at=NOW - timedelta(hours=3),  # before the window: not counted
            ),
            link(
                "m-app",
                "p-app-java",
                "outbound",
                "10.0.0.20",
                "10.0.0.30",
                5433,
                "10.0.0.30",
                established=0,
                failed=3,
            ),
            link("m-app", "p-app-java", "outbound", "10.0.0.20", "203.0.113.7", 443, "203.0.113.7"),
            link("m-db", "p-db-pg", "inbound", "10.0.0.20", "10.0.0.30", 5432, "10.0.0.20"),
        ],
    )


@pytest.fixture
def estate(la: LogAnalyticsLoopback) -> str:
    customer_id = str(uuid.uuid4())
    la.add_workspace(customer_id)
    _seed_small_estate(la, customer_id)
    return customer_id


def _vmi(
    credential: ClientSecretCredential, la: LogAnalyticsLoopback, customer_id: str, **kwargs: Any
) -> VmInsightsSource:
    definition = _definition(
        "vminsights", [("ws-estate", customer_id)], {"computers": ["web01", "app01", "db01", "ghost01"]}
    )
    return VmInsightsSource(definition, _runner(credential, la), clock=lambda: NOW, **kwargs)


WINDOW = MapWindow(start=NOW - timedelta(minutes=60), end=NOW)


def test_vminsights_small_estate_gives_the_expected_graph(credential, la, estate) -> None:
    source = _vmi(credential, la, estate)
    servers = source.servers()
    assert [(s.computer, s.machine_id) for s in servers] == [
        ("app01", "m-app"),
        ("db01", "m-db"),
        ("web01", "m-web"),
        ("ghost01", ""),
    ]
    results = _by_server(list(source.fetch(servers, WINDOW)))
    assert "no VM Insights data" in results["ghost01"].error

    app = results["app01"].map
    assert app is not None
    assert app.server == "app01"
    assert app.root_id == "machine|m-app"
    kinds = {node.id: node.kind for node in app.nodes}
    assert kinds == {
        "machine|m-app": NodeKind.MACHINE,
        "process|m-app|p-app-java": NodeKind.PROCESS,
        "port|m-app|10.0.0.20|8080|tcp": NodeKind.PORT,
        "machine|m-web": NodeKind.MACHINE,
        "machine|m-db": NodeKind.MACHINE,
        "process|m-db|p-db-pg": NodeKind.PROCESS,
        "port|m-db|0.0.0.0|5432|tcp": NodeKind.PORT,
        "port|m-db|10.0.0.30|5433|tcp": NodeKind.PORT,
        "external|203.0.113.7": NodeKind.EXTERNAL,
    }
    java = "process|m-app|p-app-java"
    assert _edges(app) == {
        ("owns", "machine|m-app", java, None, None, False),
        ("listens", java, "port|m-app|10.0.0.20|8080|tcp", None, None, False),
        ("connection", "machine|m-web", "port|m-app|10.0.0.20|8080|tcp", "inbound", 8080, False),
        ("owns", "machine|m-db", "process|m-db|p-db-pg", None, None, False),
        ("listens", "process|m-db|p-db-pg", "port|m-db|0.0.0.0|5432|tcp", None, None, False),
        ("connection", java, "port|m-db|0.0.0.0|5432|tcp", "outbound", 5432, False),
        ("connection", java, "port|m-db|10.0.0.30|5433|tcp", "outbound", 5433, True),
        ("connection", java, "external|203.0.113.7", "outbound", 443, False),
    }
    to_db = next(e for e in app.edges if e.port == 5432)
    assert (to_db.links_established, to_db.links_live, to_db.bytes_sent) == (5, 4, 25)  # two minutes summed
    failed = next(e for e in app.edges if e.port == 5433)
    assert (failed.links_failed, failed.links_established) == (3, 0)
    names = {node.id: node.name for node in app.nodes}
    assert names["machine|m-app"] == "app01"  # the newest VMComputer row
    assert names[java] == "Orders API"
    assert names["process|m-db|p-db-pg"] == "postgres"
    assert next(n for n in app.nodes if n.id == "machine|m-web").monitored

    web = results["web01"].map
    assert web is not None
    group = next(node for node in web.nodes if node.kind is NodeKind.CLIENT_GROUP)
    assert group.ips == ("192.168.1.5", "192.168.1.6")
    assert group.port == 443
    inbound = [e for e in web.edges if e.direction is Direction.INBOUND]
    assert [(e.source, e.target, e.links_established) for e in inbound] == [
        (group.id, "port|m-web|0.0.0.0|443|tcp", 2)
    ]
    outbound = [e for e in web.edges if e.direction is Direction.OUTBOUND]
    assert [e.target for e in outbound] == ["port|m-app|10.0.0.20|8080|tcp"]
    assert la.queries[-1].prefer == "wait=30"


def test_vminsights_takes_one_query_per_batch(credential, la) -> None:
    customer_id = str(uuid.uuid4())
    la.add_workspace(customer_id)
    seed_vminsights(la, customer_id, servers=5, connections=8, now=NOW, prefix=f"b{customer_id[:6]}")
    definition = _definition(
        "vminsights",
        [("ws-batch", customer_id)],
        {"computers": [f"b{customer_id[:6]}{i:05d}" for i in range(5)]},
    )
    source = VmInsightsSource(definition, _runner(credential, la), clock=lambda: NOW, batch_size=2)
    servers = source.servers()
    before = len(la.queries)
    results = list(source.fetch(servers, WINDOW))
    assert all(result.ok for result in results)
    assert len(results) == 5
    maps_queries = [q for q in la.queries[before:] if q.template == "vminsights-map"]
    assert len(maps_queries) == 3  # 5 servers in batches of 2: one query per batch, not per server or table
    assert [len(q.parameters["machineIds"]) for q in maps_queries] == [2, 2, 1]
    assert all(len(result.map.edges) > 8 for result in results if result.map)


@pytest.mark.parametrize(
    ("kind", "fault", "expected"),
    [
        ("status", {"status": 503}, "HTTP 503"),
        ("timeout", {}, "GatewayTimeout"),
        ("garbage", {}, "not a query result"),
    ],
)
def test_vminsights_a_failing_batch_costs_only_its_servers(
    credential, la, estate, kind, fault, expected
) -> None:
    la.fault_for("m-db", kind, **fault)
    source = _vmi(credential, la, estate, batch_size=2)
    results = _by_server(list(source.fetch(source.servers(), WINDOW)))
    # batches of two in name order: (app01, db01) fails as a whole, web01's batch goes on
    assert expected in results["db01"].error
    assert expected in results["app01"].error
    assert results["web01"].ok
    assert "no VM Insights data" in results["ghost01"].error


def test_vminsights_429_then_success_honours_retry_after(credential, la, estate) -> None:
    la.fault_for("m-app", "status", status=429, retry_after=0.05, times=1)
    source = _vmi(credential, la, estate)
    servers = source.servers()
    before = len(la.queries)
    results = _by_server(list(source.fetch(servers, WINDOW)))
    assert all(results[name].ok for name in ("app01", "web01", "db01"))
    assert [q.status for q in la.queries[before:]] == [429, 200]


def test_vminsights_partial_answer_keeps_the_data_and_says_so(credential, la, estate) -> None:
    la.fault_for("m-app", "partial", times=1)
    source = _vmi(credential, la, estate)
    results = _by_server(list(source.fetch(source.servers(), WINDOW)))
    app = results["app01"]
    assert app.map is not None
    assert len(app.map.edges) == 8
    assert app.warnings
    assert "PartialError" in app.warnings[0]


def test_vminsights_malformed_rows_fail_only_their_server(credential, la, estate) -> None:
    la.fault_for("m-db", "malformed", times=1)
    source = _vmi(credential, la, estate)
    results = _by_server(list(source.fetch(source.servers(), WINDOW)))
    assert "malformed data" in results["db01"].error
    assert results["app01"].ok
    assert results["web01"].ok


def test_vminsights_no_content_is_an_empty_map(credential, la, estate) -> None:
    la.fault_for("m-app", "nocontent", times=1)
    source = _vmi(credential, la, estate)
    results = _by_server(list(source.fetch(source.servers(), WINDOW)))
    assert results["app01"].map is not None
    assert [n.id for n in results["app01"].map.nodes] == ["machine|m-app"]


def test_vminsights_window_limit_and_check(credential, la, estate) -> None:
    source = _vmi(credential, la, estate)
    with pytest.raises(MapSourceError, match="longer than 1440"):
        list(source.fetch(source.servers(), MapWindow(start=NOW - timedelta(hours=25), end=NOW)))
    assert source.check() == "3 machines reported VM Insights Map data in the last 24 hours"
    la.deny_workspace(estate)
    with pytest.raises(MapSourceError, match="InsufficientAccessError"):
        source.check()


def test_vminsights_resolves_remote_machines_across_workspaces(credential, la) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    la.add_workspace(first)
    la.add_workspace(second)
    at = NOW - timedelta(minutes=10)
    la.add_rows(
        first,
        "VMComputer",
        [{"TimeGenerated": at, "Machine": "m-x1", "Computer": "x1", "Ipv4Addresses": ["10.9.0.1"]}],
    )
    la.add_rows(
        second,
        "VMComputer",
        [{"TimeGenerated": at, "Machine": "m-x2", "Computer": "x2", "Ipv4Addresses": ["10.9.0.2"]}],
    )
    la.add_rows(
        first,
        "VMConnection",
        [
            {
                "TimeGenerated": at,
                "Machine": "m-x1",
                "Process": "p-x1",
                "Direction": "outbound",
                "SourceIp": "10.9.0.1",
                "DestinationIp": "10.9.0.2",
                "DestinationPort": 1433,
                "Protocol": "tcp",
                "RemoteIp": "10.9.0.2",
                "LinksEstablished": 1,
            }
        ],
    )
    definition = _definition(
        "vminsights", [("ws-first", first), ("ws-second", second)], {"computers": ["x1"]}
    )
    source = VmInsightsSource(definition, _runner(credential, la), clock=lambda: NOW)
    (result,) = list(source.fetch(source.servers(), WINDOW))
    assert result.map is not None
    assert "machine|m-x2" in {node.id for node in result.map.nodes}
    assert la.queries[-1].workspaces == (second,)


def test_query_api_refuses_what_it_cannot_run_and_foreign_tokens(credential, la, estate, stack) -> None:
    runner = _runner(credential, la)
    with pytest.raises(MapSourceError, match="BadArgumentError"):
        runner.query([estate], "VMConnection | take 10", start=NOW - timedelta(hours=1), end=NOW)
    token = stack.entra.mint("https://management.azure.com/.default").token
    response = httpx.post(
        f"{la.url}/v1/workspaces/{estate}/query",
        json={"query": "// itsm-connector:vminsights-check v1"},
        headers={"Authorization": f"Bearer {token}"},
        verify=loopback_tls().client_context(),
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "AuthorizationRequiredError"


# ------------------------------------------------------------------------------------------------
# flow logs
# ------------------------------------------------------------------------------------------------
def _flow(src: str, dst: str, port: int, direction: str, **n: Any) -> dict[str, Any]:
    at = n.pop("at", NOW - timedelta(minutes=30))
    return {
        "TimeGenerated": at + timedelta(minutes=10),
        "FlowStartTime": at,
        "SubType": "FlowLog",
        "SrcIp": src,
        "DestIp": dst,
        "DestPort": port,
        "L4Protocol": n.get("protocol", "T"),
        "FlowDirection": direction,
        "FlowStatus": "Denied" if n.get("denied") else "Allowed",
        "SrcVm": n.get("src_vm", ""),
        "DestVm": n.get("dest_vm", ""),
        "FlowType": n.get("flow_type", "IntraVNet"),
        "AllowedInFlows": 0 if n.get("denied") else n.get("flows", 1) if direction == "Inbound" else 0,
        "AllowedOutFlows": 0 if n.get("denied") else n.get("flows", 1) if direction == "Outbound" else 0,
        "DeniedInFlows": n.get("flows", 1) if n.get("denied") else 0,
        "DeniedOutFlows": 0,
        "BytesSrcToDest": n.get("up", 100),
        "BytesDestToSrc": n.get("down", 1000),
    }


VM = f"{SUBSCRIPTION}/rg-maps/"


@pytest.fixture
def flows(la: LogAnalyticsLoopback) -> str:
    customer_id = str(uuid.uuid4())
    la.add_workspace(customer_id)
    web, app, db = VM + "web-vm", VM + "app-vm", VM + "db-vm"
    la.add_rows(
        customer_id,
        "NTANetAnalytics",
        [
            # logged at both NICs: counted once
            _flow("10.1.0.4", "10.1.0.5", 8080, "Outbound", src_vm=web, dest_vm=app, flows=3),
            _flow("10.1.0.4", "10.1.0.5", 8080, "Inbound", src_vm=web, dest_vm=app, flows=3),
            _flow("10.1.0.5", "10.1.0.6", 1433, "Outbound", src_vm=app, dest_vm=db, flows=2),
            _flow("10.1.0.5", "10.1.0.6", 22, "Inbound", src_vm=app, dest_vm=db, denied=True, flows=4),
            _flow("10.1.0.5", "52.1.2.3", 443, "Outbound", src_vm=app, flow_type="AzurePublic"),
            _flow("198.51.100.9", "10.1.0.4", 443, "Inbound", dest_vm=web, flow_type="ExternalPublic"),
            _flow("198.51.100.10", "10.1.0.4", 443, "Inbound", dest_vm=web, flow_type="ExternalPublic"),
            _flow(
                "10.1.0.5", "10.1.0.6", 1433, "Outbound", src_vm=app, dest_vm=db, at=NOW - timedelta(hours=5)
            ),
        ],
    )
    return customer_id


def test_flowlogs_small_estate_gives_the_expected_graph(credential, la, flows) -> None:
    definition = _definition("flowlogs", [("ws-flows", flows)], {"computers": ["web-vm", "app-vm", "db-vm"]})
    source = FlowLogsSource(definition, _runner(credential, la), clock=lambda: NOW)
    servers = source.servers()
    assert [(s.computer, s.ips) for s in servers] == [
        ("app-vm", ("10.1.0.5",)),
        ("db-vm", ("10.1.0.6",)),
        ("web-vm", ("10.1.0.4",)),
    ]
    results = _by_server(list(source.fetch(servers, WINDOW)))
    app = results["app-vm"].map
    assert app is not None
    root, web, _db = (f"machine|{VM.lower()}{name}" for name in ("app-vm", "web-vm", "db-vm"))
    assert _edges(app) == {
        ("connection", web, f"port|{VM.lower()}app-vm|10.1.0.5|8080|tcp", "inbound", 8080, False),
        ("connection", root, f"port|{VM.lower()}db-vm|10.1.0.6|1433|tcp", "outbound", 1433, False),
        ("connection", root, f"port|{VM.lower()}db-vm|10.1.0.6|22|tcp", "outbound", 22, True),
        ("connection", root, "external|52.1.2.3", "outbound", 443, False),
    }
    inbound = next(e for e in app.edges if e.port == 8080)
    assert (inbound.links_established, inbound.bytes_sent, inbound.bytes_received) == (3, 1000, 100)
    assert next(e for e in app.edges if e.port == 1433).links_established == 2  # the old flow is outside
    assert next(e for e in app.edges if e.port == 22).links_failed == 4
    web_map = results["web-vm"].map
    assert web_map is not None
    group = next(n for n in web_map.nodes if n.kind is NodeKind.CLIENT_GROUP)
    assert group.ips == ("198.51.100.10", "198.51.100.9")
    assert not any(node.kind is NodeKind.PROCESS for node in app.nodes)
    assert source.check() == "8 Traffic Analytics flow records in the last 24 hours"


def test_flowlogs_batches_and_malformed_rows(credential, la, flows) -> None:
    definition = _definition(
        "flowlogs",
        [("ws-flows", flows)],
        {"kind": "resourceGroup", "scope": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-maps"},
    )
    source = FlowLogsSource(definition, _runner(credential, la), clock=lambda: NOW, batch_size=2)
    servers = source.servers()
    assert {s.computer for s in servers} == {"app-vm", "db-vm", "web-vm"}
    la.fault_for("10.1.0.4", "malformed", times=1)
    before = len(la.queries)
    results = _by_server(list(source.fetch(servers, WINDOW)))
    assert len([q for q in la.queries[before:] if q.template == "flowlogs-map"]) == 2
    assert "malformed data" in results["web-vm"].error
    assert results["db-vm"].ok


# ------------------------------------------------------------------------------------------------
# Service Map
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def service_map(stack: LoopbackStack) -> tuple[ServiceMapApi, str, dict[str, Any]]:
    api = stack.servicemap
    name = f"sm-{uuid.uuid4().hex[:8]}"
    ws = api.add_workspace(_workspace_id(name), str(uuid.uuid4()))
    rg = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-apps/providers/Microsoft.Compute/virtualMachines"
    web = api.add_machine(ws, "web01", ["10.2.0.4"], resource_id=f"{rg}/web01")
    app = api.add_machine(ws, "app01", ["10.2.0.5"], resource_id=f"{rg}/app01")
    db = api.add_machine(ws, "db01", ["10.2.0.6"])
    other = api.add_machine(ws, "legacy", ["10.10.10.10"], monitored=False)
    nginx = api.add_process(ws, web, "nginx", "nginx")
    java = api.add_process(ws, app, "Orders API", "java")
    pg = api.add_process(ws, db, "PostgreSQL", "postgres")
    svc = api.add_process(ws, other, "Port 8880", "")
    web_443 = api.add_port(ws, nginx, "10.2.0.4", 443)
    app_8080 = api.add_port(ws, java, "10.2.0.5", 8080)
    db_5432 = api.add_port(ws, pg, "10.2.0.6", 5432)
    legacy_8880 = api.add_port(ws, svc, "10.10.10.10", 8880)
    api.add_connection(ws, api.add_client_group(ws, nginx), nginx, web_443)
    api.add_connection(ws, nginx, java, app_8080)
    api.add_connection(ws, java, pg, db_5432)
    api.add_connection(ws, java, svc, legacy_8880, failed=True)
    group = api.add_machine_group(ws, "Orders", [web, app])
    return api, name, {"web": web, "app": app, "db": db, "group": group, "customer_id": ws.customer_id}


def _sm(stack, http, credential, name: str, group: dict[str, Any], **kwargs: Any) -> ServiceMapSource:
    definition = _definition("servicemap", [(name, "")], group)
    return ServiceMapSource(
        definition,
        http,
        credential,
        arm_endpoint=stack.alerts.url,
        clock=lambda: NOW,
        retry_policy=FAST,
        **kwargs,
    )


def test_servicemap_small_estate_gives_the_expected_graph(stack, http, credential, service_map) -> None:
    api, name, seeded = service_map
    source = _sm(stack, http, credential, name, {"computers": ["web01", "app01", "db01"]}, page_size=2)
    before = len(api.calls)
    servers = source.servers()
    assert [s.computer for s in servers] == ["app01", "db01", "web01"]
    assert api.operations()[before:] == ["machines", "machines"]  # 4 machines in pages of 2, by nextLink
    results = _by_server(list(source.fetch(servers, WINDOW)))
    assert api.operations()[-1] == "map:machine-list-dependency"
    app = results["app01"].map
    assert app is not None
    me = seeded["app"]["id"].lower()
    kinds = sorted(node.kind.value for node in app.nodes)
    assert kinds == sorted(
        ["machine"] * 4 + ["process"] * 4 + ["port"] * 3
    )  # app, web, db, legacy; nginx, java, postgres, legacy's; 8080, 5432, 8880
    connections = {(e.direction, e.port, e.failed) for e in app.edges if e.kind is EdgeKind.CONNECTION}
    assert connections == {
        (Direction.INBOUND, 8080, False),
        (Direction.OUTBOUND, 5432, False),
        (Direction.OUTBOUND, 8880, True),
    }
    assert app.root_id == f"machine|{me}"
    legacy = next(n for n in app.nodes if n.kind is NodeKind.MACHINE and n.name == "legacy")
    assert not legacy.monitored
    web = results["web01"].map
    assert web is not None
    assert any(n.kind is NodeKind.CLIENT_GROUP for n in web.nodes)


def test_servicemap_machine_group_and_scope(stack, http, credential, service_map) -> None:
    _, name, seeded = service_map
    by_group = _sm(stack, http, credential, name, {"kind": "machineGroup", "machine_group": seeded["group"]})
    assert [s.computer for s in by_group.servers()] == ["app01", "web01"]
    scope = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-apps"
    by_scope = _sm(stack, http, credential, name, {"kind": "resourceGroup", "scope": scope})
    assert [s.computer for s in by_scope.servers()] == ["app01", "web01"]
    missing = _sm(stack, http, credential, name, {"kind": "machineGroup", "machine_group": str(uuid.uuid4())})
    with pytest.raises(MapSourceError, match="in none of the workspaces"):
        missing.servers()


def test_servicemap_a_bad_server_fails_alone(stack, http, credential, service_map) -> None:
    api, name, seeded = service_map
    api.fault_for(seeded["db"]["id"], "status", status=500)
    api.fault_for(seeded["web"]["id"], "malformed")
    source = _sm(stack, http, credential, name, {"computers": ["web01", "app01", "db01"]})
    servers = source.servers()
    before = len(api.calls)
    results = _by_server(list(source.fetch(servers, WINDOW)))
    assert results["app01"].ok
    assert "HTTP 500" in results["db01"].error
    assert "malformed map" in results["web01"].error
    assert (
        api.operations()[before:]
        == ["map:machine-list-dependency"] * 3 + ["map:single-machine-dependency"] * 5
    )  # the batch failed (3 attempts): each machine alone, db01 with its own 3 attempts


def test_servicemap_429_then_success_and_window_limit(stack, http, credential, service_map) -> None:
    api, name, seeded = service_map
    api.fault_for(seeded["app"]["id"], "status", status=429, retry_after=0, times=1)
    source = _sm(stack, http, credential, name, {"computers": ["app01"]})
    (result,) = list(source.fetch(source.servers(), WINDOW))
    assert result.ok
    with pytest.raises(MapSourceError, match="at most 60 minutes"):
        list(source.fetch(source.servers(), MapWindow(start=NOW - timedelta(minutes=61), end=NOW)))
    with pytest.raises(InvalidInputError, match="window_minutes is at most 60"):
        _definition("servicemap", [(name, "")], {"computers": ["app01"]}, window_minutes=90)
    assert source.check() == "4 live Service Map machines in the last hour"


def test_workspace_customer_id_lookup_and_registry(stack, http, credential, service_map) -> None:
    _, name, seeded = service_map
    workspace = Workspace(resource_id=_workspace_id(name))
    assert (
        workspace_customer_id(http, credential, stack.alerts.url, workspace, policy=FAST)
        == seeded["customer_id"]
    )
    deps = MapSourceDeps(credential=credential, http=http, arm_endpoint=stack.alerts.url, clock=lambda: NOW)
    source = build_map_source(_definition("servicemap", [(name, "")], {"computers": ["db01"]}), deps)
    assert [s.computer for s in source.servers()] == ["db01"]
    with pytest.raises(InvalidInputError, match="CSV"):
        build_map_source(MapSourceDefinition.parse({"name": "csv", "kind": "migrate"}), deps)
    assert isinstance(ServerRef(computer="x"), ServerRef)
