"""The alert path end to end into SCSM: webhook -> Azurite -> queue function -> the loopback Cireson portal.

The functions registered in ``function_app.app`` run through ``tests/hostsim.py`` against the
session's loopback stack (Azurite, Entra ID, Key Vault) and this module's loopback Cireson portal
over TLS; the connection is added with the operator's CLI. The only test double is the app's clock,
injected through the container so that "15 minutes later" needs no waiting.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container
from shared_code.domain.correlation import CorrelationState
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.itsm.scsm.mapping import correlation_of
from tests.hostsim import FunctionHost
from tests.loopback.scsm import INCIDENT, RESOLVED, ScsmLoopback
from tests.loopback.stack import LoopbackStack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
ALERTS = "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.AlertsManagement/alerts"
T0 = datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC)


def azure_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def alert(alert_id: str, fired_at: datetime, cis: list[str] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((FIXTURES / "metric_fired.json").read_text())
    essentials = payload["data"]["essentials"]
    essentials["alertId"] = f"{ALERTS}/{alert_id}"
    essentials["firedDateTime"] = azure_time(fired_at)
    if cis is not None:
        essentials["configurationItems"] = cis
    return payload


def resolution(payload: dict[str, Any], resolved_at: datetime) -> dict[str, Any]:
    resolved = copy.deepcopy(payload)
    resolved["data"]["essentials"]["monitorCondition"] = "Resolved"
    resolved["data"]["essentials"]["resolvedDateTime"] = azure_time(resolved_at)
    return resolved


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


class Flow:
    """One test's app container, host, portal and connection."""

    def __init__(self, stack: LoopbackStack, container: Container, portal: ScsmLoopback) -> None:
        self.stack = stack
        self.container = container
        self.portal = portal
        self.clock = Clock()
        assert "alert_delivery" not in vars(container)  # the clock goes in before the services are built
        container.clock = self.clock
        self.host = FunctionHost(function_app.app, stack.queues())
        self.name = f"scsm-{uuid.uuid4().hex[:10]}"

    def connect(self, *options: str) -> str:
        code, output = self.stack.cli(
            "connections",
            "add",
            self.name,
            "--type",
            "scsm",
            "--url",
            self.portal.url,
            "--user",
            self.portal.username,
            "--secrets-stdin",
            *options,
            stdin=f"{self.portal.password}\n",
        )
        assert code == 0, output
        return output

    def post(self, payload: object) -> str:
        call = self.host.http(
            "receive_alert",
            "POST",
            f"https://func.example/api/alerts/{self.name}",
            body=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            route_params={"connection": self.name},
        )
        assert call.status == 202, call.response.get_body()
        return str(call.json()["deliveryId"])

    def deliver(self) -> int:
        return self.host.drain("deliver_alert", max_rounds=20)

    def send(self, payload: object) -> Delivery:
        delivery_id = self.post(payload)
        self.deliver()
        row = self.delivery(delivery_id)
        assert row.status is DeliveryStatus.DELIVERED, row.last_error
        return row

    def delivery(self, delivery_id: str) -> Delivery:
        row = self.container.deliveries.get(self.name, delivery_id)
        assert row is not None
        return row

    def incidents(self) -> list[dict[str, Any]]:
        return sorted(self.portal.objects(INCIDENT), key=lambda obj: obj["Id"])

    def notes(self, incident: dict[str, Any]) -> list[str]:
        return [entry["Description"] for entry in self.portal.notes(incident["BaseId"])]


@pytest.fixture
def portal() -> Iterator[ScsmLoopback]:
    with ScsmLoopback() as server:
        yield server


@pytest.fixture
def flow(app: Container, stack: LoopbackStack, portal: ScsmLoopback) -> Iterator[Flow]:
    was = httpretry._testing
    httpretry.set_testing(True)  # Retry-After and backoff without the waiting
    try:
        yield Flow(stack, app, portal)
    finally:
        httpretry.set_testing(was)


