"""The alert path end to end against a loopback Cherwell: webhook -> Azurite -> queue function -> Cherwell.

The functions registered in ``function_app.app`` are driven through ``tests/hostsim.py`` with the
loopback stack of ``tests/conftest.py`` (Azurite, Entra ID, Key Vault) and a loopback Cherwell over
TLS started here; the connection is added with the operator's CLI (``--type cherwell``). Nothing of
the app is replaced: only its clock is injected through the container, so "later" can be minutes
later without waiting.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container, get_container
from shared_code.domain.correlation import CorrelationState
from shared_code.domain.delivery import Delivery, DeliveryStatus
from tests.hostsim import FunctionHost, HttpCall
from tests.loopback.cherwell import DEFAULT_CLIENT_ID, DEFAULT_PASSWORD, DEFAULT_USERNAME, CherwellLoopback
from tests.loopback.stack import LoopbackStack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
ALERTS = "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.AlertsManagement/alerts"
T0 = datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC)
MARKER = "Azure Monitor correlation id: "


def azure_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def alert(alert_id: str, fired_at: datetime, name: str = "metric_fired") -> dict[str, Any]:
    payload: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    essentials = payload["data"]["essentials"]
    essentials["alertId"] = f"{ALERTS}/{alert_id}"
    essentials["firedDateTime"] = azure_time(fired_at)
    return payload


def resolution(payload: dict[str, Any], resolved_at: datetime) -> dict[str, Any]:
    resolved = copy.deepcopy(payload)
    resolved["data"]["essentials"]["monitorCondition"] = "Resolved"
    resolved["data"]["essentials"]["resolvedDateTime"] = azure_time(resolved_at)
    return resolved


class Clock:
    """Real time shifted by ``offset``: still moves (leases expire), but can jump ahead."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


@dataclass
class Flow:
    stack: LoopbackStack
    cherwell: CherwellLoopback
    host: FunctionHost
    clock: Clock
    name: str = field(default_factory=lambda: f"cw-{uuid.uuid4().hex[:12]}")
    before: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.before = {rec["RecID"] for rec in self.cherwell.records("Incident")}

    @property
    def container(self) -> Container:
        return get_container()

    def connect(self, *options: str) -> str:
        """``connections add --type cherwell`` with the password on stdin; returns the CLI's output."""
        code, output = self.stack.cli(
            "connections",
            "add",
            self.name,
            "--type",
            "cherwell",
            "--url",
            self.cherwell.url,
            "--user",
            DEFAULT_USERNAME,
            "--client-id",
            DEFAULT_CLIENT_ID,
            "--secrets-stdin",
            *options,
            stdin=f"{DEFAULT_PASSWORD}\n",
        )
        assert code == 0, output
        return output

    def post(self, payload: object) -> HttpCall:
        return self.host.http(
            "receive_alert",
            "POST",
            f"https://func.example/api/alerts/{self.name}",
            body=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            route_params={"connection": self.name},
        )

    def send(self, payload: object, *, expect: DeliveryStatus = DeliveryStatus.DELIVERED) -> Delivery:
        call = self.post(payload)
        assert call.status == 202, call.response.get_body()
        self.host.drain("deliver_alert", max_rounds=20)
        row = self.container.deliveries.get(self.name, call.json()["deliveryId"])
        assert row is not None
        assert row.status is expect, row.last_error
        return row

    def incidents(self) -> list[dict[str, str]]:
        rows = [rec for rec in self.cherwell.records("Incident") if rec["RecID"] not in self.before]
        return sorted(rows, key=lambda rec: int(rec["IncidentID"]))

    def incident(self) -> dict[str, str]:
        (only,) = self.incidents()
        return only


@pytest.fixture(scope="module")
def cherwell() -> Iterator[CherwellLoopback]:
    with CherwellLoopback() as server:
        yield server


@pytest.fixture
def flow(app: Container, stack: LoopbackStack, cherwell: CherwellLoopback) -> Iterator[Flow]:
    cherwell.clear_faults()
    clock = Clock()
    assert "alert_delivery" not in vars(app)  # the alert services take the clock when built
    app.clock = clock
    yield Flow(stack, cherwell, FunctionHost(function_app.app, stack.queues()), clock)
    cherwell.clear_faults()


@pytest.fixture
def fast_retries() -> Iterator[None]:
    was = httpretry._testing
    httpretry.set_testing(True)
    yield
    httpretry.set_testing(was)


