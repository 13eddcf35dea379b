"""The alert path end to end: action-group webhook -> Azurite -> queue function -> ServiceNow.

Every test drives the functions registered in ``function_app.app`` through ``tests/hostsim.py``
against the loopback stack (Azurite, Entra ID, Key Vault, ServiceNow over TLS), with a connection
added by the real CLI. Nothing of the app is replaced; the only test double is the app's clock,
which is injected through the container (its documented collaborator) so that "later" can be
minutes or hours later without waiting.

The loopback ServiceNow lives for the whole test session (one per xdist worker), so every test uses
its own connection name and looks only at the incidents created after it started.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import function_app
from shared_code import httpretry
from shared_code.alerts.schema import parse_alert
from shared_code.bootstrap import Container, get_container, reset_container
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.delivery import Delivery, DeliveryStatus
from tests.hostsim import FunctionHost, HttpCall
from tests.loopback.servicenow import ServiceNowLoopback
from tests.loopback.stack import LoopbackStack

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
FIRED_FIXTURES = sorted(path.stem for path in FIXTURES.glob("*_fired.json"))
JSON = {"Content-Type": "application/json"}

# impact/urgency per severity for the parametrised test: deliberately unlike the defaults, so the
# test proves the connection's --severity-map is what reaches ServiceNow
SEVERITY_MAP = {"Sev0": (1, 1), "Sev1": (1, 3), "Sev2": (3, 1), "Sev3": (2, 3), "Sev4": (3, 2)}
SEVERITY_MAP_OPTION = ",".join(f"{sev}={impact}/{urgency}" for sev, (impact, urgency) in SEVERITY_MAP.items())

# one fact per fixture that only its alertContext carries: the description must summarise it
CONTEXT_FACTS = {
    "activity_log_administrative_fired": "Operation: Microsoft.Compute/virtualMachines/delete",
    "activity_log_autoscale_fired": "Autoscale: 3 -> 5 instances",
    "activity_log_policy_fired": "Operation: Microsoft.Authorization/policies/audit/action",
    "activity_log_recommendation_fired": "Right-size or shutdown underutilized virtual machines",
    "activity_log_security_fired": "Security finding: category Trojan",
    "application_insights_fired": 'requests | where name == "POST /checkout"',
    "log_alerts_v2_fired": "Heartbeat | summarize",
    "log_analytics_fired": "SecurityEvent | where EventID == 4625",
    "metric_dynamic_fired": "DynamicThresholdCriteria",
    "metric_fired": "Percentage CPU Average GreaterThan 80 (value: 93.4171)",
    "metric_multi_resource_fired": "Available Memory Bytes",
    "prometheus_fired": "kube_pod_container_status_waiting_reason",
    "resource_health_fired": "Health: Available -> Unavailable",
    "service_health_fired": "Tracking id: ZX9Q-4KT",
    "smart_detector_fired": "Detected value: 18.4%",
}

NOTE_COUNT = re.compile(r"the alert fired again \((\d+) firings?")
T0 = datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC)


# -- payloads --------------------------------------------------------------------------------------


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


def azure_time(moment: datetime) -> str:
    """Azure's own spelling: seven fractional digits and a Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


ALERTS = "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.AlertsManagement/alerts"


def alert(
    name: str = "metric_fired",
    *,
    alert_id: str | None = None,
    fired_at: datetime | None = None,
    cis: list[str] | None = None,
    origin: str | None = None,
) -> dict[str, Any]:
    """A fixture with some essentials changed: another firing, another alert, another CI."""
    payload = load(name)
    ess = payload["data"]["essentials"]
    if alert_id is not None:
        ess["alertId"] = f"{ALERTS}/{alert_id}"
    if fired_at is not None:
        ess["firedDateTime"] = azure_time(fired_at)
    if cis is not None:
        ess["configurationItems"] = cis
    if origin is not None:
        ess["originAlertId"] = origin
    return payload


def resolution(payload: dict[str, Any], resolved_at: datetime) -> dict[str, Any]:
    """The Resolved notification of a fired payload (same alertId, same firedDateTime)."""
    resolved = copy.deepcopy(payload)
    resolved["data"]["essentials"]["monitorCondition"] = "Resolved"
    resolved["data"]["essentials"]["resolvedDateTime"] = azure_time(resolved_at)
    return resolved


def encode(payload: object) -> bytes:
    return json.dumps(payload).encode()


# -- the world of one test ---------------------------------------------------------------------------


