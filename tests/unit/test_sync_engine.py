"""The sync engine with a hand-written keyset feed and in-memory sinks and repositories."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from shared_code.bootstrap import Container
from shared_code.domain.connection import ConnectionBase, SyncData
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.runs import RunRecord, SyncStateRow
from shared_code.domain.sync import RejectedRow, SyncCursor, SyncErrorKind, SyncErrorRecord, SyncPage
from shared_code.domain.workitem import Lifecycle, WorkItem, WorkItemType
from shared_code.errors import (
    AlertsApiError,
    AlreadyExistsError,
    EtagConflict,
    ItsmAuthError,
    ItsmError,
    ItsmUnavailableError,
    NotFoundError,
    StateError,
)
from shared_code.itsm.servicenow.mapping import lifecycle_of
from shared_code.ports.itsm import ConnectorPorts
from shared_code.ports.monitor import CloseOutcome
from shared_code.products import parse_connection
from shared_code.state import workitems as workitems_table
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.backsync import BackSync, finished_state, parse_correlation_id
from shared_code.workitems.engine import SyncEngine, SyncOutcome, SyncProgress
from tests.fakes.state import InMemoryCorrelations

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
INC = WorkItemType.INCIDENT
CHG = WorkItemType.CHANGE_REQUEST


# -- fakes ---------------------------------------------------------------------------------------


def connection(name: str = "snow", **extra: object) -> ConnectionBase:
    data: dict[str, object] = {
        "name": name,
        "partner_type": "servicenow",
        "server_url": f"https://{name}.service-now.com",
        "client_id": "cid",
        "username": "integration",
        "sync_data": ["incidents"],
        "sync_scope_days": 30,
    }
    data.update(extra)
    return parse_connection(data)


def item(conn: str, n: int, updated_at: datetime, **extra: object) -> WorkItem:
    data: dict[str, object] = {
        "connection": conn,
        "item_type": INC,
        "source_id": f"sys{n:05d}",
        "number": f"INC{n:07d}",
        "updated_at": updated_at,
        "state": "In Progress",
        "title": f"incident {n}",
    }
    data.update(extra)
    if "lifecycle" not in data:  # as the ServiceNow mapping sets it
        data["lifecycle"] = lifecycle_of(
            WorkItemType(str(data["item_type"])),
            str(data.get("state_code", "")),
            str(data.get("state", "")),
            resolved_at=data.get("resolved_at"),  # type: ignore[arg-type]
            closed_at=data.get("closed_at"),  # type: ignore[arg-type]
        )
    return WorkItem.model_validate(data)


class FakeFeed:
    """A keyset change feed over (updated_at, source_id); ``bad`` ids come back as rejected rows."""

    def __init__(self, conn: str = "snow") -> None:
        self.conn = conn
        self.rows: dict[str, WorkItem] = {}
        self.bad: set[str] = set()
        self.cursors: list[SyncCursor] = []
        self.fail_on_call: dict[int, Exception] = {}
        self.on_fetch: Callable[[int], None] | None = None
        self._lock = threading.Lock()

    def add(self, n: int, updated_at: datetime, **extra: object) -> WorkItem:
        row = item(self.conn, n, updated_at, **extra)
        self.rows[row.source_id] = row
        return row

    def ports(self) -> ConnectorPorts:
        return ConnectorPorts(product="Fake", check=lambda: "fake feed", close=lambda: None, changes=self)

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        with self._lock:
            call = len(self.cursors)
            self.cursors.append(cursor)
        if self.on_fetch is not None:
            self.on_fetch(call)
        if call in self.fail_on_call:
            raise self.fail_on_call[call]
        ordered = sorted(self.rows.values(), key=lambda r: (r.updated_at, r.source_id))
        after = [r for r in ordered if (r.updated_at, r.source_id) > (cursor.updated_at, cursor.last_id)]
        chunk = after[:page_size]
        next_cursor = (
            SyncCursor(updated_at=chunk[-1].updated_at, last_id=chunk[-1].source_id) if chunk else cursor
        )
        return SyncPage(
            items=[r for r in chunk if r.source_id not in self.bad],
            rejected=[
                RejectedRow(source_id=r.source_id, error="bad date") for r in chunk if r.source_id in self.bad
            ],
            next_cursor=next_cursor,
            is_last=len(after) <= page_size,
        )

    def close(self) -> None:
        return None


class MemorySink:
    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.rows: dict[str, WorkItem] = {}
        self.writes: list[list[str]] = []
        self.fail_at_write: int | None = None
        self.before_write: Callable[[int], None] | None = None

    def write(self, items: Sequence[WorkItem]) -> None:
        index = len(self.writes)
        if self.before_write is not None:
            self.before_write(index)
        if self.fail_at_write is not None and index >= self.fail_at_write:
            raise StateError("storage went away")
        self.writes.append([i.source_id for i in items])
        for i in items:
            self.rows[i.source_id] = i


class MemorySyncState:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], SyncStateRow] = {}
        self._etags = itertools.count(1)
        self._lock = threading.Lock()

    def get(self, connection: str, item_type: str) -> SyncStateRow | None:
        return self.rows.get((connection, item_type))

    def insert(self, row: SyncStateRow) -> SyncStateRow:
        with self._lock:
            if (row.connection, row.item_type) in self.rows:
                raise AlreadyExistsError("exists")
            stored = row.model_copy(update={"etag": str(next(self._etags))})
            self.rows[(row.connection, row.item_type)] = stored
            return stored

    def replace(self, row: SyncStateRow) -> SyncStateRow:
        with self._lock:
            current = self.rows.get((row.connection, row.item_type))
            if current is None or current.etag != row.etag:
                raise EtagConflict("changed")
            stored = row.model_copy(update={"etag": str(next(self._etags))})
            self.rows[(row.connection, row.item_type)] = stored
            return stored


class MemoryErrors:
    def __init__(self) -> None:
        self.records: list[SyncErrorRecord] = []

    def record(self, records: Sequence[SyncErrorRecord]) -> None:
        self.records.extend(records)


class MemoryRuns:
    def __init__(self) -> None:
        self.runs: list[RunRecord] = []

    def record(self, run: RunRecord) -> None:
        self.runs.append(run)


class Connections:
    def __init__(self, *connections: ConnectionBase) -> None:
        self.by_name = {c.name: c for c in connections}

    def get(self, name: str) -> ConnectionBase:
        if name not in self.by_name:
            raise NotFoundError(f"no ITSM connection named {name!r}")
        return self.by_name[name]

    def list(self) -> list[ConnectionBase]:
        return sorted(self.by_name.values(), key=lambda c: c.name)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class Harness:
    def __init__(
        self, *connections: ConnectionBase, sinks: int = 1, overlap: int = 120, page_size: int = 10
    ) -> None:
        self.connections = Connections(*(connections or (connection(),)))
        self.feeds = {name: FakeFeed(name) for name in self.connections.by_name}
        self.sinks = [MemorySink(f"sink{i}") for i in range(sinks)]
        self.state = MemorySyncState()
        self.errors = MemoryErrors()
        self.runs = MemoryRuns()
        self.clock = Clock()
        self.correlations = InMemoryCorrelations()
        self.closer = FakeCloser()
        self.engine = SyncEngine(
            connections=self.connections,
            connector_for=lambda c: self.feeds[c.name].ports(),
            sync_state=self.state,
            sinks=self.sinks,
            errors=self.errors,
            runs=self.runs,
            clock=self.clock,
            page_size=page_size,
            overlap=timedelta(seconds=overlap),
            backsync=BackSync(self.correlations, self.closer, self.clock),
        )

    @property
    def feed(self) -> FakeFeed:
        return next(iter(self.feeds.values()))

    def watermark(self, conn: str = "snow", item_type: WorkItemType = INC) -> SyncCursor | None:
        row = self.state.get(conn, item_type.sync_name)
        return row.watermark if row else None


class FakeCloser:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.fail: Exception | None = None

    def close_alert(self, alert_id: str) -> CloseOutcome:
        if self.fail is not None:
            raise self.fail
        self.closed.append(alert_id)
        return CloseOutcome.CLOSED


def seed(
    feed: FakeFeed, count: int, start: datetime | None = None, step: timedelta = timedelta(minutes=1)
) -> None:
    moment = start or NOW - timedelta(days=2)
    for n in range(count):
        feed.add(n, moment + step * n)


# -- first run, overlap, watermark -------------------------------------------------------------


def test_first_run_reads_the_connection_scope_and_syncs_everything_in_it() -> None:
    h = Harness(connection(sync_scope_days=10))
    h.feed.add(1, NOW - timedelta(days=11))  # outside the scope: never read
    seed(h.feed, 25, start=NOW - timedelta(days=9))
    [result] = h.engine.run()
    assert h.feed.cursors[0] == SyncCursor(updated_at=NOW - timedelta(days=10), last_id="")
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.synced == 25
    assert result.pages == 3
    assert set(h.sinks[0].rows) == {f"sys{n:05d}" for n in range(25)}
    newest = max(h.feed.rows.values(), key=lambda r: r.updated_at)
    assert h.watermark() == SyncCursor(updated_at=newest.updated_at, last_id=newest.source_id)


def test_incremental_run_starts_overlap_seconds_before_the_watermark_and_picks_up_changes() -> None:
    h = Harness(overlap=120)
    seed(h.feed, 15)
    h.engine.run()
    first = h.watermark()
    assert first is not None
    h.clock.now += timedelta(minutes=15)
    h.feed.cursors.clear()
    h.sinks[0].writes.clear()
    changed = h.feed.add(3, NOW + timedelta(minutes=5), state="Resolved")
    [result] = h.engine.run()
    assert h.feed.cursors[0] == SyncCursor(updated_at=first.updated_at - timedelta(seconds=120), last_id="")
    assert h.sinks[0].rows["sys00003"] == changed
    # the overlap re-reads the rows of the last two minutes before the watermark (12, 13, 14 minutes
    # into the seed, inclusive), then the change
    assert result.synced == 4
    assert h.sinks[0].writes == [["sys00012", "sys00013", "sys00014", "sys00003"]]
    assert h.watermark() == SyncCursor(updated_at=changed.updated_at, last_id="sys00003")


def test_a_same_second_row_committed_after_the_watermark_passed_is_caught_by_the_overlap() -> None:
    h = Harness(overlap=2)
    moment = NOW - timedelta(hours=1)
    h.feed.add(5, moment)
    h.engine.run()
    assert h.watermark() == SyncCursor(updated_at=moment, last_id="sys00005")
    h.feed.add(2, moment)  # same second, smaller id: behind the keyset position
    h.engine.run()
    assert "sys00002" in h.sinks[0].rows


def test_watermark_moves_only_after_every_sink_committed_the_page() -> None:
    h = Harness(sinks=2, page_size=5)
    seed(h.feed, 12)
    seen: list[SyncCursor | None] = []
    h.sinks[1].before_write = lambda index: seen.append(h.watermark())
    h.engine.run()
    ordered = sorted(h.feed.rows.values(), key=lambda r: (r.updated_at, r.source_id))
    # while page N is written, the stored watermark is still the end of page N-1
    assert seen == [
        None,
        SyncCursor(updated_at=ordered[4].updated_at, last_id=ordered[4].source_id),
        SyncCursor(updated_at=ordered[9].updated_at, last_id=ordered[9].source_id),
    ]


def test_a_sink_failing_mid_run_leaves_the_watermark_at_the_last_committed_page_and_a_rerun_fills_in() -> (
    None
):
    h = Harness(sinks=2, page_size=5)
    seed(h.feed, 23)
    h.sinks[1].fail_at_write = 2  # the third page fails in the second sink only
    [failed] = h.engine.run()
    ordered = sorted(h.feed.rows.values(), key=lambda r: (r.updated_at, r.source_id))
    assert failed.outcome is SyncOutcome.FAILED
    assert "storage went away" in failed.error
    assert h.watermark() == SyncCursor(updated_at=ordered[9].updated_at, last_id=ordered[9].source_id)
    assert len(h.sinks[1].rows) == 10
    h.sinks[1].fail_at_write = None
    h.clock.now += timedelta(minutes=15)
    [rerun] = h.engine.run()
    assert rerun.outcome is SyncOutcome.SUCCEEDED
    for sink in h.sinks:
        assert sink.rows == h.feed.rows  # same set, latest versions, one row per id
    assert h.watermark() == SyncCursor(updated_at=ordered[-1].updated_at, last_id=ordered[-1].source_id)


def test_rejected_rows_are_logged_and_skipped_and_good_rows_after_them_are_synced() -> None:
    h = Harness(page_size=5)
    seed(h.feed, 12)
    h.feed.bad = {"sys00002", "sys00006"}
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.synced == 10
    assert result.rejected == 2
    assert set(h.sinks[0].rows) == {f"sys{n:05d}" for n in range(12)} - h.feed.bad
    rejected = [r for r in h.errors.records if r.kind is SyncErrorKind.REJECTED_ROW]
    assert sorted(r.source_id for r in rejected) == ["sys00002", "sys00006"]
    assert all(r.message == "bad date" and r.run_id == result.run_id for r in rejected)
    last = max(h.feed.rows.values(), key=lambda r: r.updated_at)
    assert h.watermark() == SyncCursor(updated_at=last.updated_at, last_id=last.source_id)


def test_an_error_log_failure_keeps_the_watermark_before_the_page_with_the_rejected_row() -> None:
    h = Harness(page_size=5)
    seed(h.feed, 10)
    h.feed.bad = {"sys00007"}

    def broken(records: Sequence[SyncErrorRecord]) -> None:
        if any(r.kind is SyncErrorKind.REJECTED_ROW for r in records):
            raise StateError("SyncErrors unavailable")

    h.errors.record = broken  # type: ignore[method-assign]
    [result] = h.engine.run()
    ordered = sorted(h.feed.rows.values(), key=lambda r: (r.updated_at, r.source_id))
    assert result.outcome is SyncOutcome.FAILED
    assert h.watermark() == SyncCursor(updated_at=ordered[4].updated_at, last_id=ordered[4].source_id)


def test_the_next_page_is_fetched_while_the_current_one_is_written() -> None:
    h = Harness(page_size=5)
    seed(h.feed, 15)
    second_fetch_started = threading.Event()
    h.feed.on_fetch = lambda call: second_fetch_started.set() if call == 1 else None
    overlapped: list[bool] = []
    h.sinks[0].before_write = lambda index: (
        overlapped.append(second_fetch_started.wait(2)) if index == 0 else None
    )
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert overlapped == [True]


def test_a_deferred_page_is_mapped_only_after_the_next_page_was_asked_for() -> None:
    """A connector may leave a page's mapping to the engine (``SyncPage.deferred``), so that it runs
    while the next request is in flight; the engine must read the rows only after it has started
    fetching the next page, and each page's rows only once."""
    h = Harness(page_size=5)
    seed(h.feed, 15)
    fetch_started = [threading.Event() for _ in range(4)]
    h.feed.on_fetch = lambda call: fetch_started[call].set()
    real_fetch = h.feed.fetch_changes
    mapped: list[tuple[int, bool]] = []  # (page, whether the next page's fetch had started)

    def deferred(item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        page = real_fetch(item_type, cursor, page_size)
        number = len(h.feed.cursors) - 1

        def build() -> tuple[list[WorkItem], list[RejectedRow]]:
            next_started = page.is_last or fetch_started[number + 1].wait(2)
            mapped.append((number, next_started))
            return page.items, page.rejected

        return SyncPage.deferred(next_cursor=page.next_cursor, is_last=page.is_last, build=build)

    h.feed.fetch_changes = deferred  # type: ignore[method-assign]
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert (result.synced, result.pages) == (15, 3)
    assert mapped == [(0, True), (1, True), (2, True)]
    assert h.sinks[0].rows == h.feed.rows


def test_a_deferred_page_maps_once_and_a_mapping_failure_surfaces_where_the_rows_are_read() -> None:
    calls: list[int] = []
    row = item("snow", 1, NOW)

    def build() -> tuple[list[WorkItem], list[RejectedRow]]:
        calls.append(1)
        return [row], [RejectedRow(source_id="bad", error="bad date")]

    page = SyncPage.deferred(next_cursor=SyncCursor(updated_at=NOW), is_last=True, build=build)
    assert "not mapped yet" in repr(page)
    assert calls == []
    assert page.rejected == [RejectedRow(source_id="bad", error="bad date")]
    assert page.items == [row]
    assert calls == [1]
    assert "1 items, 1 rejected" in repr(page)

    def broken() -> tuple[list[WorkItem], list[RejectedRow]]:
        calls.append(2)
        raise ItsmError("the answer could not be read")

    failing = SyncPage.deferred(next_cursor=SyncCursor(updated_at=NOW), is_last=False, build=broken)
    assert failing.next_cursor == SyncCursor(updated_at=NOW)
    with pytest.raises(ItsmError, match="could not be read"):
        _ = failing.items
    with pytest.raises(ItsmError, match="could not be read"):  # the same failure, not a second build
        _ = failing.rejected
    assert calls == [1, 2]


def test_a_page_whose_mapping_fails_fails_the_run_before_any_write_and_keeps_the_watermark() -> None:
    h = Harness(page_size=5)
    seed(h.feed, 15)
    real_fetch = h.feed.fetch_changes

    def third_page_unreadable(item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        page = real_fetch(item_type, cursor, page_size)
        if len(h.feed.cursors) < 3:
            return page

        def build() -> tuple[list[WorkItem], list[RejectedRow]]:
            raise ItsmError("ServiceNow answered rows the sync cannot read")

        return SyncPage.deferred(next_cursor=page.next_cursor, is_last=page.is_last, build=build)

    h.feed.fetch_changes = third_page_unreadable  # type: ignore[method-assign]
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.FAILED
    assert "cannot read" in result.error
    assert (result.pages, result.synced) == (2, 10)
    assert len(h.sinks[0].writes) == 2
    ordered = sorted(h.feed.rows.values(), key=lambda r: (r.updated_at, r.source_id))
    assert h.watermark() == SyncCursor(updated_at=ordered[9].updated_at, last_id=ordered[9].source_id)


def test_a_time_budget_stops_after_a_committed_page_and_the_next_run_continues() -> None:
    h = Harness(page_size=5)
    seed(h.feed, 20)

    def slow(index: int) -> None:
        h.clock.now += timedelta(seconds=40)

    h.sinks[0].before_write = slow
    [partial] = h.engine.run(time_budget=timedelta(seconds=60))
    assert partial.outcome is SyncOutcome.INCOMPLETE
    assert partial.pages == 2
    h.sinks[0].before_write = None
    [rest] = h.engine.run()
    assert rest.outcome is SyncOutcome.SUCCEEDED
    assert h.sinks[0].rows == h.feed.rows


def test_a_time_budget_is_shared_fairly_between_connections_and_unused_time_goes_to_the_next() -> None:
    h = Harness(connection("alpha"), connection("beta"), connection("gamma"), page_size=5)
    seed(h.feeds["alpha"], 3)  # one page: leaves most of its share to the others
    seed(h.feeds["beta"], 100)  # large first syncs
    seed(h.feeds["gamma"], 100)

    def slow(index: int) -> None:
        h.clock.now += timedelta(seconds=10)  # every page takes 10 s to write

    h.sinks[0].before_write = slow
    results = {r.connection: r for r in h.engine.run(time_budget=timedelta(seconds=90))}

    # alpha may use 30 s and needs 10; beta then gets (90 - 10) / 2 = 40 s, gamma the last 40 s
    assert {name: (r.outcome, r.pages) for name, r in results.items()} == {
        "alpha": (SyncOutcome.SUCCEEDED, 1),
        "beta": (SyncOutcome.INCOMPLETE, 4),
        "gamma": (SyncOutcome.INCOMPLETE, 4),
    }
    assert h.clock.now == NOW + timedelta(seconds=90)
    for name in ("beta", "gamma"):  # each stopped after a committed page, its watermark stored
        ordered = sorted(h.feeds[name].rows.values(), key=lambda r: (r.updated_at, r.source_id))
        last = ordered[4 * 5 - 1]
        assert h.watermark(name) == SyncCursor(updated_at=last.updated_at, last_id=last.source_id)
    h.sinks[0].before_write = None
    rest = h.engine.run()
    assert all(r.outcome is SyncOutcome.SUCCEEDED for r in rest)


def test_a_row_updated_in_the_future_does_not_pin_the_watermark_there(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(page_size=5)
    seed(h.feed, 7)  # two days ago, a minute apart
    future = NOW + timedelta(days=30)  # imported without system fields, or a skewed clock
    for n in range(100, 108):
        h.feed.add(n, future)
    newest_real = max((r for r in h.feed.rows.values() if r.updated_at < NOW), key=lambda r: r.updated_at)

    with caplog.at_level(logging.WARNING, logger="shared_code.workitems.engine"):
        [first] = h.engine.run()

    assert first.outcome is SyncOutcome.SUCCEEDED
    assert set(h.sinks[0].rows) == set(h.feed.rows)  # the future rows are synced too
    fifth = h.feed.rows["sys00004"]
    assert h.feed.cursors == [  # paging follows the page cursors, into the future too
        SyncCursor(updated_at=NOW - timedelta(days=30)),
        SyncCursor(updated_at=fifth.updated_at, last_id="sys00004"),
        SyncCursor(updated_at=future, last_id="sys00102"),
    ]
    # the stored watermark stops at the newest row that is not after the run's start
    assert h.watermark() == SyncCursor(updated_at=newest_real.updated_at, last_id=newest_real.source_id)
    assert first.watermark == h.watermark()
    warnings = [r.getMessage() for r in caplog.records if "after this run started" in r.getMessage()]
    assert len(warnings) == 1  # once per run, though two pages reached into the future
    assert "snow incidents" in warnings[0]
    assert future.isoformat() in warnings[0]

    # an engineer edits an incident a minute after the run (inside any "start + skew" cap) ...
    soon = h.feed.add(3, NOW + timedelta(minutes=1), state="Resolved")
    h.clock.now += timedelta(minutes=15)
    [second] = h.engine.run()

    # ... and the next run still reads it, and the future rows again (idempotent upserts)
    assert second.outcome is SyncOutcome.SUCCEEDED
    assert h.sinks[0].rows["sys00003"] == soon
    assert h.watermark() == SyncCursor(updated_at=soon.updated_at, last_id="sys00003")
    assert h.feed.cursors[-1].updated_at == future


def test_a_future_watermark_stored_earlier_is_healed_by_reading_back_the_sync_scope() -> None:
    h = Harness(connection(sync_scope_days=10))
    seed(h.feed, 4, start=NOW - timedelta(days=3))
    h.state.insert(
        SyncStateRow(
            connection="snow",
            item_type="incidents",
            watermark_updated_at=NOW + timedelta(days=30),
            watermark_last_id="sys99999",
        )
    )
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert h.feed.cursors[0] == SyncCursor(updated_at=NOW - timedelta(days=10))
    assert set(h.sinks[0].rows) == {f"sys{n:05d}" for n in range(4)}
    newest = max(h.feed.rows.values(), key=lambda r: r.updated_at)
    assert h.watermark() == SyncCursor(updated_at=newest.updated_at, last_id=newest.source_id)


# -- failures ------------------------------------------------------------------------------------


def test_an_expired_refresh_token_is_recorded_as_re_authorise_in_runs_state_and_error_log() -> None:
    h = Harness()
    seed(h.feed, 3)
    h.feed.fail_on_call[0] = ItsmAuthError("refresh token expired; re-authorise the connection", status=401)
    [result] = h.engine.run(trigger="timer")
    assert result.outcome is SyncOutcome.FAILED
    assert "re-authorise this connection" in result.error
    [run] = h.runs.runs
    assert run.outcome == "failed"
    assert "re-authorise this connection" in run.error
    assert run.trigger == "timer"
    row = h.state.get("snow", "incidents")
    assert row is not None
    assert "re-authorise" in row.last_error
    assert row.lease_owner == ""
    assert row.watermark is None
    assert [r.kind for r in h.errors.records] == [SyncErrorKind.REAUTHORISE]


def test_one_failing_connection_does_not_stop_the_others() -> None:
    h = Harness(connection("alpha"), connection("beta", sync_data=["incidents", "change_requests"]))
    h.feeds["alpha"].fail_on_call[0] = ItsmUnavailableError("HTTP 503 after 4 attempts", status=503)
    seed(h.feeds["beta"], 4)
    results = h.engine.run()
    outcomes = {(r.connection, r.item_type): r.outcome for r in results}
    assert outcomes == {
        ("alpha", INC): SyncOutcome.FAILED,
        ("beta", INC): SyncOutcome.SUCCEEDED,
        ("beta", CHG): SyncOutcome.SUCCEEDED,
    }
    assert {r.connection for r in h.runs.runs} == {"alpha", "beta"}
    assert len(h.sinks[0].rows) == 4


def test_an_unexpected_exception_is_reported_without_its_text() -> None:
    h = Harness()
    h.feed.fail_on_call[0] = RuntimeError("password=hunter2")
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.FAILED
    assert "hunter2" not in result.error
    assert "RuntimeError" in result.error


def test_a_run_finding_the_lease_held_is_skipped_and_leaves_the_watermark_alone() -> None:
    h = Harness()
    seed(h.feed, 3)
    h.state.insert(
        SyncStateRow(
            connection="snow",
            item_type="incidents",
            lease_owner="sync:other",
            lease_until=NOW + timedelta(minutes=1),
        )
    )
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SKIPPED
    assert h.feed.cursors == []
    h.clock.now += timedelta(minutes=2)  # the crashed run's lease has expired
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.synced == 3


def test_named_connection_and_types() -> None:
    h = Harness(connection("alpha"), connection("beta"))
    with pytest.raises(NotFoundError):
        h.engine.run("gamma")
    [result] = h.engine.run("alpha", [CHG])
    assert result.outcome is SyncOutcome.SKIPPED
    assert "does not sync change_requests" in result.error
    events: list[SyncProgress] = []
    seed(h.feeds["beta"], 12)
    h.engine.run("beta", [INC], progress=events.append)
    assert [e.synced for e in events] == [10, 12, 12]
    assert events[-1].done
    assert not events[0].done


def test_sync_data_without_incidents_is_not_synced_by_the_timer() -> None:
    h = Harness(connection("alpha", sync_data=[]), connection("beta", sync_data=[SyncData.CHANGE_REQUESTS]))
    results = h.engine.run()
    assert [(r.connection, r.item_type) for r in results] == [("beta", CHG)]


# -- backward sync -------------------------------------------------------------------------------

KEY = "a" * 40
SUB = "00000000-0000-4000-8000-000000000000"
ALERT_1 = f"/subscriptions/{SUB}/providers/Microsoft.AlertsManagement/alerts/1111"
ALERT_2 = f"/subscriptions/{SUB}/providers/Microsoft.AlertsManagement/alerts/2222"


def open_correlation(
    h: Harness,
    generation: int = 2,
    state: CorrelationState = CorrelationState.OPEN,
    last_fired_at: datetime | None = None,
) -> None:
    h.correlations.insert(
        Correlation(
            connection="snow",
            key=KEY,
            key_text="rule|cpu|ci|vm1",
            state=state,
            work_item_id="sys00001",
            work_item_number="INC0000001",
            generation=generation,
            alert_ids=(ALERT_1, ALERT_2, ALERT_1),
            last_fired_at=last_fired_at,
        )
    )


def test_parse_correlation_id() -> None:
    assert parse_correlation_id(f"azmon-{KEY}-g12") == (KEY, 12)
    assert parse_correlation_id("azmon--g1") is None
    assert parse_correlation_id("something else") is None


def test_a_resolved_alert_work_item_closes_each_azure_alert_once_and_updates_its_correlation() -> None:
    h = Harness(connection(close_azure_alerts=True))
    open_correlation(h)
    resolved_at = NOW - timedelta(minutes=3)
    h.feed.add(
        1,
        NOW - timedelta(minutes=2),
        state="Resolved",
        correlation_id=f"azmon-{KEY}-g2",
        resolved_at=resolved_at,
    )
    [result] = h.engine.run()
    assert h.closer.closed == [ALERT_1, ALERT_2]
    assert result.alerts_closed == 2
    assert result.correlations_updated == 1
    row = h.correlations.get("snow", KEY)
    assert row is not None
    assert row.state is CorrelationState.RESOLVED
    assert row.resolved_at == resolved_at
    h.clock.now += timedelta(minutes=1)
    h.engine.run()  # the overlap reads the item again: the row is no longer OPEN, nothing is closed twice
    assert h.closer.closed == [ALERT_1, ALERT_2]


def test_closed_items_of_another_generation_or_a_not_open_row_are_left_alone() -> None:
    h = Harness(connection(close_azure_alerts=True))
    open_correlation(h, generation=3)
    h.feed.add(1, NOW - timedelta(minutes=2), state="Closed", correlation_id=f"azmon-{KEY}-g2")
    h.engine.run()
    row = h.correlations.get("snow", KEY)
    assert row is not None
    assert row.state is CorrelationState.OPEN
    assert h.closer.closed == []


def test_without_close_azure_alerts_the_correlation_learns_the_state_but_no_alert_is_closed() -> None:
    h = Harness(connection(close_azure_alerts=False))
    open_correlation(h)
    h.feed.add(1, NOW - timedelta(minutes=2), state="Closed", correlation_id=f"azmon-{KEY}-g2")
    [result] = h.engine.run()
    row = h.correlations.get("snow", KEY)
    assert row is not None
    assert row.state is CorrelationState.CLOSED
    assert h.closer.closed == []
    assert result.alerts_closed == 0


def test_a_transient_alerts_api_failure_fails_the_page_and_the_next_run_retries() -> None:
    h = Harness(connection(close_azure_alerts=True))
    open_correlation(h)
    h.feed.add(1, NOW - timedelta(minutes=2), state="Resolved", correlation_id=f"azmon-{KEY}-g2")
    h.closer.fail = AlertsApiError("HTTP 503 after 4 attempts", permanent=False, status=503)
    [failed] = h.engine.run()
    assert failed.outcome is SyncOutcome.FAILED
    assert "backward sync failed" in failed.error
    assert h.watermark() is None
    h.closer.fail = None
    [ok] = h.engine.run()
    assert ok.outcome is SyncOutcome.SUCCEEDED
    assert h.closer.closed == [ALERT_1, ALERT_2]


def test_a_permanent_alerts_api_failure_is_logged_and_the_correlation_still_updated() -> None:
    h = Harness(connection(close_azure_alerts=True))
    open_correlation(h)
    h.feed.add(1, NOW - timedelta(minutes=2), state="Resolved", correlation_id=f"azmon-{KEY}-g2")
    h.closer.fail = AlertsApiError("HTTP 403 AuthorizationFailed", permanent=True, status=403)
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert [(r.kind, r.source_id) for r in h.errors.records] == [(SyncErrorKind.BACKSYNC, "sys00001")] * 2
    row = h.correlations.get("snow", KEY)
    assert row is not None
    assert row.state is CorrelationState.RESOLVED


@pytest.mark.parametrize(
    ("item_type", "label", "code", "lifecycle", "expected"),
    [
        (INC, "Gelöst", "6", Lifecycle.RESOLVED, CorrelationState.RESOLVED),  # a German integration user
        (INC, "Fixed", "6", Lifecycle.RESOLVED, CorrelationState.RESOLVED),  # a relabelled choice
        (INC, "Geschlossen", "7", Lifecycle.CLOSED, CorrelationState.CLOSED),
        (INC, "Annulé", "8", Lifecycle.CANCELLED, CorrelationState.CLOSED),
        (INC, "Resolved", "2", Lifecycle.IN_PROGRESS, None),  # the code decides, not the label
        (INC, "Neu", "1", Lifecycle.NEW, None),
        (INC, "Awaiting vendor", "101", Lifecycle.IN_PROGRESS, None),  # a custom state counts as open
        (CHG, "Geschlossen", "3", Lifecycle.CLOSED, CorrelationState.CLOSED),
        (CHG, "Abgebrochen", "4", Lifecycle.CANCELLED, CorrelationState.CLOSED),
        (CHG, "Implementieren", "-1", Lifecycle.IN_PROGRESS, None),
        (INC, "Resolved", "", Lifecycle.RESOLVED, CorrelationState.RESOLVED),  # no raw value: the label
        (INC, "Closed", "", Lifecycle.CLOSED, CorrelationState.CLOSED),
        (INC, "In Progress", "", Lifecycle.IN_PROGRESS, None),
    ],
)
def test_the_servicenow_lifecycle_decides_on_the_raw_state_code_and_back_sync_reads_only_it(
    item_type: WorkItemType,
    label: str,
    code: str,
    lifecycle: Lifecycle,
    expected: CorrelationState | None,
) -> None:
    assert lifecycle_of(item_type, code, label) is lifecycle
    work_item = item("snow", 1, NOW, item_type=item_type, state=label, state_code=code)
    assert work_item.lifecycle is lifecycle
    assert finished_state(work_item) is expected
    # back sync reads the lifecycle, never a product's codes or labels
    assert finished_state(work_item.model_copy(update={"lifecycle": None})) is None
    relabelled = work_item.model_copy(update={"state": "Resolved", "state_code": "6"})
    assert finished_state(relabelled) is expected


def test_an_incident_resolved_for_a_non_english_integration_user_is_back_synced() -> None:
    h = Harness(connection(close_azure_alerts=True))
    open_correlation(h)
    h.feed.add(
        1,
        NOW - timedelta(minutes=2),
        state="Gelöst",
        state_code="6",
        correlation_id=f"azmon-{KEY}-g2",
        resolved_at=NOW - timedelta(minutes=3),
    )
    [result] = h.engine.run()
    assert (result.correlations_updated, result.alerts_closed) == (1, 2)
    assert h.closer.closed == [ALERT_1, ALERT_2]
    row = h.correlations.get("snow", KEY)
    assert row is not None
    assert row.state is CorrelationState.RESOLVED


@pytest.mark.parametrize(
    ("fired", "back_synced"),
    [
        (timedelta(minutes=-20), True),  # the last firing came before the engineer resolved it
        (timedelta(minutes=5), False),  # it fired again after: the snapshot is stale
    ],
)
def test_an_item_resolved_before_its_alert_last_fired_is_not_back_synced(
    fired: timedelta, back_synced: bool, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(connection(close_azure_alerts=True))
    resolved_at = NOW - timedelta(minutes=10)
    open_correlation(h, last_fired_at=resolved_at + fired)
    h.feed.add(
        1,
        NOW - timedelta(minutes=9),
        state="Resolved",
        state_code="6",
        correlation_id=f"azmon-{KEY}-g2",
        resolved_at=resolved_at,
    )
    with caplog.at_level(logging.INFO, logger="shared_code.workitems.backsync"):
        [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    row = h.correlations.get("snow", KEY)
    assert row is not None
    skipped = [r.getMessage() for r in caplog.records if "fired again" in r.getMessage()]
    if back_synced:
        assert row.state is CorrelationState.RESOLVED
        assert h.closer.closed == [ALERT_1, ALERT_2]
        assert skipped == []
    else:
        assert row.state is CorrelationState.OPEN  # the problem is active again
        assert row.resolved_at is None
        assert h.closer.closed == []
        assert (result.correlations_updated, result.alerts_closed) == (0, 0)
        [message] = skipped
        assert "snow INC0000001" in message
        assert "rule|cpu|ci|vm1" in message


# -- Alerts Management client --------------------------------------------------------------------


# -- the CLI command ------------------------------------------------------------------------------


def test_sync_run_shows_progress_on_a_terminal_and_a_summary_and_fails_on_failure() -> None:
    import io
    import types

    from shared_code.cli import sync_run
    from shared_code.errors import InvalidInputError

    h = Harness(connection("alpha"), connection("beta"), page_size=5)
    seed(h.feeds["alpha"], 12)
    h.feeds["beta"].fail_on_call[0] = ItsmAuthError("refresh token expired", status=401)
    container = types.SimpleNamespace(sync_engine=h.engine)
    out = io.StringIO()
    code = sync_run(container, None, None, out, True)  # type: ignore[arg-type]
    text = out.getvalue()
    assert code == 1
    assert "\ralpha incidents: 10 rows in 2 pages" in text
    assert "alpha incidents: succeeded, 12 synced" in text
    assert "beta incidents: failed" in text
    assert "re-authorise this connection" in text
    piped = io.StringIO()
    assert sync_run(container, "alpha", ["incidents"], piped, False) == 0  # type: ignore[arg-type]
    assert "\r" not in piped.getvalue()
    with pytest.raises(InvalidInputError):
        sync_run(container, "alpha", ["problems"], piped, False)  # type: ignore[arg-type]


# -- the run machinery as the engine uses it -----------------------------------------------------


def test_a_connector_whose_cursor_stops_moving_cannot_loop_a_cli_run_for_ever() -> None:
    h = Harness(page_size=5)
    for n in range(1, 21):
        h.feed.add(n, NOW - timedelta(hours=1) + timedelta(minutes=n))
    real_fetch = h.feed.fetch_changes

    def stuck(item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        if len(h.feed.cursors) > 50:  # the test's own bound, so a regression fails instead of hanging
            raise ItsmError("looped 50 times")
        page = real_fetch(item_type, cursor, page_size)
        if len(h.feed.cursors) >= 2:  # from the second page on: the same rows, the same position
            return SyncPage(items=page.items, rejected=page.rejected, next_cursor=cursor, is_last=False)
        return page

    h.feed.fetch_changes = stuck  # type: ignore[method-assign]
    [result] = h.engine.run(trigger="cli")  # no time budget: only the progress check can stop it
    assert result.outcome is SyncOutcome.FAILED
    assert "does not move its cursor forward" in result.error
    assert len(h.feed.cursors) <= 3


def test_the_sync_lease_is_renewed_with_every_committed_page() -> None:
    h = Harness(page_size=5)
    for n in range(1, 21):
        h.feed.add(n, NOW - timedelta(hours=1) + timedelta(minutes=n))
    leases: list[datetime | None] = []

    def slow_write(index: int) -> None:
        h.clock.now += timedelta(minutes=3)  # each page takes longer than half a 5-minute lease
        row = h.state.get("snow", "incidents")
        leases.append(row.lease_until if row else None)

    h.sinks[0].before_write = slow_write
    [result] = h.engine.run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.synced == 20
    # every page found the lease renewed by the previous page's commit: it never lapsed
    renewed = [until for until in leases if until is not None]
    assert len(renewed) == len(leases) == 4
    assert renewed == sorted(renewed)
    assert len(set(renewed)) == len(renewed)
    assert all(
        until > moment
        for until, moment in zip(
            renewed, [NOW + timedelta(minutes=3 * (i + 1)) for i in range(4)], strict=True
        )
    )


def test_a_page_with_the_same_item_twice_keeps_the_newer_version_in_the_table(app: Container) -> None:
    repository = WorkItemRepository(app.tables.table(workitems_table.TABLE))
    old = item("snow", 7, NOW - timedelta(minutes=5), title="before the edit")
    new = item("snow", 7, NOW - timedelta(minutes=1), title="after the edit")
    assert repository.upsert_many([new, old]) == 1  # newer first: order in the page does not matter
    stored = repository.get("snow", INC, old.source_id)
    assert stored is not None
    assert stored.title == "after the edit"
    assert repository.upsert_many([old, new]) == 1
    stored = repository.get("snow", INC, old.source_id)
    assert stored is not None
    assert stored.title == "after the edit"