def test_fire_creates_one_incident_refire_adds_one_note_and_resolve_resolves_it(flow: Flow) -> None:
    output = flow.connect("--note-interval-minutes", "15")
    assert f"added connection {flow.name} (scsm, {flow.portal.url})" in output
    assert f"itsm-{flow.name}-password" in output
    code, tested = flow.stack.cli("connections", "test", flow.name)
    assert code == 0, tested
    assert "incidents queryable" in tested

    fired = alert("scsm-cycle", T0, cis=["srv-003"])
    first = flow.send(fired)

    assert first.outcome == "created"
    [incident] = flow.incidents()
    assert first.work_item_number == incident["Id"]
    assert incident["Title"].startswith("[Sev2] ")
    assert (incident["Impact"]["Name"], incident["Urgency"]["Name"]) == ("Medium", "Medium")  # Sev2 default
    assert [ci["DisplayName"] for ci in incident["AboutConfigItem"]] == ["srv-003"]
    assert "Percentage CPU" in incident["Description"]
    [row] = list(flow.container.correlations.list(flow.name))
    assert correlation_of(incident["Description"]) == f"azmon-{row.key}-g1"
    assert (row.state, row.work_item_id, row.work_item_number) == (
        CorrelationState.OPEN,
        incident["BaseId"],
        incident["Id"],
    )
    assert flow.notes(incident) == []

    flow.clock.advance(minutes=16)
    refired = flow.send(alert("scsm-cycle", T0 + timedelta(minutes=16), cis=["srv-003"]))

    assert refired.outcome.startswith("noted")
    [incident] = flow.incidents()
    [note] = flow.notes(incident)
    assert "the alert fired again" in note

    flow.clock.advance(minutes=1)
    last = alert("scsm-cycle", T0 + timedelta(minutes=16), cis=["srv-003"])
    resolved = flow.send(resolution(last, T0 + timedelta(minutes=20)))

    assert resolved.outcome == "resolved"
    [incident] = flow.incidents()
    assert incident["Status"]["Id"] == RESOLVED
    assert "the alert resolved at" in incident["ResolutionDescription"]
    assert flow.notes(incident) == [note, incident["ResolutionDescription"]]
    assert incident["TroubleTicketResolvedByUser"]["BaseId"] == flow.portal.user_id
    [row] = list(flow.container.correlations.list(flow.name))
    assert row.state is CorrelationState.RESOLVED


def test_a_create_whose_answer_is_lost_is_recovered_without_a_second_incident(flow: Flow) -> None:
    flow.connect()
    flow.portal.fail_next(1, path_contains="Projection/Commit", body="drop_after")

    row = flow.send(alert("scsm-lost", T0))

    [incident] = flow.incidents()
    assert row.work_item_number == incident["Id"]
    assert row.attempts == 1
    assert flow.portal.write_count() == 1


def test_a_sign_in_page_instead_of_json_fails_the_attempt_clearly_and_the_retry_delivers_once(
    flow: Flow,
) -> None:
    flow.connect()
    flow.portal.fail_next(1, path_contains="Projection/Commit", body="html200")

    delivery_id = flow.post(alert("scsm-html", T0))
    assert flow.deliver() == 2  # the first attempt failed and asked the host for a retry

    row = flow.delivery(delivery_id)
    assert row.status is DeliveryStatus.DELIVERED
    assert row.attempts == 2
    [incident] = flow.incidents()
    assert row.work_item_number == incident["Id"]


def test_an_unknown_support_group_or_a_name_instead_of_a_guid_are_clear_errors(flow: Flow) -> None:
    code, output = flow.stack.cli(
        "connections",
        "add",
        flow.name,
        "--type",
        "scsm",
        "--url",
        flow.portal.url,
        "--user",
        flow.portal.username,
        "--assignment-group",
        "Server Operations",
        "--secrets-stdin",
        stdin=f"{flow.portal.password}\n",
    )
    assert code == 2
    assert "--assignment-group: must be the GUID of an IncidentTierQueuesEnum value" in output
    assert "Traceback" not in output

    flow.connect("--assignment-group", "00000000-0000-4000-8000-00000000beef")
    delivery_id = flow.post(alert("scsm-group", T0))
    flow.deliver()

    row = flow.delivery(delivery_id)
    assert row.status is not DeliveryStatus.DELIVERED
    assert "The enumeration value '00000000-0000-4000-8000-00000000beef'" in row.last_error
    assert flow.incidents() == []
