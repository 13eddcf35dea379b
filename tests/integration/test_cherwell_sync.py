"""The work-item sync of a Cherwell connection, end to end through the app's engine and entry points.

Each test gets its own loopback Cherwell (its clock an hour behind real time and moved by the test)
next to the session's loopback stack and Azurite; the connection is added with the operator's CLI;
the sync runs through ``container.sync_engine`` and the functions registered in ``function_app.app``.
Faults come only from the edges: the loopback's fault injection, its clock, and a wrapper around the
engine's WorkItems sink that kills the run (or edits Cherwell) between pages.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container
from shared_code.domain.sync import SyncCursor, SyncErrorKind
from shared_code.domain.workitem import Lifecycle, WorkItem, WorkItemType
from shared_code.itsm.cherwell.mapping import parse_datetime
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import syncstate as syncstate_table
from shared_code.state import workitems as workitems_table
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.engine import SyncEngine, SyncOutcome, SyncResult
from shared_code.workitems.sinks import WorkItemSink
from tests.hostsim import FunctionHost
from tests.loopback.cherwell import DEFAULT_CLIENT_ID, DEFAULT_PASSWORD, DEFAULT_USERNAME, CherwellLoopback
from tests.loopback.stack import LoopbackStack

INC, CHG = WorkItemType.INCIDENT, WorkItemType.CHANGE_REQUEST
OBJECT = {INC: "Incident", CHG: "ChangeRequest"}
PUBLIC_ID = {INC: "IncidentID", CHG: "ChangeID"}
TITLE = {INC: "ShortDescription", CHG: "Title"}
PAGE = 10
REAUTHORISE = "re-authorise this connection"

Position = tuple[datetime, str]


class Clock:
    """Cherwell's clock: whole seconds, moved only by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start.replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def when(text: str) -> datetime:
    parsed = parse_datetime(text, "LastModifiedDateTime")
    assert parsed is not None
    return parsed


class World:
    def __init__(
        self, stack: LoopbackStack, app: Container, cherwell: CherwellLoopback, clock: Clock
    ) -> None:
        self.stack = stack
        self.app = app
        self.cherwell = cherwell
        self.clock = clock
        self.host = FunctionHost(function_app.app, stack.queues())
        self.workitems = WorkItemRepository(app.tables.table(workitems_table.TABLE))
        self.sync_state = SyncStateRepository(app.tables.table(syncstate_table.TABLE))
        self.errors_table = SyncErrorRepository(app.tables.table(syncerrors_table.TABLE))

    @property
    def engine(self) -> SyncEngine:
        return self.app.sync_engine

    def connect(self, name: str, *options: str, sync: str = "incidents") -> None:
        code, output = self.stack.cli(
            "connections",
            "add",
            name,
            "--type",
            "cherwell",
            "--url",
            self.cherwell.url,
            "--user",
            DEFAULT_USERNAME,
            "--client-id",
            DEFAULT_CLIENT_ID,
            "--password-env",
            "CW_TEST_PASSWORD",
            "--sync",
            sync,
            "--scope-days",
            "120",
            *options,
        )
        assert code == 0, output

    def seed(self, item_type: WorkItemType, count: int, rng_seed: int = 1) -> list[str]:
        now = self.clock.now
        return self.cherwell.seed_work_items(
            OBJECT[item_type],
            count,
            start=now - timedelta(days=100),
            end=now - timedelta(days=1),
            rng_seed=rng_seed,
        )

    def order(self, item_type: WorkItemType = INC) -> list[dict[str, str]]:
        """The source in feed order: (LastModifiedDateTime, RecID)."""
        records = self.cherwell.records(OBJECT[item_type])
        return sorted(records, key=lambda r: (when(r["LastModifiedDateTime"]), r["RecID"].lower()))

    def expected(
        self, item_type: WorkItemType = INC, exclude: Sequence[str] = ()
    ) -> dict[str, tuple[str, ...]]:
        return {
            r["RecID"]: (
                r[PUBLIC_ID[item_type]],
                when(r["LastModifiedDateTime"]).isoformat(),
                r[TITLE[item_type]],
            )
            for r in self.cherwell.records(OBJECT[item_type])
            if r["RecID"] not in exclude
        }

    def stored(self, connection: str, item_type: WorkItemType = INC) -> dict[str, WorkItem]:
        rows: dict[str, WorkItem] = {}
        for row in self.workitems.list(connection, item_type):
            assert row.source_id not in rows, f"{row.number} is stored twice"
            rows[row.source_id] = row
        return rows

    def assert_synced(
        self, connection: str, item_type: WorkItemType = INC, exclude: Sequence[str] = ()
    ) -> None:
        """The WorkItems table holds every source record once, in its latest version, and no other."""
        expected = self.expected(item_type, exclude)
        assert expected, "the test seeded nothing"
        stored = {
            sid: (row.number, row.updated_at.isoformat(), row.title)
            for sid, row in self.stored(connection, item_type).items()
        }
        assert stored == expected

    def watermark(self, connection: str, item_type: WorkItemType = INC) -> Position | None:
        row = self.sync_state.get(connection, item_type.sync_name)
        assert row is not None
        mark: SyncCursor | None = row.watermark
        return None if mark is None else (mark.updated_at, mark.last_id)