class Clock:
    """Real time shifted by ``offset``: still moves (leases expire), but can jump ahead."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)


def install_clock(container: Container, clock: Clock) -> None:
    # the alert services take the container's clock when they are built: before any alert
    assert "alert_intake" not in vars(container)
    assert "alert_delivery" not in vars(container)
    container.clock = clock


@dataclass
class Flow:
    stack: LoopbackStack
    host: FunctionHost
    clock: Clock
    name: str = field(default_factory=lambda: f"sn-{uuid.uuid4().hex[:12]}")
    before: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.before = {rec["sys_id"] for rec in self.stack.servicenow.records("incident")}

    @property
    def container(self) -> Container:
        return get_container()

    @property
    def snow(self) -> ServiceNowLoopback:
        return self.stack.servicenow

    def connect(self, *options: str, name: str | None = None) -> str:
        name = name or self.name
        self.stack.add_servicenow_connection(name, *options)
        return name

    # HTTP ------------------------------------------------------------------------------------
    def post(
        self,
        payload: object,
        *,
        connection: str | None = None,
        headers: dict[str, str] | None = None,
        send: bool = True,
    ) -> HttpCall:
        name = connection or self.name
        body = payload if isinstance(payload, bytes) else encode(payload)
        return self.host.http(
            "receive_alert",
            "POST",
            f"https://func.example/api/alerts/{name}",
            body=body,
            headers=JSON if headers is None else headers,
            route_params={"connection": name},
            send_outputs=send,
        )

    def accepted(self, payload: object, *, connection: str | None = None, send: bool = True) -> HttpCall:
        call = self.post(payload, connection=connection, send=send)
        assert call.status == 202, call.response.get_body()
        return call

    def status(self, delivery_id: str, *, connection: str | None = None) -> HttpCall:
        name = connection or self.name
        return self.host.http(
            "alert_status",
            "GET",
            f"https://func.example/api/alerts/{name}/{delivery_id}",
            route_params={"connection": name, "delivery_id": delivery_id},
        )

    def deliver(self) -> int:
        return self.host.drain("deliver_alert", max_rounds=20)

    def send(self, payload: object, *, connection: str | None = None) -> Delivery:
        """Post, deliver through the queue, and return the delivery row."""
        delivery_id = self.accepted(payload, connection=connection).json()["deliveryId"]
        self.deliver()
        row = self.delivery(delivery_id, connection=connection)
        assert row.status is DeliveryStatus.DELIVERED, row.last_error
        return row

    # state -----------------------------------------------------------------------------------
    def delivery(self, delivery_id: str, *, connection: str | None = None) -> Delivery:
        row = self.container.deliveries.get(connection or self.name, delivery_id)
        assert row is not None
        return row

    def deliveries(self, connection: str | None = None) -> list[Delivery]:
        return list(self.container.deliveries.list(connection=connection or self.name))

    def correlations(self, connection: str | None = None) -> list[Correlation]:
        return list(self.container.correlations.list(connection or self.name))

    def correlation(self, connection: str | None = None) -> Correlation:
        (row,) = self.correlations(connection)
        return row

    def incidents(self) -> list[dict[str, str]]:
        """Incidents created since this test started, oldest first."""
        rows = [rec for rec in self.snow.records("incident") if rec["sys_id"] not in self.before]
        return sorted(rows, key=lambda rec: rec["number"])

    def incident(self) -> dict[str, str]:
        (only,) = self.incidents()
        return only

    def notes(self, incident: dict[str, str]) -> list[str]:
        return [e["value"] for e in self.snow.journal(incident["sys_id"]) if e["element"] == "work_notes"]

    def queued(self) -> int:
        queue = self.stack.queues().get_queue_client(self.host.queue_name_of("deliver_alert"))
        return int(queue.get_queue_properties().approximate_message_count or 0)


def note_firings(notes: list[str]) -> int:
    """Firings the re-fire notes report ("the alert fired again (3 firings since ...")."""
    return sum(int(m.group(1)) for note in notes for m in NOTE_COUNT.finditer(note))


@pytest.fixture
def fast_retries() -> Iterator[None]:
    """Retry backoff and Retry-After waits without the waiting (restored afterwards)."""
    was = httpretry._testing
    httpretry.set_testing(True)
    yield
    httpretry.set_testing(was)


@pytest.fixture
def flow(app: Container, stack: LoopbackStack) -> Flow:
    clock = Clock()
    install_clock(app, clock)
    return Flow(stack, FunctionHost(function_app.app, stack.queues()), clock)


@pytest.fixture
def low_attempts_flow(stack: LoopbackStack, fast_retries: None) -> Iterator[Flow]:
    """Like ``flow``, with ALERT_MAX_ATTEMPTS=2 (so a failing delivery gives up quickly)."""
    prefix = f"e2e{uuid.uuid4().hex[:12]}"
    stack.servicenow.clear_faults()
    with stack.app(TABLE_PREFIX=prefix, ALERT_MAX_ATTEMPTS="2") as container:
        queues = stack.queues()
        for queue in queues.list_queues():
            queues.get_queue_client(queue.name).clear_messages()
        clock = Clock()
        install_clock(container, clock)
        yield Flow(stack, FunctionHost(function_app.app, queues), clock)
    stack.servicenow.clear_faults()


def in_threads(count: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` for i in range(count) on ``count`` threads released together."""
    start = threading.Barrier(count)

    def run(i: int) -> Any:
        start.wait(timeout=10)
        return action(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


# -- 1. every monitoring service -------------------------------------------------------------------


def expected_targets(essentials: dict[str, Any]) -> str:
    # configurationItems (an ARM id shown by its resource name), else the targets' names; a bare
    # subscription is no configuration item and is shown as "subscription <id>"
    items = essentials.get("configurationItems") or essentials.get("alertTargetIDs") or []
    names = [
        f"subscription {item.split('/')[2]}"
        if re.fullmatch(r"/subscriptions/[^/]+/?", item)
        else item.rstrip("/").rsplit("/", 1)[-1]
        if item.startswith("/subscriptions/")
        else item
        for item in items
    ]
    unique: list[str] = []
    for item in names:
        if item.lower() not in {seen.lower() for seen in unique}:
            unique.append(item)
    return ", ".join(unique)


@pytest.mark.parametrize("fixture", FIRED_FIXTURES)
def test_every_fired_fixture_becomes_one_incident_with_mapped_fields(flow: Flow, fixture: str) -> None:
    flow.connect("--severity-map", SEVERITY_MAP_OPTION)
    payload = load(fixture)
    ess = payload["data"]["essentials"]

    call = flow.post(payload)

    assert call.status == 202
    answer = call.json()
    assert answer["duplicate"] is False
    assert answer["status"] == "pending"
    assert re.fullmatch(r"[0-9a-f]{32}", answer["deliveryId"])
    assert answer["statusUrl"] == f"/api/alerts/{flow.name}/{answer['deliveryId']}"
    assert flow.deliver() == 1

    incident = flow.incident()
    impact, urgency = SEVERITY_MAP[ess["severity"]]
    assert (
        incident["short_description"] == f"[{ess['severity']}] {ess['alertRule']} on {expected_targets(ess)}"
    )
    assert (incident["impact"], incident["urgency"]) == (str(impact), str(urgency))
    assert incident["contact_type"] == "monitoring"
    assert incident["state"] == "1"
    description = incident["description"]
    assert "Alert context:" in description
    assert CONTEXT_FACTS[fixture] in description
    link = ess.get("investigationLink") or (
        "https://portal.azure.com/#view/Microsoft_Azure_Monitoring_Alerts/AlertDetails.ReactView/alertId~/"
        + ess["alertId"].replace("/", "%2F")
    )
    assert f"Open in the Azure portal: {link}" in description
    row = flow.correlation()
    assert incident["correlation_id"] == f"azmon-{row.key}-g1"
    assert row.state is CorrelationState.OPEN
    assert (row.work_item_id, row.work_item_number) == (incident["sys_id"], incident["number"])
    delivered = flow.delivery(answer["deliveryId"])
    assert delivered.status is DeliveryStatus.DELIVERED
    assert delivered.attempts == 1
    assert delivered.outcome == "created"
    assert delivered.work_item_number == incident["number"]
    assert flow.notes(incident) == []


# -- 1b. Microsoft's published payloads: budgets, health events, subscription-scoped alerts ---------

BUDGET_TEST_ACTIONS = [
    "cost_budget_test_action",
    "cost_budget_actual_test_action",
    "cost_budget_forecasted_test_action",
]


@pytest.mark.parametrize("fixture", BUDGET_TEST_ACTIONS)
def test_a_budget_alert_opens_an_incident_at_the_connection_default_severity(
    flow: Flow, fixture: str
) -> None:
    flow.connect("--default-severity", "Sev1", "--severity-map", SEVERITY_MAP_OPTION, "--create-ci")
    payload = load(fixture)
    budget = payload["data"]["alertContext"]["AlertData"]
    cis_before = len(flow.snow.records("cmdb_ci"))

    call = flow.post(payload)

    assert call.status == 202, call.json()  # Azure never retries a 4xx: a refusal loses the alert
    assert flow.deliver() == 1
    incident = flow.incident()
    subscription = budget["Scope"].split("/")[2]
    assert incident["short_description"] == f"[Sev1] {budget['BudgetName']} on subscription {subscription}"
    assert (incident["impact"], incident["urgency"]) == tuple(str(n) for n in SEVERITY_MAP["Sev1"])
    assert f"Budget: {budget['BudgetName']}" in incident["description"]
    assert "the alert has no severity: the connection's default" in incident["description"]
    assert incident["cmdb_ci"] == ""  # neither "budgets" (the category) nor the subscription
    assert len(flow.snow.records("cmdb_ci")) == cis_before


HEALTH_SEQUENCES = {
    "service-health": ("service_health_fired", "service_health_update", "service_health_resolved"),
    "resource-health": ("resource_health_fired", "resource_health_update", "resource_health_resolved"),
}


@pytest.mark.parametrize("kind", sorted(HEALTH_SEQUENCES))
def test_a_health_event_is_one_incident_its_updates_notes_and_its_recovery_the_resolution(
    flow: Flow, kind: str
) -> None:
    flow.connect("--note-interval-minutes", "60")
    active, update, recovery = (load(name) for name in HEALTH_SEQUENCES[kind])

    created = flow.send(active)
    flow.clock.advance(minutes=5)
    noted = flow.send(update)
    flow.clock.advance(minutes=5)
    resolved = flow.send(recovery)

    assert (created.outcome, noted.outcome.split(":")[0], resolved.outcome) == (
        "created",
        "noted",
        "resolved",
    )
    incident = flow.incident()  # one incident for the whole event
    assert incident["state"] == "6"
    notes = flow.notes(incident)
    assert len(notes) == 2
    assert "update on this problem" in notes[0]
    assert "the problem recovered" in incident["close_notes"]
    assert flow.correlation().state is CorrelationState.RESOLVED


def test_a_subscription_scoped_alert_never_creates_a_ci_named_by_the_subscription(flow: Flow) -> None:
    flow.connect("--create-ci")
    payload = load("service_health_fired")
    subscription = payload["data"]["essentials"]["alertTargetIDs"][0].split("/")[2]
    requests_before = len(flow.snow.requests)

    flow.send(payload)

    incident = flow.incident()
    assert incident["cmdb_ci"] == ""
    assert not [ci for ci in flow.snow.records("cmdb_ci") if subscription in str(ci.get("name", ""))]
    assert not [path for _, path, _ in flow.snow.requests[requests_before:] if "cmdb_ci" in path]
    assert incident["short_description"].endswith(f"on subscription {subscription}")


# -- 2. fire, re-fire, resolve -----------------------------------------------------------------------


def test_refires_are_coalesced_into_one_note_per_interval_and_resolve_closes_the_incident(flow: Flow) -> None:
    flow.connect("--note-interval-minutes", "15", "--close-code", "Resolved by monitoring")
    first = flow.send(alert(alert_id="cycle-1", fired_at=T0))
    assert first.outcome == "created"
    incident = flow.incident()
    # Sev2 under the default severity map
    assert (incident["impact"], incident["urgency"]) == ("2", "2")

    # the alert fires again under its own id (another evaluation): one Azure alert, one problem
    outcomes = []
    for minute in (1, 2):
        flow.clock.advance(minutes=1)
        outcomes.append(flow.send(alert(alert_id="cycle-1", fired_at=T0 + timedelta(minutes=minute))).outcome)
    assert [o.split(":")[0] for o in outcomes] == ["coalesced", "coalesced"]
    assert flow.notes(incident) == []  # inside the interval: counted, not noted

    flow.clock.advance(minutes=15)
    noted = flow.send(alert(alert_id="cycle-1", fired_at=T0 + timedelta(minutes=17)))
    assert noted.outcome.startswith("noted")
    (note,) = flow.notes(incident)
    assert "the alert fired again (3 firings since the last update" in note
    assert "Percentage CPU" in note

    flow.clock.advance(minutes=1)
    last = alert(alert_id="cycle-1", fired_at=T0 + timedelta(minutes=17))
    flow.send(last)  # the same notification again: an action-group retry
    flow.clock.advance(minutes=1)
    resolved = flow.send(resolution(last, T0 + timedelta(minutes=20)))

    assert resolved.outcome == "resolved"
    (incident,) = flow.incidents()
    assert incident["state"] == "6"
    assert incident["close_code"] == "Resolved by monitoring"
    assert "the alert resolved at" in incident["close_notes"]
    assert "It fired 4 time(s) in all." in incident["close_notes"]
    notes = flow.notes(incident)
    assert len(notes) == 2
    assert notes[-1] == incident["close_notes"]
    assert flow.correlation().state is CorrelationState.RESOLVED


def test_without_auto_resolve_a_resolution_only_adds_a_note(flow: Flow) -> None:
    flow.connect("--no-auto-resolve")
    fired = alert(alert_id="manual-1", fired_at=T0)
    flow.send(fired)
    flow.clock.advance(minutes=5)

    resolved = flow.send(resolution(fired, T0 + timedelta(minutes=5)))

    assert resolved.outcome == "noted"
    incident = flow.incident()
    assert incident["state"] == "1"
    assert not incident.get("close_code")
    (note,) = flow.notes(incident)
    assert "the alert resolved at 2024-05-06 07:05:00 UTC" in note
    assert "Auto-resolve is off" in note
    assert flow.correlation().state is CorrelationState.OPEN


def test_a_resolution_without_an_open_incident_changes_nothing(flow: Flow) -> None:
    flow.connect()
    writes = flow.snow.write_count()

    row = flow.send(resolution(alert(alert_id="never-fired", fired_at=T0), T0 + timedelta(minutes=3)))

    assert row.outcome.startswith("ignored")
    assert flow.incidents() == []
    assert flow.snow.write_count() == writes
    # the firing it overtook (its delivery was retried) arrives now: it must not open an incident
    # that nothing would ever resolve
    late = flow.send(alert(alert_id="never-fired", fired_at=T0))
    assert late.outcome.startswith("ignored")
    assert flow.incidents() == []


# -- 3. correlation modes ----------------------------------------------------------------------------


def test_per_alert_correlation_gives_each_alert_its_own_incident(flow: Flow) -> None:
    flow.connect("--correlation", "per-alert", "--note-interval-minutes", "0")
    flow.send(alert(alert_id="alert-a", origin="origin-a", fired_at=T0))
    flow.send(alert(alert_id="alert-b", origin="origin-b", fired_at=T0))
    assert len(flow.incidents()) == 2

    flow.clock.advance(minutes=5)
    again = flow.send(alert(alert_id="alert-a", origin="origin-a", fired_at=T0 + timedelta(minutes=5)))

    assert again.outcome.startswith("noted")
    first, second = flow.incidents()
    assert again.work_item_number == first["number"]
    assert len(flow.notes(first)) == 1
    assert flow.notes(second) == []


def test_per_rule_and_ci_correlation_is_the_default_and_separates_cis(flow: Flow) -> None:
    flow.connect("--note-interval-minutes", "0")
    ci_name = f"vm-e2e-{uuid.uuid4().hex[:8]}"
    (ci_sys_id,) = flow.snow.seed_cis([ci_name])

    flow.send(alert(alert_id="ci-1", cis=[ci_name], fired_at=T0))
    flow.send(alert(alert_id="ci-2", cis=["vm-other"], fired_at=T0))
    flow.clock.advance(minutes=1)
    again = flow.send(alert(alert_id="ci-3", cis=[ci_name.upper()], fired_at=T0 + timedelta(minutes=1)))

    first, second = flow.incidents()
    assert first["cmdb_ci"] == ci_sys_id
    assert not second.get("cmdb_ci")  # no such CI in the CMDB, and creating CIs is off
    assert again.work_item_number == first["number"]  # CI names compare without case
    assert len(flow.notes(first)) == 1
    assert flow.notes(second) == []
    assert len(flow.correlations()) == 2


def test_per_rule_correlation_appends_a_later_ci_as_a_note(flow: Flow) -> None:
    flow.connect("--correlation", "per-rule")  # default 15-minute note interval
    flow.send(alert(alert_id="rule-1", cis=["vm-web-01"], fired_at=T0))
    flow.clock.advance(minutes=1)
    flow.send(alert(alert_id="rule-2", cis=["vm-web-01"], fired_at=T0 + timedelta(minutes=1)))
    incident = flow.incident()
    assert flow.notes(incident) == []  # same CI, inside the interval: only counted

    flow.clock.advance(minutes=1)
    added = flow.send(alert(alert_id="rule-3", cis=["vm-web-02"], fired_at=T0 + timedelta(minutes=2)))

    assert added.outcome.startswith("noted")
    (note,) = flow.notes(flow.incident())
    assert "Also affecting: vm-web-02" in note
    assert "the alert fired again (2 firings since the last update" in note
    assert flow.correlation().configuration_items == ("vm-web-01", "vm-web-02")


# -- 4. fired again after resolution -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window_hours", "later", "reopened"),
    [("24", timedelta(hours=1), True), ("1", timedelta(hours=2), False), ("0", timedelta(minutes=1), False)],
    ids=["within-window-reopens", "after-window-new-incident", "zero-window-new-incident"],
)
def test_fired_after_resolution_reopens_within_the_window_else_opens_a_new_incident(
    flow: Flow, window_hours: str, later: timedelta, reopened: bool
) -> None:
    flow.connect("--reopen-window-hours", window_hours)
    fired = alert(alert_id="first-cycle", fired_at=T0)
    flow.send(fired)
    flow.send(resolution(fired, T0 + timedelta(minutes=10)))
    assert flow.incident()["state"] == "6"

    flow.clock.advance(seconds=later.total_seconds())
    again = flow.send(alert(alert_id="second-cycle", fired_at=T0 + later + timedelta(minutes=10)))

    row = flow.correlation()
    assert row.state is CorrelationState.OPEN
    if reopened:
        assert again.outcome == "reopened"
        incident = flow.incident()
        assert incident["state"] == "2"
        assert "incident reopened" in flow.notes(incident)[-1]
        assert row.generation == 1
    else:
        assert again.outcome == "created"
        old, new = flow.incidents()
        assert old["state"] == "6"
        assert new["state"] == "1"
        assert new["correlation_id"] == f"azmon-{row.key}-g2"
        assert again.work_item_number == new["number"]
        assert flow.notes(new) == []


