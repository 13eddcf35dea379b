"""The SCSM connector against the loopback Cireson portal: real HTTP, TLS, sign-in, criteria, commits."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItem, WorkItemState, WorkItemType
from shared_code.errors import ItsmAuthError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.scsm.auth import CiresonTokenAuth
from shared_code.itsm.scsm.connector import ScsmConnector
from shared_code.itsm.scsm.mapping import correlation_of
from shared_code.itsm.scsm.settings import ScsmConnection
from tests.loopback.scsm import (
    ACTIVE,
    CHANGE,
    INCIDENT,
    RESOLUTION_CATEGORIES,
    RESOLVED,
    SUPPORT_GROUPS,
    ScsmLoopback,
    parse_ts,
)
from tests.loopback.tls import loopback_tls

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def portal(clock: Clock) -> Iterator[ScsmLoopback]:
    with ScsmLoopback(clock=clock) as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(verify=loopback_tls().client_context(), timeout=5) as http:
        yield http


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make(
    portal: ScsmLoopback,
    client: httpx.Client,
    clock: Clock,
    sleeps: list[float],
    *,
    password: str = "",
    **settings: str,
) -> ScsmConnector:
    connection = ScsmConnection(name="scsm-it", server_url=portal.url, username=portal.username, **settings)
    auth = CiresonTokenAuth(
        portal.url,
        username=portal.username,
        password=SecretStr(password or portal.password),
        connection_name=connection.name,
    )
    return ScsmConnector(
        connection, client, auth, retry=RetryPolicy(max_attempts=4, sleep=sleeps.append), clock=clock
    )


@pytest.fixture
def scsm(portal: ScsmLoopback, client: httpx.Client, clock: Clock, sleeps: list[float]) -> ScsmConnector:
    return make(portal, client, clock, sleeps)


def draft(correlation: str = "azmon-0a1b2c3d-g1", **changes: object) -> IncidentDraft:
    values: dict[str, object] = {
        "short_description": "[Sev1] CPU above 90% on srv-001",
        "description": "Percentage CPU Average GreaterThan 90 (value: 93.4)",
        "impact": 1,
        "urgency": 2,
        "correlation_id": correlation,
        "configuration_item": "srv-001",
    }
    return IncidentDraft.model_validate(values | changes)


def commits(portal: ScsmLoopback) -> int:
    return portal.write_count()


# -- the alert path ----------------------------------------------------------------------------------


def test_an_incident_is_made_from_the_template_as_the_integration_user_and_found_by_its_correlation(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    group = next(iter(SUPPORT_GROUPS))
    ref = scsm.create_incident(draft(assignment_group=group))

    stored = portal.object(INCIDENT, ref.id)
    assert stored is not None
    assert ref.number == stored["Id"]
    assert stored["Id"].startswith("IR")
    assert ref.url == f"{portal.url}/Incident/Edit/{stored['Id']}"
    assert stored["Title"] == "[Sev1] CPU above 90% on srv-001"
    assert correlation_of(stored["Description"]) == "azmon-0a1b2c3d-g1"
    assert (stored["Impact"]["Name"], stored["Urgency"]["Name"], stored["Priority"]) == ("High", "Medium", 2)
    assert stored["TierQueue"] == {"Id": group, "Name": SUPPORT_GROUPS[group]}
    assert stored["Source"]["Name"] == "Portal"  # the template's value stays
    assert [ci["DisplayName"] for ci in stored["AboutConfigItem"]] == ["srv-001"]
    assert stored["CreatedWorkItem"]["BaseId"] == portal.user_id  # looked up by the account's name
    assert scsm.find_by_correlation("azmon-0a1b2c3d-g1") == ref
    assert scsm.find_by_correlation("azmon-0a1b2c3d-g12") is None
    assert scsm.get_state(ref) is WorkItemState.OPEN
    assert commits(portal) == 1


def test_notes_resolve_and_reopen_write_the_action_log_and_the_status(
    scsm: ScsmConnector, portal: ScsmLoopback, client: httpx.Client, clock: Clock, sleeps: list[float]
) -> None:
    category = next(iter(RESOLUTION_CATEGORIES))
    scsm = make(portal, client, clock, sleeps, resolution_category_id=category)
    ref = scsm.create_incident(draft())

    clock.advance(minutes=15)
    scsm.add_note(ref, "Azure Monitor: the alert fired again (3 firings).")
    clock.advance(minutes=5)
    scsm.resolve(ref, "Azure Monitor: the alert resolved.")

    stored = portal.object(INCIDENT, ref.id)
    assert stored is not None
    assert stored["Status"]["Id"] == RESOLVED
    assert stored["ResolutionDescription"] == "Azure Monitor: the alert resolved."
    assert stored["ResolutionCategory"]["Id"] == category
    assert parse_ts(stored["ResolvedDate"]) == clock.now
    assert stored["TroubleTicketResolvedByUser"]["BaseId"] == portal.user_id
    assert [e["Description"] for e in portal.notes(ref.id)] == [
        "Azure Monitor: the alert fired again (3 firings).",
        "Azure Monitor: the alert resolved.",
    ]
    assert all(e["ActionType"] == "AnalystComment" and not e["IsPrivate"] for e in portal.notes(ref.id))
    assert scsm.get_state(ref) is WorkItemState.RESOLVED
    assert scsm.find_by_correlation("azmon-0a1b2c3d-g1") is None  # only open incidents are recovered

    scsm.reopen(ref, "Azure Monitor: the alert fired again after the resolution.")
    stored = portal.object(INCIDENT, ref.id)
    assert stored is not None
    assert (stored["Status"]["Id"], stored["ResolvedDate"], stored["ResolutionDescription"]) == (
        ACTIVE,
        None,
        None,
    )
    assert len(portal.notes(ref.id)) == 3
    assert scsm.get_state(ref) is WorkItemState.OPEN


def test_a_closed_incident_is_read_only_and_a_deleted_one_is_gone(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    ref = scsm.create_incident(draft())
    portal.update(INCIDENT, ref.id, Status="Closed")
    before = commits(portal)

    with pytest.raises(ItsmRejectedError, match="is closed") as closed:
        scsm.add_note(ref, "fired again")
    assert closed.value.status == 403  # the alert path then carries on without it
    assert scsm.get_state(ref) is WorkItemState.CLOSED
    assert commits(portal) == before

    gone = ref.model_copy(update={"id": "00000000-0000-4000-8000-000000000000"})
    with pytest.raises(ItsmRejectedError, match="does not exist any more") as missing:
        scsm.resolve(gone, "resolved")
    assert missing.value.status == 404


def test_a_note_whose_answer_is_lost_is_found_in_the_action_log_and_not_written_twice(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    ref = scsm.create_incident(draft())
    portal.fail_next(1, path_contains="Projection/Commit", body="drop_after")

    scsm.add_note(ref, "fired again")

    assert [e["Description"] for e in portal.notes(ref.id)] == ["fired again"]
    assert commits(portal) == 2  # the create and the one note; no blind second commit

    # the same note again (a delivery retried after the process died): it is already there
    scsm.add_note(ref, "fired again")
    assert commits(portal) == 2


def test_a_note_that_was_not_processed_is_written_after_looking(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    ref = scsm.create_incident(draft())
    portal.fail_next(1, path_contains="Projection/Commit", body="drop")

    scsm.add_note(ref, "fired again")

    assert [e["Description"] for e in portal.notes(ref.id)] == ["fired again"]
    assert commits(portal) == 3  # create, the dropped one, the one after reading the incident again


def test_a_create_whose_answer_is_lost_is_recovered_by_its_correlation_id(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    portal.fail_next(1, path_contains="Projection/Commit", body="drop_after")

    ref = scsm.create_incident(draft())

    [only] = portal.objects(INCIDENT)
    assert ref.id == only["BaseId"]
    assert commits(portal) == 1


def test_a_create_that_cannot_be_recovered_fails_as_unavailable(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    portal.fail_next(1, path_contains="Projection/Commit", body="drop")

    with pytest.raises(ItsmUnavailableError, match="failed after 1 attempt"):
        scsm.create_incident(draft())
    assert portal.objects(INCIDENT) == []


def test_a_change_by_someone_else_between_read_and_commit_is_read_again_and_both_changes_stay(
    scsm: ScsmConnector, portal: ScsmLoopback, clock: Clock
) -> None:
    ref = scsm.create_incident(draft())

    def analyst_edits() -> None:
        clock.advance(seconds=1)
        portal.update(INCIDENT, ref.id, Title="Edited by the analyst")

    portal.before_next_commit(analyst_edits)
    scsm.resolve(ref, "resolved by monitoring")

    stored = portal.object(INCIDENT, ref.id)
    assert stored is not None
    assert (stored["Title"], stored["Status"]["Id"]) == ("Edited by the analyst", RESOLVED)
    assert [e["Description"] for e in portal.notes(ref.id)] == ["resolved by monitoring"]
    assert commits(portal) == 3  # the create, the refused resolve, the resolve after reading again


def test_a_refusal_that_is_not_a_lost_race_is_reported_with_the_portals_text(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    with pytest.raises(
        ItsmRejectedError, match=r"refused to save the new incident: The enumeration value '[0-9a-f-]+'"
    ):
        scsm.create_incident(draft(assignment_group="00000000-0000-4000-8000-00000000beef"))
    assert portal.objects(INCIDENT) == []


# -- sign-in, throttling, bad answers ------------------------------------------------------------------


def test_an_expired_token_signs_in_again_and_a_wrong_password_asks_to_reauthorise(
    portal: ScsmLoopback, client: httpx.Client, clock: Clock, sleeps: list[float]
) -> None:
    scsm = make(portal, client, clock, sleeps)
    ref = scsm.create_incident(draft())
    portal.expire_tokens()

    assert scsm.get_state(ref) is WorkItemState.OPEN
    assert len(portal.issued_tokens()) == 2

    wrong = make(portal, client, clock, sleeps, password="not-the-password")
    with pytest.raises(ItsmAuthError, match="re-authorise") as caught:
        wrong.get_state(ref)
    assert "not-the-password" not in str(caught.value)
    assert all(token not in str(caught.value) for token in portal.issued_tokens())


def test_throttling_honours_retry_after_and_an_outage_ends_after_bounded_attempts(
    scsm: ScsmConnector, portal: ScsmLoopback, sleeps: list[float]
) -> None:
    ref = scsm.create_incident(draft())
    portal.fail_next(2, 429, retry_after=7)
    assert scsm.get_state(ref) is WorkItemState.OPEN
    assert sleeps == [7.0, 7.0]

    portal.fail_next(4, 503, body="html")
    with pytest.raises(ItsmUnavailableError, match="after 4 attempts: HTTP 503"):
        scsm.get_state(ref)

    portal.fail_next(1, body="html200")
    with pytest.raises(ItsmUnavailableError, match="text/html, not JSON"):
        scsm.get_state(ref)


def test_criteria_the_portal_cannot_evaluate_fail_with_its_exception_text(
    portal: ScsmLoopback, client: httpx.Client, clock: Clock, sleeps: list[float]
) -> None:
    # a change projection id where the incident projection belongs: no Status/Description to search
    scsm = make(portal, client, clock, sleeps, incident_projection_id="8ab27adb-13b1-2b7b-56e6-91598417cbee")
    with pytest.raises(ItsmUnavailableError, match="after 4 attempts: HTTP 500"):
        scsm.find_by_correlation("azmon-0a1b2c3d-g1")


# -- configuration items ---------------------------------------------------------------------------


def test_configuration_items_are_found_by_display_name_and_never_created(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    deleted = portal.add_ci("srv-retired", deleted=True)

    found = scsm.ensure_configuration_item("SRV-002", create=True)

    assert found is not None
    assert portal.object("ci", found) is not None
    assert scsm.ensure_configuration_item("srv-002", create=False) == found  # cached
    assert scsm.ensure_configuration_item("srv-retired", create=True) is None
    assert deleted
    assert scsm.ensure_configuration_item("srv-999", create=True) is None
    assert scsm.ensure_configuration_item("srv-001\nsrv-002", create=False) is None
    assert scsm.ensure_configuration_item("  ", create=False) is None
    assert portal.count("ci") == 6  # the five seeded and the retired one: nothing created

    ref = scsm.create_incident(draft(configuration_item="srv-999"))
    stored = portal.object(INCIDENT, ref.id)
    assert stored is not None
    assert stored["AboutConfigItem"] == []


# -- the change feed ---------------------------------------------------------------------------------


def page_through(
    scsm: ScsmConnector, item_type: WorkItemType, start: datetime, page_size: int
) -> list[list[WorkItem]]:
    pages: list[list[WorkItem]] = []
    cursor = SyncCursor(updated_at=start)
    for _ in range(500):
        page = scsm.fetch_changes(item_type, cursor, page_size)
        assert not page.rejected, page.rejected
        assert len(page.items) <= page_size
        assert (page.next_cursor.updated_at, page.next_cursor.last_id) >= (cursor.updated_at, cursor.last_id)
        pages.append(page.items)
        cursor = page.next_cursor
        if page.is_last:
            return pages
    raise AssertionError("the feed did not end")


def test_the_feed_pages_every_row_once_in_order_bursts_included(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    ids = portal.seed_work_items(INCIDENT, 700, start=T0 - timedelta(days=100), end=T0 - timedelta(days=1))
    changes = portal.seed_work_items(CHANGE, 60, start=T0 - timedelta(days=50), end=T0, rng_seed=2)

    pages = page_through(scsm, WorkItemType.INCIDENT, T0 - timedelta(days=120), 50)

    seen = [item for page in pages for item in page]
    assert sorted(item.source_id for item in seen) == sorted(ids)
    keys = [(item.updated_at, item.source_id) for item in seen]
    assert keys == sorted(keys)
    assert len(pages) < 40  # empty stretches cost no pages: about 700 / 50 of them
    assert all(item.lifecycle is not None for item in seen)
    bursts = len(keys) - len({updated for updated, _ in keys})
    assert bursts > 20  # the seed put many rows on one millisecond, and none was lost or doubled
    feed = [
        i for p in page_through(scsm, WorkItemType.CHANGE_REQUEST, T0 - timedelta(days=120), 25) for i in p
    ]
    assert sorted(item.source_id for item in feed) == sorted(changes)
    assert {item.change_type for item in feed} <= {"Emergency", "Standard", "Major", "Minor"}


def test_rows_changed_while_paging_are_neither_skipped_nor_doubled(
    scsm: ScsmConnector, portal: ScsmLoopback, clock: Clock
) -> None:
    ids = portal.seed_work_items(INCIDENT, 300, start=T0 - timedelta(days=30), end=T0 - timedelta(hours=1))
    order = sorted(portal.objects(INCIDENT), key=lambda o: (o["LastModified"], o["BaseId"]))
    latest: dict[str, datetime] = {}
    counts: dict[str, int] = {}
    cursor = SyncCursor(updated_at=T0 - timedelta(days=31))
    changed: set[str] = set()
    for n in range(200):
        page = scsm.fetch_changes(WorkItemType.INCIDENT, cursor, 40)
        for item in page.items:
            latest[item.source_id] = item.updated_at
            counts[item.source_id] = counts.get(item.source_id, 0) + 1
        if n == 2:  # one already read and one not yet read change now: both must come (again)
            clock.advance(seconds=1)
            for row in (order[10], order[-10]):
                portal.update(INCIDENT, row["BaseId"], Title="changed while paging")
                changed.add(row["BaseId"])
        cursor = page.next_cursor
        if page.is_last:
            break
    source = {o["BaseId"]: parse_ts(o["LastModified"]) for o in portal.objects(INCIDENT)}
    assert set(latest) == set(ids)
    assert latest == source  # every row in its latest version
    assert {i for i, c in counts.items() if c > 1} == {order[10]["BaseId"]}  # read again: it changed after
    assert changed


def test_bad_rows_are_rejected_with_their_id_and_do_not_stop_the_feed(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    ids = portal.seed_work_items(INCIDENT, 30, start=T0 - timedelta(days=3), end=T0 - timedelta(days=1))
    no_number, bad_date, odd_status = ids[3], ids[7], ids[11]
    portal.mangle(no_number, drop=["Id"])
    portal.mangle(bad_date, set_fields={"LastModified": "05/06/2024 07:00"})
    portal.mangle(
        odd_status, set_fields={"Status": {"Id": "9accddda-fbf5-10d4-b402-69bdd276a69b", "Name": "Custom"}}
    )

    items, rejected = [], []
    cursor = SyncCursor(updated_at=T0 - timedelta(days=4))
    for _ in range(50):
        page = scsm.fetch_changes(WorkItemType.INCIDENT, cursor, 10)
        items += page.items
        rejected += page.rejected
        cursor = page.next_cursor
        if page.is_last:
            break

    assert {r.source_id: r.error for r in rejected} == {
        no_number: "Id: missing",
        bad_date: "LastModified: not an ISO 8601 date-time: '05/06/2024 07:00'",
    }
    assert sorted(i.source_id for i in items) == sorted(set(ids) - {no_number, bad_date})
    [custom] = [i for i in items if i.source_id == odd_status]
    assert (custom.state, custom.lifecycle) == ("Custom", None)
    assert all(i.lifecycle in set(Lifecycle) for i in items if i.source_id != odd_status)


def test_check_signs_in_reads_the_template_and_queries_incidents(
    scsm: ScsmConnector, portal: ScsmLoopback
) -> None:
    text = scsm.check()

    assert f"SCSM user {portal.user_id}" in text
    assert "incidents queryable" in text
    with pytest.raises(ItsmUnavailableError, match="HTTP 500"):
        make(
            portal,
            httpx.Client(verify=loopback_tls().client_context(), timeout=5),
            Clock(),
            [],
            incident_template_id="11111111-2222-4333-8444-555555555555",
        ).check()