def position(record: dict[str, str]) -> Position:
    return when(record["LastModifiedDateTime"]), record["RecID"]


_prefixes = itertools.count(1)


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    before = httpretry._testing
    httpretry.set_testing(True)
    yield
    httpretry.set_testing(before)


@pytest.fixture
def world(stack: LoopbackStack) -> Iterator[World]:
    clock = Clock(datetime.now(UTC) - timedelta(hours=1))
    prefix = f"cws{os.getpid() % 100000}x{next(_prefixes)}"
    with (
        CherwellLoopback(clock=clock) as cherwell,
        stack.app(TABLE_PREFIX=prefix, SYNC_PAGE_SIZE=str(PAGE), CW_TEST_PASSWORD=DEFAULT_PASSWORD) as app,
    ):
        built = World(stack, app, cherwell, clock)
        try:
            yield built
        finally:
            built.workitems.close()


class HookedSink:
    """The WorkItems sink with ``hook(write_index, items)`` run before each write."""

    def __init__(self, inner: WorkItemSink, hook: Callable[[int, Sequence[WorkItem]], None]) -> None:
        self.name = inner.name
        self.inner = inner
        self.hook = hook
        self.writes = 0

    def write(self, items: Sequence[WorkItem]) -> None:
        if items:
            index, self.writes = self.writes, self.writes + 1
            self.hook(index, items)
        self.inner.write(items)


@contextlib.contextmanager
def hooked(engine: SyncEngine, hook: Callable[[int, Sequence[WorkItem]], None]) -> Iterator[HookedSink]:
    sinks: list[WorkItemSink] = engine._sinks
    [index] = [n for n, sink in enumerate(sinks) if sink.name == "table"]
    original = sinks[index]
    wrapper = HookedSink(original, hook)
    sinks[index] = wrapper
    try:
        yield wrapper
    finally:
        sinks[index] = original


class HostRecycled(RuntimeError):
    """Stands for the process dying in the middle of a run."""


def one(results: list[SyncResult], item_type: WorkItemType = INC) -> SyncResult:
    [result] = [r for r in results if r.item_type is item_type]
    return result