def test_a_late_fired_notification_of_a_resolved_alert_is_ignored(flow: Flow) -> None:
    flow.connect()
    fired = alert(alert_id="late", fired_at=T0)
    flow.send(fired)
    flow.send(resolution(fired, T0 + timedelta(minutes=2)))
    writes = flow.snow.write_count()

    # a Fired of the resolved alert stamped before the resolution, arriving after it
    late = alert(alert_id="late", fired_at=T0 - timedelta(seconds=30))
    row = flow.send(late)

    assert row.outcome.startswith("ignored")
    assert flow.snow.write_count() == writes
    assert flow.incident()["state"] == "6"


# -- 5. idempotency --------------------------------------------------------------------------------


def test_the_same_payload_posted_twice_is_stored_queued_and_delivered_once(flow: Flow) -> None:
    flow.connect()
    payload = alert(alert_id="twice", fired_at=T0)
    first = flow.accepted(payload).json()
    second = flow.accepted(payload).json()

    assert second["duplicate"] is True
    assert second["deliveryId"] == first["deliveryId"]
    assert flow.queued() == 1
    assert flow.deliver() == 1
    assert len(flow.deliveries()) == 1
    incident = flow.incident()

    third = flow.accepted(payload).json()  # after delivery too
    assert third["duplicate"] is True
    assert third["status"] == "delivered"
    assert flow.deliver() == 0
    assert flow.incident()["sys_id"] == incident["sys_id"]
    assert flow.notes(incident) == []


