"""Provance mapping, settings and connector error paths without a server.

Rows are Web API payloads as Dataverse sends them with formatted values; connector error paths use
``httpx.MockTransport`` (allowed for unit tests of error paths).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItemState, WorkItemType
from shared_code.errors import InvalidInputError, ItsmAuthError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.provance.connector import ProvanceConnector
from shared_code.itsm.provance.mapping import (
    TableInfo,
    draft_to_incident_fields,
    lifecycle_of,
    note_id,
    parse_version,
    record_id,
    resolution_parameters,
    row_to_work_item,
    row_version,
    work_item_state,
)
from shared_code.itsm.provance.settings import ProvanceConnection
from shared_code.products import parse_connection

APP = "7d0c8e2a-3b1f-4c5d-9e6f-0a1b2c3d4e5f"
TENANT = "72f988bf-0000-4000-8000-0000000000aa"
INCIDENTS = TableInfo(
    logical_name="incident",
    entity_set="incidents",
    primary_id="incidentid",
    primary_name="title",
    columns=frozenset(
        [
            "incidentid",
            "ticketnumber",
            "title",
            "description",
            "statecode",
            "statuscode",
            "prioritycode",
            "caseorigincode",
            "casetypecode",
            "createdon",
            "modifiedon",
            "versionnumber",
            "ownerid",
            "createdby",
            "modifiedby",
        ]
    ),
    number_column="ticketnumber",
)
F = "@OData.Community.Display.V1.FormattedValue"

# a row as GET /api/data/v9.2/incidents answers it with Prefer: odata.include-annotations
RESOLVED_ROW: dict[str, Any] = {
    "@odata.etag": 'W/"1000042"',
    "incidentid": "9e42abf7-4801-5baf-aa8c-a04ab502c26f",
    "ticketnumber": "CAS-01001-1DQCJU",
    "title": "[Sev1] cpu-high on vm-web-01",
    "description": "Percentage CPU Average GreaterThan 80",
    "statecode": 1,
    f"statecode{F}": "Resolved",
    "statuscode": 5,
    f"statuscode{F}": "Problem Solved",
    "prioritycode": 1,
    f"prioritycode{F}": "High",
    "caseorigincode": 3,
    f"caseorigincode{F}": "Web",
    "casetypecode": 2,
    f"casetypecode{F}": "Problem",
    "createdon": "2024-05-06T07:00:00Z",
    f"createdon{F}": "5/6/2024 7:00 AM",
    "modifiedon": "2024-05-06T07:25:13Z",
    "versionnumber": 1000042,
    "_ownerid_value": "0b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b",
    f"_ownerid_value{F}": "Service Desk",
    "_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname": "team",
    "_createdby_value": "d23f0824-128b-4f33-8c5c-7fd0a6a3a450",
    f"_createdby_value{F}": "# ITSM connector",
    "_modifiedby_value": "3c2b1a09-8f7e-4d6c-9b5a-4e3d2c1b0a99",
    f"_modifiedby_value{F}": "Beth Anglin",
}


def connection(**changes: Any) -> ProvanceConnection:
    values = {
        "name": "pv-prod",
        "partner_type": "provance",
        "server_url": "https://contoso.crm4.dynamics.com/",
        "username": APP,
        "tenant_id": TENANT,
    } | changes
    return ProvanceConnection.model_validate(values)


def test_a_resolved_case_maps_to_a_resolved_work_item_with_its_readable_values() -> None:
    item = row_to_work_item("pv-prod", WorkItemType.INCIDENT, INCIDENTS, RESOLVED_ROW)

    assert (item.source_id, item.number) == (RESOLVED_ROW["incidentid"], "CAS-01001-1DQCJU")
    assert item.updated_at == datetime(2024, 5, 6, 7, 25, 13, tzinfo=UTC)
    assert (item.state, item.state_code, item.lifecycle) == ("Problem Solved", "5", Lifecycle.RESOLVED)
    assert (item.priority, item.source, item.category) == ("High", "Web", "Problem")
    assert (item.assigned_to, item.created_by) == ("Service Desk", "# ITSM connector")
    assert (item.resolved_by, item.resolved_at) == ("Beth Anglin", item.updated_at)
    assert item.closed_at is None
    assert item.created_at == datetime(2024, 5, 6, 7, 0, tzinfo=UTC)
    record = item.to_service_desk_record(datetime(2024, 5, 7, tzinfo=UTC))
    assert (record["IncidentState_s"], record["ServiceDeskId_s"]) == ("Problem Solved", "CAS-01001-1DQCJU")


def test_an_active_case_without_formatted_values_shows_raw_values_and_is_in_progress() -> None:
    row = {k: v for k, v in RESOLVED_ROW.items() if "@" not in k} | {"statecode": 0, "statuscode": 2}

    item = row_to_work_item("pv-prod", WorkItemType.INCIDENT, INCIDENTS, row)

    assert (item.state, item.lifecycle, item.resolved_by, item.resolved_at) == (
        "2",
        Lifecycle.IN_PROGRESS,
        "",
        None,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ticketnumber": None}, "ticketnumber: missing"),
        ({"modifiedon": "yesterday"}, "modifiedon: not a date-time"),
        ({"versionnumber": None}, "versionnumber: missing"),
        ({"statecode": 4}, "statecode: 4 is not a state of table incident"),
        ({"statecode": "1"}, "statecode: not a whole number"),
        ({"title": {"nested": 1}}, "title: unexpected dict value"),
    ],
)
def test_rows_it_cannot_read_name_the_column(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_to_work_item("pv-prod", WorkItemType.INCIDENT, INCIDENTS, RESOLVED_ROW | change)


def test_state_codes_of_stock_and_custom_tables() -> None:
    custom = TableInfo("new_changerequest", "new_changerequests", "new_changerequestid", "new_name")
    assert lifecycle_of(INCIDENTS, 2) is Lifecycle.CANCELLED
    assert lifecycle_of(custom, 1) is Lifecycle.CLOSED
    assert work_item_state(INCIDENTS, {"statecode": 0}) is WorkItemState.OPEN
    assert work_item_state(INCIDENTS, {"statecode": 2}) is WorkItemState.CLOSED
    with pytest.raises(ValueError, match="not a state of table new_changerequest"):
        lifecycle_of(custom, 2)


def test_a_draft_becomes_an_incident_body_with_bound_references_and_clipped_text() -> None:
    draft = IncidentDraft(
        short_description="[Sev0] disk full on db-01",
        description="x" * 5000,
        impact=3,
        urgency=3,
        correlation_id="azmon-0123456789abcdef-g2",
        assignment_group="teams(0b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)",
        caller="contacts(1b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)",
    )
    table = TableInfo(**{**INCIDENTS.__dict__, "correlation_column": "new_correlationid"})
    new_id = record_id("incident", draft.correlation_id, 0)

    body = draft_to_incident_fields(
        draft, table, new_id, customer="accounts(2b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)"
    )

    assert body["incidentid"] == new_id
    assert body["title"] == "[Sev0] disk full on db-01"
    assert len(str(body["description"])) == 2000
    assert body["prioritycode"] == 3  # impact 3 + urgency 3 - 1 = 5 -> Low
    assert body["new_correlationid"] == draft.correlation_id
    assert body["customerid_account@odata.bind"] == "/accounts(2b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)"
    assert body["ownerid@odata.bind"] == "/teams(0b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)"
    assert body["primarycontactid@odata.bind"] == "/contacts(1b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)"


def test_ids_are_stable_per_correlation_and_note_and_versions_sort_as_text() -> None:
    assert record_id("incident", "azmon-a-g1", 0) == record_id("incident", "azmon-a-g1", 0)
    assert record_id("incident", "azmon-a-g1", 0) != record_id("incident", "azmon-a-g1", 1)
    assert note_id("r1", "text") == note_id("r1", "text") != note_id("r1", "other")
    assert row_version({"versionnumber": 999}) < row_version({"versionnumber": 1000})
    assert parse_version(row_version({"versionnumber": 1000})) == 1000
    assert parse_version("") is None
    assert parse_version("0123456789abcdef") is None


def test_the_resolution_subject_is_the_notes_first_line() -> None:
    body = resolution_parameters(INCIDENTS, "r1", "\nthe alert resolved at 07:05\nmore", 5)
    resolution = body["IncidentResolution"]
    assert isinstance(resolution, dict)
    assert resolution["subject"] == "the alert resolved at 07:05"
    assert resolution["incidentid@odata.bind"] == "/incidents(r1)"
    assert body["Status"] == 5


# -- settings ---------------------------------------------------------------------------------------


def test_a_connection_from_the_registry_checks_the_environment_host_and_its_references() -> None:
    parsed = parse_connection(
        {
            "name": "pv-prod",
            "partner_type": "provance",
            "server_url": "https://contoso.crm4.dynamics.com/",
            "username": APP.upper(),
            "tenant_id": "contoso.onmicrosoft.com",
            "customer": "accounts(2B8A6C8E-5F1C-4D7E-9A3B-2C1D0E9F8A7B)",
            "sync_data": ["incidents"],
        }
    )
    assert isinstance(parsed, ProvanceConnection)
    assert parsed.client_id == APP
    assert parsed.scope == "https://contoso.crm4.dynamics.com/.default"
    assert parsed.customer == "accounts(2b8a6c8e-5f1c-4d7e-9a3b-2c1d0e9f8a7b)"
    assert [spec.flag for spec in parsed.secret_specs()] == ["--client-secret-env"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"server_url": "https://contoso.example.com"}, "is not a Dataverse environment"),
        ({"username": "itsm.connector"}, "application \\(client\\) id"),
        ({"tenant_id": ""}, "tenant_id is required"),
        ({"customer": "accounts(Contoso)"}, "accounts\\(<guid>\\) or contacts\\(<guid>\\)"),
        ({"assignment_group": "Service Desk"}, "teams\\(<guid>\\) or systemusers\\(<guid>\\)"),
        ({"incident_table": "Incident Table"}, "must be a logical name"),
        ({"sync_data": ["incidents", "change_requests"]}, "--change-table"),
        ({"authority_host": "http://login.example"}, "https:// host"),
    ],
)
def test_invalid_connections_are_refused_naming_the_problem(change: dict[str, Any], message: str) -> None:
    with pytest.raises((ValidationError, InvalidInputError), match=message):
        connection(**change)


# -- connector error paths (MockTransport) --------------------------------------------------------------

ENTITY = {
    "LogicalName": "incident",
    "EntitySetName": "incidents",
    "PrimaryIdAttribute": "incidentid",
    "PrimaryNameAttribute": "title",
    "ChangeTrackingEnabled": True,
    "Attributes": [{"LogicalName": name} for name in sorted(INCIDENTS.columns)],
}


def mock_connector(answer: Any) -> ProvanceConnector:
    def handler(request: httpx.Request) -> httpx.Response:
        if "EntityDefinitions" in request.url.path:
            return httpx.Response(200, json=ENTITY)
        result: httpx.Response = answer(request) if callable(answer) else answer
        return result

    client = httpx.Client(transport=httpx.MockTransport(handler), timeout=httpx.Timeout(5.0))
    policy = RetryPolicy(max_attempts=2, sleep=lambda _: None)
    return ProvanceConnector(connection(sync_data=["incidents"]), client, httpx.Auth(), retry=policy)


CURSOR = SyncCursor(updated_at=datetime(2024, 5, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (httpx.Response(200, json={"@odata.context": "x"}), ItsmUnavailableError, "without a value list"),
        (
            httpx.Response(200, text="<html>sign in</html>", headers={"Content-Type": "text/html"}),
            ItsmUnavailableError,
            "text/html, not JSON",
        ),
        (httpx.Response(401), ItsmAuthError, "re-authorise"),
        (
            httpx.Response(302, headers={"Location": "https://login.microsoftonline.com/x"}),
            ItsmRejectedError,
            "redirected .* to login.microsoftonline.com",
        ),
        (
            httpx.Response(
                400, json={"error": {"code": "0x80060888", "message": "Could not find a property"}}
            ),
            ItsmRejectedError,
            "0x80060888: Could not find a property",
        ),
        (httpx.Response(503, text="<html>down</html>"), ItsmUnavailableError, "after 2 attempts: HTTP 503"),
    ],
)
def test_bad_answers_to_a_feed_page_are_clear_errors(
    answer: httpx.Response, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mock_connector(answer).fetch_changes(WorkItemType.INCIDENT, CURSOR, 10)


def test_a_page_whose_rows_carry_no_position_cannot_pin_the_feed() -> None:
    rows = [{"incidentid": "9e42abf7-4801-5baf-aa8c-a04ab502c26f", "statecode": 0}]
    answer = httpx.Response(200, json={"value": rows, "@odata.nextLink": "https://x/next"})

    with pytest.raises(Exception, match="carry no readable modifiedon/versionnumber"):
        mock_connector(answer).fetch_changes(WorkItemType.INCIDENT, CURSOR, 10)


def test_the_feed_query_is_the_keyset_filter_with_the_page_size_preference() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"value": [RESOLVED_ROW]})

    cursor = SyncCursor(
        updated_at=datetime(2024, 5, 6, 7, 25, 13, 500, tzinfo=UTC), last_id=row_version(RESOLVED_ROW)
    )
    page = mock_connector(answer).fetch_changes(WorkItemType.INCIDENT, cursor, 250)

    params = dict(seen[0].url.params)
    assert params["$filter"] == (
        "(modifiedon eq 2024-05-06T07:25:13Z and versionnumber gt 1000042) "
        "or modifiedon gt 2024-05-06T07:25:13Z"
    )
    assert params["$orderby"] == "modifiedon asc,versionnumber asc"
    assert "odata.maxpagesize=250" in seen[0].headers["Prefer"]
    assert page.is_last
    assert page.next_cursor == SyncCursor(
        updated_at=datetime(2024, 5, 6, 7, 25, 13, tzinfo=UTC), last_id="00000000000001000042"
    )