def test_fire_refire_and_resolve_give_one_incident_one_note_and_a_resolution(flow: Flow) -> None:
    output = flow.connect("--note-interval-minutes", "15", "--service", "Infrastructure", "--test")
    assert f"added connection {flow.name} (cherwell, {flow.cherwell.url}/CherwellAPI)" in output
    assert f"OK: {flow.name}: Cherwell at 127.0.0.1 answered as {DEFAULT_USERNAME!r}" in output
    fired = alert("cw-cycle", T0)

    created = flow.send(fired)

    incident = flow.incident()
    assert created.outcome == "created"
    assert created.work_item_number == incident["IncidentID"]
    assert incident["ShortDescription"].startswith("[Sev2] ")
    assert (incident["Impact"], incident["Urgency"], incident["Priority"]) == ("Medium", "Medium", "3")
    assert (incident["Status"], incident["Service"]) == ("New", "Infrastructure")
    (row,) = flow.container.correlations.list(flow.name)
    assert incident["Description"].endswith(f"{MARKER}azmon-{row.key}-g1")
    assert (row.work_item_id, row.state) == (incident["RecID"], CorrelationState.OPEN)

    flow.clock.advance(minutes=1)
    coalesced = flow.send(alert("cw-cycle", T0 + timedelta(minutes=1)))
    flow.clock.advance(minutes=16)
    noted = flow.send(alert("cw-cycle", T0 + timedelta(minutes=17)))
    assert coalesced.outcome.startswith("coalesced")
    assert noted.outcome.startswith("noted")
    (note,) = flow.cherwell.notes(incident["RecID"])
    assert "the alert fired again (2 firings since the last update" in note

    flow.clock.advance(minutes=1)
    resolved = flow.send(resolution(fired, T0 + timedelta(minutes=18)))

    assert resolved.outcome == "resolved"
    incident = flow.incident()
    assert incident["Status"] == "Resolved"
    assert "the alert resolved at" in incident["CloseDescription"]
    assert flow.cherwell.notes(incident["RecID"])[-1] == incident["CloseDescription"]
    assert len(flow.cherwell.notes(incident["RecID"])) == 2
    (row,) = flow.container.correlations.list(flow.name)
    assert row.state is CorrelationState.RESOLVED


def test_a_refire_within_the_window_reopens_the_resolved_incident(flow: Flow) -> None:
    flow.connect("--reopen-window-hours", "24")
    fired = alert("cw-reopen", T0)
    flow.send(fired)
    flow.clock.advance(minutes=5)
    flow.send(resolution(fired, T0 + timedelta(minutes=5)))
    flow.clock.advance(minutes=5)

    reopened = flow.send(alert("cw-reopen-2", T0 + timedelta(minutes=10)))

    assert reopened.outcome == "reopened"
    incident = flow.incident()
    assert incident["Status"] == "Reopened"
    assert "incident reopened" in flow.cherwell.notes(incident["RecID"])[-1]


def test_lost_answers_to_the_create_and_the_note_leave_one_incident_and_one_note(flow: Flow) -> None:
    flow.connect("--note-interval-minutes", "0")
    flow.cherwell.lose_answers(1, "savebusinessobject")
    created = flow.send(alert("cw-lost", T0))
    assert created.outcome == "created"
    incident = flow.incident()
    assert created.work_item_number == incident["IncidentID"]

    flow.cherwell.lose_answers(1, "saverelatedbusinessobject")
    flow.clock.advance(minutes=1)
    noted = flow.send(alert("cw-lost", T0 + timedelta(minutes=1)))

    assert noted.outcome.startswith("noted")
    assert noted.attempts == 1
    assert len(flow.incidents()) == 1
    assert len(flow.cherwell.notes(incident["RecID"])) == 1


def test_a_status_the_site_does_not_allow_fails_the_delivery_with_a_clear_error(
    flow: Flow, fast_retries: None
) -> None:
    flow.connect("--resolved-status", "Fixed")
    fired = alert("cw-status", T0)
    flow.send(fired)
    flow.clock.advance(minutes=2)

    failed = flow.send(resolution(fired, T0 + timedelta(minutes=2)), expect=DeliveryStatus.FAILED)

    assert (
        "Status 'Fixed' (--resolved-status) is not a value Cherwell allows for Incident" in failed.last_error
    )
    assert flow.incident()["Status"] == "New"
    code, output = flow.stack.cli("connections", "test", flow.name)
    assert code == 1
    assert "FAILED" in output
    assert "--resolved-status" in output


def test_refresh_tokens_rotate_into_key_vault_and_no_secret_reaches_a_log_row_or_answer(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    flow.connect("--note-interval-minutes", "0")
    secret_name = f"itsm-{flow.name}-refresh-token"
    texts = [json.dumps(flow.post(alert("cw-secrets", T0)).json())]
    flow.host.drain("deliver_alert", max_rounds=20)
    first = flow.stack.keyvault.secrets_snapshot()[secret_name]
    assert first in flow.cherwell.issued_tokens()

    flow.cherwell.expire_access_tokens()
    flow.clock.advance(minutes=1)
    noted = flow.send(alert("cw-secrets", T0 + timedelta(minutes=1)))

    assert noted.outcome.startswith("noted")
    rotated = flow.stack.keyvault.secrets_snapshot()[secret_name]
    assert rotated != first
    assert rotated in flow.cherwell.issued_tokens()
    texts.append(flow.stack.cli("connections", "show", flow.name)[1])
    texts.append(flow.stack.cli("alerts", "list", "--connection", flow.name)[1])
    texts += [logging.Formatter().format(record) for record in caplog.records]
    tables = flow.container.tables
    for table in ("AlertDeliveries", "Correlations", "Connections"):
        texts += [json.dumps(dict(e), default=str) for e in tables.table(table).list_entities()]
    assert any("obtained a Cherwell access token" in text for text in texts)
    secrets = {DEFAULT_PASSWORD, *flow.cherwell.issued_tokens()}
    leaked = [(secret[:6], text[:100]) for text in texts for secret in secrets if secret in text]
    assert leaked == []
