"""The Cherwell connector against the loopback server: real HTTP over TLS, OAuth, lookups and searches."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import ItsmError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.cherwell.auth import CherwellAuth
from shared_code.itsm.cherwell.connector import CherwellConnector
from shared_code.itsm.cherwell.mapping import CORRELATION_MARKER, parse_datetime, zone_of
from shared_code.itsm.cherwell.settings import CherwellConnection
from tests.loopback.cherwell import DEFAULT_CLIENT_ID, DEFAULT_PASSWORD, DEFAULT_USERNAME, CherwellLoopback
from tests.loopback.tls import loopback_tls

T0 = datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class MemoryStore:
    def __init__(self) -> None:
        self.token: str | None = None
        self.saved: list[str] = []

    def load(self) -> str | None:
        return self.token

    def save(self, token: str) -> None:
        self.token = token
        self.saved.append(token)


class World:
    def __init__(self, server: CherwellLoopback, clock: Clock, **settings: Any) -> None:
        self.server = server
        self.clock = clock
        self.store = MemoryStore()
        self.sleeps: list[float] = []
        self.http = httpx.Client(verify=loopback_tls().client_context(), timeout=5)
        self.connector = self.build(**settings)

    def build(self, **settings: Any) -> CherwellConnector:
        connection = CherwellConnection.model_validate(
            {
                "name": "cw-test",
                "server_url": self.server.url,
                "username": DEFAULT_USERNAME,
                "client_id": DEFAULT_CLIENT_ID,
            }
            | settings
        )
        auth = CherwellAuth(
            connection.server_url,
            client_id=connection.client_id,
            username=connection.username,
            password=SecretStr(DEFAULT_PASSWORD),
            refresh_token_store=self.store,
            connection_name=connection.name,
        )
        policy = RetryPolicy(sleep=self.sleeps.append, jitter=lambda cap: cap)
        return CherwellConnector(connection, self.http, auth, retry=policy)

    def draft(self, correlation: str = "azmon-0123456789abcdef-g1", **changes: Any) -> IncidentDraft:
        data: dict[str, Any] = {
            "short_description": "[Sev1] High CPU on vm-web-01",
            "description": "CPU above 90 percent for 10 minutes.",
            "impact": 1,
            "urgency": 2,
            "correlation_id": correlation,
            "caller": "Azure Monitor",
        } | changes
        return IncidentDraft(**data)

    def incident(self, ref: WorkItemRef) -> dict[str, str]:
        found = self.server.record("Incident", ref.id)
        assert found is not None
        return found


@pytest.fixture
def world() -> Iterator[World]:
    clock = Clock()
    with CherwellLoopback(clock=clock) as server:
        built = World(server, clock)
        yield built
        built.http.close()


def test_check_proves_every_name_the_connection_uses_and_names_what_is_wrong(world: World) -> None:
    verdict = world.connector.check()
    assert f"Cherwell at 127.0.0.1 answered as {DEFAULT_USERNAME!r}" in verdict
    assert "Incident, ChangeRequest readable" in verdict
    assert "Status 'Resolved' and 'Reopened' allowed" in verdict

    with pytest.raises(
        ItsmRejectedError, match=r"Status 'Fixed' \(--resolved-status\) is not a value"
    ) as bad:
        world.build(resolved_status="Fixed").check()
    assert "In Progress" in str(bad.value)
    with pytest.raises(ItsmRejectedError, match=r"no business object named 'Ticket' \(--incident-object\)"):
        world.build(incident_object="Ticket").check()
    with pytest.raises(
        ItsmRejectedError, match=r"no relationship 'Incident Has Notes' \(--note-relationship\)"
    ):
        world.build(note_relationship="Incident Has Notes").check()


def test_create_note_resolve_and_reopen_write_what_the_incident_should_say(world: World) -> None:
    ref = world.connector.create_incident(world.draft())

    incident = world.incident(ref)
    assert ref.number == incident["IncidentID"]
    assert ref.url is not None
    assert ref.url.startswith(f"{world.server.url}/CherwellClient/Access/Command/Queries.GoToRecord?BusObID=")
    assert (incident["Status"], incident["Impact"], incident["Urgency"], incident["Priority"]) == (
        "New",
        "High",
        "Medium",
        "2",
    )
    assert incident["Description"].endswith(f"{CORRELATION_MARKER}azmon-0123456789abcdef-g1")
    assert incident["CustomerDisplayName"] == "Azure Monitor"
    assert world.connector.find_by_correlation("azmon-0123456789abcdef-g1") == ref
    assert world.connector.get_state(ref) is WorkItemState.OPEN

    world.connector.add_note(ref, "the alert fired again")
    world.clock.advance(minutes=5)
    world.connector.resolve(ref, "the alert resolved")
    incident = world.incident(ref)
    assert (incident["Status"], incident["CloseDescription"]) == ("Resolved", "the alert resolved")
    assert incident["ResolvedDateTime"] == "5/6/2024 7:05:00 AM"
    assert world.connector.get_state(ref) is WorkItemState.RESOLVED
    # a resolved incident is not taken over by a recovering create
    assert world.connector.find_by_correlation("azmon-0123456789abcdef-g1") is None

    world.connector.reopen(ref, "it fired again")
    assert world.incident(ref)["Status"] == "Reopened"
    assert world.server.notes(ref.id) == ["the alert fired again", "the alert resolved", "it fired again"]


def test_a_site_rule_refusing_the_save_is_rejected_naming_the_fields_and_the_service_option_fixes_it(
    world: World,
) -> None:
    world.server.set_required("Incident", "ShortDescription", "Description", "Service", "Subcategory")
    with pytest.raises(ItsmRejectedError) as refused:
        world.connector.create_incident(world.draft())
    message = str(refused.value)
    assert "VALIDATIONERROR" in message
    assert "Service: Service is required" in message
    assert "Subcategory: Subcategory is required" in message
    assert world.server.count("Incident") == 0

    connector = world.build(service="Infrastructure", subcategory="Performance", category="Hardware")
    ref = connector.create_incident(world.draft())
    incident = world.incident(ref)
    assert (incident["Service"], incident["Category"], incident["Subcategory"]) == (
        "Infrastructure",
        "Hardware",
        "Performance",
    )


def test_a_correlation_field_is_used_when_configured_and_a_longer_id_is_not_taken_for_it(
    world: World,
) -> None:
    with pytest.raises(ItsmRejectedError, match=r"no field 'AzureCorrelationId' \(set --correlation-field\)"):
        world.build(correlation_field="AzureCorrelationId").create_incident(world.draft())

    world.connector.create_incident(world.draft("azmon-feed-g12"))
    assert world.connector.find_by_correlation("azmon-feed-g1") is None  # contains matches -g12; not it
    with_field = world.build(correlation_field="Source")  # any text field the site adds serves
    ref = with_field.create_incident(world.draft("azmon-feed-g1"))
    assert world.incident(ref)["Source"] == "azmon-feed-g1"
    assert with_field.find_by_correlation("azmon-feed-g1") == ref


def test_a_create_whose_answer_is_lost_is_found_again_not_repeated(world: World) -> None:
    world.server.lose_answers(1, "savebusinessobject")

    ref = world.connector.create_incident(world.draft())

    assert world.server.count("Incident") == 1
    assert len(world.server.calls("savebusinessobject")) == 1
    assert world.incident(ref)["IncidentID"] == ref.number


def test_a_create_that_failed_before_saving_is_an_outage_not_a_guess(world: World) -> None:
    world.server.fail_next(1, 500, path_contains="savebusinessobject")
    with pytest.raises(ItsmUnavailableError, match="HTTP 500"):
        world.connector.create_incident(world.draft())
    assert world.server.count("Incident") == 0
    assert len(world.server.calls("savebusinessobject")) == 1  # not retried blindly


def test_a_note_whose_answer_is_lost_is_looked_for_and_not_sent_twice(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    ref = world.connector.create_incident(world.draft())
    world.server.lose_answers(1, "saverelatedbusinessobject")

    with caplog.at_level(logging.WARNING):
        world.connector.add_note(ref, "fired again (3 firings)")

    assert world.server.notes(ref.id) == ["fired again (3 firings)"]
    assert len(world.server.calls("saverelatedbusinessobject")) == 1
    assert "failed in transit but was saved" in caplog.text


def test_a_note_that_failed_without_landing_is_sent_once_more(world: World) -> None:
    ref = world.connector.create_incident(world.draft())
    world.server.fail_next(1, 502, path_contains="saverelatedbusinessobject", kind="html")

    world.connector.add_note(ref, "fired again")

    assert world.server.notes(ref.id) == ["fired again"]
    assert len(world.server.calls("saverelatedbusinessobject")) == 2


def test_a_note_that_could_not_be_confirmed_is_looked_for_before_the_next_attempt(world: World) -> None:
    ref = world.connector.create_incident(world.draft())
    world.server.lose_answers(1, "saverelatedbusinessobject")
    world.server.fail_next(4, 503, path_contains="getrelatedbusinessobject")

    with pytest.raises(ItsmUnavailableError):
        world.connector.add_note(ref, "fired again")
    assert world.server.notes(ref.id) == ["fired again"]

    world.connector.add_note(ref, "fired again")  # the delivery's retry: the note is there already

    assert world.server.notes(ref.id) == ["fired again"]
    assert len(world.server.calls("saverelatedbusinessobject")) == 1


def test_a_re_created_field_refreshes_the_cached_schema_once(world: World) -> None:
    first = world.connector.create_incident(world.draft())
    world.server.recreate_field("Incident", "ShortDescription")
    world.server.recreate_field("Incident", "LastModifiedDateTime")

    second = world.connector.create_incident(world.draft("azmon-0123456789abcdef-g2"))
    page = world.connector.fetch_changes(
        WorkItemType.INCIDENT, SyncCursor(updated_at=T0 - timedelta(days=1)), 10
    )

    assert world.incident(second)["ShortDescription"] == "[Sev1] High CPU on vm-web-01"
    assert {item.source_id for item in page.items} == {first.id, second.id}
    assert len(world.server.calls("getbusinessobjectsummary")) == 2  # read again once, not per call


def test_throttling_and_outages_are_retried_within_bounds_honouring_retry_after(world: World) -> None:
    world.server.fail_next(1, 429, retry_after=7, path_contains="getsearchresults")
    world.server.fail_next(1, 503, path_contains="getsearchresults", kind="html")
    page = world.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)
    assert page.is_last
    assert world.sleeps[0] == 7

    world.server.fail_next(10, 503, path_contains="getsearchresults")
    with pytest.raises(ItsmUnavailableError, match="after 4 attempts: HTTP 503"):
        world.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)


def test_a_sign_in_page_or_an_error_inside_a_200_is_a_clear_error(world: World) -> None:
    world.server.fail_next(1, 200, path_contains="getsearchresults", kind="html")
    with pytest.raises(ItsmUnavailableError, match="HTTP 200 with text/html, not JSON"):
        world.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)
    world.server.fail_next(1, 500, path_contains="getsearchresults", kind="has_error")
    with pytest.raises(ItsmUnavailableError, match=r"hasError\): GENERALFAILURE"):
        world.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)


def test_an_expired_access_token_is_replaced_through_the_refresh_grant_and_the_new_one_stored(
    world: World,
) -> None:
    world.connector.create_incident(world.draft())
    world.server.expire_access_tokens()
    world.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)

    assert world.server.token_grants() == ["password", "refresh_token"]
    assert len(world.store.saved) == 2
    assert world.store.token in world.server.issued_tokens()


def test_a_deleted_incident_is_a_404_the_alert_path_can_recognise(world: World) -> None:
    ghost = WorkItemRef(id="00" * 21, number="999999")
    with pytest.raises(ItsmRejectedError) as gone:
        world.connector.resolve(ghost, "resolved")
    assert gone.value.status == 404
    with pytest.raises(ItsmRejectedError) as missing:
        world.connector.get_state(ghost)
    assert missing.value.status == 404


def test_configuration_items_are_found_created_once_when_allowed_and_linked(world: World) -> None:
    world.server.insert_record("ConfigServer", FriendlyName="vm-db-01")
    assert world.connector.ensure_configuration_item("VM-DB-01", create=False) is not None
    assert world.connector.ensure_configuration_item("vm-new-07", create=False) is None

    ref = world.connector.create_incident(
        world.draft(configuration_item="vm-new-07", create_configuration_item=True)
    )
    world.connector.create_incident(
        world.draft(
            "azmon-0123456789abcdef-g2", configuration_item="vm-new-07", create_configuration_item=True
        )
    )

    servers = {rec["FriendlyName"]: rec["RecID"] for rec in world.server.records("ConfigServer")}
    assert sorted(servers) == ["vm-db-01", "vm-new-07"]
    incident = world.incident(ref)
    assert (incident["ConfigItemRecID"], incident["ConfigItemDisplayName"]) == (
        servers["vm-new-07"],
        "vm-new-07",
    )


def test_a_site_without_the_ci_object_creates_incidents_without_a_ci(world: World) -> None:
    connector = world.build(ci_object="ConfigDevice")
    ref = connector.create_incident(
        world.draft(configuration_item="vm-web-01", create_configuration_item=True)
    )
    assert world.incident(ref)["ConfigItemRecID"] == ""


def read_all(connector: CherwellConnector, item_type: WorkItemType, page_size: int) -> tuple[list[str], int]:
    cursor = SyncCursor(updated_at=T0 - timedelta(days=60))
    seen: list[str] = []
    for pages in range(1, 500):
        page = connector.fetch_changes(item_type, cursor, page_size)
        seen += [item.source_id for item in page.items]
        cursor = page.next_cursor
        if page.is_last:
            return seen, pages
    raise AssertionError("the feed did not end")


@pytest.mark.parametrize("zone", ["UTC", "America/New_York"])
def test_keyset_paging_reads_every_record_once_in_feed_order_through_bursts_in_one_second(zone: str) -> None:
    clock = Clock()
    with CherwellLoopback(clock=clock, time_zone=zone) as server:
        server.seed_work_items("Incident", 97, start=T0 - timedelta(days=30), end=T0 - timedelta(hours=1))
        server.seed_work_items("ChangeRequest", 23, start=T0 - timedelta(days=30), end=T0, rng_seed=2)
        world = World(server, clock, time_zone=zone)
        try:
            incidents, pages = read_all(world.connector, WorkItemType.INCIDENT, 7)
            changes, _ = read_all(world.connector, WorkItemType.CHANGE_REQUEST, 500)
        finally:
            world.http.close()
        order = sorted(
            server.records("Incident"),
            key=lambda r: (parse_local(r["LastModifiedDateTime"], zone), r["RecID"]),
        )
    assert incidents == [r["RecID"] for r in order]
    assert pages >= 97 // 7
    assert len(changes) == 23


def parse_local(text: str, zone: str) -> datetime:
    parsed = parse_datetime(text, "x", zone_of(zone))
    assert parsed is not None
    return parsed


def test_records_changed_while_paging_are_neither_skipped_nor_repeated(world: World) -> None:
    world.server.seed_work_items("Incident", 40, start=T0 - timedelta(days=5), end=T0 - timedelta(hours=1))
    first_ids = {r["RecID"] for r in world.server.records("Incident")}
    cursor = SyncCursor(updated_at=T0 - timedelta(days=6))
    seen: list[str] = []
    for n in range(100):
        page = world.connector.fetch_changes(WorkItemType.INCIDENT, cursor, 6)
        seen += [i.source_id for i in page.items]
        cursor = page.next_cursor
        if n == 1:
            world.clock.advance(seconds=1)
            world.server.touch("Incident", 5)  # some behind the cursor, some ahead: all move to "now"
        if page.is_last:
            break
    assert set(seen) == first_ids
    assert len(seen) - len(set(seen)) <= 5  # only the touched ones come again, in their new version


def test_an_answer_out_of_keyset_order_is_refused_rather_than_trusted(world: World) -> None:
    world.server.seed_work_items("Incident", 12, start=T0 - timedelta(days=2), end=T0 - timedelta(hours=1))
    world.server.mangle_search(lambda records: records.reverse())
    with pytest.raises(ItsmError, match=r"out of \(LastModifiedDateTime, RecID\) order"):
        world.connector.fetch_changes(
            WorkItemType.INCIDENT, SyncCursor(updated_at=T0 - timedelta(days=3)), 10
        )
