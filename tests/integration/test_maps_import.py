"""The map import end to end: a VM Insights source against the loopback Log Analytics query API,
the Maps table in Azurite, and the registered HTTP and timer functions (through ``tests/hostsim``)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

import pytest

import function_app
from shared_code.bootstrap import Container
from shared_code.domain.mapsources import MapSourceDefinition
from tests.hostsim import FunctionHost
from tests.loopback.loganalytics import SeededServer, seed_vminsights
from tests.loopback.stack import LoopbackStack

RESOURCE_ID = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg-maps"
    "/providers/Microsoft.OperationalInsights/workspaces/ws-maps"
)


@pytest.fixture
def estate(app: Container, stack: LoopbackStack) -> tuple[str, list[SeededServer]]:
    """A workspace of its own with three seeded servers, and a source naming two of them."""
    assert stack.loganalytics is not None
    customer_id = str(uuid.uuid4())
    stack.loganalytics.add_workspace(customer_id)
    prefix = f"s{uuid.uuid4().hex[:6]}"
    seeded = seed_vminsights(
        stack.loganalytics, customer_id, servers=3, connections=8, now=datetime.now(UTC), prefix=prefix
    )
    app.map_sources.add(
        MapSourceDefinition.model_validate(
            {
                "name": "vmi",
                "kind": "vminsights",
                "workspaces": [{"resource_id": RESOURCE_ID, "customer_id": customer_id}],
                "group": {"kind": "computers", "computers": [seeded[0].computer, seeded[1].computer]},
                "timeout_seconds": 10,
            }
        )
    )
    return customer_id, seeded


def host() -> FunctionHost:
    return FunctionHost(function_app.app)


def test_timer_import_then_views_by_name_and_machine_id(
    app: Container, estate: tuple[str, list[SeededServer]]
) -> None:
    _, seeded = estate
    h = host()
    h.timer("maps_import_timer")
    [run] = list(app.map_importer._runs.list("maps"))  # type: ignore[attr-defined]
    assert run.outcome == "ok", run.detail
    assert run.counts["imported"] == 2

    index = h.http("maps_index", "GET", "http://localhost/api/maps?format=json")
    assert index.status == 200
    listed = {row["server"] for row in index.json()["servers"]}
    assert listed == {seeded[0].computer, seeded[1].computer}
    html = h.http("maps_index", "GET", "http://localhost/api/maps")
    assert html.status == 200
    assert seeded[0].computer in html.response.get_body().decode()

    name = seeded[0].computer.upper()
    as_json = h.http(
        "maps_server",
        "GET",
        f"http://localhost/api/maps/{quote(name)}?format=json",
        route_params={"server": name},
    )
    assert as_json.status == 200
    body = as_json.json()
    assert body["server"] == seeded[0].computer
    assert {"start", "end"} <= set(body["window"])
    assert body["edges"]
    assert set(body["changes"]["added"])
    by_id = h.http(
        "maps_server",
        "GET",
        "http://localhost/api/maps/x?format=drawio",
        route_params={"server": seeded[0].machine_id},
    )
    assert by_id.status == 200
    assert "attachment" in by_id.response.headers["Content-Disposition"]
    assert "<mxfile" in by_id.response.get_body().decode()

    missing = h.http(
        "maps_server", "GET", "http://localhost/api/maps/nobody", route_params={"server": "nobody"}
    )
    assert missing.status == 404
    assert "nobody" in missing.json()["error"]["message"]
    bad = h.http(
        "maps_server",
        "GET",
        "http://localhost/api/maps/x?format=pdf",
        route_params={"server": seeded[0].computer},
    )
    assert bad.status == 400
    assert "pdf" in bad.json()["error"]["message"]


def test_on_demand_import_of_one_server_and_an_unchanged_reimport(
    app: Container, estate: tuple[str, list[SeededServer]]
) -> None:
    _, seeded = estate
    h = host()
    body = json.dumps({"servers": [seeded[1].computer, "not-mapped-01"]}).encode()
    first = h.http("maps_import", "POST", "http://localhost/api/maps/import", body=body)
    assert first.status == 200, first.json()
    [result] = first.json()["results"]
    assert result["counts"]["imported"] == 1
    assert result["errors"] == {"not-mapped-01": "not in any map source's server group"}
    assert app.maps.load(seeded[0].computer) is None

    again = h.http(
        "maps_import",
        "POST",
        "http://localhost/api/maps/import",
        body=json.dumps({"servers": [seeded[1].computer]}).encode(),
    )
    assert again.status == 200
    assert again.json()["results"][0]["counts"]["unchanged"] == 1
    assert again.json()["results"][0]["counts"]["imported"] == 0

    for raw in (b"{", b"[]", b'{"servers": "web"}', b'{"server": []}'):
        refused = h.http("maps_import", "POST", "http://localhost/api/maps/import", body=raw)
        assert refused.status == 400, raw
        assert refused.json()["error"]["code"] == "invalid_request"


def test_a_failing_server_keeps_its_previous_map(
    app: Container, stack: LoopbackStack, estate: tuple[str, list[SeededServer]]
) -> None:
    _, seeded = estate
    assert stack.loganalytics is not None
    app.map_importer.run(trigger="test")
    before = app.maps.load(seeded[0].computer)
    assert before is not None
    stack.loganalytics.fault_for(seeded[0].machine_id, "malformed")
    try:
        [result] = app.map_importer.run(trigger="test")
    finally:
        stack.loganalytics.clear_faults()
    assert result.failed >= 1, result
    assert seeded[0].computer in result.errors
    after = app.maps.load(seeded[0].computer)
    assert after is not None
    assert after.dependency_keys() == before.dependency_keys()
    listing = app.maps.find(seeded[0].computer)
    assert listing is not None
    assert listing.status.value == "failed"
