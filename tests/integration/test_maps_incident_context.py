"""Incidents carry the map: an alert on a mapped server creates an incident whose description
lists who depends on the server and what it depends on, from the latest import.

End to end through the registered functions: a VM Insights import (timer) into Azurite, then an
action-group alert on one of the servers posted to the webhook and delivered through the queue to
the loopback ServiceNow. The lookup failing must not stop the incident.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared_code.alerts.processor import AlertProcessor
from shared_code.alerts.schema import parse_alert
from shared_code.bootstrap import Container, get_container
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.domain.maps import DependencySummary
from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.errors import StateError
from tests.hostsim import FunctionHost
from tests.loopback.loganalytics import SeededServer, seed_vminsights
from tests.loopback.stack import LoopbackStack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
RESOURCE_ID = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg-maps"
    "/providers/Microsoft.OperationalInsights/workspaces/ws-incidents"
)


def metric_alert(ci: str) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((FIXTURES / "metric_fired.json").read_text())
    payload = copy.deepcopy(payload)
    ess = payload["data"]["essentials"]
    ess["alertId"] = ess["alertId"].rsplit("/", 1)[0] + f"/{uuid.uuid4()}"
    ess["alertRule"] = f"cpu-{uuid.uuid4().hex[:6]}"
    ess["configurationItems"] = [ci]
    return payload


def import_estate(app: Container, stack: LoopbackStack, host: FunctionHost) -> list[SeededServer]:
    assert stack.loganalytics is not None
    customer_id = str(uuid.uuid4())
    stack.loganalytics.add_workspace(customer_id)
    seeded = seed_vminsights(
        stack.loganalytics,
        customer_id,
        servers=3,
        connections=8,
        now=datetime.now(UTC),
        prefix=f"vm{uuid.uuid4().hex[:5]}-",
    )
    app.map_sources.add(
        MapSourceDefinition.model_validate(
            {
                "name": "vmi",
                "kind": "vminsights",
                "workspaces": [{"resource_id": RESOURCE_ID, "customer_id": customer_id}],
                "group": {"kind": "computers", "computers": [s.computer for s in seeded]},
            }
        )
    )
    host.timer("maps_import_timer")
    return seeded


def deliver(stack: LoopbackStack, host: FunctionHost, connection: str, payload: dict[str, Any]) -> str:
    call = host.http(
        "receive_alert",
        "POST",
        f"https://func.example/api/alerts/{connection}",
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        route_params={"connection": connection},
    )
    assert call.status == 202, call.response.get_body()
    host.drain("deliver_alert", max_rounds=20)
    delivery = get_delivery(connection, call.json()["deliveryId"])
    assert delivery.status is DeliveryStatus.DELIVERED, delivery.last_error
    [incident] = [
        rec for rec in stack.servicenow.records("incident") if rec["sys_id"] == delivery.work_item_id
    ]
    return incident["description"]


def get_delivery(connection: str, delivery_id: str) -> Delivery:
    row = get_container().deliveries.get(connection, delivery_id)
    assert row is not None
    return row


def test_an_incident_for_a_mapped_server_lists_its_clients_and_dependencies(
    app: Container, stack: LoopbackStack
) -> None:
    host = FunctionHost(function_app.app, stack.queues())
    seeded = import_estate(app, stack, host)
    vm_a = seeded[0]
    stored = app.maps.load(vm_a.computer)
    assert stored is not None
    connection = f"sn-{uuid.uuid4().hex[:10]}"
    stack.add_servicenow_connection(connection)

    description = deliver(stack, host, connection, metric_alert(vm_a.computer.upper()))

    assert f"Dependency map of {vm_a.computer} (imported " in description
    assert stored.imported_at.strftime("%Y-%m-%d %H:%M:%S UTC") in description
    assert "from map source vmi" in description
    depends = next(line for line in description.splitlines() if line.startswith("Depends on: "))
    for peer in seeded[1:]:
        assert f"{peer.computer}:443" in depends  # the other servers it calls
    assert "203.0.0.2:8002" in depends  # an external endpoint it calls
    clients = next(line for line in description.splitlines() if line.startswith("Used by (clients): "))
    assert "Clients of :443" in clients
    assert vm_a.computer not in clients  # a server is not its own client

    # a server nobody mapped: no map section at all
    plain = deliver(stack, host, connection, metric_alert(f"unmapped-{uuid.uuid4().hex[:6]}"))
    assert "Dependency map of" not in plain


class BrokenContext:
    def __init__(self) -> None:
        self.calls = 0

    def summary_for(self, server: str) -> DependencySummary | None:
        self.calls += 1
        raise StateError("Maps table unreachable")


def test_a_failed_lookup_never_blocks_the_incident(caplog: pytest.LogCaptureFixture) -> None:
    broken = BrokenContext()
    processor = AlertProcessor(correlations=None, clock=lambda: datetime.now(UTC), dependencies=broken)  # type: ignore[arg-type]
    signal = parse_alert(metric_alert("vm-a.corp.example"))
    with caplog.at_level(logging.WARNING):
        assert processor.dependency_summary(signal) is None
    assert broken.calls == 1
    assert "creating the incident without it" in caplog.text


class CountingContext:
    def __init__(self, known: dict[str, DependencySummary]) -> None:
        self.known = known
        self.asked: list[str] = []

    def summary_for(self, server: str) -> DependencySummary | None:
        self.asked.append(server)
        return self.known.get(server.lower())


def test_a_host_name_is_also_looked_up_by_its_short_name() -> None:
    summary = DependencySummary(server="vm-a", imported_at=datetime.now(UTC), dependencies=("db:1433",))
    context = CountingContext({"vm-a": summary})
    processor = AlertProcessor(correlations=None, clock=lambda: datetime.now(UTC), dependencies=context)  # type: ignore[arg-type]
    assert processor.dependency_summary(parse_alert(metric_alert("vm-a.corp.example"))) == summary
    assert context.asked == ["vm-a.corp.example", "vm-a"]