def test_a_retried_post_whose_queue_message_was_lost_is_queued_again_once_stale(flow: Flow) -> None:
    flow.connect()
    payload = alert(alert_id="lost-message", fired_at=T0)
    flow.accepted(payload, send=False)  # stored, then the queue message never made it

    soon = flow.accepted(payload)  # an immediate retry: the first may still be in flight
    assert soon.json()["duplicate"] is True
    assert soon.outputs == {}
    flow.clock.advance(minutes=2)
    later = flow.accepted(payload)

    assert later.json()["duplicate"] is True
    assert "delivery" in later.outputs
    assert flow.deliver() == 1
    assert len(flow.incidents()) == 1
    assert len(flow.deliveries()) == 1


def test_the_redrive_timer_queues_a_pending_alert_whose_message_was_lost_once(flow: Flow) -> None:
    flow.connect()
    delivery_id = flow.accepted(alert(alert_id="timer", fired_at=T0), send=False).json()["deliveryId"]

    assert flow.host.timer("redrive_stale_alerts") == {}  # young: its message may still be queued
    assert flow.delivery(delivery_id).status is DeliveryStatus.PENDING
    flow.clock.advance(minutes=11)
    queued = flow.host.timer("redrive_stale_alerts")
    assert [json.loads(m)["deliveryId"] for m in queued["deliveries"]] == [delivery_id]
    assert flow.host.timer("redrive_stale_alerts") == {}  # in flight now: not queued twice
    assert flow.deliver() == 1

    row = flow.delivery(delivery_id)
    assert row.status is DeliveryStatus.DELIVERED
    assert row.work_item_number == flow.incident()["number"]


def test_twenty_concurrent_posts_of_one_payload_are_stored_and_queued_once(flow: Flow) -> None:
    flow.connect()
    body = encode(alert(alert_id="storm", fired_at=T0))

    answers = in_threads(20, lambda _: flow.post(body))

    assert [call.status for call in answers] == [202] * 20
    assert len({call.json()["deliveryId"] for call in answers}) == 1
    assert sum(not call.json()["duplicate"] for call in answers) == 1
    assert sum(bool(call.outputs) for call in answers) == 1
    assert len(flow.deliveries()) == 1
    assert flow.deliver() == 1
    assert len(flow.incidents()) == 1
    assert flow.notes(flow.incident()) == []


def test_twenty_concurrent_deliveries_of_one_message_create_one_incident(flow: Flow) -> None:
    flow.connect("--note-interval-minutes", "0")
    call = flow.accepted(alert(alert_id="redelivered", fired_at=T0), send=False)
    message = call.outputs["delivery"]

    in_threads(20, lambda _: flow.host.call_queue("deliver_alert", message))

    incident = flow.incident()
    assert flow.notes(incident) == []
    row = flow.correlation()
    assert row.fire_count == 1
    assert row.unnoted_fires == 0
    delivered = flow.delivery(call.json()["deliveryId"])
    assert delivered.status is DeliveryStatus.DELIVERED
    assert delivered.work_item_number == incident["number"]
    assert delivered.outcome == "created"  # the redeliveries that found it done do not overwrite it


def test_twenty_concurrent_refires_of_one_problem_give_one_incident_and_no_duplicate_notes(
    flow: Flow,
) -> None:
    flow.connect("--note-interval-minutes", "0")
    messages = [
        flow.accepted(alert(alert_id=f"refire-{i}", fired_at=T0 + timedelta(seconds=i)), send=False).outputs[
            "delivery"
        ]
        for i in range(20)
    ]

    in_threads(20, lambda i: flow.host.call_queue("deliver_alert", messages[i]))

    incident = flow.incident()
    row = flow.correlation()
    notes = flow.notes(incident)
    assert row.fire_count == 20
    # every firing but the first is in exactly one note or still waiting for the next one
    assert note_firings(notes) + row.unnoted_fires == 19
    assert len(set(notes)) == len(notes) <= 19  # each names its own latest firing: none is repeated
    assert row.lease_owner == ""

    # the whole storm delivered again (the host retried every message): nothing new
    in_threads(20, lambda i: flow.host.call_queue("deliver_alert", messages[i]))
    assert flow.notes(incident) == notes
    assert flow.correlation().fire_count == 20
    assert len(flow.incidents()) == 1
    outcomes = sorted(row.outcome.split(":")[0] for row in flow.deliveries())
    assert outcomes.count("created") == 1
    assert set(outcomes) <= {"created", "noted", "coalesced"}


# -- 6. bad input ------------------------------------------------------------------------------------


def _invalid_severity() -> bytes:
    payload = load("metric_fired")
    payload["data"]["essentials"]["severity"] = "Critical"
    return encode(payload)


def _bad_time() -> bytes:
    payload = load("metric_fired")
    payload["data"]["essentials"]["firedDateTime"] = "yesterday"
    return encode(payload)


def _lone_surrogate(*path: str | int) -> Callable[[], bytes]:
    """The fixture with an unpaired UTF-16 surrogate (sent as the JSON escape \\ud800) at ``path``."""

    def body() -> bytes:
        payload = load("log_alerts_v2_fired")
        node: Any = payload
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = "vm-web-01 \ud800 high"
        return encode(payload)  # json.dumps escapes it: the bytes are plain ASCII

    return body


def _huge_integer() -> bytes:
    payload = load("metric_fired")
    payload["data"]["alertContext"]["condition"]["allOf"][0]["metricValue"] = "@HUGE@"
    return encode(payload).replace(b'"@HUGE@"', b"9" * 5_000)


def _essential_time(field: str, text: str) -> Callable[[], bytes]:
    def body() -> bytes:
        payload = load("metric_resolved")
        payload["data"]["essentials"][field] = text
        return encode(payload)

    return body


