"""The alert processor's decisions, with an in-memory correlation table and a fake ITSM product."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from shared_code.alerts.processor import AlertProcessor, Outcome
from shared_code.domain.alert import AlertSignal, MonitorCondition, Severity
from shared_code.domain.connection import ConnectionBase, CorrelationMode
from shared_code.domain.correlation import CorrelationState
from shared_code.domain.workitem import WorkItemRef, WorkItemState
from shared_code.errors import BusyError, ItsmUnavailableError
from shared_code.products import parse_connection
from tests.fakes.itsm import FakeItsm
from tests.fakes.state import InMemoryCorrelations

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def connection(**overrides: object) -> ConnectionBase:
    data: dict[str, object] = {
        "name": "sn",
        "partner_type": "servicenow",
        "server_url": "https://dev1.service-now.com",
        "username": "svc",
        "client_id": "cid",
        "note_interval_minutes": 15,
    }
    return parse_connection(data | overrides)


def signal(
    alert: str = "a1",
    *,
    rule: str = "cpu-high",
    ci: str = "vm-web-01",
    condition: MonitorCondition = MonitorCondition.FIRED,
    fired_at: datetime = T0,
    severity: Severity = Severity.SEV1,
) -> AlertSignal:
    return AlertSignal(
        alert_id=f"/subscriptions/s/providers/Microsoft.AlertsManagement/alerts/{alert}",
        rule=rule,
        severity=severity,
        monitoring_service="Platform",
        signal_type="Metric",
        condition=condition,
        fired_at=fired_at,
        resolved_at=fired_at + timedelta(minutes=5) if condition is MonitorCondition.RESOLVED else None,
        configuration_items=(ci,),
        context_summary="Percentage CPU Average > 80 (value: 97.5) over PT5M",
    )


@pytest.fixture
def world():
    clock = Clock()
    repo = InMemoryCorrelations()
    itsm = FakeItsm()
    processor = AlertProcessor(repo, clock, lease_seconds=60, busy_budget_seconds=0.3)
    return clock, repo, itsm, processor


def test_first_firing_creates_one_incident_with_mapped_fields(world):
    _clock, repo, itsm, processor = world
    result = processor.process(connection(), itsm.ports(), "d1", signal(severity=Severity.SEV0))
    assert result.outcome is Outcome.CREATED
    assert itsm.calls == ["create"]
    (incident,) = itsm.incidents.values()
    assert (incident.draft.impact, incident.draft.urgency) == (1, 1)
    assert incident.draft.short_description == "[Sev0] cpu-high on vm-web-01"
    assert "Percentage CPU Average > 80" in incident.draft.description
    (row,) = repo.rows.values()
    assert row.state is CorrelationState.OPEN
    assert row.work_item_number == incident.ref.number
    assert row.lease_owner == ""
    assert row.fire_count == 1


def test_refire_is_coalesced_within_the_interval_then_noted_with_the_count(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    for i in range(2, 6):
        clock.advance(minutes=1)
        result = processor.process(conn, itsm.ports(), f"d{i}", signal(f"a{i}", fired_at=clock.now))
        assert result.outcome is Outcome.COALESCED
    assert itsm.calls == ["create"]
    clock.advance(minutes=15)
    result = processor.process(conn, itsm.ports(), "d6", signal("a6", fired_at=clock.now))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert incident.notes
    assert "fired again (5 firings since the last update" in incident.notes[0]
    (row,) = repo.rows.values()
    assert row.unnoted_fires == 0
    assert row.fire_count == 6


def test_the_same_notification_twice_is_one_effect(world):
    _clock, _repo, itsm, processor = world
    conn = connection(note_interval_minutes=0)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    first = processor.process(conn, itsm.ports(), "d2", signal("a2"))
    again = processor.process(conn, itsm.ports(), "d2", signal("a2"))
    assert (first.outcome, again.outcome) == (Outcome.NOTED, Outcome.DUPLICATE)
    assert itsm.calls == ["create", "note"]


def test_concurrent_firings_of_one_problem_make_one_incident(world):
    _clock, repo, _, processor = world
    itsm = FakeItsm(call_seconds=0.02)
    conn = connection()
    barrier = threading.Barrier(20)
    outcomes: list[Outcome] = []

    def fire(i: int) -> None:
        barrier.wait()
        outcomes.append(processor.process(conn, itsm.ports(), f"d{i}", signal(f"a{i}")).outcome)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert itsm.calls.count("create") == 1
    assert sorted(outcomes).count(Outcome.CREATED) == 1
    assert len(outcomes) == 20
    (row,) = repo.rows.values()
    assert row.fire_count == 20
    assert row.unnoted_fires == 19


def test_resolve_is_one_write_and_a_second_resolve_is_a_duplicate(world):
    clock, _repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    clock.advance(minutes=1)
    processor.process(
        conn, itsm.ports(), "d2", signal("a1", fired_at=clock.now)
    )  # the same alert, fired again
    clock.advance(minutes=5)
    result = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert result.outcome is Outcome.RESOLVED
    assert itsm.calls == ["create", "resolve"]
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    assert "1 firing(s) since the last note" in incident.notes[-1]
    again = processor.process(conn, itsm.ports(), "r2", signal("a2", condition=MonitorCondition.RESOLVED))
    assert again.outcome is Outcome.DUPLICATE
    assert itsm.calls == ["create", "resolve"]


def test_without_auto_resolve_a_resolution_is_only_a_note(world):
    _clock, _repo, itsm, processor = world
    conn = connection(auto_resolve=False)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    result = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert result.outcome is Outcome.NOTED
    assert itsm.calls == ["create", "note"]
    assert next(iter(itsm.incidents.values())).state is WorkItemState.OPEN


def test_firing_again_reopens_inside_the_window_and_opens_anew_after_it(world):
    clock, repo, itsm, processor = world
    conn = connection(reopen_window_hours=2)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    clock.advance(hours=1)
    reopened = processor.process(conn, itsm.ports(), "d2", signal("a2", fired_at=clock.now))
    assert reopened.outcome is Outcome.REOPENED
    assert len(itsm.incidents) == 1
    processor.process(
        conn, itsm.ports(), "r2", signal("a2", condition=MonitorCondition.RESOLVED, fired_at=clock.now)
    )
    clock.advance(hours=3)
    fresh = processor.process(conn, itsm.ports(), "d3", signal("a3", fired_at=clock.now))
    assert fresh.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 2
    (row,) = repo.rows.values()
    assert row.generation == 2
    assert row.work_item_number == fresh.work_item.number


def test_an_incident_that_cannot_be_reopened_is_replaced(world):
    clock, _repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    itsm.reopen_rejected = True
    clock.advance(minutes=30)
    result = processor.process(conn, itsm.ports(), "d2", signal("a2", fired_at=clock.now))
    assert result.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 2


def test_a_late_fired_notification_after_its_resolution_is_ignored(world):
    _clock, _repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    late = processor.process(conn, itsm.ports(), "d1-late", signal("a1"))
    assert late.outcome is Outcome.IGNORED
    assert itsm.calls == ["create", "resolve"]


def test_a_resolution_that_overtook_its_firing_keeps_the_late_firing_from_opening_an_incident(world):
    _clock, _repo, itsm, processor = world
    conn = connection()
    result = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert result.outcome is Outcome.IGNORED
    assert result.work_item is None
    late = processor.process(conn, itsm.ports(), "f1", signal("a1"))  # its firing, delivered after a retry
    assert late.outcome is Outcome.IGNORED
    assert itsm.calls == []
    again = processor.process(conn, itsm.ports(), "f2", signal("a2", fired_at=T0 + timedelta(minutes=30)))
    assert again.outcome is Outcome.CREATED
    assert itsm.calls == ["create"]
    (incident,) = itsm.incidents.values()
    assert incident.draft.correlation_id.endswith("-g1")


def test_a_lost_create_response_is_recovered_not_repeated(world):
    _clock, _repo, itsm, processor = world
    conn = connection()
    original = itsm.create_incident

    def create_then_lose_response(draft):
        original(draft)
        raise ItsmUnavailableError("connection reset after the POST")

    itsm.create_incident = create_then_lose_response
    with pytest.raises(ItsmUnavailableError):
        processor.process(conn, itsm.ports(), "d1", signal("a1"))
    itsm.create_incident = original
    result = processor.process(conn, itsm.ports(), "d1", signal("a1"))
    assert result.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 1
    assert itsm.calls == ["create", "find"]


def test_per_rule_mode_notes_a_new_configuration_item_at_once(world):
    _clock, _repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_RULE)
    processor.process(conn, itsm.ports(), "d1", signal("a1", ci="vm-1"))
    result = processor.process(conn, itsm.ports(), "d2", signal("a2", ci="vm-2"))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert "Also affecting: vm-2" in incident.notes[0]
    assert processor.process(conn, itsm.ports(), "d3", signal("a3", ci="vm-2")).outcome is Outcome.COALESCED


def test_per_alert_mode_opens_one_incident_per_alert(world):
    _clock, _repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_ALERT)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "d2", signal("a2"))
    assert len(itsm.incidents) == 2


def test_a_resolution_waits_for_a_create_in_flight_then_asks_for_a_retry(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    (key,) = repo.rows
    row = repo.rows[key]
    repo.rows[key] = row.model_copy(
        update={"lease_owner": "other:1", "lease_until": clock.now + timedelta(seconds=60)}
    )
    with pytest.raises(BusyError):
        processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert itsm.calls == ["create"]


def test_a_failed_note_leaves_the_firings_for_the_next_note(world):
    _clock, repo, itsm, processor = world
    conn = connection(note_interval_minutes=0)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    itsm.fail_next.append(ItsmUnavailableError("503"))
    with pytest.raises(ItsmUnavailableError):
        processor.process(conn, itsm.ports(), "d2", signal("a2"))
    result = processor.process(conn, itsm.ports(), "d2", signal("a2"))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert len(incident.notes) == 1
    assert repo.rows[next(iter(repo.rows))].lease_owner == ""


def test_work_item_ref_roundtrip_in_result(world):
    _clock, _repo, itsm, processor = world
    result = processor.process(connection(), itsm.ports(), "d1", signal())
    assert isinstance(result.work_item, WorkItemRef)
    assert result.work_item.number.startswith("INC")


def test_a_new_configuration_item_under_another_instances_lease_is_counted_then_noted(world):
    clock, repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_RULE)
    processor.process(conn, itsm.ports(), "d1", signal("a1", ci="vm-1"))
    (key,) = repo.rows
    held = repo.rows[key].model_copy(
        update={"lease_owner": "other:1", "lease_until": clock.now + timedelta(seconds=60)}
    )
    repo.rows[key] = held
    result = processor.process(conn, itsm.ports(), "d2", signal("a2", ci="vm-2"))
    assert result.outcome is Outcome.COALESCED  # never waits for the lease, never ends busy
    assert repo.rows[key].pending_cis == ("vm-2",)
    assert itsm.calls == ["create"]
    repo.rows[key] = repo.rows[key].model_copy(update={"lease_owner": "", "lease_until": None})
    result = processor.process(conn, itsm.ports(), "d3", signal("a3", ci="vm-1"))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert "Also affecting: vm-2" in incident.notes[0]
    row = repo.rows[key]
    assert (row.configuration_items, row.pending_cis) == (("vm-1", "vm-2"), ())
    assert processor.process(conn, itsm.ports(), "d4", signal("a4", ci="vm-2")).outcome is Outcome.COALESCED


def test_a_problem_another_process_opened_is_recognised_despite_the_insert_first(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    elsewhere = AlertProcessor(repo, clock, lease_seconds=60, busy_budget_seconds=0.3)
    result = elsewhere.process(conn, itsm.ports(), "d2", signal("a2"))
    assert result.outcome is Outcome.COALESCED
    assert itsm.calls == ["create"]
    (row,) = repo.rows.values()
    assert row.fire_count == 2


# -- a lease that runs out while the product is slow (M1) --------------------------------------------


def other_instance(repo: InMemoryCorrelations, clock: Clock) -> AlertProcessor:
    """Another host instance: its own process memory, the same table."""
    return AlertProcessor(repo, clock, lease_seconds=60, busy_budget_seconds=0.3)


def test_a_lease_taken_over_during_a_slow_ci_lookup_gives_no_second_incident(world):
    clock, repo, itsm, processor = world
    conn = connection()
    elsewhere = other_instance(repo, clock)
    taken_over: list[Outcome] = []

    def slow_lookup(_itsm: FakeItsm) -> None:
        # the CMDB lookup (several retried GETs) outlasts the lease; another instance delivers a
        # firing of the same problem meanwhile, takes the expired "creating" lease and creates
        clock.advance(seconds=61)
        taken_over.append(
            elsewhere.process(conn, itsm.ports(), "d2", signal("a2", fired_at=clock.now)).outcome
        )

    itsm.on_ci_lookup = slow_lookup
    first = processor.process(conn, itsm.ports(), "d1", signal("a1"))

    assert taken_over == [Outcome.CREATED]
    assert itsm.calls.count("create") == 1  # the first instance lost its lease and wrote nothing
    assert first.outcome is Outcome.COALESCED
    (incident,) = itsm.incidents.values()
    (row,) = repo.rows.values()
    assert (row.work_item_id, row.fire_count, row.lease_owner) == (incident.ref.id, 2, "")
    for alert_id in ("a1", "a2"):
        processor.process(
            conn, itsm.ports(), f"r-{alert_id}", signal(alert_id, condition=MonitorCondition.RESOLVED)
        )
    assert incident.state is WorkItemState.RESOLVED


def test_a_slow_lookup_renews_the_lease_before_the_create_and_the_fast_path_does_not(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1", ci="vm-fast"))
    assert repo.writes == 2  # the conditional insert and the release: no renewal when fast

    ahead: list[timedelta] = []
    itsm.on_ci_lookup = lambda _: clock.advance(seconds=30)  # half the lease

    def at_create(_itsm: FakeItsm) -> None:
        row = next(r for r in repo.rows.values() if r.state is CorrelationState.CREATING)
        assert row.lease_until is not None
        ahead.append(row.lease_until - clock.now)

    itsm.on_create = at_create
    result = processor.process(conn, itsm.ports(), "d2", signal("a2", ci="vm-slow"))

    assert result.outcome is Outcome.CREATED
    assert ahead == [timedelta(seconds=60)]  # renewed to a whole lease right before the POST
    assert repo.writes == 2 + 3  # insert, renewal, release
    assert len(itsm.incidents) == 2


def test_an_incident_created_after_the_lease_was_taken_over_is_resolved_as_a_duplicate(world, caplog):
    clock, repo, itsm, processor = world
    conn = connection()
    elsewhere = other_instance(repo, clock)

    def slow_post(_itsm: FakeItsm) -> None:
        # the POST waits out 429 Retry-After answers past the lease; another instance takes over,
        # finds nothing by correlation id (the first POST is still in flight) and creates too
        clock.advance(seconds=61)
        assert (
            elsewhere.process(conn, itsm.ports(), "d2", signal("a2", fired_at=clock.now)).outcome
            is Outcome.CREATED
        )

    itsm.on_create = slow_post
    first = processor.process(conn, itsm.ports(), "d1", signal("a1"))

    kept, duplicate = itsm.incidents.values()  # the other instance's create answered first
    (row,) = repo.rows.values()
    assert row.work_item_id == kept.ref.id  # the row was not overwritten
    assert first.outcome is Outcome.DUPLICATE
    assert first.work_item == kept.ref
    assert duplicate.state is WorkItemState.RESOLVED
    assert duplicate.notes == [
        f"Duplicate of {kept.ref.number}: two instances created it while ServiceNow was slow. "
        f"The alert's updates go to {kept.ref.number}."
    ]
    assert any(r.levelname == "ERROR" and "two instances created" in r.getMessage() for r in caplog.records)
    assert row.fire_count == 2
    assert set(row.firing_alerts) == {alert_id("a1"), alert_id("a2")}
    for name in ("a1", "a2"):
        processor.process(conn, itsm.ports(), f"r-{name}", signal(name, condition=MonitorCondition.RESOLVED))
    assert [i.state for i in itsm.incidents.values()] == [WorkItemState.RESOLVED] * 2


def test_a_create_whose_alerts_resolved_while_it_was_in_flight_is_resolved_at_once(world):
    clock, repo, itsm, processor = world
    conn = connection()
    elsewhere = other_instance(repo, clock)

    def slow_post(_itsm: FakeItsm) -> None:
        clock.advance(seconds=61)
        resolved = elsewhere.process(
            conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED)
        )
        assert resolved.outcome is Outcome.IGNORED  # nothing found by correlation id yet

    itsm.on_create = slow_post
    result = processor.process(conn, itsm.ports(), "d1", signal("a1"))

    assert result.outcome is Outcome.CREATED
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    assert "resolved while this incident was being created" in incident.notes[-1]
    (row,) = repo.rows.values()
    assert (row.state, row.work_item_id) == (CorrelationState.RESOLVED, incident.ref.id)


def test_alert_lease_seconds_must_exceed_two_http_timeouts():
    from shared_code.errors import ConfigurationError
    from shared_code.settings import Settings

    base = {
        "AzureWebJobsStorage": "UseDevelopmentStorage=true",
        "KEY_VAULT_URL": "https://kv.vault.azure.net",
    }
    assert Settings.from_environ(base).alert_lease_seconds == 60  # 60 > 2 x 20: the defaults fit
    assert Settings.from_environ(base | {"ALERT_LEASE_SECONDS": "21", "HTTP_TIMEOUT_SECONDS": "10"})
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_environ(base | {"ALERT_LEASE_SECONDS": "40", "ALERT_MAX_ATTEMPTS": "0"})
    text = str(raised.value)
    assert "- ALERT_MAX_ATTEMPTS:" in text  # every problem named in the one message
    assert "- ALERT_LEASE_SECONDS: must be more than twice HTTP_TIMEOUT_SECONDS (40 <= 2 * 20)" in text
    with pytest.raises(ConfigurationError, match="ALERT_LEASE_SECONDS"):
        Settings.from_environ(base | {"HTTP_TIMEOUT_SECONDS": "30"})


# -- a resolution after a failed create (M3) -----------------------------------------------------------


def test_a_resolution_after_a_create_that_failed_in_transit_resolves_the_incident_it_finds(world):
    _clock, repo, itsm, processor = world
    conn = connection()
    original = itsm.create_incident

    def create_then_lose_response(draft):
        original(draft)
        raise ItsmUnavailableError("connection reset after the POST")

    itsm.create_incident = create_then_lose_response
    with pytest.raises(ItsmUnavailableError):
        processor.process(conn, itsm.ports(), "d1", signal("a1"))
    itsm.create_incident = original

    result = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))

    assert result.outcome is Outcome.RESOLVED
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    assert result.work_item == incident.ref
    (row,) = repo.rows.values()
    assert (row.state, row.work_item_id, row.lease_owner) == (CorrelationState.RESOLVED, incident.ref.id, "")
    late = processor.process(conn, itsm.ports(), "d1", signal("a1"))  # the firing's delivery, retried
    assert late.outcome is Outcome.IGNORED
    assert itsm.calls == ["create", "find", "resolve"]


def test_a_resolution_after_a_create_that_never_happened_is_recorded_and_the_late_firing_ignored(world):
    _clock, repo, itsm, processor = world
    conn = connection(auto_resolve=False)
    itsm.fail_next.append(ItsmUnavailableError("503"))
    with pytest.raises(ItsmUnavailableError):
        processor.process(conn, itsm.ports(), "d1", signal("a1"))

    result = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))

    assert result.outcome is Outcome.IGNORED
    assert result.work_item is None
    (row,) = repo.rows.values()
    assert row.state is CorrelationState.RESOLVED
    assert row.resolved_alert_fired_at == T0
    assert (row.work_item_id, row.lease_owner) == ("", "")
    assert processor.process(conn, itsm.ports(), "d1", signal("a1")).outcome is Outcome.IGNORED
    assert itsm.incidents == {}
    assert itsm.calls == ["create", "find"]


# -- problems of several alert ids (M4) ----------------------------------------------------------------


def alert_id(name: str) -> str:
    return signal(name).alert_id


def test_one_alert_resolving_keeps_the_incident_open_while_another_of_the_problem_fires(world):
    _clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "d2", signal("a2"))  # another dimension of the metric, same CI

    first = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))

    assert first.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.OPEN
    assert incident.notes[-1].startswith(
        "Azure Monitor: alert a1 resolved at 2026-11-01 12:05:00 UTC; still firing: a2."
    )
    (row,) = repo.rows.values()
    assert (row.state, row.firing_alerts, row.resolved_alerts) == (
        CorrelationState.OPEN,
        (alert_id("a2"),),
        (alert_id("a1"),),
    )

    late = processor.process(conn, itsm.ports(), "d1-again", signal("a1"))  # a1's firing, delivered late
    assert late.outcome is Outcome.IGNORED
    last = processor.process(conn, itsm.ports(), "r2", signal("a2", condition=MonitorCondition.RESOLVED))

    assert last.outcome is Outcome.RESOLVED
    assert itsm.get_state(incident.ref) is WorkItemState.RESOLVED
    assert itsm.calls == ["create", "note", "resolve"]
    assert repo.rows[next(iter(repo.rows))].firing_alerts == ()


def test_a_late_firing_of_another_alert_that_fired_before_the_resolution_is_not_ignored(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    clock.advance(minutes=10)

    # a2 fired before a1 resolved, but its delivery was retried: it is active and needs an incident
    late = processor.process(conn, itsm.ports(), "d2", signal("a2", fired_at=T0 - timedelta(seconds=30)))

    assert late.outcome is Outcome.REOPENED
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.OPEN
    (row,) = repo.rows.values()
    assert row.firing_alerts == (alert_id("a2"),)
    processor.process(conn, itsm.ports(), "r2", signal("a2", condition=MonitorCondition.RESOLVED))
    assert itsm.get_state(incident.ref) is WorkItemState.RESOLVED


def test_coalesced_firings_record_their_alert_ids_for_backward_sync(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    (key,) = repo.rows
    repo.rows[key] = repo.rows[key].model_copy(
        update={"lease_owner": "other:1", "lease_until": clock.now + timedelta(seconds=60)}
    )
    assert processor.process(conn, itsm.ports(), "d2", signal("a2")).outcome is Outcome.COALESCED
    repo.rows[key] = repo.rows[key].model_copy(update={"lease_owner": "", "lease_until": None})
    assert processor.process(conn, itsm.ports(), "d3", signal("a3")).outcome is Outcome.COALESCED

    row = repo.rows[key]
    expected = tuple(alert_id(name) for name in ("a1", "a2", "a3"))
    assert row.alert_ids == expected
    assert row.firing_alerts == expected


def test_per_alert_mode_resolves_on_the_alerts_own_resolution(world):
    _clock, repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_ALERT)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    (row,) = repo.rows.values()
    assert (row.firing_alerts, row.resolved_alerts) == ((), (alert_id("a1"),))


# -- a work item that cannot be written any more (S3) --------------------------------------------------


@pytest.mark.parametrize("status", [404, 403], ids=["deleted", "read-only"])
def test_a_firing_on_an_incident_that_is_gone_opens_a_new_one(world, caplog, status):
    _clock, repo, itsm, processor = world
    conn = connection(note_interval_minutes=0)
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    (old,) = itsm.incidents.values()
    itsm.gone[old.ref.id] = status

    result = processor.process(conn, itsm.ports(), "d2", signal("a2"))

    assert result.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 2
    assert result.work_item is not None
    assert result.work_item != old.ref
    (row,) = repo.rows.values()
    assert (row.state, row.generation, row.work_item_id) == (CorrelationState.OPEN, 2, result.work_item.id)
    assert any(r.levelname == "WARNING" and old.ref.number in r.getMessage() for r in caplog.records)
    processor.process(conn, itsm.ports(), "r2", signal("a2", condition=MonitorCondition.RESOLVED))
    assert itsm.incidents[result.work_item.id].state is WorkItemState.RESOLVED


@pytest.mark.parametrize("status", [404, 403], ids=["deleted", "read-only"])
def test_a_resolution_of_an_incident_that_is_gone_is_recorded_without_it(world, caplog, status):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm.ports(), "d1", signal("a1"))
    (old,) = itsm.incidents.values()
    itsm.gone[old.ref.id] = status

    result = processor.process(conn, itsm.ports(), "r1", signal("a1", condition=MonitorCondition.RESOLVED))

    assert result.outcome is Outcome.RESOLVED
    assert f"{old.ref.number} cannot be written (HTTP {status})" in result.detail
    (row,) = repo.rows.values()
    assert (row.state, row.lease_owner) == (CorrelationState.RESOLVED, "")
    assert any(r.levelname == "WARNING" and old.ref.number in r.getMessage() for r in caplog.records)
    clock.advance(minutes=30)
    again = processor.process(
        conn, itsm.ports(), "d2", signal("a2", fired_at=clock.now)
    )  # cannot be reopened
    assert again.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 2


# -- bounded lists (S4) ----------------------------------------------------------------------------------


def test_a_thousand_configuration_items_keep_the_row_within_table_storage_limits(world):
    from shared_code.state.correlations import _to_entity

    clock, repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_RULE)
    processor.process(conn, itsm.ports(), "d1", signal("a1", ci="vm-0000"))
    many = tuple(
        f"/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-{n:04d}"
        for n in range(1, 1001)
    )
    clock.advance(minutes=1)
    noted = processor.process(
        conn,
        itsm.ports(),
        "d2",
        signal("a2", fired_at=clock.now).model_copy(update={"configuration_items": many}),
    )

    assert noted.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    also = next(line for line in incident.notes[0].splitlines() if line.startswith("Also affecting:"))
    assert also.endswith("vm-0100 and 900 more")
    (key,) = repo.rows
    row = repo.rows[key]
    assert len(row.configuration_items) == 100
    assert row.configuration_items[-1] == many[-1]  # the newest kept

    # a storm of firings with new CIs and new alert ids while another instance holds the lease
    repo.rows[key] = row.model_copy(
        update={"lease_owner": "other:1", "lease_until": clock.now + timedelta(seconds=60)}
    )
    for n in range(150):
        cis = tuple(f"host-{n:03d}-{m}" for m in range(10))
        pending = signal(f"s{n}", fired_at=clock.now).model_copy(update={"configuration_items": cis})
        assert processor.process(conn, itsm.ports(), f"s{n}", pending).outcome is Outcome.COALESCED
    row = repo.rows[key]
    assert (len(row.pending_cis), len(row.alert_ids), len(row.firing_alerts)) == (100, 100, 100)
    assert row.alert_ids[-1] == alert_id("s149")
    for name, value in _to_entity(row).items():
        if isinstance(value, str):
            assert len(value.encode("utf-16-le")) < 64 * 1024, name