@pytest.mark.parametrize("killed_at", [0, 3])
def test_a_run_killed_after_k_pages_then_rerun_leaves_the_table_equal_to_the_source(
    world: World, killed_at: int
) -> None:
    world.connect("cw-kill")
    world.seed(INC, 64, rng_seed=10 + killed_at)
    order = world.order()

    def kill(index: int, items: Sequence[WorkItem]) -> None:
        if index == killed_at:
            raise HostRecycled(f"killed while writing page {index}")

    with hooked(world.engine, kill):
        killed = one(world.engine.run("cw-kill"))

    assert killed.outcome is SyncOutcome.FAILED
    assert "HostRecycled" in killed.error
    assert (killed.pages, killed.synced) == (killed_at, killed_at * PAGE)
    committed = order[: killed_at * PAGE]
    assert world.watermark("cw-kill") == (position(committed[-1]) if committed else None)
    assert set(world.stored("cw-kill")) == {r["RecID"] for r in committed}

    world.host.timer("sync_work_items")  # the next timer run resumes from the watermark

    world.assert_synced("cw-kill")
    assert world.watermark("cw-kill") == position(order[-1])


def test_records_edited_and_created_while_a_run_pages_through_are_all_there_in_their_latest_version(
    world: World,
) -> None:
    world.connect("cw-paging")
    world.seed(INC, 52, rng_seed=31)
    order = world.order()
    behind, ahead = order[0]["RecID"], order[-1]["RecID"]
    created: list[str] = []

    def edit_between_pages(index: int, items: Sequence[WorkItem]) -> None:
        if index == 2:
            world.clock.advance(seconds=1)
            world.cherwell.update_record("Incident", behind, ShortDescription="edited behind the run")
            world.cherwell.update_record("Incident", ahead, ShortDescription="edited ahead of the run")
            record = world.cherwell.insert_record(
                "Incident", ShortDescription="opened mid-run", Description="new", Impact="Low", Urgency="Low"
            )
            created.append(record["RecID"])

    with hooked(world.engine, edit_between_pages) as sink:
        result = one(world.engine.run("cw-paging"))

    assert result.outcome is SyncOutcome.SUCCEEDED, result.error
    assert sink.writes >= 6
    world.assert_synced("cw-paging")
    stored = world.stored("cw-paging")
    assert stored[behind].title == "edited behind the run"
    assert stored[ahead].title == "edited ahead of the run"
    assert stored[created[0]].title == "opened mid-run"
    assert world.watermark("cw-paging") == position(world.order()[-1])


def test_change_requests_and_incidents_sync_side_by_side_with_their_lifecycles(world: World) -> None:
    world.connect("cw-both", sync="incidents,change_requests")
    world.seed(INC, 23, rng_seed=40)
    world.seed(CHG, 17, rng_seed=41)

    results = world.engine.run("cw-both")

    assert {r.outcome for r in results} == {SyncOutcome.SUCCEEDED}
    world.assert_synced("cw-both", INC)
    world.assert_synced("cw-both", CHG)
    changes = world.stored("cw-both", CHG)
    by_status = {row.state: row.lifecycle for row in changes.values()}
    assert by_status.get("Closed", Lifecycle.CLOSED) is Lifecycle.CLOSED
    assert all(row.lifecycle is not None for row in changes.values())
    assert all(row.change_type in ("Normal", "Standard", "Emergency") for row in changes.values())


def test_a_record_with_missing_fields_is_logged_by_id_and_a_sites_own_status_is_kept_raw(
    world: World,
) -> None:
    world.connect("cw-bad")
    world.seed(INC, 25, rng_seed=50)
    world.cherwell.set_statuses("Incident", ("New", "In Progress", "Awaiting Vendor", "Resolved", "Closed"))
    custom = world.cherwell.insert_record(
        "Incident", ShortDescription="vendor case", Description="x", Status="Awaiting Vendor"
    )["RecID"]
    broken: list[str] = []

    def drop_modified(records: list[dict[str, object]]) -> None:
        victim = records[4]  # inside the page: the records around it still say where the page ends
        broken.append(str(victim["busObRecId"]))
        fields = victim["fields"]
        assert isinstance(fields, list)
        victim["fields"] = [f for f in fields if f["name"] != "LastModifiedDateTime"]

    world.cherwell.mangle_search(drop_modified)

    result = one(world.engine.run("cw-bad"))

    assert result.outcome is SyncOutcome.SUCCEEDED, result.error
    assert result.rejected == 1
    [error] = [e for e in world.errors_table.list("cw-bad") if e.kind is SyncErrorKind.REJECTED_ROW]
    assert (error.source_id, error.message) == (broken[0], "LastModifiedDateTime: missing")
    world.assert_synced("cw-bad", exclude=broken)
    row = world.stored("cw-bad")[custom]
    assert (row.state, row.state_code, row.lifecycle) == ("Awaiting Vendor", "Awaiting Vendor", None)