BAD_REQUESTS: list[tuple[str, Callable[[], bytes], str, int, str, str]] = [
    ("malformed-json", lambda: b'{"schemaId": ', "application/json", 400, "malformed_json", "not valid JSON"),
    ("not-utf8", lambda: b'{"a": "\xff\xfe"}', "application/json", 400, "malformed_json", "not valid JSON"),
    (
        "nested-too-deep",
        lambda: b"[" * 100_000,
        "application/json",
        400,
        "malformed_json",
        "nested too deeply",
    ),
    ("text-plain", lambda: encode(load("metric_fired")), "text/plain", 415, "unsupported_media_type", "JSON"),
    (
        "over-256-kib",
        lambda: b'{"pad": "' + b"x" * (256 * 1024) + b'"}',
        "application/json",
        413,
        "payload_too_large",
        "limit is 262144 bytes",
    ),
    (
        "legacy-metric-alert",
        lambda: encode(load("legacy_metric_alert")),
        "application/json",
        422,
        "not_common_alert_schema",
        "Enable the common alert schema in the action group",
    ),
    (
        "legacy-log-alert",
        lambda: encode(load("legacy_log_alert")),
        "application/json",
        422,
        "not_common_alert_schema",
        "Enable the common alert schema in the action group",
    ),
    ("json-array", lambda: b"[1, 2]", "application/json", 422, "not_common_alert_schema", "JSON array"),
    (
        "invalid-severity",
        _invalid_severity,
        "application/json",
        422,
        "invalid_alert",
        "data.essentials.severity: must be one of Sev0",
    ),
    ("bad-fired-time", _bad_time, "application/json", 422, "invalid_alert", "data.essentials.firedDateTime"),
    *(
        (f"lone-surrogate-{where}", _lone_surrogate(*path), "application/json", 400, "malformed_json", shown)
        for where, path, shown in [
            ("alert-id", ("data", "essentials", "alertId"), "data.essentials.alertId holds"),
            ("alert-rule", ("data", "essentials", "alertRule"), "data.essentials.alertRule holds"),
            ("description", ("data", "essentials", "description"), "data.essentials.description holds"),
            ("ci", ("data", "essentials", "configurationItems", 0), "data.essentials.configurationItems[0]"),
            (
                "context",
                ("data", "alertContext", "condition", "windowSize"),
                "alertContext.condition.windowSize",
            ),
        ]
    ),
    ("huge-integer", _huge_integer, "application/json", 400, "malformed_json", "more than 4,300 digits"),
    (
        "fired-time-before-year-1-in-utc",
        _essential_time("firedDateTime", "0001-01-01T00:00:00+14:00"),
        "application/json",
        422,
        "invalid_alert",
        "data.essentials.firedDateTime: is out of range",
    ),
    (
        "resolved-time-before-1601",
        _essential_time("resolvedDateTime", "1600-12-31T23:59:59.0000000Z"),
        "application/json",
        422,
        "invalid_alert",
        "data.essentials.resolvedDateTime: is before 1601",
    ),
]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_is_answered_4xx_and_nothing_is_stored(
    flow: Flow, body: Callable[[], bytes], content_type: str, status: int, code: str, message: str
) -> None:
    flow.connect()

    call = flow.post(body(), headers={"Content-Type": content_type})

    assert call.status == status, call.json()
    error = call.json()["error"]
    assert error["code"] == code
    assert message in error["message"]
    if code == "invalid_alert":
        assert error["path"] == message.split(":")[0]
    assert call.outputs == {}
    assert flow.deliveries() == []
    assert flow.queued() == 0


@pytest.mark.parametrize("connection", ["sn-nobody", "no such/../name"])
def test_an_unknown_connection_is_404_and_nothing_is_stored(flow: Flow, connection: str) -> None:
    flow.connect()

    call = flow.post(load("metric_fired"), connection=connection)

    assert call.status == 404
    assert call.json()["error"]["code"] == "not_found"
    assert call.outputs == {}
    assert flow.queued() == 0
    assert flow.deliveries() == []


def _signal_json() -> dict[str, Any]:
    signal: dict[str, Any] = json.loads(parse_alert(load("metric_fired")).model_dump_json())
    return signal


FORGED_MESSAGES: dict[str, Callable[[], str]] = {
    "bad-json": lambda: '{"connection": ',
    "not-utf8": lambda: b'{"connection": "\xff"}'.decode("latin-1"),
    "json-array": lambda: "[1, 2]",
    "wrong-types": lambda: json.dumps({"connection": 5, "deliveryId": ["x"]}),
    "traversal-in-connection": lambda: json.dumps(
        {"connection": "../../Connections", "deliveryId": "0" * 32}
    ),
    "traversal-with-signal": lambda: json.dumps(
        {"connection": "sn/../x", "deliveryId": "0" * 32, "signal": _signal_json()}
    ),
    "huge-delivery-id": lambda: json.dumps({"connection": "sn-x", "deliveryId": "a" * 20_000}),
    "unknown-field": lambda: json.dumps({"connection": "sn-x", "deliveryId": "0" * 32, "x" * 5_000: 1}),
    "damaged-signal": lambda: json.dumps(
        {"connection": "sn-x", "deliveryId": "0" * 32, "signal": {"alert_id": "x", "severity": "Sev9"}}
    ),
}


@pytest.mark.parametrize("kind", sorted(FORGED_MESSAGES))
def test_a_forged_or_damaged_queue_message_is_dropped_and_writes_nothing(
    flow: Flow, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    flow.connect()
    body = FORGED_MESSAGES[kind]()

    with caplog.at_level(logging.ERROR):
        flow.host.call_queue("deliver_alert", body)  # returns: no uncaught error, no retry

    assert flow.deliveries() == []
    assert list(flow.container.tables.table("AlertDeliveries").list_entities()) == []
    assert list(flow.container.tables.table("Correlations").list_entities()) == []
    assert flow.incidents() == []
    dropped = [r.getMessage() for r in caplog.records if "dropping queue message" in r.getMessage()]
    assert dropped, [r.getMessage() for r in caplog.records]
    assert all(len(line) < 600 for line in dropped)


def test_a_message_for_an_unknown_connection_writes_no_row(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    flow.connect()
    message = {
        "connection": "sn-nobody",
        "deliveryId": "0123456789abcdef0123456789abcdef",
        "signal": _signal_json(),
    }

    with caplog.at_level(logging.ERROR):
        flow.host.call_queue("deliver_alert", json.dumps(message))

    assert flow.deliveries(connection="sn-nobody") == []
    assert list(flow.container.tables.table("AlertDeliveries").list_entities()) == []
    assert flow.incidents() == []
    assert any("no connection named sn-nobody" in r.getMessage() for r in caplog.records)


def test_a_stored_delivery_of_a_removed_connection_ends_failed(flow: Flow) -> None:
    flow.connect()
    delivery_id = flow.accepted(alert(alert_id="removed", fired_at=T0), send=True).json()["deliveryId"]
    code, output = flow.stack.cli("connections", "remove", flow.name)
    assert code == 0, output

    flow.deliver()

    row = flow.delivery(delivery_id)
    assert row.status is DeliveryStatus.FAILED
    assert "no ITSM connection named" in row.last_error
    assert flow.incidents() == []


def test_long_client_values_are_cut_in_error_messages(flow: Flow) -> None:
    flow.connect()
    huge_name = "n" * 100_000

    unknown = flow.post(load("metric_fired"), connection=huge_name)
    huge_id = flow.status("a" * 16_000)

    assert unknown.status == 404
    assert len(unknown.json()["error"]["message"]) < 200
    assert "…" in unknown.json()["error"]["message"]
    assert huge_id.status == 404  # not 503: an id that is not one never reaches storage
    assert len(huge_id.json()["error"]["message"]) < 250
    surrogate_key = flow.post(b'{"' + b"k" * 100_000 + b'": "\\ud800"}')
    assert surrogate_key.status == 400
    assert len(surrogate_key.json()["error"]["message"]) < 300
    wrong_type = flow.post(load("metric_fired"), headers={"Content-Type": "text/" + "x" * 50_000})
    assert wrong_type.status == 415
    assert len(wrong_type.json()["error"]["message"]) < 200


def _outsized(kind: str) -> dict[str, Any]:
    payload = alert(alert_id=f"outsized-{kind}", fired_at=T0)
    ess = payload["data"]["essentials"]
    if kind == "long-ascii":  # a rule description of 200 KB and 300 configuration items
        ess["description"] = "Runbook: " + "restart the pool and page the owner. " * 5_500
        ess["configurationItems"] = [f"vm-pool-{i:04d}.corp.example" for i in range(300)]
    else:  # 25,000 CJK characters: small in UTF-16, 75 KB in UTF-8
        ess["description"] = "Runbook: " + "警报说明" * 6_250
    return payload


@pytest.mark.parametrize("kind", ["long-ascii", "long-cjk"])
def test_an_outsized_alert_is_accepted_stored_within_table_limits_and_delivered(
    flow: Flow, kind: str
) -> None:
    flow.connect()
    payload = _outsized(kind)
    assert len(encode(payload)) < 256 * 1024

    call = flow.post(payload)

    assert call.status == 202, call.json()
    assert len(call.outputs["delivery"].encode()) <= 48 * 1024  # what a queue message holds
    assert flow.deliver() == 1
    (row,) = flow.deliveries()
    assert row.status is DeliveryStatus.DELIVERED, row.last_error
    (entity,) = flow.container.tables.table("AlertDeliveries").list_entities()
    assert len(entity["Signal"].encode("utf-16-le")) <= 64 * 1024
    incident = flow.incident()
    assert "Rule description: Runbook: " in incident["description"]
    assert incident["short_description"].startswith("[Sev2] vm-web-01 high CPU on ")


# -- 7. faults ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, 20), (503, None), (503, 7)],
    ids=["429-retry-after", "503", "503-retry-after"],
)
def test_servicenow_throttling_or_outage_that_ends_is_retried_and_delivered(
    flow: Flow, fast_retries: None, caplog: pytest.LogCaptureFixture, status: int, retry_after: int | None
) -> None:
    flow.connect()
    flow.snow.fail_next(2, status, retry_after=retry_after)
    caplog.set_level(logging.WARNING, logger="shared_code.httpretry")

    row = flow.send(alert(alert_id="throttled", fired_at=T0))

    assert row.attempts == 1  # retried inside the attempt, not through the queue
    assert row.outcome == "created"
    assert flow.incident()["number"] == row.work_item_number
    waits = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(rf"after HTTP {status} .* in ([0-9.]+) s", r.getMessage()))
    ]
    assert len(waits) == 2
    if retry_after is not None:
        assert waits == [retry_after, retry_after]  # Retry-After honoured (fast_retries skips the sleep)
    else:
        assert all(0 <= wait <= 8 for wait in waits)  # bounded backoff


