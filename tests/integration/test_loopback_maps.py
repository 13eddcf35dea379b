"""The map loopbacks themselves, over raw HTTP: the documented shapes, errors and faults."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from shared_code.mapsources.vminsights import check_query
from tests.loopback.loganalytics import LogAnalyticsLoopback, seed_vminsights
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

NOW = datetime.now(UTC)
WS_ID = (
    "/subscriptions/6e0c4b1a-0000-4000-8000-0000000000bb/resourceGroups/rg/providers/"
    "Microsoft.OperationalInsights/workspaces/{}"
)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(verify=loopback_tls().client_context(), timeout=10) as client:
        yield client


def _la(stack: LoopbackStack) -> LogAnalyticsLoopback:
    assert stack.loganalytics is not None
    stack.loganalytics.clear_faults()
    return stack.loganalytics


def test_query_api_shapes_errors_and_faults(stack: LoopbackStack, http: httpx.Client) -> None:
    la = _la(stack)
    customer_id = str(uuid.uuid4())
    la.add_workspace(customer_id)
    seeded = seed_vminsights(la, customer_id, servers=3, connections=4, now=NOW, prefix="lb")
    token = stack.entra.mint("https://api.loganalytics.io/.default").token
    url = f"{la.url}/v1/workspaces/{customer_id}/query"
    headers = {"Authorization": f"Bearer {token}", "Prefer": "wait=30"}
    timespan = f"{(NOW - timedelta(hours=2)).isoformat()}/{NOW.isoformat()}"
    body = {"query": check_query(NOW - timedelta(hours=1), NOW), "timespan": timespan}
    answer = http.post(url, json=body, headers=headers).json()
    table = answer["tables"][0]
    assert table["name"] == "PrimaryResult"
    assert table["columns"] == [{"name": "Machines", "type": "long"}]
    assert table["rows"] == [[len(seeded)]]
    assert la.queries[-1].prefer == "wait=30"

    la.fault_for(seeded[0].machine_id, "status", status=429, retry_after=7, times=1)
    map_query = (
        "// itsm-connector:vminsights-map v1\n"
        f'let machineIds = dynamic(["{seeded[0].machine_id}"]);\n'
        f"let windowStart = datetime({(NOW - timedelta(hours=1)).isoformat()});\n"
        f"let windowEnd = datetime({NOW.isoformat()});\n"
        f"let inventoryStart = datetime({(NOW - timedelta(hours=2)).isoformat()});\n"
    )
    throttled = http.post(url, json={"query": map_query}, headers=headers)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    rows = http.post(url, json={"query": map_query}, headers=headers).json()["tables"][0]
    kinds = {row[[c["name"] for c in rows["columns"]].index("RowKind")] for row in rows["rows"]}
    assert kinds == {"connection", "machine", "port", "process"}
    addresses = [c["name"] for c in rows["columns"]].index("Ipv4Addresses")
    machine_row = next(row for row in rows["rows"] if row[addresses])
    assert json.loads(
        machine_row[addresses]
    )  # dynamic columns arrive as JSON text, as the service sends them

    unknown = http.post(f"{la.url}/v1/workspaces/{uuid.uuid4()}/query", json=body, headers=headers)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "WorkspaceNotFoundError"
    bad = http.post(url, json={"query": "VMComputer | take 1"}, headers=headers)
    assert bad.status_code == 400
    assert bad.json()["error"]["innererror"]["code"] == "SyntaxError"


def test_service_map_paths_paging_and_limits(stack: LoopbackStack, http: httpx.Client) -> None:
    api = stack.servicemap
    name = f"lb-{uuid.uuid4().hex[:6]}"
    ws = api.add_workspace(WS_ID.format(name), str(uuid.uuid4()))
    machines = [api.add_machine(ws, f"vm{i}", [f"10.3.0.{i}"]) for i in range(3)]
    token = stack.entra.mint("https://management.azure.com/.default").token
    auth = {"Authorization": f"Bearer {token}"}
    base = f"{stack.alerts.url}{WS_ID.format(name)}/features/serviceMap"
    params = {"api-version": "2015-11-01-preview", "$top": "2"}
    first = http.get(f"{base}/machines", params=params, headers=auth).json()
    assert len(first["value"]) == 2
    second = http.get(first["nextLink"], headers=auth).json()
    assert len(second["value"]) == 1
    assert {m["id"] for m in first["value"] + second["value"]} == {m["id"] for m in machines}
    assert "nextLink" not in second
    too_long = http.post(
        f"{base}/generateMap",
        params={"api-version": "2015-11-01-preview"},
        headers=auth,
        json={
            "kind": "map:single-machine-dependency",
            "machineId": machines[0]["id"],
            "startTime": (NOW - timedelta(hours=2)).isoformat(),
            "endTime": NOW.isoformat(),
        },
    )
    assert too_long.status_code == 400
    assert "at most one hour" in too_long.json()["error"]["message"]
    no_token = http.get(f"{base}/machines", params=params)
    assert no_token.status_code == 401
    workspace = http.get(
        f"{stack.alerts.url}{WS_ID.format(name)}", params={"api-version": "2022-10-01"}, headers=auth
    )
    assert workspace.json()["properties"]["customerId"] == ws.customer_id
