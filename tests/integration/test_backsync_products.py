"""Backward sync for every product: resolved in the product closes the correlation (and the alert).

One test, parametrised over Cherwell, Provance and SCSM and over ``--close-azure-alerts``: the
connection is added with the CLI, an alert goes through the webhook and the queue function to the
product's loopback, an analyst resolves the incident there (as the product's own UI would), and the
sync run, through the real connector over HTTPS, reads ``WorkItem.lifecycle`` from the product's
mapping and updates the correlation row; with ``--close-azure-alerts`` it closes the Azure alert at
the loopback Alerts Management API too, once. ServiceNow's cases live in ``test_sync.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared_code.bootstrap import Container
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.delivery import DeliveryStatus
from shared_code.domain.workitem import Lifecycle, WorkItemType
from shared_code.state import workitems as workitems_table
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.engine import SyncOutcome, SyncResult
from tests.hostsim import FunctionHost
from tests.loopback import cherwell as cherwell_loopback
from tests.loopback import provance as provance_loopback
from tests.loopback import scsm as scsm_loopback
from tests.loopback.stack import LoopbackStack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
ALERTS = "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.AlertsManagement/alerts"


@dataclass(frozen=True)
class Product:
    """A product's loopback as the test needs it: how to connect, and how an analyst resolves."""

    options: list[str]
    stdin: str
    resolve: Callable[[str], object]


def cherwell(stack: LoopbackStack, things: ExitStack) -> Product:
    server = things.enter_context(cherwell_loopback.CherwellLoopback())
    return Product(
        ["--type", "cherwell", "--url", server.url, "--user", cherwell_loopback.DEFAULT_USERNAME,
         "--client-id", cherwell_loopback.DEFAULT_CLIENT_ID, "--secrets-stdin"],
        f"{cherwell_loopback.DEFAULT_PASSWORD}\n",
        lambda rec_id: server.update_record(
            "Incident", rec_id, Status="Resolved", CloseDescription="Restarted the agent."
        ),
    )  # fmt: skip


def provance(stack: LoopbackStack, things: ExitStack) -> Product:
    server = provance_loopback.DataverseLoopback(stack.entra).start()
    things.callback(server.stop)
    client_id = str(uuid.uuid4())  # the stack's Entra is shared: an app registration of its own
    provance_loopback.register_app(server, client_id)
    account = server.add_account("Contoso backsync")
    # stock incident has no column for it; back sync needs the one the site adds (docs/provance.md, step 5)
    server.add_column("incident", "new_correlationid", max_length=100)

    def resolve(record_id: str) -> None:
        # what CloseIncident does to the incident (the analyst's "Resolve Case"): resolved, problem solved
        server.update_record("incident", record_id, statecode=1, statuscode=5)

    return Product(
        [
            *provance_loopback.connection_options(server, account, client_id),
            *("--sync", "incidents", "--correlation-column", "new_correlationid"),
        ],
        f"{provance_loopback.PROVANCE_APP_SECRET}\n",
        resolve,
    )


def scsm(stack: LoopbackStack, things: ExitStack) -> Product:
    server = things.enter_context(scsm_loopback.ScsmLoopback())
    return Product(
        ["--type", "scsm", "--url", server.url, "--user", server.username, "--secrets-stdin"],
        f"{server.password}\n",
        lambda base_id: server.update(
            scsm_loopback.INCIDENT, base_id, Status="Resolved", ResolutionDescription="Fixed by the analyst."
        ),
    )


PRODUCTS: dict[str, Callable[[LoopbackStack, ExitStack], Product]] = {
    "cherwell": cherwell,
    "provance": provance,
    "scsm": scsm,
}


@pytest.fixture(params=sorted(PRODUCTS))
def product(request: pytest.FixtureRequest, stack: LoopbackStack) -> Iterator[tuple[str, Product]]:
    with ExitStack() as things:
        yield request.param, PRODUCTS[request.param](stack, things)


def fired_alert(fired: datetime) -> tuple[str, bytes]:
    payload: dict[str, Any] = json.loads((FIXTURES / "metric_fired.json").read_text())
    alert_id = f"{ALERTS}/{uuid.uuid4()}"
    essentials = payload["data"]["essentials"]
    essentials["alertId"] = alert_id
    essentials["firedDateTime"] = fired.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    return alert_id, json.dumps(payload).encode()


def sync(app: Container, name: str) -> SyncResult:
    [result] = [r for r in app.sync_engine.run(name) if r.item_type is WorkItemType.INCIDENT]
    assert result.outcome is SyncOutcome.SUCCEEDED, result.error
    return result


def correlation(app: Container, name: str) -> Correlation:
    [row] = app.correlations.list(name)
    return row


@pytest.mark.parametrize("close_alerts", [True, False], ids=["close-azure-alerts", "keep-azure-alerts"])
def test_an_incident_resolved_in_the_product_finishes_its_correlation_and_closes_its_alert_once(
    app: Container, stack: LoopbackStack, product: tuple[str, Product], close_alerts: bool
) -> None:
    kind, setup = product
    name = f"bs-{kind}-{uuid.uuid4().hex[:8]}"
    flags = ["--close-azure-alerts"] if close_alerts else []
    code, output = stack.cli("connections", "add", name, *setup.options, *flags, stdin=setup.stdin)
    assert code == 0, output
    alert_id, body = fired_alert(datetime.now(UTC) - timedelta(minutes=5))
    stack.alerts.add_alert(alert_id)
    host = FunctionHost(function_app.app, stack.queues())
    call = host.http(
        "receive_alert",
        "POST",
        f"https://func.example/api/alerts/{name}",
        body=body,
        headers={"Content-Type": "application/json"},
        route_params={"connection": name},
    )
    assert call.status == 202, call.response.get_body()
    host.drain("deliver_alert", max_rounds=20)
    delivery = app.deliveries.get(name, call.json()["deliveryId"])
    assert delivery is not None
    assert delivery.status is DeliveryStatus.DELIVERED, delivery.last_error
    opened = correlation(app, name)
    assert opened.state is CorrelationState.OPEN
    assert opened.alert_ids == (alert_id,)

    still_open = sync(app, name)  # the incident is open in the product: nothing to finish
    assert (still_open.correlations_updated, still_open.alerts_closed) == (0, 0)
    assert correlation(app, name).state is CorrelationState.OPEN

    setup.resolve(opened.work_item_id)
    resolved = sync(app, name)

    stored = WorkItemRepository(app.tables.table(workitems_table.TABLE))
    item = stored.get(name, WorkItemType.INCIDENT, opened.work_item_id)
    assert item is not None
    assert item.lifecycle is Lifecycle.RESOLVED
    assert item.correlation_id == f"azmon-{opened.key}-g{opened.generation}"
    assert resolved.correlations_updated == 1
    row = correlation(app, name)
    assert row.state is CorrelationState.RESOLVED
    assert row.generation == opened.generation
    changes = [c for c in stack.alerts.state_changes() if c.alert_id.lower() == alert_id.lower()]
    if close_alerts:
        assert resolved.alerts_closed == 1
        assert stack.alerts.alert_state(alert_id) == "Closed"
        assert [c.new_state for c in changes] == ["Closed"]
    else:
        assert resolved.alerts_closed == 0
        assert stack.alerts.alert_state(alert_id) == "New"
        assert changes == []

    again = sync(app, name)  # the finished correlation is not finished twice, the alert not closed twice
    assert (again.correlations_updated, again.alerts_closed) == (0, 0)
    assert len([c for c in stack.alerts.state_changes() if c.alert_id.lower() == alert_id.lower()]) == len(
        changes
    )
