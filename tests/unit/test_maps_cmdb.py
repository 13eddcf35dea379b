"""CMDB publishing pieces in isolation: a map's dependencies, and the IRE answers the connector must
not take for success (``httpx.MockTransport`` for the answers a loopback would not give)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.cmdb import Dependency
from shared_code.domain.maps import (
    Direction,
    EdgeKind,
    MapEdge,
    MapNode,
    MapWindow,
    NodeKind,
    ServerMap,
    node_id,
)
from shared_code.errors import ItsmAuthError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.servicenow.auth import ServiceNowBasicAuth
from shared_code.itsm.servicenow.cmdb import ServiceNowDependencyCmdb
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.maps.publish import dependencies_of

NOW = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)


def cmdb(handler: Callable[[httpx.Request], httpx.Response]) -> ServiceNowDependencyCmdb:
    client = httpx.Client(transport=httpx.MockTransport(handler), timeout=5)
    connector = ServiceNowConnector(
        "sn",
        "https://example.service-now.com",
        client,
        ServiceNowBasicAuth("u", lambda: SecretStr("p")),
        retry=RetryPolicy(max_attempts=1, sleep=lambda _s: None),
    )
    return ServiceNowDependencyCmdb(connector, "AzureMonitorITSM")


def test_the_request_names_the_data_source_and_indexes_the_items() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = json.loads(request.content)
        items = [{"className": "cmdb_ci_server", "operation": "INSERT", "sys_id": str(i)} for i in range(2)]
        relations = [{"className": "cmdb_rel_ci", "operation": "NO_CHANGE"} for _ in body["relations"]]
        return httpx.Response(200, json={"result": {"items": items, "relations": relations}})

    result = cmdb(handler).publish_dependencies([], [Dependency("a", "b", 80, "10.0.0.1")])
    [request] = seen
    assert request.url.path == "/api/now/identifyreconcile"
    assert request.url.params["sysparm_data_source"] == "AzureMonitorITSM"
    body = json.loads(request.content)
    assert body["items"][0] == {
        "className": "cmdb_ci_server",
        "values": {"name": "a", "ip_address": "10.0.0.1"},
    }
    assert body["relations"] == [{"parent": 0, "child": 1, "type": "Depends on::Used by"}]
    assert (result.new_items, result.new_relations) == (2, 0)


@pytest.mark.parametrize(
    "answer",
    [
        {"result": {"items": []}},  # fewer results than items
        {"result": "ok"},
        {"items": []},
    ],
)
def test_an_answer_without_one_result_per_item_is_not_success(answer: dict[str, object]) -> None:
    publisher = cmdb(lambda _r: httpx.Response(200, json=answer))
    with pytest.raises(ItsmUnavailableError, match="identifyreconcile"):
        publisher.publish_dependencies(["a"], [])


def test_refused_credentials_say_so() -> None:
    publisher = cmdb(lambda _r: httpx.Response(401, json={"error": {"message": "User Not Authenticated"}}))
    with pytest.raises(ItsmAuthError):
        publisher.publish_dependencies(["a"], [])


def test_a_maps_dependencies_are_machines_in_both_directions() -> None:
    web = node_id(NodeKind.MACHINE, "web")
    web_proc = node_id(NodeKind.PROCESS, "web", "nginx")
    db = node_id(NodeKind.MACHINE, "db")
    db_port = node_id(NodeKind.PORT, "db", "10.0.0.3", "1433", "tcp")
    app = node_id(NodeKind.MACHINE, "app")
    clients = node_id(NodeKind.CLIENT_GROUP, "web", "443", "tcp")
    external = node_id(NodeKind.EXTERNAL, "203.0.113.9")
    server_map = ServerMap(
        server="web",
        source="vmi",
        window=MapWindow(start=NOW, end=NOW),
        imported_at=NOW,
        nodes=(
            MapNode(id=web, kind=NodeKind.MACHINE, name="web", ips=("10.0.0.1",)),
            MapNode(id=web_proc, kind=NodeKind.PROCESS, name="nginx", machine=web),
            MapNode(id=db, kind=NodeKind.MACHINE, name="db", ips=("10.0.0.3",)),
            MapNode(id=db_port, kind=NodeKind.PORT, name="1433", machine=db, port=1433),
            MapNode(id=app, kind=NodeKind.MACHINE, name="app"),
            MapNode(id=clients, kind=NodeKind.CLIENT_GROUP, name="Clients of :443", machine=web),
            MapNode(id=external, kind=NodeKind.EXTERNAL, name="203.0.113.9"),
        ),
        edges=(
            MapEdge(
                source=web_proc,
                target=db_port,
                kind=EdgeKind.CONNECTION,
                port=1433,
                direction=Direction.OUTBOUND,
            ),
            MapEdge(
                source=web_proc,
                target=external,
                kind=EdgeKind.CONNECTION,
                port=443,
                direction=Direction.OUTBOUND,
            ),
            MapEdge(
                source=app, target=web_proc, kind=EdgeKind.CONNECTION, port=443, direction=Direction.INBOUND
            ),
            MapEdge(
                source=clients,
                target=web_proc,
                kind=EdgeKind.CONNECTION,
                port=443,
                direction=Direction.INBOUND,
            ),
            MapEdge(source=web, target=web_proc, kind=EdgeKind.OWNS),
        ),
    )
    assert dependencies_of(server_map) == [
        Dependency("app", "web", 443, "", "10.0.0.1"),
        Dependency("web", "db", 1433, "10.0.0.1", "10.0.0.3"),
    ]
