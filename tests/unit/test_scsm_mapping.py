"""SCSM mapping, criteria and connection settings: pure functions over the portal's own shapes."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItemState, WorkItemType
from shared_code.errors import InvalidInputError
from shared_code.itsm.scsm import criteria
from shared_code.itsm.scsm.mapping import (
    CHANGE_CANCELLED,
    CHANGE_COMPLETED,
    CHANGE_FAILED,
    CHANGE_IN_PROGRESS,
    CHANGE_NEW,
    DESCRIPTION_LIMIT,
    IMPACT,
    INCIDENT_ACTIVE,
    INCIDENT_CLOSED,
    INCIDENT_PENDING,
    INCIDENT_RESOLVED,
    URGENCY,
    correlation_of,
    description_with_marker,
    draft_to_incident,
    has_note,
    incident_state,
    like_pattern,
    marker,
    note_entry,
    note_id,
    position_of,
    row_to_work_item,
    strip_marker,
)
from shared_code.itsm.scsm.settings import DEFAULT_INCIDENT_TEMPLATE, ScsmConnection
from shared_code.products import parse_connection
from tests.loopback.scsm import like_regex

INCIDENT_BASE_ID = "0c6bd0b8-5d5f-4b5b-9a43-5c1a1e8c7d01"

# an incident of System.WorkItem.Incident.ProjectionType as the Cireson portal answers it
INCIDENT_ROW: dict[str, Any] = {
    "ClassTypeId": "a604b942-4c7b-2fb2-28dc-61dc6f465c68",
    "ClassName": "System.WorkItem.Incident",
    "BaseId": INCIDENT_BASE_ID.upper(),
    "Id": "IR4711",
    "DisplayName": "IR4711 - [Sev1] CPU above 90% on srv-007",
    "FullName": "System.WorkItem.Incident:IR4711",
    "Title": "[Sev1] CPU above 90% on srv-007",
    "Description": "CPU was 93% for 15 minutes.\n\n"
    "Azure Monitor correlation id: azmon-7d1c0a2b-g3 (used by the Azure Monitor connector: keep this line)",
    "Status": {"Id": "2B8830B6-59F0-F574-9C2A-F4B4682F1681", "Name": "Resolved"},
    "Impact": {"Id": "d2b5e816-2d24-8e7d-a61f-2cceaeac2664", "Name": "High"},
    "Urgency": {"Id": "02625c30-08c6-4181-b2ed-222fa473280e", "Name": "Medium"},
    "Priority": 2,
    "Classification": {"Id": "1f8b4a3d-8d2e-4f0c-9a2b-0e6c2f3a4b5c", "Name": "Hardware"},
    "Source": {"Id": "6ef191ce-3124-2974-94fb-020c677f4017", "Name": "Portal"},
    "TierQueue": {"Id": None, "Name": None},
    "ResolutionCategory": {"Id": None, "Name": None},
    "ResolutionDescription": "The alert resolved.",
    "CreatedDate": "2024-05-06T07:00:01.250Z",
    "ResolvedDate": "2024-05-06T09:30:00",
    "ClosedDate": "0001-01-01T00:00:00",
    "LastModified": "2024-05-06T09:30:00.437Z",
    "TimeAdded": "2024-05-06T07:00:01.250Z",
    "ObjectStatus": {"Id": "acdcedb7-100c-8c91-d664-4629a218bd94", "Name": "Active"},
    "CreatedWorkItem": {"BaseId": "f1", "DisplayName": "Azure Monitor Integration", "UserName": "svc-azmon"},
    "AssignedWorkItem": {"BaseId": "f2", "DisplayName": "Beth Anglin", "UserName": "beth"},
    "RequestedWorkItem": None,
    "TroubleTicketResolvedByUser": {"BaseId": "f1", "DisplayName": "Azure Monitor Integration"},
    "TroubleTicketClosedByUser": None,
    "AboutConfigItem": [
        {"BaseId": "c1", "DisplayName": "srv-007", "ClassName": "Microsoft.Windows.Computer"},
        {"BaseId": "c2", "DisplayName": "srv-008", "ClassName": "Microsoft.Windows.Computer"},
    ],
    "AppliesToTroubleTicket": [
        {
            "Id": "2f3c8c1e-8a51-5a57-9a0d-1c7e3f6a9b10",
            "ActionType": "AnalystComment",
            "Title": "Analyst Comment",
            "Description": "Looking into it.",
            "EnteredBy": "Beth Anglin",
            "EnteredDate": "2024-05-06T07:05:00.000Z",
            "IsPrivate": False,
        }
    ],
}

CHANGE_ROW: dict[str, Any] = {
    "ClassTypeId": "e6c9cf6e-d7fe-1b5d-216c-c3f5d2c7670c",
    "ClassName": "System.WorkItem.ChangeRequest",
    "BaseId": "7e0f7a52-2a8b-4c3c-8d3e-6b6f4f1d2a90",
    "Id": "CR2044",
    "Title": "Rotate TLS certificate on web-001",
    "Description": "Scheduled rotation.",
    "Status": {"Id": CHANGE_IN_PROGRESS, "Name": "In Progress"},
    "Category": {"Id": "357662a7-451c-df62-ed68-3147bdff324e", "Name": "Emergency"},
    "Risk": {"Id": "8d0f", "Name": "High"},
    "Impact": {"Id": "80cc", "Name": "Medium"},
    "Priority": {"Id": "3a96f7dc-4469-ed8b-48a1-517f7ccf6189", "Name": "Medium"},
    "Area": {"Id": "a1", "Name": "Infrastructure"},
    "ScheduledStartDate": "2026-12-02T22:00:00.000Z",
    "ScheduledEndDate": "2026-12-03T01:00:00.000Z",
    "ActualStartDate": "2026-12-02T22:05:00+01:00",
    "ActualEndDate": None,
    "RequiredBy": "2026-12-01T08:00:00Z",
    "CreatedDate": "2026-11-20T10:00:00.000Z",
    "LastModified": "2026-12-02T22:05:10.120Z",
    "CreatedWorkItem": {"DisplayName": "David Loo"},
    "AssignedWorkItem": {"DisplayName": "Fred Luddy"},
    "AboutConfigItem": [{"DisplayName": "web-001"}],
}


def test_an_incident_row_maps_to_the_service_desk_fields_with_labels_for_people_and_guids_for_decisions() -> (
    None
):
    item = row_to_work_item("scsm-1", WorkItemType.INCIDENT, INCIDENT_ROW)

    assert item.source_id == INCIDENT_BASE_ID  # lower-cased: GUIDs compare as text elsewhere
    assert item.number == "IR4711"
    assert item.updated_at == datetime(2024, 5, 6, 9, 30, 0, 437000, tzinfo=UTC)
    assert (item.state, item.state_code, item.lifecycle) == (
        "Resolved",
        INCIDENT_RESOLVED,
        Lifecycle.RESOLVED,
    )
    assert (item.impact, item.urgency, item.priority) == ("High", "Medium", "2")
    assert (item.created_by, item.assigned_to, item.resolved_by, item.closed_by) == (
        "Azure Monitor Integration",
        "Beth Anglin",
        "Azure Monitor Integration",
        "",
    )
    assert (item.source, item.category, item.computer) == ("Portal", "Hardware", "srv-007")
    assert item.title == "[Sev1] CPU above 90% on srv-007"
    assert (
        item.description == "CPU was 93% for 15 minutes."
    )  # the marker line is the connector's, not people's
    assert item.correlation_id == "azmon-7d1c0a2b-g3"
    assert item.created_at == datetime(2024, 5, 6, 7, 0, 1, 250000, tzinfo=UTC)
    assert item.resolved_at == datetime(2024, 5, 6, 9, 30, tzinfo=UTC)  # no offset: UTC
    assert item.closed_at is None  # 0001-01-01 is SCSM's "no date"
    record = item.to_service_desk_record(datetime(2024, 5, 7, tzinfo=UTC))
    assert record["IncidentState_s"] == "Resolved"
    assert record["ServiceDeskSysId_s"] == INCIDENT_BASE_ID
    assert record["ResolvedDate_t"] == "2024-05-06T09:30:00+00:00"


def test_a_change_request_row_maps_its_own_fields() -> None:
    item = row_to_work_item("scsm-1", WorkItemType.CHANGE_REQUEST, CHANGE_ROW)

    assert (item.number, item.state, item.lifecycle) == ("CR2044", "In Progress", Lifecycle.IN_PROGRESS)
    assert (item.change_type, item.risk, item.impact, item.priority) == (
        "Emergency",
        "High",
        "Medium",
        "Medium",
    )
    assert item.category == "Infrastructure"
    assert (item.created_by, item.assigned_to, item.computer) == ("David Loo", "Fred Luddy", "web-001")
    assert item.planned_start == datetime(2026, 12, 2, 22, tzinfo=UTC)
    assert item.planned_end == datetime(2026, 12, 3, 1, tzinfo=UTC)
    assert item.work_start == datetime(2026, 12, 2, 21, 5, tzinfo=UTC)  # +01:00 read as such
    assert item.work_end is None
    assert item.requested_at == datetime(2026, 12, 1, 8, tzinfo=UTC)
    assert item.correlation_id == ""
    assert "CRState_s" in item.to_service_desk_record(datetime(2026, 12, 3, tzinfo=UTC))


@pytest.mark.parametrize(
    ("status", "lifecycle", "state"),
    [
        (INCIDENT_ACTIVE, Lifecycle.IN_PROGRESS, WorkItemState.OPEN),
        (INCIDENT_PENDING, Lifecycle.IN_PROGRESS, WorkItemState.OPEN),
        (INCIDENT_RESOLVED, Lifecycle.RESOLVED, WorkItemState.RESOLVED),
        (INCIDENT_CLOSED, Lifecycle.CLOSED, WorkItemState.CLOSED),
    ],
)
def test_incident_statuses_map_by_guid(status: str, lifecycle: Lifecycle, state: WorkItemState) -> None:
    row = copy.deepcopy(INCIDENT_ROW) | {
        "Status": {"Id": status.upper(), "Name": "Status im Portal auf Deutsch"}
    }

    item = row_to_work_item("c", WorkItemType.INCIDENT, row)

    assert item.lifecycle is lifecycle
    assert item.state == "Status im Portal auf Deutsch"  # the label is shown, never decided on
    assert incident_state(status.upper()) is state


@pytest.mark.parametrize(
    ("status", "lifecycle"),
    [
        (CHANGE_NEW, Lifecycle.NEW),
        (CHANGE_IN_PROGRESS, Lifecycle.IN_PROGRESS),
        (CHANGE_COMPLETED, Lifecycle.RESOLVED),
        (CHANGE_FAILED, Lifecycle.CLOSED),
        (CHANGE_CANCELLED, Lifecycle.CANCELLED),
    ],
)
def test_change_statuses_map_by_guid(status: str, lifecycle: Lifecycle) -> None:
    row = CHANGE_ROW | {"Status": {"Id": status, "Name": "x"}}
    assert row_to_work_item("c", WorkItemType.CHANGE_REQUEST, row).lifecycle is lifecycle


def test_an_unknown_status_keeps_its_label_and_leaves_the_lifecycle_unset_and_counts_as_open() -> None:
    custom = "9accddda-fbf5-10d4-b402-69bdd276a69b"
    row = INCIDENT_ROW | {"Status": {"Id": custom, "Name": "Work in Progress"}}

    item = row_to_work_item("c", WorkItemType.INCIDENT, row)

    assert (item.state, item.state_code, item.lifecycle) == ("Work in Progress", custom, None)
    assert incident_state(custom) is WorkItemState.OPEN
    assert row_to_work_item("c", WorkItemType.INCIDENT, {**row, "Status": None}).lifecycle is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"BaseId": None}, "BaseId: missing"),
        ({"Id": ""}, "Id: missing"),
        ({"LastModified": None}, "LastModified: missing"),
        ({"LastModified": "06/05/2024 09:30"}, "LastModified: not an ISO 8601 date-time"),
        ({"CreatedDate": 20240506}, "CreatedDate: expected a date-time string"),
        ({"Title": {"nested": True}}, "Title: unexpected dict value"),
    ],
)
def test_a_row_that_cannot_be_read_names_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_to_work_item("c", WorkItemType.INCIDENT, INCIDENT_ROW | change)


def test_a_row_knows_its_feed_position_only_when_it_has_a_base_id_and_a_readable_last_modified() -> None:
    assert position_of(INCIDENT_ROW) == (datetime(2024, 5, 6, 9, 30, 0, 437000, tzinfo=UTC), INCIDENT_BASE_ID)
    assert position_of(INCIDENT_ROW | {"LastModified": "yesterday"}) is None
    assert position_of(INCIDENT_ROW | {"BaseId": ""}) is None


def draft(**changes: Any) -> IncidentDraft:
    values: dict[str, Any] = {
        "short_description": "[Sev1] CPU above 90% on srv-007",
        "description": "Alert context: ...",
        "impact": 1,
        "urgency": 3,
        "correlation_id": "azmon-7d1c0a2b-g1",
    }
    return IncidentDraft(**(values | changes))


TEMPLATE = {
    "ClassTypeId": "a604b942-4c7b-2fb2-28dc-61dc6f465c68",
    "BaseId": None,
    "Id": "IR{0}",
    "Title": None,
    "Status": {"Id": INCIDENT_ACTIVE, "Name": "Active"},
    "Source": {"Id": "6ef191ce-3124-2974-94fb-020c677f4017", "Name": "Portal"},
    "AboutConfigItem": [{"BaseId": "c0", "DisplayName": "from-the-template"}],
    "AppliesToTroubleTicket": [],
}


def test_a_draft_fills_the_template_projection_without_changing_the_template() -> None:
    before = json.dumps(TEMPLATE, sort_keys=True)
    group, user = "6f2b5e0c-0f7d-4bb1-a7a4-1e0d3c2b1a09", "a1b2c3d4-0000-4000-8000-000000000001"

    current = draft_to_incident(
        TEMPLATE,
        draft(assignment_group=group, caller=user),
        {"BaseId": "c7", "DisplayName": "srv-007"},
    )

    assert json.dumps(TEMPLATE, sort_keys=True) == before
    assert current["Title"] == "[Sev1] CPU above 90% on srv-007"
    assert current["Description"].startswith("Alert context: ...\n\n")
    assert correlation_of(current["Description"]) == "azmon-7d1c0a2b-g1"
    assert current["Impact"] == {"Id": IMPACT[1][0], "Name": "High"}
    assert current["Urgency"] == {"Id": URGENCY[3][0], "Name": "Low"}
    assert current["TierQueue"] == {"Id": group}
    assert current["RequestedWorkItem"] == {"BaseId": user}
    assert [ci["DisplayName"] for ci in current["AboutConfigItem"]] == ["from-the-template", "srv-007"]
    assert current["Status"] == TEMPLATE["Status"]  # what the template sets stays
    assert current["Id"] == "IR{0}"


def test_a_long_description_is_shortened_so_that_the_marker_line_still_fits_scsms_limit() -> None:
    text = description_with_marker("x" * 10_000, "azmon-7d1c0a2b-g1")

    assert len(text) <= DESCRIPTION_LIMIT
    assert text.endswith(marker("azmon-7d1c0a2b-g1"))
    assert strip_marker(text) == "x" * (len(strip_marker(text)) - 1) + "…"


def test_the_like_pattern_finds_one_generation_and_not_its_longer_namesakes() -> None:
    matches = like_regex(like_pattern("azmon-7d1c0a2b-g1")).fullmatch  # SQL LIKE, as the portal runs it

    assert matches(description_with_marker("a", "azmon-7d1c0a2b-g1"))
    assert not matches(description_with_marker("a", "azmon-7d1c0a2b-g12"))
    assert not matches("mentions azmon-7d1c0a2b-g1 in passing")
    assert like_pattern("azmon_1-g1").count("[_]") == 1  # a wildcard in an id is made literal
    assert like_regex(like_pattern("azmon_1-g1")).fullmatch(description_with_marker("", "azmon_1-g1"))
    assert not like_regex(like_pattern("azmon_1-g1")).fullmatch(description_with_marker("", "azmonx1-g1"))
    with pytest.raises(ValueError, match="correlation id"):
        marker("azmon 1%")


def test_note_ids_are_stable_per_work_item_purpose_and_text() -> None:
    first = note_id(INCIDENT_BASE_ID, "note", "fired again")

    assert first == note_id(INCIDENT_BASE_ID, "note", "fired again")
    assert first != note_id(INCIDENT_BASE_ID, "resolve", "fired again")
    assert first != note_id("another", "note", "fired again")
    entry = note_entry(
        first, "y" * 5000, "CONTOSO\\svc-azmon", datetime(2024, 5, 6, 7, 0, 0, 123456, tzinfo=UTC)
    )
    assert entry["ActionType"] == "AnalystComment"
    assert entry["EnteredDate"] == "2024-05-06T07:00:00.123Z"
    assert len(entry["Description"]) == 4000
    assert has_note({"AppliesToTroubleTicket": [entry]}, first)
    assert not has_note({"AppliesToTroubleTicket": None}, first)


# -- criteria ----------------------------------------------------------------------------------------


def test_criteria_take_values_only_as_json_strings_and_check_names() -> None:
    body = criteria.query(
        "285cb0a2-f276-bccb-563e-bb721df7cdec",
        criteria.all_of(
            criteria.simple(
                criteria.generic("LastModified"), "Greater", datetime(2024, 5, 6, 7, 0, 0, 999999, tzinfo=UTC)
            ),
            criteria.simple(
                criteria.prop("a604b942-4c7b-2fb2-28dc-61dc6f465c68", "Status"), "NotEqual", "x'\"}"
            ),
        ),
    )

    [first, second] = body["Criteria"]["Base"]["Expression"]["And"]["Expression"]
    assert first["SimpleExpression"]["ValueExpressionRight"]["Value"] == "2024-05-06T07:00:00.999Z"
    assert second["SimpleExpression"]["ValueExpressionLeft"] == {
        "Property": "$Context/Property[Type='a604b942-4c7b-2fb2-28dc-61dc6f465c68']/Status$"
    }
    assert json.loads(json.dumps(body)) == body
    assert criteria.all_of(first) is first
    with pytest.raises(ValueError, match="timezone-aware"):
        criteria.format_datetime(datetime(2024, 5, 6))
    with pytest.raises(ValueError, match="operator"):
        criteria.simple(criteria.generic("Id"), "Contains", "x")
    with pytest.raises(ValueError, match="generic property"):
        criteria.generic("Id$ or 1=1")
    with pytest.raises(ValueError, match="line breaks"):
        criteria.simple(criteria.generic("DisplayName"), "Equal", "srv\n001")
    assert criteria.like_literal("50%_[x]") == "50[%][_][[]x]"


# -- the connection model ------------------------------------------------------------------------------

BASE: dict[str, object] = {
    "name": "scsm-1",
    "partner_type": "scsm",
    "server_url": "https://portal.contoso.com/",
    "username": "CONTOSO\\svc",
}


def test_a_connection_has_stock_defaults_and_only_a_password_in_key_vault() -> None:
    connection = parse_connection(dict(BASE))

    assert isinstance(connection, ScsmConnection)
    assert connection.server_url == "https://portal.contoso.com"
    assert connection.incident_template_id == DEFAULT_INCIDENT_TEMPLATE
    assert connection.language_code == "ENU"
    assert connection.secret_names == ("itsm-scsm-1-password",)


def test_guids_are_checked_and_normalised_and_errors_name_the_flags() -> None:
    connection = parse_connection(BASE | {"incident_template_id": "{A77BB0C9-E201-DD93-230C-799A66D9E8FA}"})
    assert isinstance(connection, ScsmConnection)
    assert connection.incident_template_id == DEFAULT_INCIDENT_TEMPLATE

    labels = {"assignment_group": "--assignment-group", "incident_template_id": "--incident-template"}
    with pytest.raises(InvalidInputError) as caught:
        parse_connection(
            BASE
            | {"assignment_group": "Tier 2", "incident_template_id": "default", "language_code": "en-US"},
            labels,
        )
    message = str(caught.value)
    assert "--assignment-group: must be the GUID of an IncidentTierQueuesEnum value" in message
    assert "--incident-template: must be the GUID of an incident template" in message
    assert "language_code: must be a three-letter portal language code" in message


def test_a_connection_that_would_create_cis_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="do not create configuration items"):
        parse_connection(BASE | {"create_configuration_items": True})
