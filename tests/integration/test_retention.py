"""Retention and the stale-pending sweep on Azurite, through the registered timer functions.

Rows are written by the app's own repositories at times set by a controllable clock (the app's
injected collaborator); the timers then run "days later" by moving that clock, not by waiting.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import function_app
from shared_code.alerts.schema import parse_alert
from shared_code.bootstrap import Container
from shared_code.domain.alert import AlertSignal
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.domain.runs import RunRecord
from shared_code.domain.sync import SyncErrorKind, SyncErrorRecord
from shared_code.health import TIMER_JOBS
from shared_code.state import deliveries as deliveries_table
from shared_code.state import runs as runs_table
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state.deliveries import DeliveryRepository
from shared_code.state.retention import KEYS, delete_rows, deliveries_expired
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.tables import query_entities
from tests.hostsim import FunctionHost
from tests.loopback.stack import LoopbackStack

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alerts" / "metric_fired.json"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(app: Container) -> Clock:
    fixed = Clock(NOW)
    app.clock = fixed
    return fixed


@pytest.fixture
def signal() -> AlertSignal:
    return parse_alert(json.loads(FIXTURE.read_text()))


def delivery(connection: str, status: DeliveryStatus, updated: datetime, signal: AlertSignal) -> Delivery:
    return Delivery(
        connection=connection,
        delivery_id=uuid.uuid4().hex,
        status=status,
        received_at=updated,
        updated_at=updated,
        signal=signal,
    )


def run_record(started: datetime, job: str = "sync") -> RunRecord:
    return RunRecord(
        job=job,
        trigger="timer",
        started_at=started,
        finished_at=started,
        duration_seconds=1,
        outcome="succeeded",
    )


def error_record(connection: str, occurred: datetime) -> SyncErrorRecord:
    return SyncErrorRecord(connection=connection, kind=SyncErrorKind.ITSM, message="x", occurred_at=occurred)


def test_the_timer_prunes_each_table_by_its_own_age_and_never_a_pending_delivery(
    app: Container, stack: LoopbackStack, clock: Clock, signal: AlertSignal
) -> None:
    deliveries = DeliveryRepository(app.tables.table(deliveries_table.TABLE))
    runs = RunRepository(app.tables.table(runs_table.TABLE))
    errors = SyncErrorRepository(app.tables.table(syncerrors_table.TABLE))
    old, recent = NOW - timedelta(days=45), NOW - timedelta(days=10)
    old_rows = [delivery("sn-a", DeliveryStatus.DELIVERED, old, signal) for _ in range(130)]  # > 1 batch
    old_rows.append(delivery("sn-b", DeliveryStatus.FAILED, old, signal))
    kept = [
        delivery("sn-a", DeliveryStatus.PENDING, NOW - timedelta(days=400), signal),  # pending: never
        delivery("sn-a", DeliveryStatus.DELIVERED, recent, signal),
        delivery("sn-b", DeliveryStatus.FAILED, recent, signal),
    ]
    for row in old_rows + kept:
        deliveries.insert(row)
    for started in (NOW - timedelta(days=100), NOW - timedelta(days=91)):
        runs.record(run_record(started))
    runs.record(run_record(NOW - timedelta(days=60)))  # 60 days: runs are kept 90
    errors.add_many(
        [error_record("sn-a", NOW - timedelta(days=31)), error_record("sn-b", NOW - timedelta(days=40))]
    )
    errors.add_many([error_record("sn-a", recent)])

    FunctionHost(function_app.app, stack.queues()).timer("prune_state")

    left = {row.delivery_id for row in deliveries.list(limit=10_000)}
    assert left == {row.delivery_id for row in kept}
    assert [run.started_at for run in runs.list("sync")] == [NOW - timedelta(days=60)]
    assert [e.occurred_at for e in errors.list("sn-a")] == [recent]
    assert list(errors.list("sn-b")) == []
    [record] = list(runs.list("retention"))
    assert record.outcome == "succeeded"
    assert record.counts == {"AlertDeliveries": 131, "Runs": 2, "SyncErrors": 2}


def test_a_run_deletes_at_most_the_limit_per_table_and_the_next_run_continues(
    stack: LoopbackStack, signal: AlertSignal
) -> None:
    with stack.app(TABLE_PREFIX=f"r{uuid.uuid4().hex[:10]}", RETENTION_MAX_ROWS="100") as app:
        app.clock = Clock(NOW)
        deliveries = DeliveryRepository(app.tables.table(deliveries_table.TABLE))
        for _ in range(150):
            deliveries.insert(delivery("sn-a", DeliveryStatus.DELIVERED, NOW - timedelta(days=31), signal))

        first = app.retention.run()
        assert first.deleted["AlertDeliveries"] == 100
        assert first.outcome == "incomplete"
        second = app.retention.run()
        assert second.deleted["AlertDeliveries"] == 50
        assert second.outcome == "succeeded"
        assert list(deliveries.list()) == []


def test_a_row_written_after_it_was_read_is_not_deleted(app: Container, signal: AlertSignal) -> None:
    table = app.tables.table(deliveries_table.TABLE)
    deliveries = DeliveryRepository(table)
    rows = [delivery("sn-a", DeliveryStatus.FAILED, NOW - timedelta(days=60), signal) for _ in range(3)]
    for row in rows:
        deliveries.insert(row)
    # a redrive lands between the key query and the deletes
    expiry = deliveries_expired(NOW - timedelta(days=30))
    keys = list(query_entities(table, expiry.query, expiry.parameters, select=KEYS))
    deliveries.save(rows[0].evolve(status=DeliveryStatus.PENDING, updated_at=NOW))
    deleted = delete_rows(table, keys)

    assert deleted == 2
    [left] = list(deliveries.list())
    assert left.delivery_id == rows[0].delivery_id
    assert left.status is DeliveryStatus.PENDING


def test_the_retention_run_is_reported_by_health(app: Container, stack: LoopbackStack, clock: Clock) -> None:
    host = FunctionHost(function_app.app, stack.queues())
    host.timer("prune_state")
    body = host.http("health", "GET", "https://func.example/api/health").json()

    assert TIMER_JOBS["prune_state"] == "retention"
    assert body["timers"]["prune_state"]["outcome"] == "succeeded"
    assert body["timers"]["prune_state"]["runs"] == 1


def test_the_stale_sweep_reads_only_stale_pending_keys(
    app: Container, stack: LoopbackStack, clock: Clock, signal: AlertSignal
) -> None:
    deliveries = DeliveryRepository(app.tables.table(deliveries_table.TABLE))
    stale = delivery("sn-a", DeliveryStatus.PENDING, NOW - timedelta(minutes=30), signal)
    young = delivery("sn-a", DeliveryStatus.PENDING, NOW - timedelta(minutes=2), signal)
    done = delivery("sn-a", DeliveryStatus.DELIVERED, NOW - timedelta(days=3), signal)
    for row in (stale, young, done):
        deliveries.insert(row)

    keys = deliveries.stale_pending(NOW - timedelta(minutes=10))
    assert [(k.connection, k.delivery_id) for k in keys] == [("sn-a", stale.delivery_id)]
    assert deliveries.stale_pending(NOW - timedelta(minutes=10), limit=0) == []

    outputs = FunctionHost(function_app.app, stack.queues()).timer("redrive_stale_alerts")
    [message] = outputs["deliveries"]
    assert json.loads(message) == {"connection": "sn-a", "deliveryId": stale.delivery_id}
    stamped = deliveries.get("sn-a", stale.delivery_id)
    assert stamped is not None
    assert stamped.updated_at == NOW
    assert FunctionHost(function_app.app, stack.queues()).timer("redrive_stale_alerts") == {}