def test_a_persistent_servicenow_failure_ends_failed_and_alerts_redrive_delivers_it(
    low_attempts_flow: Flow,
) -> None:
    flow = low_attempts_flow
    flow.connect()
    flow.snow.fail_next(10_000, 503)
    delivery_id = flow.accepted(alert(alert_id="outage", fired_at=T0)).json()["deliveryId"]

    assert flow.deliver() == 2  # the first attempt asks the host for a retry; the second gives up

    failed = flow.delivery(delivery_id)
    assert failed.status is DeliveryStatus.FAILED
    assert failed.attempts == 2
    assert "ItsmUnavailableError" in failed.last_error
    assert "HTTP 503" in failed.last_error
    assert flow.incidents() == []
    assert flow.queued() == 0
    status = flow.status(delivery_id).json()
    assert (status["status"], status["attempts"], status["workItem"]) == ("failed", 2, None)
    assert "HTTP 503" in status["lastError"]
    code, listing = flow.stack.cli("alerts", "list", "--status", "failed")
    assert code == 0
    assert delivery_id in listing
    assert "HTTP 503" in listing

    # a redrive while the outage lasts is one more attempt, counted as such, and ends failed again
    code, output = flow.stack.cli("alerts", "redrive", "--connection", flow.name)
    assert code == 1, output
    assert "redrove 1: 0 delivered, 1 failed" in output
    assert flow.delivery(delivery_id).attempts == 3
    assert flow.delivery(delivery_id).status is DeliveryStatus.FAILED

    flow.snow.clear_faults()
    code, output = flow.stack.cli("alerts", "redrive", "--connection", flow.name)

    assert code == 0, output
    assert "redrove 1: 1 delivered, 0 failed" in output
    incident = flow.incident()
    done = flow.delivery(delivery_id)
    assert done.status is DeliveryStatus.DELIVERED
    assert done.attempts == 4
    assert done.work_item_number == incident["number"]
    assert flow.correlation().work_item_id == incident["sys_id"]
    assert flow.stack.cli("alerts", "list", "--status", "failed")[1].strip() == "no deliveries match"
    assert flow.stack.cli("alerts", "redrive", "--connection", flow.name)[1].strip() == "nothing to redrive"
    assert len(flow.incidents()) == 1


def test_connections_on_one_instance_never_share_an_incident(flow: Flow, fast_retries: None) -> None:
    team_a = flow.connect(name=f"{flow.name}-a")
    team_b = flow.connect(name=f"{flow.name}-b")
    payload = alert(alert_id="shared-rule", fired_at=T0)
    flow.send(payload, connection=team_a)
    # team B's create answers 500 (ambiguous): it looks for its own incident before creating one
    flow.snow.fail_next(1, 500, path_contains="/api/now/table/incident")

    flow.send(payload, connection=team_b)

    a, b = flow.incidents()
    assert flow.correlation(team_a).work_item_id == a["sys_id"]
    assert flow.correlation(team_b).work_item_id == b["sys_id"]
    assert a["correlation_id"] != b["correlation_id"]


# -- 8. status endpoint ------------------------------------------------------------------------------


def test_alert_status_reports_the_delivery_and_404_for_an_unknown_id(flow: Flow) -> None:
    flow.connect()
    delivery_id = flow.accepted(alert(alert_id="status", fired_at=T0)).json()["deliveryId"]

    pending = flow.status(delivery_id)
    assert pending.status == 200
    assert pending.json()["status"] == "pending"
    assert pending.json()["workItem"] is None

    flow.deliver()
    done = flow.status(delivery_id)

    assert done.status == 200
    body = done.json()
    incident = flow.incident()
    assert body["deliveryId"] == delivery_id
    assert body["connection"] == flow.name
    assert body["status"] == "delivered"
    assert body["attempts"] == 1
    assert body["lastError"] == ""
    assert body["outcome"] == "created"
    assert body["workItem"] == {"id": incident["sys_id"], "number": incident["number"]}
    assert body["alert"]["rule"] == "vm-web-01 high CPU"
    for unknown in ("0" * 32, "not-an-id", ""):
        missing = flow.status(unknown)
        assert missing.status == 404
        assert missing.json()["error"]["code"] == "not_found"
    assert flow.status(delivery_id, connection="sn-nobody").status == 404


def test_alert_status_reveals_nothing_of_another_connections_delivery(flow: Flow) -> None:
    flow.connect()
    other = flow.connect(name=f"{flow.name}-x")  # a name that shares this one's prefix
    delivery_id = flow.accepted(alert(alert_id="theirs", fired_at=T0)).json()["deliveryId"]

    asked_elsewhere = flow.status(delivery_id, connection=other)
    never_existed = flow.status("f" * 32, connection=other)

    assert asked_elsewhere.status == never_existed.status == 404
    body = asked_elsewhere.response.get_body().decode()
    assert body == never_existed.response.get_body().decode().replace("f" * 32, delivery_id)
    assert f'"{flow.name}"' not in body
    assert flow.status(delivery_id).status == 200


# -- 9. OAuth ----------------------------------------------------------------------------------------


def test_rotated_refresh_tokens_are_written_back_and_an_expired_access_token_is_renewed(
    flow: Flow,
) -> None:
    flow.connect("--note-interval-minutes", "0")
    secret_name = f"itsm-{flow.name}-refresh-token"
    flow.send(alert(alert_id="oauth-1", fired_at=T0))
    first_refresh = flow.stack.keyvault.secrets_snapshot()[secret_name]

    flow.snow.expire_access_tokens()
    flow.clock.advance(minutes=1)
    renewed = flow.send(alert(alert_id="oauth-2", fired_at=T0 + timedelta(minutes=1)))

    assert renewed.attempts == 1
    assert renewed.outcome.startswith("noted")
    rotated = flow.stack.keyvault.secrets_snapshot()[secret_name]
    assert rotated != first_refresh  # the instance rotated it on the refresh grant; we kept the new one

    # a cold start with the password changed at the instance can only sign in with the stored token
    snow = flow.snow
    reset_container()
    install_clock(flow.container, flow.clock)
    snow.add_user(snow.username, "changed-" + uuid.uuid4().hex)
    try:
        flow.clock.advance(minutes=1)
        cold = flow.send(alert(alert_id="oauth-3", fired_at=T0 + timedelta(minutes=2)))
    finally:
        snow.add_user(snow.username, snow.password)
    assert cold.outcome.startswith("noted")
    assert flow.stack.keyvault.secrets_snapshot()[secret_name] != rotated
    assert len(flow.notes(flow.incident())) == 2


# -- secrets ------------------------------------------------------------------------------------------


