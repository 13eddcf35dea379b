"""ServiceNow Event Management: the event mapping (pure) and the EventWriter's edge cases over
httpx.MockTransport (the lifecycle against the loopback instance is in the port contract suite and
the alert end-to-end tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared_code.alerts import render
from shared_code.alerts.schema import parse_alert
from shared_code.domain.alert import Severity
from shared_code.domain.connection import ConnectionBase
from shared_code.domain.workitem import AlertFacts, IncidentDraft, WorkItemRef, WorkItemState
from shared_code.errors import ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.itsm.servicenow.events import (
    EVENT_SEVERITY,
    EVENTS_API,
    EventWriter,
    alert_state,
    draft_to_event,
    event_severity,
    follow_up_event,
)
from shared_code.itsm.servicenow.settings import ServiceNowConnection, ServiceNowWorkItemType

INSTANCE = "https://dev12345.service-now.com"
NOW = datetime(2024, 5, 6, 7, 30, 0, tzinfo=UTC)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
KEY = "azmon-0123456789abcdef0123456789abcdef01234567-g1"


def draft(**changes: Any) -> IncidentDraft:
    values: dict[str, Any] = {
        "short_description": "[Sev1] CPU high on vm-1",
        "description": "Azure Monitor alert fired: CPU high",
        "impact": 1,
        "urgency": 2,
        "correlation_id": KEY,
        "configuration_item": "vm-1",
        "alert": AlertFacts(
            severity=Severity.SEV1,
            rule="CPU high",
            monitoring_service="Platform",
            signal_type="Metric",
            resource="vm-1",
            resource_id="/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-1",
            metric_name="Percentage CPU",
            alert_id="/subscriptions/s/providers/Microsoft.AlertsManagement/alerts/a-1",
            fired_at=datetime(2024, 5, 6, 9, 0, 5, tzinfo=timezone(timedelta(hours=2))),
        ),
    }
    return IncidentDraft(**(values | changes))


# -- mapping -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("severity", "expected"),
    [(Severity.SEV0, 1), (Severity.SEV1, 2), (Severity.SEV2, 3), (Severity.SEV3, 4), (Severity.SEV4, 5)],
)
def test_azure_severity_maps_to_event_severity_one_critical_to_five_info(
    severity: Severity, expected: int
) -> None:
    facts = draft().alert
    assert facts is not None
    assert event_severity(draft(alert=facts.model_copy(update={"severity": severity}))) == expected
    assert EVENT_SEVERITY[severity] == expected


@pytest.mark.parametrize(("impact", "urgency", "expected"), [(1, 1, 1), (1, 2, 2), (2, 3, 4), (3, 3, 5)])
def test_a_draft_without_alert_facts_takes_its_severity_from_impact_and_urgency(
    impact: int, urgency: int, expected: int
) -> None:
    assert event_severity(draft(alert=None, impact=impact, urgency=urgency)) == expected


def test_the_first_event_carries_the_alert_fields_and_the_correlation_id_as_message_key() -> None:
    event = draft_to_event(draft(assignment_group="Network"), "Azure Monitor connector (prod)", NOW)

    assert event["source"] == "Azure Monitor"
    assert event["event_class"] == "Azure Monitor connector (prod)"
    assert event["node"] == "vm-1"
    assert event["type"] == "CPU high"
    assert event["resource"] == "vm-1"
    assert event["metric_name"] == "Percentage CPU"
    assert event["message_key"] == KEY
    assert event["severity"] == "2"
    assert event["time_of_event"] == "2024-05-06 07:00:05"  # GMT
    assert all(isinstance(value, str) for value in event.values())
    info = json.loads(event["additional_info"])
    assert info["azure_severity"] == "Sev1"
    assert info["azure_alert_id"].endswith("/a-1")
    assert info["assignment_group"] == "Network"
    assert "caller" not in info  # empty values are left out


def test_without_a_known_ci_the_node_is_the_alerts_resource_and_long_names_are_cut_to_100() -> None:
    facts = draft().alert
    assert facts is not None
    long_rule = "r" * 300
    event = draft_to_event(
        draft(configuration_item=None, alert=facts.model_copy(update={"rule": long_rule})), "c", NOW
    )
    assert event["node"] == "vm-1"
    assert len(event["type"]) == 100


def test_a_real_metric_alert_reaches_the_event_with_its_metric_and_severity() -> None:
    signal = parse_alert(json.loads((FIXTURES / "metric_fired.json").read_text()))
    connection = ConnectionBase(name="prod", partner_type="servicenow", server_url=INSTANCE, username="u")
    made = render.incident_draft(connection, signal, "rule|x", KEY)
    event = draft_to_event(made, "c", NOW)
    assert event["metric_name"] == "Percentage CPU"
    assert event["severity"] == str(EVENT_SEVERITY[signal.severity])
    assert event["node"] == made.configuration_item


def test_a_clearing_event_has_severity_zero_the_same_key_and_the_earlier_identity_fields() -> None:
    earlier = {"source": "Azure Monitor", "node": "vm-1", "type": "CPU high", "severity": "2"}
    event = follow_up_event(KEY, "the alert resolved", 0, NOW, like=earlier, condition="Resolved")
    assert event["severity"] == "0"
    assert event["message_key"] == KEY
    assert event["node"] == "vm-1"
    assert event["description"] == "the alert resolved"
    assert json.loads(event["additional_info"]) == {"azure_condition": "Resolved"}
    bare = follow_up_event(KEY, "resolved", 0, NOW, condition="Resolved")
    assert bare["source"] == "Azure Monitor"
    assert "node" not in bare  # nothing empty is sent


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("Open", WorkItemState.OPEN),
        ("Reopen", WorkItemState.OPEN),
        ("Flapping", WorkItemState.OPEN),
        ("Closed", WorkItemState.RESOLVED),
    ],
)
def test_em_alert_states_map_to_the_coarse_lifecycle(state: str, expected: WorkItemState) -> None:
    assert alert_state(state) is expected


def test_the_work_item_type_is_a_connection_option_defaulting_to_incident() -> None:
    base = {"name": "prod", "server_url": INSTANCE, "username": "u", "client_id": "c"}
    assert ServiceNowConnection.model_validate(base).work_item_type is ServiceNowWorkItemType.INCIDENT
    events = ServiceNowConnection.model_validate(base | {"work_item_type": "event"})
    assert events.work_item_type.sends_events
    with pytest.raises(ValueError, match="work_item_type"):
        ServiceNowConnection.model_validate(base | {"work_item_type": "ticket"})


# -- the writer over MockTransport ---------------------------------------------------------------------


def writer(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[EventWriter, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    client = httpx.Client(transport=httpx.MockTransport(record), timeout=5)
    policy = RetryPolicy(sleep=lambda _s: None, jitter=lambda cap: 0.0)
    table = ServiceNowConnector("prod", INSTANCE, client, httpx.BasicAuth("u", "p"), retry=policy)
    return EventWriter(table, event_class="c", clock=lambda: NOW, fallback_severity=4), seen


def accepted() -> httpx.Response:
    return httpx.Response(200, json={"result": {"Default Bulk Endpoint": "1 events were inserted"}})


def posted(requests: list[httpx.Request]) -> list[dict[str, str]]:
    return [json.loads(r.content)["records"][0] for r in requests if r.url.path == EVENTS_API]


def test_a_create_whose_alert_is_not_processed_yet_is_known_by_its_message_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == EVENTS_API:
            return accepted()
        return httpx.Response(200, json={"result": []})

    events, seen = writer(handler)
    ref = events.create_incident(draft())
    assert ref == WorkItemRef(id=KEY, number=KEY)
    assert posted(seen)[0]["message_key"] == KEY
    assert events.get_state(ref) is WorkItemState.OPEN  # pending events count as open


def test_a_create_whose_alerts_are_unreadable_still_succeeds_by_message_key() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == EVENTS_API:
            return accepted()
        return httpx.Response(403, json={"error": {"message": "Operation Failed", "detail": "ACL"}})

    events, _ = writer(handler)
    assert events.create_incident(draft()).id == KEY


def test_a_missing_role_is_a_rejection_naming_the_products_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        detail = "The user lacks the evt_mgmt_integration role"
        return httpx.Response(403, json={"error": {"message": "User Not Authorized", "detail": detail}})

    events, _ = writer(handler)
    with pytest.raises(ItsmRejectedError) as info:
        events.create_incident(draft())
    assert info.value.status == 403
    assert "evt_mgmt_integration" in str(info.value)


def test_an_answer_without_a_result_is_unavailable_not_success() -> None:
    events, _ = writer(lambda request: httpx.Response(200, json={"status": "ok"}))
    with pytest.raises(ItsmUnavailableError, match="without a result"):
        events.create_incident(draft())


def test_an_event_post_is_retried_after_a_503_because_it_is_idempotent_by_message_key() -> None:
    answers = iter([httpx.Response(503), accepted()])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == EVENTS_API:
            return next(answers)
        return httpx.Response(200, json={"result": []})

    events, seen = writer(handler)
    events.create_incident(draft())
    assert len(posted(seen)) == 2


def test_notes_repeat_the_last_firing_event_and_without_one_nothing_is_sent() -> None:
    earlier = {"source": "Azure Monitor", "node": "vm-1", "type": "CPU high", "severity": "2", "sys_id": "e1"}
    rows: dict[str, list[dict[str, str]]] = {"em_event": [], "em_alert": []}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == EVENTS_API:
            return accepted()
        table = request.url.path.rsplit("/", 1)[-1]
        assert "message_key=" + KEY in request.url.params["sysparm_query"]
        return httpx.Response(200, json={"result": rows[table]})

    events, seen = writer(handler)
    ref = WorkItemRef(id=KEY, number="Alert0010001")
    events.add_note(ref, "fired again")
    assert posted(seen) == []

    rows["em_event"] = [earlier]
    events.add_note(ref, "fired again")
    (note,) = posted(seen)
    assert (note["severity"], note["node"], note["description"]) == ("2", "vm-1", "fired again")
    assert note["time_of_event"] == "2024-05-06 07:30:00"


def test_a_reopen_without_a_readable_earlier_event_uses_the_connections_default_severity() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == EVENTS_API:
            return accepted()
        return httpx.Response(200, json={"result": []})

    events, seen = writer(handler)
    events.reopen(WorkItemRef(id=KEY, number=KEY), "fired again")
    events.resolve(WorkItemRef(id=KEY, number=KEY), "resolved")
    assert [event["severity"] for event in posted(seen)] == ["4", "0"]
