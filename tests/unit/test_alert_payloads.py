"""Microsoft's published payloads (action-group test actions, health events) and what they become.

The fixtures ``*_test_action.json`` follow the samples Microsoft publishes for the action group's
"Test" button (Budget, Cost budget, Forecasted budget, Service health, Resource health); the
``service_health_*`` / ``resource_health_*`` sequences are activity-log alerts as Azure sends
them: every state change a new alert with monitorCondition "Fired", the recovery in the context.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared_code.alerts import render
from shared_code.alerts.armid import resource_name
from shared_code.alerts.processor import AlertProcessor, Outcome
from shared_code.alerts.schema import parse_alert
from shared_code.domain.alert import MonitorCondition, Severity
from shared_code.domain.connection import ConnectionBase, CorrelationMode
from shared_code.domain.correlation import CorrelationState
from shared_code.domain.workitem import WorkItemState
from shared_code.errors import AlertSchemaError
from shared_code.products import parse_connection
from tests.fakes.itsm import FakeItsm
from tests.fakes.state import InMemoryCorrelations

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
TEST_SUBSCRIPTION = "aaaa0a0a-bb1b-cc2c-dd3d-eeeeee4e4e4e"
BUDGETS = ("cost_budget_test_action", "cost_budget_actual_test_action", "cost_budget_forecasted_test_action")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def connection(**overrides: object) -> ConnectionBase:
    data: dict[str, object] = {
        "name": "sn",
        "partner_type": "servicenow",
        "server_url": "https://dev1.service-now.com",
        "username": "svc",
        "client_id": "cid",
    }
    return parse_connection(data | overrides)


# -- budget alerts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUDGETS)
def test_budget_alerts_with_null_essentials_are_accepted(name):
    payload = load(name)
    essentials = payload["data"]["essentials"]
    assert essentials["alertRule"] is essentials["severity"] is essentials["alertTargetIDs"] is None

    signal = parse_alert(payload)

    budget = payload["data"]["alertContext"]["AlertData"]
    assert signal.rule == budget["BudgetName"]
    assert signal.rule_id == budget["BudgetId"]
    assert signal.severity is Severity.SEV3
    assert signal.severity_assumed is True
    assert signal.signal_type == ""
    assert signal.origin_alert_id == ""
    assert signal.target_ids == (f"/subscriptions/{TEST_SUBSCRIPTION}",)  # the budget's scope
    # "budgets" is the alert's category, and a subscription is no configuration item
    assert signal.configuration_items == ()
    assert render.short_description(signal) == (
        f"[Sev3] {budget['BudgetName']} on subscription {TEST_SUBSCRIPTION}"
    )


def test_the_connection_default_severity_applies_to_alerts_without_one():
    signal = parse_alert(load("cost_budget_actual_test_action"), default_severity=Severity.SEV1)
    conn = connection(default_severity="Sev1", severity_map={"Sev1": {"impact": 1, "urgency": 3}})

    draft = render.incident_draft(conn, signal, "k", "c")

    assert signal.severity is Severity.SEV1
    assert (draft.impact, draft.urgency) == (1, 3)
    assert "the alert has no severity: the connection's default" in draft.description


def test_a_sent_severity_is_never_replaced_by_the_default():
    payload = load("cost_budget_test_action")
    payload["data"]["essentials"]["severity"] = "Sev0"
    signal = parse_alert(payload, default_severity=Severity.SEV4)
    assert (signal.severity, signal.severity_assumed) == (Severity.SEV0, False)


def test_a_budget_alert_without_a_budget_name_gets_a_stable_rule_name():
    payload = load("cost_budget_test_action")
    del payload["data"]["alertContext"]["AlertData"]["BudgetName"]
    del payload["data"]["alertContext"]["AlertData"]["BudgetId"]

    first, again = parse_alert(payload), parse_alert(copy.deepcopy(payload))

    assert first.rule == "CostAlerts alert"
    assert first.rule_id == f"{TEST_SUBSCRIPTION}:CostAlerts:CostAlerts alert" == again.rule_id


def test_two_notifications_of_one_budget_are_one_problem_and_two_budgets_are_two():
    forecast = parse_alert(load("cost_budget_test_action"))
    forecast_again = parse_alert(load("cost_budget_forecasted_test_action"))
    actual = parse_alert(load("cost_budget_actual_test_action"))
    mode = CorrelationMode.PER_RULE_AND_CI

    key = render.correlation_key_text(mode, forecast)

    assert render.correlation_key_text(mode, forecast_again) == key
    assert render.correlation_key_text(mode, actual) != key


@pytest.mark.parametrize(
    "field",
    [
        "alertRule",
        "severity",
        "signalType",
        "alertTargetIDs",
        "configurationItems",
        "originAlertId",
        "description",
        "alertRuleID",
        "investigationLink",
        "resolvedDateTime",
        "essentialsVersion",
        "alertContextVersion",
        "targetResourceGroup",
        "targetResourceType",
    ],
)
@pytest.mark.parametrize("how", ["null", "absent"])
def test_every_optional_essentials_field_may_be_null_or_absent(field, how):
    payload = load("metric_fired")
    essentials = payload["data"]["essentials"]
    if how == "null":
        essentials[field] = None
    else:
        essentials.pop(field, None)

    signal = parse_alert(payload)

    assert signal.rule
    assert signal.severity in Severity


@pytest.mark.parametrize("field", ["alertId", "monitorCondition", "monitoringService", "firedDateTime"])
def test_what_every_payload_has_is_still_required(field):
    payload = load("cost_budget_test_action")
    payload["data"]["essentials"][field] = None
    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(payload)
    assert caught.value.path == f"data.essentials.{field}"


# -- health events ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sequence", "problem"),
    [
        (
            ("service_health_fired", "service_health_update", "service_health_resolved"),
            "service-health:ZX9Q-4KT",
        ),
        (
            ("resource_health_fired", "resource_health_update", "resource_health_resolved"),
            "resource-health:/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg-web-prod"
            "/providers/microsoft.compute/virtualmachines/vm-web-01",
        ),
    ],
)
def test_a_health_event_is_one_problem_and_its_recovery_is_the_resolution(sequence, problem):
    payloads = [load(name) for name in sequence]
    assert {p["data"]["essentials"]["monitorCondition"] for p in payloads} == {"Fired"}  # as Azure sends them
    assert len({p["data"]["essentials"]["alertId"] for p in payloads}) == 3  # a new alert each time

    active, update, recovery = (parse_alert(p) for p in payloads)

    assert active.problem_key == update.problem_key == recovery.problem_key == problem
    assert [s.condition for s in (active, update, recovery)] == [
        MonitorCondition.FIRED,
        MonitorCondition.FIRED,
        MonitorCondition.RESOLVED,
    ]
    assert recovery.resolved_at == recovery.fired_at
    assert active.resolved_at is None
    for mode in CorrelationMode:
        keys = {render.correlation_key_text(mode, s) for s in (active, update, recovery)}
        assert len(keys) == 1, mode


@pytest.mark.parametrize(
    ("stage", "status"), [("Complete", "Active"), ("RCA", "Active"), ("Active", "Resolved")]
)
def test_service_health_stages_that_end_the_event_resolve_it(stage, status):
    payload = load("service_health_fired")
    payload["data"]["alertContext"]["properties"]["stage"] = stage
    payload["data"]["alertContext"]["status"] = status
    assert parse_alert(payload).condition is MonitorCondition.RESOLVED


@pytest.mark.parametrize("current", ["Unavailable", "Degraded", "Unknown"])
def test_resource_health_other_than_available_keeps_firing(current):
    payload = load("resource_health_resolved")
    payload["data"]["alertContext"]["properties"]["currentHealthStatus"] = current
    assert parse_alert(payload).condition is MonitorCondition.FIRED


def test_a_service_health_event_without_a_tracking_id_correlates_as_any_alert():
    payload = load("service_health_fired")
    del payload["data"]["alertContext"]["properties"]["trackingId"]
    signal = parse_alert(payload)
    assert signal.problem_key == ""
    assert render.correlation_key_text(CorrelationMode.PER_RULE_AND_CI, signal).startswith("rule|")


def test_other_alerts_name_no_problem():
    assert parse_alert(load("metric_fired")).problem_key == ""
    assert parse_alert(load("activity_log_administrative_fired")).problem_key == ""


# -- the subscription is not a configuration item ---------------------------------------------------


def test_a_subscription_scoped_alert_names_no_configuration_item():
    signal = parse_alert(load("service_health_test_action"))
    assert signal.configuration_items == ()
    assert render.incident_draft(connection(), signal, "k", "c").configuration_item is None


def test_the_subscription_name_stands_in_where_the_payload_has_it():
    payload = load("service_health_fired")
    payload["data"]["alertContext"]["properties"]["subscriptionName"] = "Contoso Production"
    assert parse_alert(payload).configuration_items == ("Contoso Production",)


@pytest.mark.parametrize(
    "listed",
    [
        ["00000000-0000-0000-0000-000000000000"],
        ["/subscriptions/00000000-0000-0000-0000-000000000000"],
        ["/subscriptions/00000000-0000-0000-0000-000000000000/"],
    ],
)
def test_a_listed_subscription_id_is_not_kept_as_a_configuration_item(listed):
    payload = load("service_health_fired")
    payload["data"]["essentials"]["configurationItems"] = listed
    assert parse_alert(payload).configuration_items == ()


def test_other_listed_items_and_resource_targets_are_kept():
    payload = load("service_health_fired")
    payload["data"]["essentials"]["configurationItems"] = [
        "00000000-0000-0000-0000-000000000000",
        "sqlsrv-01",
    ]
    assert parse_alert(payload).configuration_items == ("sqlsrv-01",)
    group = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-shop"
    payload["data"]["essentials"].update(configurationItems=None, alertTargetIDs=[group])
    assert parse_alert(payload).configuration_items == ("rg-shop",)


def test_a_configuration_item_named_by_a_guid_is_looked_up_but_never_created():
    payload = load("metric_fired")
    payload["data"]["essentials"]["configurationItems"] = ["11111111-2222-3333-4444-555555555555"]
    signal = parse_alert(payload)
    draft = render.incident_draft(connection(create_configuration_items=True), signal, "k", "c")
    assert draft.configuration_item == "11111111-2222-3333-4444-555555555555"
    assert draft.create_configuration_item is False
    named = render.incident_draft(
        connection(create_configuration_items=True), parse_alert(load("metric_fired")), "k", "c"
    )
    assert named.create_configuration_item is True


@pytest.mark.parametrize(
    ("resource_id", "name"),
    [
        ("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-1", "vm-1"),
        ("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-1/", "vm-1"),
        ("/subscriptions/s/resourceGroups/rg", "rg"),
        ("/subscriptions/s", ""),
        ("/subscriptions/s/", ""),
        ("vm-plain", "vm-plain"),
    ],
)
def test_one_function_turns_arm_ids_into_names(resource_id, name):
    assert resource_name(resource_id) == name
    assert render.ci_name(resource_id) == name


# -- the processor: one incident per health event, resolved by its recovery ---------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2023, 9, 12, 8, 35, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def world():
    clock = Clock()
    itsm = FakeItsm()
    processor = AlertProcessor(InMemoryCorrelations(), clock, lease_seconds=60, busy_budget_seconds=0.3)
    return clock, itsm, processor


def test_health_updates_are_noted_at_once_and_the_recovery_resolves(world):
    _clock, itsm, processor = world
    conn = connection(note_interval_minutes=60)
    active, update, recovery = (
        parse_alert(load(name))
        for name in ("service_health_fired", "service_health_update", "service_health_resolved")
    )

    outcomes = [
        processor.process(conn, itsm.ports(), f"d{i}", signal).outcome
        for i, signal in enumerate((active, update, recovery))
    ]

    assert outcomes == [Outcome.CREATED, Outcome.NOTED, Outcome.RESOLVED]
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    assert "update on this problem" in incident.notes[0]
    assert "rollback of the gateway" in incident.notes[0]
    assert "the problem recovered" in incident.notes[-1]
    assert "now mitigated" in incident.notes[-1]


def test_an_update_delivered_after_the_recovery_is_late_and_a_new_outage_reopens(world):
    _clock, itsm, processor = world
    conn = connection()
    active, update, recovery = (
        parse_alert(load(name))
        for name in ("resource_health_fired", "resource_health_update", "resource_health_resolved")
    )
    processor.process(conn, itsm.ports(), "d1", active)
    processor.process(conn, itsm.ports(), "d3", recovery)

    late = processor.process(conn, itsm.ports(), "d2", update)  # queued before the recovery, delivered after

    assert late.outcome is Outcome.IGNORED
    payload = load("resource_health_fired")
    payload["data"]["essentials"]["alertId"] += "-again"
    payload["data"]["essentials"]["firedDateTime"] = "2023-10-02T16:00:00Z"
    again = processor.process(conn, itsm.ports(), "d4", parse_alert(payload))
    assert again.outcome is Outcome.REOPENED
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.OPEN


def test_a_recovery_delivered_before_its_outage_leaves_nothing_open(world):
    _clock, itsm, processor = world
    conn = connection()
    active, recovery = (parse_alert(load(n)) for n in ("resource_health_fired", "resource_health_resolved"))

    first = processor.process(conn, itsm.ports(), "d2", recovery)
    late = processor.process(conn, itsm.ports(), "d1", active)

    assert (first.outcome, late.outcome) == (Outcome.IGNORED, Outcome.IGNORED)
    assert itsm.incidents == {}


def test_under_per_alert_correlation_a_health_event_is_still_one_incident(world):
    _clock, itsm, processor = world
    conn = connection(correlation="per-alert")
    for i, name in enumerate(("service_health_fired", "service_health_update", "service_health_resolved")):
        processor.process(conn, itsm.ports(), f"d{i}", parse_alert(load(name)))
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    assert processor.correlations.rows
    (row,) = processor.correlations.rows.values()
    assert row.state is CorrelationState.RESOLVED
    assert row.firing_alerts == ()
