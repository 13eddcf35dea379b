"""Cherwell: connection settings, record mapping with real payload shapes, and the token flow over
``httpx.MockTransport`` (the REST API itself is exercised against the loopback server in
``tests/integration/test_cherwell_connector_loopback.py``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from pydantic import SecretStr

from shared_code.cli import FLAG_OF_FIELD, product_flags
from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import InvalidInputError, ItsmAuthError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.cherwell.auth import CherwellAuth
from shared_code.itsm.cherwell.connector import CherwellConnector
from shared_code.itsm.cherwell.mapping import (
    CORRELATION_MARKER,
    IncidentDefaults,
    RecordOptions,
    draft_to_incident_fields,
    format_datetime,
    incident_state,
    marker_of,
    parse_datetime,
    record_to_work_item,
    record_values,
    status_lifecycle,
    zone_of,
)
from shared_code.itsm.cherwell.settings import CherwellConnection
from shared_code.products import parse_connection

API = "https://itsm.contoso.example/CherwellAPI"
CLIENT_ID = "5d4f6f1b-f0de-4442-8791-4582816b04de"
PASSWORD = "p4ssw0rd-NEVER-LOG"
CLIENT_SECRET = "n4tive-s3cret-NEVER-LOG"
INCIDENT_BO = "6dd53665c0c24cab86870a21cf6434ae"
REC = "944b7a71ed04fd1fff2b0c4f6b96e25d3583fe5bbc"

Handler = Callable[[httpx.Request], httpx.Response]


def field(name: str, value: str, field_id: str = "") -> dict[str, Any]:
    """One FieldTemplateItem as getsearchresults and getbusinessobject answer them."""
    fid = field_id or f"{abs(hash(name)) % 16**32:032x}"
    return {
        "dirty": False,
        "displayName": name,
        "fieldId": fid,
        "fullFieldId": f"BO:{INCIDENT_BO},FI:{fid}",
        "html": None,
        "name": name,
        "value": value,
    }


def incident_record(**overrides: str) -> dict[str, Any]:
    values = {
        "RecID": REC,
        "IncidentID": "102784",
        "Status": "In Progress",
        "ShortDescription": "[Sev2] High CPU on vm-web-01",
        "Description": f"CPU above 90%.\n\n{CORRELATION_MARKER}azmon-0c1d2e3f4a5b6c7d-g2",
        "Impact": "Medium",
        "Urgency": "High",
        "Priority": "2",
        "CustomerDisplayName": "Monitoring",
        "OwnedBy": "Amy Adams",
        "Category": "Hardware",
        "Source": "Event",
        "ConfigItemDisplayName": "vm-web-01",
        "CreatedDateTime": "5/6/2024 6:58:12 AM",
        "CreatedBy": "svc.azuremonitor",
        "LastModifiedDateTime": "5/6/2024 7:03:45 PM",
        "ResolvedDateTime": "",
        "ResolvedBy": "",
        "ClosedDateTime": "",
        "ClosedBy": "",
    } | overrides
    return {
        "busObId": INCIDENT_BO,
        "busObPublicId": values["IncidentID"],
        "busObRecId": values["RecID"],
        "fields": [field(name, value) for name, value in values.items()],
        "links": [],
        "errorCode": None,
        "errorMessage": None,
        "hasError": False,
    }


# -- mapping -------------------------------------------------------------------------------------------


def test_an_incident_search_result_becomes_a_work_item_with_its_service_desk_columns() -> None:
    item = record_to_work_item("cw-prod", WorkItemType.INCIDENT, incident_record(), RecordOptions())

    assert (item.source_id, item.number) == (REC, "102784")
    assert item.updated_at == datetime(2024, 5, 6, 19, 3, 45, tzinfo=UTC)
    assert item.created_at == datetime(2024, 5, 6, 6, 58, 12, tzinfo=UTC)
    assert (item.state, item.state_code, item.lifecycle) == (
        "In Progress",
        "In Progress",
        Lifecycle.IN_PROGRESS,
    )
    assert (item.impact, item.urgency, item.priority) == ("Medium", "High", "2")
    assert (item.title, item.computer, item.source) == ("[Sev2] High CPU on vm-web-01", "vm-web-01", "Event")
    assert (item.assigned_to, item.category, item.created_by) == ("Amy Adams", "Hardware", "svc.azuremonitor")
    assert item.resolved_at is None
    assert item.closed_at is None
    assert item.correlation_id == "azmon-0c1d2e3f4a5b6c7d-g2"
    record = item.to_service_desk_record(datetime(2024, 5, 7, tzinfo=UTC))
    assert record["ServiceDeskId_s"] == "102784"
    assert record["IncidentState_s"] == "In Progress"
    assert record["LastModifiedDate_t"] == "2024-05-06T19:03:45+00:00"


def test_date_times_are_read_and_written_in_the_users_time_zone_across_a_dst_change() -> None:
    zone = zone_of("America/New_York")
    # 2024-03-10 02:00 EST jumped to 03:00 EDT
    assert parse_datetime("3/10/2024 1:59:59 AM", "x", zone) == datetime(2024, 3, 10, 6, 59, 59, tzinfo=UTC)
    assert parse_datetime("3/10/2024 3:00:00 AM", "x", zone) == datetime(2024, 3, 10, 7, 0, 0, tzinfo=UTC)
    assert format_datetime(datetime(2024, 3, 10, 7, 0, 0, tzinfo=UTC), zone) == "3/10/2024 3:00:00 AM"
    assert format_datetime(datetime(2024, 7, 1, 16, 5, 9, tzinfo=UTC), zone) == "7/1/2024 12:05:09 PM"
    assert format_datetime(datetime(2024, 7, 1, 4, 0, 0, tzinfo=UTC), zone) == "7/1/2024 12:00:00 AM"
    options = RecordOptions(zone=zone)
    item = record_to_work_item("cw", WorkItemType.INCIDENT, incident_record(), options)
    assert item.updated_at == datetime(2024, 5, 6, 23, 3, 45, tzinfo=UTC)  # EDT is UTC-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12/31/2023 12:00:00 AM", datetime(2023, 12, 31, 0, 0, tzinfo=UTC)),
        ("12/31/2023 12:30:01 PM", datetime(2023, 12, 31, 12, 30, 1, tzinfo=UTC)),
        ("1/2/2024 17:04", datetime(2024, 1, 2, 17, 4, tzinfo=UTC)),
        ("2024-01-02T17:04:05Z", datetime(2024, 1, 2, 17, 4, 5, tzinfo=UTC)),
        ("2024-01-02T18:04:05+01:00", datetime(2024, 1, 2, 17, 4, 5, tzinfo=UTC)),
        ("  ", None),
    ],
)
def test_cherwell_date_time_spellings(text: str, expected: datetime | None) -> None:
    assert parse_datetime(text, "LastModifiedDateTime") == expected


@pytest.mark.parametrize("text", ["13/45/2024 1:00:00 AM", "5/6/2024 13:00:00 PM", "yesterday", "5/6/24"])
def test_an_unreadable_date_time_names_its_field(text: str) -> None:
    with pytest.raises(ValueError, match="ClosedDateTime: not a Cherwell date-time"):
        parse_datetime(text, "ClosedDateTime")


def test_a_change_request_search_result_becomes_a_change_work_item() -> None:
    values = {
        "RecID": "93e5a2a1b4c14cc29cd4d0cf2a2fc1ab54e3e9e0e1",
        "ChangeID": "30412",
        "Status": "Scheduled",
        "Title": "Patch srv-0042",
        "Type": "Normal",
        "Risk": "Low",
        "LastModifiedDateTime": "6/1/2024 10:00:00 AM",
        "ScheduledStartDate": "6/3/2024 8:00:00 PM",
        "ScheduledEndDate": "6/3/2024 10:00:00 PM",
        "ClosedDateTime": "",
    }
    record = {
        "busObId": "34f9b5e6b5f1",
        "busObPublicId": "30412",
        "busObRecId": values["RecID"],
        "fields": [field(n, v) for n, v in values.items()],
    }
    item = record_to_work_item("cw", WorkItemType.CHANGE_REQUEST, record, RecordOptions())
    assert (item.number, item.title, item.change_type, item.risk) == (
        "30412",
        "Patch srv-0042",
        "Normal",
        "Low",
    )
    assert item.lifecycle is Lifecycle.IN_PROGRESS
    assert item.planned_start == datetime(2024, 6, 3, 20, 0, tzinfo=UTC)
    assert item.planned_end == datetime(2024, 6, 3, 22, 0, tzinfo=UTC)
    assert item.to_service_desk_record(item.updated_at)["CRState_s"] == "Scheduled"


def test_statuses_map_to_the_lifecycle_and_a_sites_own_status_keeps_its_raw_value() -> None:
    assert status_lifecycle(WorkItemType.INCIDENT, "New") is Lifecycle.NEW
    assert status_lifecycle(WorkItemType.INCIDENT, "  resolved ") is Lifecycle.RESOLVED
    assert status_lifecycle(WorkItemType.INCIDENT, "Closed") is Lifecycle.CLOSED
    assert status_lifecycle(WorkItemType.CHANGE_REQUEST, "Cancelled") is Lifecycle.CANCELLED
    assert status_lifecycle(WorkItemType.INCIDENT, "Fixed") is None
    assert status_lifecycle(WorkItemType.INCIDENT, "Fixed", resolved_status="Fixed") is Lifecycle.RESOLVED
    item = record_to_work_item(
        "cw", WorkItemType.INCIDENT, incident_record(Status="Awaiting Vendor"), RecordOptions()
    )
    assert (item.state, item.state_code, item.lifecycle) == ("Awaiting Vendor", "Awaiting Vendor", None)
    assert incident_state("Awaiting Vendor", "Resolved") is WorkItemState.OPEN
    assert incident_state("Fixed", "Fixed") is WorkItemState.RESOLVED
    assert incident_state("Closed", "Resolved") is WorkItemState.CLOSED


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"RecID": ""}, "RecID: missing"),
        ({"IncidentID": ""}, "IncidentID: missing"),
        ({"LastModifiedDateTime": ""}, "LastModifiedDateTime: missing"),
        ({"LastModifiedDateTime": "not a date"}, "LastModifiedDateTime: not a Cherwell date-time"),
        ({"ResolvedDateTime": "31/31/2024 1:00:00 AM"}, "ResolvedDateTime: not a Cherwell date-time"),
    ],
)
def test_a_record_with_a_missing_or_bad_key_field_is_refused_naming_it(
    overrides: dict[str, str], message: str
) -> None:
    record = incident_record(**overrides)
    record["busObRecId"] = overrides.get("RecID", REC)
    record["busObPublicId"] = overrides.get("IncidentID", "102784")
    with pytest.raises(ValueError, match=message):
        record_to_work_item("cw", WorkItemType.INCIDENT, record, RecordOptions())


def test_record_values_read_every_value_shape_and_refuse_items_they_cannot_name() -> None:
    plain = {"fields": [field("Status", "New"), field("Priority", "3")]}
    assert record_values(plain) == {"Status": "New", "Priority": "3"}
    mixed = {
        "fields": [
            field("Status", "New"),
            {"name": "Priority", "value": 3},
            {"name": "Breached", "value": True},
            {"name": "OwnedBy", "value": None},
            {"name": "Cost", "value": 2.5},
            {"name": "Team"},  # no value at all
        ]
    }
    assert record_values(mixed) == {
        "Status": "New",
        "Priority": "3",
        "Breached": "True",
        "OwnedBy": "",
        "Cost": "2.5",
        "Team": "",
    }
    for fields, message in [
        ([field("Status", "New"), "Priority"], "an item is not an object"),
        ([{"name": "", "value": "x"}], "an item has no name"),
        ([{"value": "x"}], "an item has no name"),
        ([{"name": 7, "value": "x"}], "an item has no name"),
        ([{"name": ["Status"], "value": "x"}], "an item has no name"),
        ([{"name": "Status", "value": {"label": "New"}}], "Status: unexpected dict value"),
    ]:
        with pytest.raises(ValueError, match=message):
            record_values({"fields": fields})


def test_a_record_without_a_fields_list_is_refused() -> None:
    with pytest.raises(ValueError, match="fields: missing"):
        record_to_work_item("cw", WorkItemType.INCIDENT, {"busObRecId": REC}, RecordOptions())


def test_the_correlation_id_goes_to_the_configured_field_or_onto_the_description_marker_line() -> None:
    draft = IncidentDraft(
        short_description="[Sev1] Disk full on vm-db-02",
        description="Alert details",
        impact=1,
        urgency=3,
        correlation_id="azmon-feedc0de-g1",
        caller="Monitoring",
        assignment_group="Database",
    )
    defaults = IncidentDefaults(service="Infrastructure", subcategory="Disk")
    fields = draft_to_incident_fields(draft, defaults, ci_rec_id="9a" * 21, ci_name="vm-db-02")
    assert fields == {
        "ShortDescription": "[Sev1] Disk full on vm-db-02",
        "Description": f"Alert details\n\n{CORRELATION_MARKER}azmon-feedc0de-g1",
        "Impact": "High",
        "Urgency": "Low",
        "CustomerDisplayName": "Monitoring",
        "OwnedByTeam": "Database",
        "Service": "Infrastructure",
        "Subcategory": "Disk",
        "ConfigItemRecID": "9a" * 21,
        "ConfigItemDisplayName": "vm-db-02",
    }
    assert marker_of(fields["Description"]) == "azmon-feedc0de-g1"
    with_field = draft_to_incident_fields(draft, IncidentDefaults(correlation_field="AzureCorrelationId"))
    assert with_field["AzureCorrelationId"] == "azmon-feedc0de-g1"
    assert with_field["Description"] == "Alert details"
    assert "Category" not in with_field
    assert "ConfigItemRecID" not in with_field


def test_only_a_whole_marker_line_counts_as_a_correlation_id() -> None:
    assert marker_of(f"text\n{CORRELATION_MARKER}azmon-abc1-g12\n") == "azmon-abc1-g12"
    assert marker_of(f"see {CORRELATION_MARKER}azmon-abc1-g1 in another incident") == ""
    assert marker_of("no marker") == ""


# -- settings ------------------------------------------------------------------------------------------


def connection(**overrides: Any) -> CherwellConnection:
    data: dict[str, Any] = {
        "name": "cw-prod",
        "partner_type": "cherwell",
        "server_url": "https://itsm.contoso.example",
        "username": "svc.azuremonitor",
        "client_id": CLIENT_ID,
    } | overrides
    parsed = parse_connection(data)
    assert isinstance(parsed, CherwellConnection)
    return parsed


def test_a_server_url_without_a_path_means_the_stock_api_path_and_secrets_depend_on_the_client_kind() -> None:
    plain = connection()
    assert plain.server_url == API
    assert connection(server_url="https://itsm.contoso.example/CSM/CherwellAPI/").server_url == (
        "https://itsm.contoso.example/CSM/CherwellAPI"
    )
    assert [s.purpose for s in plain.secret_specs()] == ["password", "refresh-token"]
    native = connection(native_client=True)
    assert [(s.purpose, s.flag) for s in native.secret_specs()] == [
        ("client-secret", "--client-secret-env"),
        ("password", "--password-env"),
        ("refresh-token", ""),
    ]
    assert native.secret_names == (
        "itsm-cw-prod-client-secret",
        "itsm-cw-prod-password",
        "itsm-cw-prod-refresh-token",
    )


def test_invalid_settings_are_named_by_their_cli_flags() -> None:
    labels = FLAG_OF_FIELD | product_flags()
    data: dict[str, object] = {
        "name": "cw-prod",
        "partner_type": "cherwell",
        "server_url": "http://itsm.contoso.example",
        "username": "svc",
        "time_zone": "Mars/Olympus",
        "incident_object": "Incident; DROP",
        "auth_mode": "Kerberos",
    }
    with pytest.raises(InvalidInputError) as caught:
        parse_connection(data, labels)
    message = str(caught.value)
    for expected in (
        "--url: must be an https:// URL",
        "--client-id: is required",
        "--time-zone:",
        "--incident-object:",
    ):
        assert expected in message
    assert "--auth-mode:" in message
    with pytest.raises(InvalidInputError, match="must differ"):
        connection(reopen_status="resolved")


# -- the token flow --------------------------------------------------------------------------------------


class TokenServer:
    """``POST /CherwellAPI/token``: an OWIN OAuth server (400 invalid_grant), one-use refresh tokens."""

    def __init__(self, *, accept_password: bool = True, native_secret: str | None = None) -> None:
        self.accept_password = accept_password
        self.native_secret = native_secret
        self.forms: list[dict[str, str]] = []
        self.queries: list[dict[str, str]] = []
        self.refresh: set[str] = set()
        self.access: set[str] = set()
        self.issued = 0
        self.html = False

    @property
    def grants(self) -> list[str]:
        return [f["grant_type"] for f in self.forms]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        self.forms.append(form)
        self.queries.append(dict(request.url.params))
        if self.html:
            return httpx.Response(
                200, text="<html><body>Sign in</body></html>", headers={"Content-Type": "text/html"}
            )
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.native_secret:
            return httpx.Response(
                400, json={"error": "invalid_client", "error_description": "Invalid client"}
            )
        if form["grant_type"] == "password":
            ok = (
                self.accept_password
                and form["username"] == "svc.azuremonitor"
                and form["password"] == PASSWORD
            )
        else:
            ok = form["refresh_token"] in self.refresh
            self.refresh.discard(form["refresh_token"])
        if not ok:
            return httpx.Response(
                400,
                json={
                    "error": "invalid_grant",
                    "error_description": "The user name or password is incorrect.",
                },
            )
        self.issued += 1
        access, refresh = f"access-{self.issued}", f"refresh-{self.issued}"
        self.access.add(access)
        self.refresh.add(refresh)
        return httpx.Response(
            200,
            json={
                "access_token": access,
                "token_type": "bearer",
                "expires_in": 1199,
                "refresh_token": refresh,
                "as:client_id": CLIENT_ID,
                "username": "svc.azuremonitor",
                ".issued": "Mon, 06 May 2024 07:00:00 GMT",
                ".expires": "Mon, 06 May 2024 07:19:59 GMT",
            },
        )


class Store:
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.saved: list[str] = []

    def load(self) -> str | None:
        return self.token

    def save(self, token: str) -> None:
        self.saved.append(token)
        self.token = token


class Server:
    """The token endpoint plus one authenticated API answer."""

    def __init__(self, api: Handler, tokens: TokenServer | None = None) -> None:
        self.tokens = tokens or TokenServer()
        self.api = api
        self.api_auth: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/CherwellAPI/token":
            return self.tokens(request)
        self.api_auth.append(request.headers.get("Authorization", ""))
        if self.api_auth[-1].removeprefix("Bearer ") not in self.tokens.access:
            return httpx.Response(401, json={"Message": "Authorization has been denied for this request."})
        return self.api(request)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def auth(
    store: Store | None = None, clock: Callable[[], float] = time.monotonic, **options: Any
) -> CherwellAuth:
    return CherwellAuth(
        API,
        client_id=CLIENT_ID,
        username="svc.azuremonitor",
        password=lambda: SecretStr(PASSWORD),
        refresh_token_store=store,
        connection_name="cw-prod",
        clock=clock,
        **options,
    )


def service_info(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"apiVersion": "10.5.0", "hasError": False})


def test_password_grant_with_the_auth_mode_then_refresh_grants_whose_rotated_tokens_are_saved() -> None:
    server = Server(service_info)
    store, clock = Store(), Clock()
    flow = auth(store, clock, auth_mode="LDAP")
    with httpx.Client(transport=httpx.MockTransport(server)) as client:
        client.get(f"{API}/api/V1/serviceinfo", auth=flow)
        client.get(f"{API}/api/V1/serviceinfo", auth=flow)  # the cached token
        clock.now += 1200  # past expiry (minus the skew)
        client.get(f"{API}/api/V1/serviceinfo", auth=flow)

    assert server.tokens.grants == ["password", "refresh_token"]
    assert server.tokens.queries[0] == {"auth_mode": "LDAP"}
    assert "client_secret" not in server.tokens.forms[0]
    assert server.tokens.forms[1]["refresh_token"] == "refresh-1"
    assert store.saved == ["refresh-1", "refresh-2"]
    assert server.api_auth == ["Bearer access-1", "Bearer access-1", "Bearer access-2"]
    assert PASSWORD not in repr(flow)
    assert "refresh-" not in repr(flow)


def test_a_native_client_sends_its_secret_and_a_stored_refresh_token_is_used_first() -> None:
    server = Server(service_info, TokenServer(native_secret=CLIENT_SECRET))
    server.tokens.refresh.add("refresh-from-vault")
    store = Store("refresh-from-vault")
    flow = auth(store, client_secret=lambda: SecretStr(CLIENT_SECRET))
    with httpx.Client(transport=httpx.MockTransport(server)) as client:
        assert client.get(f"{API}/api/V1/serviceinfo", auth=flow).status_code == 200

    assert server.tokens.grants == ["refresh_token"]
    assert server.tokens.forms[0]["client_secret"] == CLIENT_SECRET
    assert store.saved == ["refresh-1"]


def test_an_api_401_gets_one_new_token_and_one_retry() -> None:
    server = Server(service_info)
    flow = auth(Store())
    with httpx.Client(transport=httpx.MockTransport(server)) as client:
        client.get(f"{API}/api/V1/serviceinfo", auth=flow)
        server.tokens.access.clear()  # the user was logged out on the server
        assert client.get(f"{API}/api/V1/serviceinfo", auth=flow).status_code == 200

    assert server.tokens.grants == ["password", "refresh_token"]
    assert server.api_auth == ["Bearer access-1", "Bearer access-1", "Bearer access-2"]


def test_a_refused_refresh_token_falls_back_to_the_password(caplog: pytest.LogCaptureFixture) -> None:
    server = Server(service_info)
    store = Store("refresh-revoked")
    with httpx.Client(transport=httpx.MockTransport(server)) as client, caplog.at_level(logging.INFO):
        assert client.get(f"{API}/api/V1/serviceinfo", auth=auth(store)).status_code == 200

    assert server.tokens.grants == ["refresh_token", "password"]
    assert store.saved == ["refresh-1"]
    assert "invalid_grant" in caplog.text
    assert "refresh-revoked" not in caplog.text
    assert PASSWORD not in caplog.text


def test_refused_credentials_are_an_auth_error_that_says_what_to_check_and_leaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Server(service_info, TokenServer(accept_password=False))
    with (
        httpx.Client(transport=httpx.MockTransport(server)) as client,
        caplog.at_level(logging.DEBUG),
        pytest.raises(ItsmAuthError) as caught,
    ):
        client.get(f"{API}/api/V1/serviceinfo", auth=auth(Store()))

    message = str(caught.value)
    assert (
        "HTTP 400 from /CherwellAPI/token: invalid_grant: The user name or password is incorrect." in message
    )
    assert "re-authorise the connection" in message
    assert caught.value.status == 400
    assert PASSWORD not in message + caplog.text


def test_a_sign_in_page_instead_of_a_token_is_an_auth_error_naming_what_answered() -> None:
    tokens = TokenServer()
    tokens.html = True
    with (
        httpx.Client(transport=httpx.MockTransport(Server(service_info, tokens))) as client,
        pytest.raises(ItsmAuthError, match="answered text/html without an access token"),
    ):
        client.get(f"{API}/api/V1/serviceinfo", auth=auth())


def test_a_token_endpoint_outage_goes_to_the_retry_policy() -> None:
    server = Server(service_info)
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path.endswith("/token") and len(paths) < 3:
            return httpx.Response(
                503, text="<html>Service Unavailable</html>", headers={"Content-Type": "text/html"}
            )
        return server(request)

    sleeps: list[float] = []
    with httpx.Client(transport=httpx.MockTransport(handler), timeout=5) as client:
        connector = CherwellConnector(connection(), client, auth(), retry=RetryPolicy(sleep=sleeps.append))
        with pytest.raises(ItsmRejectedError, match="no business object named 'Incident'"):
            connector.check()  # this API answers no summary: past the outage, the lookups went on
    assert paths[:4] == [
        "/CherwellAPI/token",
        "/CherwellAPI/token",
        "/CherwellAPI/token",
        "/CherwellAPI/api/V1/getbusinessobjectsummary/busobname/Incident",
    ]
    assert len(sleeps) == 2


# -- the connector's answers, where a loopback cannot easily lie ------------------------------------------


def connector_with(api: Handler) -> CherwellConnector:
    client = httpx.Client(transport=httpx.MockTransport(Server(api)), timeout=5)
    return CherwellConnector(connection(), client, auth(), retry=RetryPolicy(sleep=lambda _s: None))


def test_a_record_answer_that_is_not_a_record_is_unavailable_not_a_crash() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        if "getbusinessobjectsummary" in request.url.path:
            return httpx.Response(200, json=[{"name": "Incident", "busObId": INCIDENT_BO}])
        if "getbusinessobjectschema" in request.url.path:
            return httpx.Response(
                200, json={"busObId": INCIDENT_BO, "fieldDefinitions": [], "hasError": False}
            )
        return httpx.Response(200, json={"busObRecId": REC, "fields": "oops"})

    with pytest.raises(ItsmUnavailableError, match="cannot be read"):
        connector_with(api).get_state(WorkItemRef(id=REC, number="1"))


def test_http_status_names_in_error_bodies_decide_between_rejected_and_unavailable() -> None:
    answers = iter(
        [
            httpx.Response(
                200,
                json={
                    "hasError": True,
                    "errorCode": "GENERALFAILURE",
                    "httpStatusCode": "InternalServerError",
                },
            ),
            httpx.Response(
                404,
                json={"hasError": True, "errorCode": "RECORDNOTFOUND", "errorMessage": "Record not found"},
            ),
            httpx.Response(
                200, json={"hasError": True, "errorCode": "SECURITY", "httpStatusCode": "Forbidden"}
            ),
        ]
    )

    def api(request: httpx.Request) -> httpx.Response:
        if "getbusinessobjectsummary" in request.url.path:
            return httpx.Response(200, json=[{"name": "Incident", "busObId": INCIDENT_BO}])
        if "getbusinessobjectschema" in request.url.path:
            return httpx.Response(200, json={"busObId": INCIDENT_BO, "fieldDefinitions": []})
        return next(answers)

    connector = connector_with(api)
    ref = WorkItemRef(id=REC, number="102784")
    with pytest.raises(ItsmUnavailableError, match="GENERALFAILURE"):
        connector.get_state(ref)
    with pytest.raises(ItsmRejectedError, match="RECORDNOTFOUND; Record not found") as gone:
        connector.get_state(ref)
    assert gone.value.status == 404
    with pytest.raises(ItsmRejectedError) as forbidden:
        connector.get_state(ref)
    assert forbidden.value.status == 403


def test_a_client_without_timeouts_is_refused() -> None:
    with httpx.Client(timeout=None) as client, pytest.raises(ValueError, match="timeouts"):
        CherwellConnector(connection(), client, auth())


def test_request_bodies_are_json_with_field_ids_never_names_in_filters() -> None:
    seen: list[dict[str, Any]] = []
    schema = {
        "busObId": INCIDENT_BO,
        "fieldDefinitions": [
            {"fieldId": "f-rec", "name": "RecID"},
            {"fieldId": "f-mod", "name": "LastModifiedDateTime"},
            {"fieldId": "f-status", "name": "Status"},
        ],
    }

    def api(request: httpx.Request) -> httpx.Response:
        if "getbusinessobjectsummary" in request.url.path:
            return httpx.Response(200, json=[{"name": "Incident", "busObId": INCIDENT_BO}])
        if "getbusinessobjectschema" in request.url.path:
            assert request.url.params["includerelationships"] == "true"
            return httpx.Response(200, json=schema)
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"businessObjects": [], "totalRows": 0, "hasError": False})

    page = connector_with(api).fetch_changes(
        WorkItemType.INCIDENT,
        SyncCursor(updated_at=datetime(2024, 5, 6, 7, 0, tzinfo=UTC), last_id="abc"),
        5000,
    )
    assert page.is_last
    assert page.items == []
    drain, after = seen
    assert drain["filters"] == [
        {"fieldId": "f-mod", "operator": "eq", "value": "5/6/2024 7:00:00 AM"},
        {"fieldId": "f-rec", "operator": "gt", "value": "abc"},
    ]
    assert drain["sorting"] == [{"fieldId": "f-rec", "sortDirection": 1}]
    assert after["filters"] == [{"fieldId": "f-mod", "operator": "gt", "value": "5/6/2024 7:00:00 AM"}]
    assert after["sorting"] == [
        {"fieldId": "f-mod", "sortDirection": 1},
        {"fieldId": "f-rec", "sortDirection": 1},
    ]
    assert drain["pageSize"] == 2000
    assert drain["pageNumber"] == 1
    assert set(drain["fields"]) == {"f-rec", "f-mod", "f-status"}  # only what the schema has
