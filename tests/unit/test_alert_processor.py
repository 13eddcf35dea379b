"""The alert processor's decisions, with an in-memory correlation table and a fake ITSM product."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from shared_code.alerts.processor import AlertProcessor, Outcome
from shared_code.alerts.signal import AlertSignal, MonitorCondition, Severity
from shared_code.connections import Connection, CorrelationMode
from shared_code.errors import BusyError, ItsmUnavailableError
from shared_code.itsm.base import WorkItemRef, WorkItemState
from shared_code.state.correlations import CorrelationState
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


def connection(**overrides: object) -> Connection:
    data: dict[str, object] = {
        "name": "sn",
        "partner_type": "servicenow",
        "server_url": "https://dev1.service-now.com",
        "username": "svc",
        "client_id": "cid",
        "note_interval_minutes": 15,
    }
    return Connection.parse(data | overrides)


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
    processor = AlertProcessor(repo, clock, lease_seconds=60, busy_budget_seconds=0.3)  # type: ignore[arg-type]
    return clock, repo, itsm, processor


def test_first_firing_creates_one_incident_with_mapped_fields(world):
    _clock, repo, itsm, processor = world
    result = processor.process(connection(), itsm, "d1", signal(severity=Severity.SEV0))
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
    processor.process(conn, itsm, "d1", signal("a1"))
    for i in range(2, 6):
        clock.advance(minutes=1)
        result = processor.process(conn, itsm, f"d{i}", signal(f"a{i}", fired_at=clock.now))
        assert result.outcome is Outcome.COALESCED
    assert itsm.calls == ["create"]
    clock.advance(minutes=15)
    result = processor.process(conn, itsm, "d6", signal("a6", fired_at=clock.now))
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
    processor.process(conn, itsm, "d1", signal("a1"))
    first = processor.process(conn, itsm, "d2", signal("a2"))
    again = processor.process(conn, itsm, "d2", signal("a2"))
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
        outcomes.append(processor.process(conn, itsm, f"d{i}", signal(f"a{i}")).outcome)

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
    processor.process(conn, itsm, "d1", signal("a1"))
    clock.advance(minutes=1)
    processor.process(conn, itsm, "d2", signal("a2", fired_at=clock.now))
    clock.advance(minutes=5)
    result = processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert result.outcome is Outcome.RESOLVED
    assert itsm.calls == ["create", "resolve"]
    (incident,) = itsm.incidents.values()
    assert incident.state is WorkItemState.RESOLVED
    assert "1 firing(s) since the last note" in incident.notes[-1]
    again = processor.process(conn, itsm, "r2", signal("a2", condition=MonitorCondition.RESOLVED))
    assert again.outcome is Outcome.DUPLICATE
    assert itsm.calls == ["create", "resolve"]


def test_without_auto_resolve_a_resolution_is_only_a_note(world):
    _clock, _repo, itsm, processor = world
    conn = connection(auto_resolve=False)
    processor.process(conn, itsm, "d1", signal("a1"))
    result = processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert result.outcome is Outcome.NOTED
    assert itsm.calls == ["create", "note"]
    assert next(iter(itsm.incidents.values())).state is WorkItemState.OPEN


def test_firing_again_reopens_inside_the_window_and_opens_anew_after_it(world):
    clock, repo, itsm, processor = world
    conn = connection(reopen_window_hours=2)
    processor.process(conn, itsm, "d1", signal("a1"))
    processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    clock.advance(hours=1)
    reopened = processor.process(conn, itsm, "d2", signal("a2", fired_at=clock.now))
    assert reopened.outcome is Outcome.REOPENED
    assert len(itsm.incidents) == 1
    processor.process(conn, itsm, "r2", signal("a2", condition=MonitorCondition.RESOLVED, fired_at=clock.now))
    clock.advance(hours=3)
    fresh = processor.process(conn, itsm, "d3", signal("a3", fired_at=clock.now))
    assert fresh.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 2
    (row,) = repo.rows.values()
    assert row.generation == 2
    assert row.work_item_number == fresh.work_item.number


def test_an_incident_that_cannot_be_reopened_is_replaced(world):
    clock, _repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm, "d1", signal("a1"))
    processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    itsm.reopen_rejected = True
    clock.advance(minutes=30)
    result = processor.process(conn, itsm, "d2", signal("a2", fired_at=clock.now))
    assert result.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 2


def test_a_late_fired_notification_after_its_resolution_is_ignored(world):
    _clock, _repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm, "d1", signal("a1"))
    processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    late = processor.process(conn, itsm, "d1-late", signal("a1"))
    assert late.outcome is Outcome.IGNORED
    assert itsm.calls == ["create", "resolve"]


def test_a_resolution_that_overtook_its_firing_keeps_the_late_firing_from_opening_an_incident(world):
    _clock, _repo, itsm, processor = world
    conn = connection()
    result = processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert result.outcome is Outcome.IGNORED
    assert result.work_item is None
    late = processor.process(conn, itsm, "f1", signal("a1"))  # its firing, delivered after a retry
    assert late.outcome is Outcome.IGNORED
    assert itsm.calls == []
    again = processor.process(conn, itsm, "f2", signal("a2", fired_at=T0 + timedelta(minutes=30)))
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
        processor.process(conn, itsm, "d1", signal("a1"))
    itsm.create_incident = original
    result = processor.process(conn, itsm, "d1", signal("a1"))
    assert result.outcome is Outcome.CREATED
    assert len(itsm.incidents) == 1
    assert itsm.calls == ["create", "find"]


def test_per_rule_mode_notes_a_new_configuration_item_at_once(world):
    _clock, _repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_RULE)
    processor.process(conn, itsm, "d1", signal("a1", ci="vm-1"))
    result = processor.process(conn, itsm, "d2", signal("a2", ci="vm-2"))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert "Also affecting: vm-2" in incident.notes[0]
    assert processor.process(conn, itsm, "d3", signal("a3", ci="vm-2")).outcome is Outcome.COALESCED


def test_per_alert_mode_opens_one_incident_per_alert(world):
    _clock, _repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_ALERT)
    processor.process(conn, itsm, "d1", signal("a1"))
    processor.process(conn, itsm, "d2", signal("a2"))
    assert len(itsm.incidents) == 2


def test_a_resolution_waits_for_a_create_in_flight_then_asks_for_a_retry(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm, "d1", signal("a1"))
    (key,) = repo.rows
    row = repo.rows[key]
    repo.rows[key] = row.model_copy(
        update={"lease_owner": "other:1", "lease_until": clock.now + timedelta(seconds=60)}
    )
    with pytest.raises(BusyError):
        processor.process(conn, itsm, "r1", signal("a1", condition=MonitorCondition.RESOLVED))
    assert itsm.calls == ["create"]


def test_a_failed_note_leaves_the_firings_for_the_next_note(world):
    _clock, repo, itsm, processor = world
    conn = connection(note_interval_minutes=0)
    processor.process(conn, itsm, "d1", signal("a1"))
    itsm.fail_next.append(ItsmUnavailableError("503"))
    with pytest.raises(ItsmUnavailableError):
        processor.process(conn, itsm, "d2", signal("a2"))
    result = processor.process(conn, itsm, "d2", signal("a2"))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert len(incident.notes) == 1
    assert repo.rows[next(iter(repo.rows))].lease_owner == ""


def test_work_item_ref_roundtrip_in_result(world):
    _clock, _repo, itsm, processor = world
    result = processor.process(connection(), itsm, "d1", signal())
    assert isinstance(result.work_item, WorkItemRef)
    assert result.work_item.number.startswith("INC")


def test_a_new_configuration_item_under_another_instances_lease_is_counted_then_noted(world):
    clock, repo, itsm, processor = world
    conn = connection(correlation=CorrelationMode.PER_RULE)
    processor.process(conn, itsm, "d1", signal("a1", ci="vm-1"))
    (key,) = repo.rows
    held = repo.rows[key].model_copy(
        update={"lease_owner": "other:1", "lease_until": clock.now + timedelta(seconds=60)}
    )
    repo.rows[key] = held
    result = processor.process(conn, itsm, "d2", signal("a2", ci="vm-2"))
    assert result.outcome is Outcome.COALESCED  # never waits for the lease, never ends busy
    assert repo.rows[key].pending_cis == ("vm-2",)
    assert itsm.calls == ["create"]
    repo.rows[key] = repo.rows[key].model_copy(update={"lease_owner": "", "lease_until": None})
    result = processor.process(conn, itsm, "d3", signal("a3", ci="vm-1"))
    assert result.outcome is Outcome.NOTED
    (incident,) = itsm.incidents.values()
    assert "Also affecting: vm-2" in incident.notes[0]
    row = repo.rows[key]
    assert (row.configuration_items, row.pending_cis) == (("vm-1", "vm-2"), ())
    assert processor.process(conn, itsm, "d4", signal("a4", ci="vm-2")).outcome is Outcome.COALESCED


def test_a_problem_another_process_opened_is_recognised_despite_the_insert_first(world):
    clock, repo, itsm, processor = world
    conn = connection()
    processor.process(conn, itsm, "d1", signal("a1"))
    elsewhere = AlertProcessor(repo, clock, lease_seconds=60, busy_budget_seconds=0.3)
    result = elsewhere.process(conn, itsm, "d2", signal("a2"))
    assert result.outcome is Outcome.COALESCED
    assert itsm.calls == ["create"]
    (row,) = repo.rows.values()
    assert row.fire_count == 2