def test_an_expired_access_token_mid_run_is_renewed_and_the_run_completes(world: World) -> None:
    world.connect("cw-token")
    world.seed(INC, 35, rng_seed=60)

    def expire(index: int, items: Sequence[WorkItem]) -> None:
        if index == 1:
            world.cherwell.expire_access_tokens()

    with hooked(world.engine, expire):
        result = one(world.engine.run("cw-token"))

    assert result.outcome is SyncOutcome.SUCCEEDED, result.error
    assert world.cherwell.token_grants() == ["password", "refresh_token"]
    world.assert_synced("cw-token")


def test_refused_credentials_mid_run_ask_to_reauthorise_and_after_reauthorise_the_rest_comes_once(
    world: World,
) -> None:
    world.connect("cw-auth")
    world.seed(INC, 47, rng_seed=70)

    def lock_out(index: int, items: Sequence[WorkItem]) -> None:
        if index == 2:
            world.cherwell.revoke_refresh_tokens()
            world.cherwell.expire_access_tokens()
            world.cherwell.add_user(DEFAULT_USERNAME, "changed-by-the-cherwell-admin")

    with hooked(world.engine, lock_out):
        failed = one(world.engine.run("cw-auth"))

    assert failed.outcome is SyncOutcome.FAILED
    assert REAUTHORISE in failed.error
    assert "invalid_grant" in failed.error
    assert [e.kind for e in world.errors_table.list("cw-auth")] == [SyncErrorKind.REAUTHORISE]
    # pages 0-2 were committed; page 3 is fetched while page 2 is written (the prefetch), so it may
    # have been read with the old token before the lock-out and committed too, but nothing after it
    assert len(world.stored("cw-auth")) in (3 * PAGE, 4 * PAGE)

    code, output = world.stack.cli(
        "connections",
        "reauthorise",
        "cw-auth",
        "--secrets-stdin",
        "--test",
        stdin="changed-by-the-cherwell-admin\n",
    )
    assert code == 0, output
    resumed = one(world.engine.run("cw-auth"))

    assert resumed.outcome is SyncOutcome.SUCCEEDED, resumed.error
    world.assert_synced("cw-auth")


def test_html_instead_of_json_fails_the_run_clearly_and_the_next_run_fills_the_gap_without_doubles(
    world: World,
) -> None:
    world.connect("cw-html")
    world.seed(INC, 44, rng_seed=80)

    def sign_in_page(index: int, items: Sequence[WorkItem]) -> None:
        if index == 1:
            world.cherwell.fail_next(1, 200, path_contains="getsearchresults", kind="html")

    with hooked(world.engine, sign_in_page):
        failed = one(world.engine.run("cw-html"))

    assert failed.outcome is SyncOutcome.FAILED
    assert "answered HTTP 200 with text/html, not JSON" in failed.error
    [error] = [e for e in world.errors_table.list("cw-html") if e.kind is SyncErrorKind.ITSM]
    assert "text/html" in error.message
    # pages 0-1 were committed; page 2 is fetched while page 1 is written (the prefetch), so it may
    # have been read before the sign-in page was armed and committed too, but nothing after it
    assert len(world.stored("cw-html")) in (2 * PAGE, 3 * PAGE)

    code, output = world.stack.cli("sync", "run", "--connection", "cw-html")

    assert code == 0, output
    world.assert_synced("cw-html")