def test_no_secret_or_token_reaches_a_log_row_or_response(
    flow: Flow, caplog: pytest.LogCaptureFixture, fast_retries: None
) -> None:
    caplog.set_level(logging.DEBUG)
    snow = flow.snow
    flow.connect("--note-interval-minutes", "0")
    texts: list[str] = []
    fired = alert(alert_id="secrets", fired_at=T0)
    texts.append(flow.accepted(fired).response.get_body().decode())
    flow.deliver()
    snow.expire_access_tokens()
    flow.clock.advance(minutes=1)
    refire = alert(alert_id="secrets-2", fired_at=T0 + timedelta(minutes=1))
    flow.send(refire)
    # an auth failure: refresh tokens revoked and the password refused
    snow.revoke_refresh_tokens()
    snow.expire_access_tokens()
    snow.add_user(snow.username, "changed-" + uuid.uuid4().hex)
    try:
        flow.clock.advance(minutes=1)
        failing = flow.accepted(resolution(refire, T0 + timedelta(minutes=2))).json()["deliveryId"]
        flow.deliver()
    finally:
        snow.add_user(snow.username, snow.password)
    assert flow.delivery(failing).status is DeliveryStatus.FAILED
    assert "ItsmAuthError" in flow.delivery(failing).last_error
    for delivery_id in (failing, flow.deliveries()[0].delivery_id):
        texts.append(flow.status(delivery_id).response.get_body().decode())
    texts.append(flow.stack.cli("alerts", "list")[1])
    texts.append(flow.stack.cli("connections", "show", flow.name)[1])

    secrets = {snow.password, snow.client_secret, flow.stack.entra.client_secret}
    secrets |= set(snow.issued_tokens())
    secrets |= {issued.token for issued in flow.stack.entra.issued_tokens()}
    secrets |= {value for name, value in flow.stack.keyvault.secrets_snapshot().items() if flow.name in name}
    assert len(secrets) >= 6
    formatter = logging.Formatter()
    texts += [formatter.format(record) for record in caplog.records]
    tables = flow.container.tables
    for table in ("AlertDeliveries", "Correlations", "Connections"):
        texts += [json.dumps(dict(entity), default=str) for entity in tables.table(table).list_entities()]
    assert any("obtained a ServiceNow access token" in text for text in texts)  # the logs were captured
    leaked = [(secret[:6], text[:120]) for text in texts for secret in secrets if secret in text]
    assert leaked == []


# -- damaged rows and values ServiceNow would read as a query -------------------------------------


@pytest.mark.parametrize(
    "damage",
    [{"Signal": "{not json"}, {"Status": "lost"}],
    ids=["signal", "status"],
)
def test_alert_status_answers_a_clean_error_for_a_stored_row_it_cannot_read(
    flow: Flow, damage: dict[str, str]
) -> None:
    flow.connect()
    delivery_id = flow.accepted(alert(alert_id="damaged", fired_at=T0), send=False).json()["deliveryId"]
    table = flow.container.tables.table("AlertDeliveries")
    (entity,) = table.list_entities()
    table.update_entity({"PartitionKey": entity["PartitionKey"], "RowKey": entity["RowKey"], **damage})

    call = flow.status(delivery_id)

    assert call.status == 503, call.json()
    error = call.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert delivery_id in error["message"]
    assert "cannot be read" in error["message"]


@pytest.mark.parametrize(
    "ci",
    ["javascript:gs.getUserID()", "  JavaScript:current.name", "vm-web-01\nvm-web-02"],
    ids=["javascript", "javascript-any-case", "line-break"],
)
def test_a_ci_name_that_cannot_be_queried_gives_an_incident_without_a_ci(flow: Flow, ci: str) -> None:
    flow.connect()
    # a condition ServiceNow cannot use is dropped from the query, which then matches any CI
    flow.snow.seed_cis([f"ci-{uuid.uuid4().hex[:12]}"])
    flow.snow.reset_request_log()

    row = flow.send(alert(alert_id=f"ci-{uuid.uuid4().hex[:8]}", fired_at=T0, cis=[ci]))

    assert row.outcome == "created"
    incident = flow.incident()
    assert incident["number"] == row.work_item_number
    assert incident["cmdb_ci"] == ""
    sent = [query.get("sysparm_query", "") for _, path, query in flow.snow.requests if "cmdb_ci" in path]
    assert not [query for query in sent if "javascript:" in query.lower() or "\n" in query]


# -- a slow ServiceNow, problems of several alerts, work items that are gone -------------------------


