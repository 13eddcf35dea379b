"""State-store contract: the Azurite repositories and the in-memory fakes used by unit tests keep the
same conditional semantics (insert fails on an existing row, replace fails on a stale ETag), and
the shared job lease built on them behaves the same on both."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from shared_code.bootstrap import Container
from shared_code.domain.runs import SyncStateRow
from shared_code.domain.sync import SyncCursor
from shared_code.errors import AlreadyExistsError, BusyError, EtagConflict, StateError
from shared_code.jobs.lease import FairBudget, JobLease, RunTally
from shared_code.ports.state import SyncStateStore
from shared_code.state import syncstate as syncstate_table
from shared_code.state.syncstate import SyncStateRepository
from tests.unit.test_sync_engine import MemorySyncState

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["azurite", "memory"])
def store(request: pytest.FixtureRequest) -> Iterator[SyncStateStore]:
    if request.param == "memory":
        yield MemorySyncState()
        return
    app: Container = request.getfixturevalue("app")
    yield SyncStateRepository(app.tables.table(syncstate_table.TABLE))


_names = itertools.count(1)


def target() -> str:
    return f"conn{next(_names)}"


def test_insert_is_conditional_and_replace_needs_the_current_etag(store: SyncStateStore) -> None:
    name = target()
    first = store.insert(SyncStateRow(connection=name, item_type="incidents"))
    with pytest.raises(AlreadyExistsError):
        store.insert(SyncStateRow(connection=name, item_type="incidents"))
    second = store.replace(first.evolve(last_outcome="succeeded"))
    with pytest.raises(EtagConflict):
        store.replace(first.evolve(last_outcome="failed"))  # stale: written since it was read
    stored = store.get(name, "incidents")
    assert stored is not None
    assert stored.last_outcome == "succeeded"
    assert stored.etag == second.etag


def test_a_lease_is_exclusive_until_it_expires(store: SyncStateStore) -> None:
    clock, name = Clock(), target()
    lease = JobLease(store, clock, lease=timedelta(minutes=5))
    lease.acquire(name, "incidents", "run-a")
    with pytest.raises(BusyError):
        lease.acquire(name, "incidents", "run-b")
    clock.now += timedelta(minutes=6)
    taken = lease.acquire(name, "incidents", "run-b")
    assert taken.lease_owner == "run-b"


def test_the_watermark_never_moves_backwards_and_each_advance_renews_the_lease(store: SyncStateStore) -> None:
    clock, name = Clock(), target()
    lease = JobLease(store, clock, lease=timedelta(minutes=5))
    state = lease.acquire(name, "incidents", "run-a")
    ahead = SyncCursor(updated_at=T0 - timedelta(hours=1), last_id="b")
    state = lease.advance(state, ahead)
    clock.now += timedelta(minutes=4)
    state = lease.advance(state, SyncCursor(updated_at=T0 - timedelta(hours=2), last_id="z"))  # behind
    assert state.watermark == ahead
    assert state.lease_until == clock.now + timedelta(minutes=5)  # renewed by the advance
    state = lease.advance(
        state, SyncCursor(updated_at=ahead.updated_at, last_id="a")
    )  # same second, lower id
    assert state.watermark == ahead
    clock.now += timedelta(minutes=4)  # past the first lease, within the renewed one
    with pytest.raises(BusyError):
        lease.acquire(name, "incidents", "run-b")


def test_a_run_whose_lease_was_taken_over_stops_and_its_release_leaves_the_row_alone(
    store: SyncStateStore,
) -> None:
    clock, name = Clock(), target()
    lease = JobLease(store, clock, lease=timedelta(minutes=5))
    slow = lease.acquire(name, "incidents", "run-a")
    clock.now += timedelta(minutes=6)
    lease.acquire(name, "incidents", "run-b")
    with pytest.raises(StateError):
        lease.advance(slow, SyncCursor(updated_at=T0))
    lease.release(slow, "run-a", T0, RunTally(succeeded=True, outcome="succeeded", done=5))
    row = store.get(name, "incidents")
    assert row is not None
    assert row.lease_owner == "run-b"
    assert row.synced_total == 0


def test_release_records_the_run_and_frees_the_lease(store: SyncStateStore) -> None:
    clock, name = Clock(), target()
    lease = JobLease(store, clock)
    state = lease.acquire(name, "incidents", "run-a")
    lease.release(state, "run-a", T0, RunTally(succeeded=False, outcome="failed", error="boom", done=3))
    row = store.get(name, "incidents")
    assert row is not None
    assert (row.lease_owner, row.last_outcome, row.last_error, row.synced_total) == ("", "failed", "boom", 3)
    assert row.last_success_at is None
    assert lease.acquire(name, "incidents", "run-b").lease_owner == "run-b"


def test_a_fair_budget_gives_each_target_its_share_of_what_is_left() -> None:
    clock = Clock()
    budget = FairBudget(clock, timedelta(minutes=9), 3)
    assert budget.next_share() == T0 + timedelta(minutes=3)
    clock.now += timedelta(minutes=1)  # the first used one minute of its three
    assert budget.next_share() == clock.now + timedelta(minutes=4)
    clock.now += timedelta(minutes=4)
    assert budget.next_share() == clock.now + timedelta(minutes=4)
    assert FairBudget(clock, None, 2).next_share() is None


def test_evolve_refuses_a_field_the_row_does_not_have() -> None:
    row = SyncStateRow(connection="c", item_type="incidents")
    with pytest.raises(TypeError, match="lease_ownr"):
        row.evolve(lease_ownr="typo")