def test_a_create_throttled_past_its_lease_leaves_one_incident_and_resolves_the_duplicate(
    flow: Flow, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    flow.connect()
    first = alert(alert_id="slow-1", fired_at=T0)
    second = alert(alert_id="slow-2", fired_at=T0 + timedelta(seconds=30))  # another dimension, same CI
    first_message = flow.accepted(first, send=False).outputs["delivery"]
    second_message = flow.accepted(second, send=False).outputs["delivery"]
    # the incident POST is throttled twice with Retry-After: 45 s (waited 30 s, the cap): with the
    # requests themselves, more than the 60 s lease
    flow.snow.fail_next(2, 429, retry_after=45, path_contains="/api/now/table/incident")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        flow.clock.advance(seconds=seconds + 1)
        if len(waits) == 2:
            # meanwhile another instance delivers the other alert: it takes the expired "creating"
            # lease, finds nothing by correlation id (the first POST is still waiting) and creates
            flow.host.call_queue("deliver_alert", second_message)

    monkeypatch.setattr(httpretry, "_testing", False)
    monkeypatch.setattr(httpretry, "time", SimpleNamespace(sleep=sleep))
    flow.host.call_queue("deliver_alert", first_message)
    monkeypatch.undo()

    assert waits == [30.0, 30.0]
    kept, duplicate = flow.incidents()  # the second instance's create answered first
    row = flow.correlation()
    assert row.work_item_id == kept["sys_id"]  # the slow create did not overwrite the row
    assert duplicate["state"] == "6"
    assert duplicate["close_notes"].startswith(
        f"Duplicate of {kept['number']}: two instances created it while ServiceNow was slow."
    )
    deliveries = {d.delivery_id: d for d in flow.deliveries()}
    slow = deliveries[json.loads(first_message)["deliveryId"]]
    assert slow.outcome.startswith("duplicate")
    assert slow.work_item_number == kept["number"]
    assert any(r.levelname == "ERROR" and duplicate["number"] in r.getMessage() for r in caplog.records)

    flow.clock.advance(minutes=5)
    assert flow.send(resolution(first, T0 + timedelta(minutes=5))).outcome.startswith("noted")
    assert flow.send(resolution(second, T0 + timedelta(minutes=6))).outcome == "resolved"
    assert [incident["state"] for incident in flow.incidents()] == ["6", "6"]


def test_a_problem_of_several_alerts_stays_open_until_the_last_resolves_and_a_late_one_reopens(
    flow: Flow,
) -> None:
    flow.connect()  # per rule + CI: a metric alert split by dimension gives one alert id per dimension
    disk_c = alert(alert_id="dim-c", fired_at=T0)
    disk_d = alert(alert_id="dim-d", fired_at=T0 + timedelta(minutes=1))
    flow.send(disk_c)
    flow.send(disk_d)
    incident = flow.incident()
    flow.clock.advance(minutes=5)

    partial = flow.send(resolution(disk_c, T0 + timedelta(minutes=5)))

    assert partial.outcome.startswith("noted")
    incident = flow.incident()
    assert incident["state"] == "1"
    assert flow.notes(incident)[-1].startswith(
        "Azure Monitor: alert dim-c resolved at 2024-05-06 07:05:00 UTC; still firing: dim-d."
    )
    row = flow.correlation()
    assert row.firing_alerts == (f"{ALERTS}/dim-d",)
    assert set(row.alert_ids) == {f"{ALERTS}/dim-c", f"{ALERTS}/dim-d"}

    assert flow.send(resolution(disk_d, T0 + timedelta(minutes=6))).outcome == "resolved"
    assert flow.incident()["state"] == "6"

    # a third dimension fired before those resolutions; its delivery was retried and comes now
    flow.clock.advance(minutes=5)
    late = flow.send(alert(alert_id="dim-e", fired_at=T0 + timedelta(minutes=2)))

    assert late.outcome == "reopened"
    assert flow.incident()["state"] == "2"
    # while the resolved ones, delivered late, are still ignored
    assert flow.send(alert(alert_id="dim-c", fired_at=T0 - timedelta(seconds=1))).outcome.startswith(
        "ignored"
    )


def test_a_resolution_after_a_failed_create_is_recorded_and_the_retried_firing_ignored(
    flow: Flow, fast_retries: None
) -> None:
    flow.connect()
    fired = alert(alert_id="failed-create", fired_at=T0)
    message = flow.accepted(fired, send=False).outputs["delivery"]
    flow.snow.fail_next(100, 503, path_contains="/api/now/table/incident")
    with pytest.raises(Exception, match="503"):
        flow.host.call_queue("deliver_alert", message)  # the host will retry it later
    flow.snow.clear_faults()
    assert flow.correlation().state is CorrelationState.CREATING
    flow.clock.advance(minutes=1)

    resolved = flow.send(resolution(fired, T0 + timedelta(minutes=1)))

    assert resolved.outcome.startswith("ignored")
    row = flow.correlation()
    assert (row.state, row.work_item_id, row.lease_owner) == (CorrelationState.RESOLVED, "", "")
    writes = flow.snow.write_count()
    flow.host.call_queue("deliver_alert", message, dequeue_count=2)  # the firing's retry
    assert flow.delivery(json.loads(message)["deliveryId"]).outcome.startswith("ignored")
    assert flow.incidents() == []
    assert flow.snow.write_count() == writes


def test_an_incident_deleted_in_servicenow_is_replaced_and_a_read_only_one_resolved_without_a_write(
    flow: Flow, caplog: pytest.LogCaptureFixture
) -> None:
    flow.connect("--note-interval-minutes", "0")
    flow.send(alert(alert_id="gone-1", fired_at=T0))
    old = flow.incident()
    flow.snow.fail_next(1000, 404, path_contains=f"/api/now/table/incident/{old['sys_id']}")  # deleted
    flow.clock.advance(minutes=1)
    fired = alert(alert_id="gone-2", fired_at=T0 + timedelta(minutes=1))

    replaced = flow.send(fired)

    assert replaced.outcome == "created"
    _, new = flow.incidents()
    assert replaced.work_item_number == new["number"]
    row = flow.correlation()
    assert (row.generation, row.work_item_id) == (2, new["sys_id"])
    assert any(r.levelname == "WARNING" and old["number"] in r.getMessage() for r in caplog.records)

    # the new one becomes read-only to the integration user (HTTP 403)
    flow.snow.fail_next(1000, 403, path_contains=f"/api/now/table/incident/{new['sys_id']}")
    flow.clock.advance(minutes=1)
    resolved = flow.send(resolution(fired, T0 + timedelta(minutes=2)))
    flow.snow.clear_faults()

    assert resolved.outcome.startswith("resolved")
    assert f"{new['number']} cannot be written (HTTP 403)" in resolved.outcome
    assert flow.correlation().state is CorrelationState.RESOLVED


def test_a_rule_firing_on_a_thousand_resources_keeps_its_row_writable(flow: Flow) -> None:
    flow.connect("--correlation", "per-rule", "--note-interval-minutes", "0")
    prefix = "vm-with-a-rather-long-resource-name-"  # 1,000 names of 40 characters: 80 KB as UTF-16
    for batch in range(25):
        flow.clock.advance(minutes=1)
        cis = [f"{prefix}{batch * 40 + n:04d}" for n in range(40)]
        row = flow.send(alert(alert_id=f"wide-{batch}", fired_at=T0 + timedelta(minutes=batch), cis=cis))
        assert row.outcome.split(":")[0] in ("created", "noted"), row.outcome

    correlation = flow.correlation()
    assert len(correlation.configuration_items) == 100
    assert correlation.configuration_items[-1] == f"{prefix}0999"
    assert len(correlation.alert_ids) == 25
    assert len(flow.notes(flow.incident())) == 24


# -- ServiceNow Event Management (work item type event) ------------------------------------------------


def _events_of(flow: Flow, key: str) -> list[dict[str, str]]:
    return sorted(flow.snow.find("em_event", message_key=key), key=lambda rec: rec["processed"])


def test_with_work_item_type_event_an_alert_is_one_em_alert_refired_into_it_and_cleared(flow: Flow) -> None:
    flow.connect("--work-item-type", "event", "--note-interval-minutes", "0")
    incidents_before = flow.snow.count("incident")
    fired = alert(alert_id="event-1", fired_at=T0)

    first = flow.send(fired)

    assert first.outcome == "created"
    key = f"azmon-{flow.correlation().key}-g1"
    (em_alert,) = flow.snow.find("em_alert", message_key=key)
    assert em_alert["state"] == "Open"
    assert em_alert["severity"] == "3"  # Sev2 -> 3 Minor
    assert first.work_item_number == em_alert["number"]
    (event,) = _events_of(flow, key)
    assert event["source"] == "Azure Monitor"
    assert event["metric_name"] == "Percentage CPU"
    assert event["time_of_event"] == "2024-05-06 07:00:00"
    info = json.loads(event["additional_info"])
    assert info["azure_severity"] == "Sev2"
    assert info["azure_alert_id"].endswith("/event-1")
    assert "Percentage CPU Average GreaterThan 80" in event["description"]

    flow.clock.advance(minutes=1)
    again = flow.send(alert(alert_id="event-1", fired_at=T0 + timedelta(minutes=1)))

    assert again.outcome.startswith("noted")
    (same,) = flow.snow.find("em_alert", message_key=key)
    assert same["sys_id"] == em_alert["sys_id"]
    assert same["event_count"] == "2"
    assert same["severity"] == "3"  # the repeat keeps the problem's severity
    assert "the alert fired again" in same["description"]

    flow.clock.advance(minutes=1)
    resolved = flow.send(resolution(fired, T0 + timedelta(minutes=2)))

    assert resolved.outcome == "resolved"
    (closed,) = flow.snow.find("em_alert", message_key=key)
    assert closed["sys_id"] == em_alert["sys_id"]
    assert closed["state"] == "Closed"
    assert [e["severity"] for e in _events_of(flow, key)] == ["3", "3", "0"]
    assert flow.correlation().state is CorrelationState.RESOLVED
    assert flow.snow.count("incident") == incidents_before  # events only: no incident written by us


def test_with_work_item_type_event_a_refire_after_resolution_reopens_the_em_alert(flow: Flow) -> None:
    flow.connect("--work-item-type", "alert")
    fired = alert(alert_id="event-2", fired_at=T0, cis=["vm-events-2"])
    flow.send(fired)
    flow.send(resolution(fired, T0 + timedelta(minutes=5)))
    flow.clock.advance(minutes=30)

    again = flow.send(alert(alert_id="event-2b", fired_at=T0 + timedelta(minutes=35), cis=["vm-events-2"]))

    assert again.outcome == "reopened"
    key = f"azmon-{flow.correlation().key}-g1"
    (em_alert,) = flow.snow.find("em_alert", message_key=key)
    assert em_alert["state"] == "Reopen"
    assert em_alert["node"] == "vm-events-2"
    assert [e["severity"] for e in _events_of(flow, key)] == ["3", "0", "3"]


def test_an_event_connection_without_the_event_role_fails_the_delivery_with_a_clear_error(
    low_attempts_flow: Flow,
) -> None:
    flow = low_attempts_flow
    flow.connect("--work-item-type", "event")
    flow.snow.set_roles(flow.snow.username, {"itil"})
    try:
        delivery_id = flow.accepted(alert(alert_id="event-3", fired_at=T0)).json()["deliveryId"]
        flow.deliver()
        row = flow.delivery(delivery_id)
    finally:
        flow.snow.set_roles(flow.snow.username, {"itil", "evt_mgmt_integration"})
    assert row.status is DeliveryStatus.FAILED
    assert "HTTP 403" in row.last_error
    assert "evt_mgmt_integration" in row.last_error
    assert not any("event-3" in event.get("additional_info", "") for event in flow.snow.records("em_event"))
