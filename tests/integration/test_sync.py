"""Work-item sync end to end, through the app's own entry points and real clients, all on loopback.

Each test gets its own loopback ServiceNow (with a clock the test moves by hand) and its own Entra
ID, Key Vault, Logs Ingestion and Alerts Management servers over the session's Azurite, so "the
synced set equals the source" compares against exactly what the test put into ServiceNow. The app
is the real container (``stack.app()``); connections are added with the real CLI; the sync runs
through ``container.sync_engine``, the ``sync_work_items`` timer and ``sync_connection`` HTTP
functions registered in ``function_app.app``, and ``python -m shared_code sync run``.

Faults are injected at the edges only: the loopback servers' ``fail_next``, ServiceNow's clock,
and a wrapper around one of the engine's sinks that raises (a run killed after k pages) or edits
ServiceNow between pages. Nothing of the app is replaced.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.runs import RunRecord, SyncStateRow
from shared_code.domain.sync import SyncCursor, SyncErrorKind, SyncErrorRecord
from shared_code.domain.workitem import WorkItem, WorkItemType
from shared_code.itsm.servicenow.mapping import SYNC_FIELDS
from shared_code.state import runs as runs_table
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import syncstate as syncstate_table
from shared_code.state import workitems as workitems_table
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.engine import SyncEngine, SyncOutcome, SyncResult
from shared_code.workitems.sinks import WorkItemSink
from tests.hostsim import FunctionHost, HttpCall
from tests.loopback import servicenow as servicenow_loopback
from tests.loopback.azurite import Azurite
from tests.loopback.servicenow import TS, Record, ServiceNowLoopback
from tests.loopback.stack import LOGS_ERROR_STREAM, LOGS_STREAM, LoopbackStack

INC = WorkItemType.INCIDENT
CHG = WorkItemType.CHANGE_REQUEST
TABLE_OF = {INC: "incident", CHG: "change_request"}
PAGE = 10  # SYNC_PAGE_SIZE: the smallest the settings allow, so a few dozen rows make many pages
OVERLAP = 120  # SYNC_OVERLAP_SECONDS
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
REAUTHORISE = "re-authorise this connection"

Position = tuple[datetime, str]
KEYSET_AFTER = re.compile(
    r"sys_updated_on>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\^ORDERBYsys_updated_on\^ORDERBYsys_id"
)
KEYSET_DRAIN = re.compile(
    r"sys_updated_on=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\^sys_id>[0-9a-f]{32}\^ORDERBYsys_id"
)


# -- the world of one test -------------------------------------------------------------------------


class Clock:
    """ServiceNow's clock: whole seconds, moved only by the test."""

    def __init__(self, start: datetime) -> None:
        self.now = start.replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, TS).replace(tzinfo=UTC)


def position(rec: Record) -> Position:
    return parse_ts(rec["sys_updated_on"]), rec["sys_id"]


def cursor_position(cursor: SyncCursor | None) -> Position | None:
    return None if cursor is None else (cursor.updated_at, cursor.last_id)


class World:
    """One test's stack, app container, ServiceNow clock and views of every store."""

    def __init__(self, stack: LoopbackStack, app: Container, clock: Clock) -> None:
        self.stack = stack
        self.app = app
        self.clock = clock
        self.snow = stack.servicenow
        self.host = FunctionHost(function_app.app, stack.queues())
        tables = app.tables
        self.workitems = WorkItemRepository(tables.table(workitems_table.TABLE))
        self.sync_state = SyncStateRepository(tables.table(syncstate_table.TABLE))
        self.runs_table = RunRepository(tables.table(runs_table.TABLE))
        self.errors_table = SyncErrorRepository(tables.table(syncerrors_table.TABLE))

    @property
    def engine(self) -> SyncEngine:
        return self.app.sync_engine

    def connect(self, name: str, *options: str, sync: str = "incidents,change_requests") -> None:
        self.stack.add_servicenow_connection(name, "--sync", sync, "--scope-days", "120", *options)

    # -- ServiceNow (the source) ---------------------------------------------------------------

    def seed(self, table: str, count: int, *, rng_seed: int = 1) -> list[str]:
        """``count`` rows updated between 100 days and 1 day before ServiceNow's now (some share a
        second: bulk edits come in bursts), all inside the 120-day sync scope."""
        now = self.clock.now
        return self.snow.seed_work_items(
            table, count, start=now - timedelta(days=100), end=now - timedelta(days=1), rng_seed=rng_seed
        )

    def source(self, item_type: WorkItemType) -> dict[str, Record]:
        return {rec["sys_id"]: rec for rec in self.snow.records(TABLE_OF[item_type])}

    def order(self, item_type: WorkItemType) -> list[Record]:
        """The source in feed order: (sys_updated_on, sys_id)."""
        return sorted(self.source(item_type).values(), key=position)

    def expected(self, item_type: WorkItemType, exclude: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
        """What every synced copy of the source must say: number, last update and title."""
        return {
            sys_id: (rec["number"], parse_ts(rec["sys_updated_on"]).isoformat(), rec["short_description"])
            for sys_id, rec in self.source(item_type).items()
            if sys_id not in exclude
        }

    # -- the sinks -----------------------------------------------------------------------------

    def stored(self, connection: str, item_type: WorkItemType = INC) -> dict[str, WorkItem]:
        rows: dict[str, WorkItem] = {}
        for row in self.workitems.list(connection, item_type):
            assert row.source_id not in rows, f"{row.number} is stored twice"
            rows[row.source_id] = row
        return rows

    def stored_view(self, connection: str, item_type: WorkItemType = INC) -> dict[str, tuple[str, ...]]:
        return {
            sys_id: (row.number, row.updated_at.isoformat(), row.title)
            for sys_id, row in self.stored(connection, item_type).items()
        }

    def ingested(self, connection: str, item_type: WorkItemType = INC) -> list[dict[str, Any]]:
        """The ServiceDesk_CL records the Logs Ingestion endpoint received, in arrival order."""
        return [
            r
            for r in self.stack.logs.records(LOGS_STREAM)
            if r["ServiceDeskConnectionName_s"] == connection and r["ServiceDeskWorkItemType_s"] == item_type
        ]

    def latest_ingested(self, connection: str, item_type: WorkItemType = INC) -> dict[str, dict[str, Any]]:
        """``arg_max(LastModifiedDate_t, *) by ServiceDeskSysId_s``: what a workbook query reads."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self.ingested(connection, item_type):
            seen = latest.get(record["ServiceDeskSysId_s"])
            if seen is None or record["LastModifiedDate_t"] >= seen["LastModifiedDate_t"]:
                latest[record["ServiceDeskSysId_s"]] = record
        return latest

    def ingested_view(self, connection: str, item_type: WorkItemType = INC) -> dict[str, tuple[str, ...]]:
        return {
            sys_id: (r["ServiceDeskId_s"], r["LastModifiedDate_t"], r["Title_s"])
            for sys_id, r in self.latest_ingested(connection, item_type).items()
        }

    def error_records(self, connection: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.stack.logs.records(LOGS_ERROR_STREAM)
            if r["ServiceDeskConnectionName_s"] == connection
        ]

    def state(self, connection: str, item_type: WorkItemType = INC) -> SyncStateRow:
        row = self.sync_state.get(connection, item_type.sync_name)
        assert row is not None, f"no SyncState row for {connection} {item_type.sync_name}"
        return row

    def runs(self, connection: str) -> list[RunRecord]:
        return list(self.runs_table.list(connection=connection))

    def errors(self, connection: str) -> list[SyncErrorRecord]:
        return list(self.errors_table.list(connection))

    # -- checks --------------------------------------------------------------------------------

    def assert_synced(
        self, connection: str, item_type: WorkItemType = INC, exclude: Sequence[str] = ()
    ) -> None:
        """WorkItems and Log Analytics hold every source row once, in its latest version."""
        expected = self.expected(item_type, exclude)
        assert expected, "the test seeded nothing"
        assert self.stored_view(connection, item_type) == expected
        assert self.ingested_view(connection, item_type) == expected

    def resent(self, connection: str, item_type: WorkItemType = INC) -> int:
        """How many ServiceDesk_CL records repeat a work item already sent (Log Analytics appends)."""
        sent = Counter(r["ServiceDeskSysId_s"] for r in self.ingested(connection, item_type))
        return sum(count - 1 for count in sent.values())

    def overlap_behind(self, mark: Position | None, item_type: WorkItemType = INC) -> int:
        """Rows a run resuming from ``mark`` reads again: those in the overlap just behind it."""
        if mark is None:
            return 0
        since = mark[0] - timedelta(seconds=OVERLAP)
        return sum(1 for rec in self.order(item_type) if since < position(rec)[0] and position(rec) <= mark)

    def assert_no_gap_below_watermark(self, connection: str, item_type: WorkItemType = INC) -> None:
        """Every source row the watermark has passed is stored, in at least the version it passed."""
        mark = cursor_position(self.state(connection, item_type).watermark)
        stored = self.stored(connection, item_type)
        passed = [rec for rec in self.order(item_type) if mark is not None and position(rec) <= mark]
        missing = [rec["number"] for rec in passed if rec["sys_id"] not in stored]
        assert not missing, f"the watermark {mark} passed rows that are not stored: {missing}"


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    """Backoff sleeps are no-ops unless a test turns them back on (then it restores this)."""
    before = httpretry._testing
    httpretry.set_testing(True)
    yield
    httpretry.set_testing(before)


_prefixes = itertools.count(1)


@pytest.fixture
def world(azurite: Azurite) -> Iterator[World]:
    """A ServiceNow of this test's own (clock one hour behind real time, so everything it stamps
    is in the past for the app), the other loopback services, and the app pointed at them."""
    clock = Clock(datetime.now(UTC) - timedelta(hours=1))
    snow = ServiceNowLoopback(rotate_refresh_tokens=True, clock=clock).start()
    prefix = f"s{os.getpid() % 100000}x{next(_prefixes)}"
    try:
        with (
            LoopbackStack(azurite=azurite, servicenow=snow) as stack,
            stack.app(
                TABLE_PREFIX=prefix, SYNC_PAGE_SIZE=str(PAGE), SYNC_OVERLAP_SECONDS=str(OVERLAP)
            ) as app,
        ):
            queues = stack.queues()
            for queue in queues.list_queues():
                queues.get_queue_client(queue.name).clear_messages()
            world = World(stack, app, clock)
            try:
                yield world
            finally:
                world.workitems.close()
    finally:
        snow.stop()


# -- entry points and fault injection --------------------------------------------------------------


def post_sync(world: World, connection: str, query: str = "") -> HttpCall:
    """``POST /api/sync/{connection}[?query]`` to the registered function, with the query string in
    ``req.params`` as the Functions host puts it there."""
    url = f"http://localhost/api/sync/{connection}" + (f"?{query}" if query else "")
    request = func.HttpRequest(
        "POST",
        url,
        headers={},
        params=dict(parse_qsl(urlsplit(url).query)),
        route_params={"connection": connection},
        body=b"",
    )
    return HttpCall(world.host.user_function("sync_connection")(request))


class HookedSink:
    """One of the engine's sinks with ``hook(write_index, items)`` run before each write of items of
    ``item_type``: raise to kill the run there, or change the world between pages."""

    def __init__(
        self, inner: WorkItemSink, item_type: WorkItemType, hook: Callable[[int, Sequence[WorkItem]], None]
    ) -> None:
        self.name = inner.name
        self.inner = inner
        self.item_type = item_type
        self.hook = hook
        self.writes = 0

    def write(self, items: Sequence[WorkItem]) -> None:
        if items and items[0].item_type is self.item_type:
            index = self.writes
            self.writes += 1
            self.hook(index, items)
        self.inner.write(items)


@contextlib.contextmanager
def hooked(
    engine: SyncEngine,
    sink_name: str,
    hook: Callable[[int, Sequence[WorkItem]], None],
    item_type: WorkItemType = INC,
) -> Iterator[HookedSink]:
    """Wrap the engine's sink named ``sink_name`` ("table" or "log_analytics") while in the block."""
    sinks: list[WorkItemSink] = engine._sinks
    [index] = [n for n, sink in enumerate(sinks) if sink.name == sink_name]
    original = sinks[index]
    wrapper = HookedSink(original, item_type, hook)
    sinks[index] = wrapper
    try:
        yield wrapper
    finally:
        sinks[index] = original


class HostRecycled(RuntimeError):
    """Stands for the process dying in the middle of a run."""


def kill_at(page: int) -> Callable[[int, Sequence[WorkItem]], None]:
    def hook(index: int, items: Sequence[WorkItem]) -> None:
        if index == page:
            raise HostRecycled(f"killed while writing page {page}")

    return hook


def one(results: list[SyncResult], item_type: WorkItemType = INC) -> SyncResult:
    [result] = [r for r in results if r.item_type is item_type]
    return result


def alert_payload(alert_id: str | None = None) -> bytes:
    payload = json.loads((FIXTURES / "metric_fired.json").read_text())
    if alert_id is not None:
        payload["data"]["essentials"]["alertId"] = alert_id
    return json.dumps(payload).encode()


def post_alert(world: World, connection: str, body: bytes) -> None:
    call = world.host.http(
        "receive_alert",
        "POST",
        f"http://localhost/api/alerts/{connection}",
        body=body,
        headers={"Content-Type": "application/json"},
        route_params={"connection": connection},
    )
    assert call.status == 202, call.json()


def alert_id_of(body: bytes) -> str:
    return str(json.loads(body)["data"]["essentials"]["alertId"])


def correlation_of(world: World, connection: str) -> Correlation:
    [row] = list(world.app.correlations.list(connection))
    return row


def resolve_incident(world: World, sys_id: str) -> Record:
    world.clock.advance(minutes=5)
    return world.snow.update_record(
        "incident", sys_id, state="6", close_code="Solved (Permanently)", close_notes="Fixed by the on-call."
    )


# -- first sync, column contract, entry points ------------------------------------------------------


def test_first_sync_over_http_stores_incidents_and_change_requests_with_their_service_desk_columns(
    world: World,
) -> None:
    world.connect("sn-cols")
    world.seed("incident", 24, rng_seed=3)
    world.seed("change_request", 17, rng_seed=4)
    world.clock.advance(minutes=1)
    beth = world.snow.find("sys_user", name="Beth Anglin")[0]["sys_id"]
    change = world.snow.insert_record(
        "change_request",
        short_description="Rotate TLS certificate on web-001",
        type="emergency",
        risk="2",
        state="-2",
        category="Network",
        assigned_to="beth.anglin",  # the Table API resolves a reference by user name
        cmdb_ci="web-001",
        requested_by_date="2026-12-01 08:00:00",
        start_date="2026-12-02 22:00:00",
        end_date="2026-12-03 01:00:00",
        work_start="2026-12-02 22:05:00",
        work_end="2026-12-03 00:40:00",
    )
    incident = world.snow.insert_record(
        "incident",
        short_description="Disk full on web-001",
        impact="1",
        urgency="1",
        assigned_to=beth,
        cmdb_ci="web-001",
        category="hardware",
    )
    resolved = resolve_incident(world, incident["sys_id"])
    world.snow.reset_request_log()

    call = post_sync(world, "sn-cols")

    assert call.status == 200, call.json()
    body = call.json()
    assert body["connection"] == "sn-cols"
    results = {r["type"]: r for r in body["results"]}
    assert set(results) == {"incidents", "change_requests"}
    assert results["incidents"]["outcome"] == "succeeded"
    assert results["incidents"]["counts"]["synced"] == 25
    assert results["change_requests"]["outcome"] == "succeeded"
    assert results["change_requests"]["counts"]["synced"] == 18
    world.assert_synced("sn-cols", INC)
    world.assert_synced("sn-cols", CHG)

    chg = world.latest_ingested("sn-cols", CHG)[change["sys_id"]]
    assert chg["ServiceDeskWorkItemType_s"] == "ChangeRequest"
    assert chg["ServiceDeskId_s"] == change["number"]
    assert chg["CRState_s"] == "Scheduled"
    assert chg["Type_s"] == "Emergency"
    assert chg["Risk_s"] == "High"
    assert chg["Category_s"] == "Network"
    assert chg["AssignedTo_s"] == "Beth Anglin"  # the display value, not the sys_user sys_id
    assert chg["Computer"] == "web-001"  # the CI's name, not its sys_id
    assert chg["RequestedDate_t"] == "2026-12-01T08:00:00+00:00"
    assert chg["PlannedStartDate_t"] == "2026-12-02T22:00:00+00:00"
    assert chg["PlannedEndDate_t"] == "2026-12-03T01:00:00+00:00"
    assert chg["WorkStartDate_t"] == "2026-12-02T22:05:00+00:00"
    assert chg["WorkEndDate_t"] == "2026-12-03T00:40:00+00:00"
    assert "IncidentState_s" not in chg

    inc = world.latest_ingested("sn-cols", INC)[incident["sys_id"]]
    assert inc["ServiceDeskWorkItemType_s"] == "Incident"
    assert inc["IncidentState_s"] == "Resolved"
    assert inc["Priority_s"] == "1 - Critical"
    assert inc["Urgency_s"] == "1 - High"
    assert inc["ResolvedBy_s"] == "System Administrator"
    assert inc["ResolvedDate_t"] == parse_ts(resolved["resolved_at"]).isoformat()
    assert inc["AssignedTo_s"] == "Beth Anglin"
    assert inc["Computer"] == "web-001"
    assert "CRState_s" not in inc

    stored_change = world.stored("sn-cols", CHG)[change["sys_id"]]
    assert (stored_change.change_type, stored_change.risk, stored_change.assigned_to) == (
        "Emergency",
        "High",
        "Beth Anglin",
    )
    # keyset paging, only the needed fields, raw and display values
    lists = [(path, q) for method, path, q in world.snow.requests if method == "GET" and "/table/" in path]
    incident_lists = [q for path, q in lists if path.endswith("/incident")]
    assert len(incident_lists) >= 3
    for query in incident_lists:
        assert query["sysparm_fields"] == ",".join(SYNC_FIELDS[INC])
        assert query["sysparm_display_value"] == "all"
        assert 1 <= int(query["sysparm_limit"]) <= PAGE
        assert "sysparm_offset" not in query
        assert KEYSET_AFTER.fullmatch(query["sysparm_query"]) or KEYSET_DRAIN.fullmatch(
            query["sysparm_query"]
        ), query["sysparm_query"]

    runs = {run.item_type: run for run in world.runs("sn-cols")}
    assert runs["incidents"].outcome == "succeeded"
    assert runs["incidents"].trigger == "http"
    assert runs["incidents"].counts["synced"] == 25
    assert runs["change_requests"].counts["synced"] == 18


def test_the_first_run_reads_back_only_as_far_as_the_connections_sync_scope(world: World) -> None:
    world.connect("sn-scope", "--scope-days", "30", sync="incidents")
    world.seed("incident", 40, rng_seed=2)
    world.snow.reset_request_log()

    earliest = datetime.now(UTC) - timedelta(days=30)
    result = one(world.engine.run("sn-scope"))
    latest = datetime.now(UTC) - timedelta(days=30)

    assert result.outcome is SyncOutcome.SUCCEEDED
    stored = set(world.stored("sn-scope"))
    inside = {r["sys_id"] for r in world.order(INC) if position(r)[0] > latest}
    maybe = {r["sys_id"] for r in world.order(INC) if position(r)[0] > earliest - timedelta(seconds=1)}
    assert inside <= stored <= maybe
    assert 0 < len(stored) < 40  # the seed spans 100 days: some rows are older than the scope
    first = next(q for m, p, q in world.snow.requests if m == "GET" and p.endswith("/incident"))
    since = parse_ts(first["sysparm_query"].split("^")[0].removeprefix("sys_updated_on>"))
    assert earliest - timedelta(seconds=1) <= since <= latest


def test_the_timer_syncs_every_connection_that_syncs_work_items_and_no_other(world: World) -> None:
    world.connect("sn-both")
    world.connect("sn-inc", sync="incidents")
    world.connect("sn-off", sync="none")
    world.seed("incident", 21, rng_seed=5)
    world.seed("change_request", 12, rng_seed=6)

    world.host.timer("sync_work_items")

    world.assert_synced("sn-both", INC)
    world.assert_synced("sn-both", CHG)
    world.assert_synced("sn-inc", INC)
    assert world.stored("sn-inc", CHG) == {}
    assert world.ingested("sn-inc", CHG) == []
    assert world.stored("sn-off", INC) == {}
    assert world.runs("sn-off") == []
    assert sorted((r.item_type, r.outcome, r.trigger) for r in world.runs("sn-both")) == [
        ("change_requests", "succeeded", "timer"),
        ("incidents", "succeeded", "timer"),
    ]
    assert [(r.item_type, r.outcome) for r in world.runs("sn-inc")] == [("incidents", "succeeded")]


def test_the_cli_syncs_one_connection_and_type_and_reports_it(world: World) -> None:
    world.connect("sn-cli")
    world.seed("incident", 23, rng_seed=7)
    world.seed("change_request", 8, rng_seed=8)

    code, output = world.stack.cli("sync", "run", "--connection", "sn-cli", "--type", "incidents")

    assert code == 0, output
    assert "sn-cli incidents: succeeded, 23 synced, 0 skipped rows, 3 pages" in output
    assert "change_requests" not in output
    world.assert_synced("sn-cli", INC)
    assert world.stored("sn-cli", CHG) == {}

    code, output = world.stack.cli("sync", "run", "--connection", "sn-nope")
    assert code == 1
    assert "sn-nope" in output
    assert [(r.item_type, r.trigger) for r in world.runs("sn-cli")] == [("incidents", "cli")]


def test_http_sync_answers_404_for_an_unknown_connection_400_for_a_bad_type_and_filters_by_type(
    world: World,
) -> None:
    world.connect("sn-http", sync="incidents")
    world.seed("incident", 12, rng_seed=9)

    unknown = post_sync(world, "sn-missing")
    assert unknown.status == 404
    assert "sn-missing" in unknown.json()["error"]["message"]
    malformed = post_sync(world, "..%2F..")
    assert malformed.status == 404
    bad_type = post_sync(world, "sn-http", "type=tickets")
    assert bad_type.status == 400
    assert "incidents or change_requests" in bad_type.json()["error"]["message"]
    assert world.runs("sn-http") == []  # nothing ran for the rejected calls

    not_synced = post_sync(world, "sn-http", "type=change_requests")
    assert not_synced.status == 200
    [result] = not_synced.json()["results"]
    assert (result["type"], result["outcome"]) == ("change_requests", "skipped")
    assert "does not sync change_requests" in result["error"]

    ok = post_sync(world, "sn-http", "type=incidents")
    assert ok.status == 200
    [result] = ok.json()["results"]
    assert (result["type"], result["outcome"], result["counts"]["synced"]) == ("incidents", "succeeded", 12)
    newest = world.order(INC)[-1]
    assert result["watermark"]["last_id"] == newest["sys_id"]
    world.assert_synced("sn-http", INC)


# -- kill and resume, outages -----------------------------------------------------------------------


@pytest.mark.parametrize("killed_at", [0, 3])
def test_a_run_killed_after_k_pages_then_rerun_leaves_no_gap_and_no_duplicate(
    world: World, killed_at: int
) -> None:
    world.connect("sn-kill", sync="incidents")
    world.seed("incident", 64, rng_seed=10 + killed_at)
    order = world.order(INC)

    with hooked(world.engine, "table", kill_at(killed_at)):
        killed = one(world.engine.run("sn-kill"))

    assert killed.outcome is SyncOutcome.FAILED
    assert "HostRecycled" in killed.error
    assert (killed.pages, killed.synced) == (killed_at, killed_at * PAGE)
    committed = order[: killed_at * PAGE]
    state = world.state("sn-kill")
    assert cursor_position(state.watermark) == (position(committed[-1]) if committed else None)
    assert set(world.stored("sn-kill")) == {rec["sys_id"] for rec in committed}
    world.assert_no_gap_below_watermark("sn-kill")
    [run] = world.runs("sn-kill")
    assert (run.outcome, run.counts["synced"]) == ("failed", killed_at * PAGE)

    # a host that dies keeps the lease until it expires: the next run waits, then takes over
    owner = "sync:dead-host"
    world.sync_state.replace(
        state.model_copy(
            update={"lease_owner": owner, "lease_until": datetime.now(UTC) + timedelta(minutes=5)}
        )
    )
    busy = post_sync(world, "sn-kill")
    assert busy.status == 200
    [skipped] = busy.json()["results"]
    assert skipped["outcome"] == "skipped"
    assert "another sync" in skipped["error"]
    held = world.state("sn-kill")
    world.sync_state.replace(
        held.model_copy(update={"lease_until": datetime.now(UTC) - timedelta(seconds=1)})
    )

    world.host.timer("sync_work_items")

    resumed = world.runs("sn-kill")[0]
    assert resumed.outcome == "succeeded"
    world.assert_synced("sn-kill")
    assert cursor_position(world.state("sn-kill").watermark) == position(order[-1])
    # Log Analytics is append-only: what was sent again is the overlap behind the watermark and at
    # most the page that died (its Log Analytics write may have finished), never the whole feed
    assert world.resent("sn-kill") <= world.overlap_behind(cursor_position(state.watermark)) + PAGE
    assert world.state("sn-kill").lease_owner == ""


def test_a_run_asked_for_while_another_pages_the_same_connection_is_skipped_not_interleaved(
    world: World,
) -> None:
    world.connect("sn-busy", sync="incidents")
    world.seed("incident", 35, rng_seed=15)
    answers: list[HttpCall] = []

    def ask_again(index: int, items: Sequence[WorkItem]) -> None:
        if index == 1:  # the timer's run holds the lease and is half-way through
            answers.append(post_sync(world, "sn-busy"))

    with hooked(world.engine, "table", ask_again):
        world.host.timer("sync_work_items")

    [busy] = answers
    assert busy.status == 200
    [skipped] = busy.json()["results"]
    assert (skipped["outcome"], skipped["counts"]["synced"]) == ("skipped", 0)
    assert "another sync of sn-busy incidents is running" in skipped["error"]
    assert sorted((r.trigger, r.outcome) for r in world.runs("sn-busy")) == [
        ("http", "skipped"),
        ("timer", "succeeded"),
    ]
    world.assert_synced("sn-busy")
    assert world.resent("sn-busy") == 0


def test_an_itsm_outage_mid_run_fails_the_run_cleanly_and_the_next_run_fills_the_gap(world: World) -> None:
    world.connect("sn-outage", sync="incidents")
    world.seed("incident", 57, rng_seed=20)

    def outage(index: int, items: Sequence[WorkItem]) -> None:
        if index == 1:  # ServiceNow goes down for longer than the retry budget (4 attempts)
            world.snow.fail_next(4, 503)

    with hooked(world.engine, "table", outage):
        call = post_sync(world, "sn-outage")

    assert call.status == 502
    body = call.json()
    [result] = body["results"]
    assert result["outcome"] == "failed"
    assert "the ITSM product failed" in result["error"]
    assert "after 4 attempts: HTTP 503" in result["error"]
    assert body["error"]["code"] == "sync_failed"
    assert 2 <= result["counts"]["pages"] < 6
    world.assert_no_gap_below_watermark("sn-outage")
    assert len(world.stored("sn-outage")) < 57
    [error] = [e for e in world.errors("sn-outage") if e.kind is SyncErrorKind.ITSM]
    assert "HTTP 503" in error.message
    mark = cursor_position(world.state("sn-outage").watermark)

    code, output = world.stack.cli("sync", "run", "--connection", "sn-outage")

    assert code == 0, output
    assert "sn-outage incidents: succeeded" in output
    world.assert_synced("sn-outage")
    assert world.resent("sn-outage") <= world.overlap_behind(mark)  # only the overlap was sent twice


def test_429_with_retry_after_and_5xx_from_servicenow_are_retried_within_bounds(world: World) -> None:
    world.connect("sn-retry", sync="incidents")
    world.seed("incident", 15, rng_seed=21)
    httpretry.set_testing(True)  # the waits are recorded, not slept
    world.snow.fail_next(2, 429, retry_after=1)
    world.snow.reset_request_log()

    first = one(world.engine.run("sn-retry"))

    assert first.outcome is SyncOutcome.SUCCEEDED, first.error
    assert httpretry.skipped_sleeps() == [1.0, 1.0]  # Retry-After: 1, twice (not the backoff)
    lists = [q for m, p, q in world.snow.requests if m == "GET" and p.endswith("/incident")]
    assert lists[0] == lists[1] == lists[2] != lists[3]  # the same call, answered on the third try
    world.assert_synced("sn-retry")

    httpretry.set_testing(True)
    world.clock.advance(minutes=3)
    [changed] = world.snow.touch("incident", 1)
    world.snow.fail_next(3, 503)  # three failures, the fourth and last attempt succeeds
    world.snow.reset_request_log()

    second = one(world.engine.run("sn-retry"))

    assert second.outcome is SyncOutcome.SUCCEEDED, second.error
    backoffs = httpretry.skipped_sleeps()  # no Retry-After: bounded, jittered backoff
    assert len(backoffs) == 3
    assert all(0 <= wait <= 8.0 for wait in backoffs)
    lists = [q for m, p, q in world.snow.requests if m == "GET" and p.endswith("/incident")]
    assert lists[0] == lists[1] == lists[2] == lists[3]
    assert world.stored("sn-retry")[changed].updated_at == world.clock.now
    world.assert_synced("sn-retry")


def test_an_expired_refresh_token_and_a_wrong_password_ask_to_reauthorise_the_connection(
    world: World,
) -> None:
    world.connect("sn-auth", sync="incidents")
    world.seed("incident", 11, rng_seed=22)
    assert one(world.engine.run("sn-auth")).outcome is SyncOutcome.SUCCEEDED
    mark = world.state("sn-auth").watermark
    world.clock.advance(days=101)  # past the refresh token's 100 days (and every access token's)
    original = world.snow.password
    world.snow.add_user(world.snow.username, "changed-by-the-servicenow-admin")
    world.snow.touch("incident", 2)

    call = post_sync(world, "sn-auth")

    assert call.status == 502
    [result] = call.json()["results"]
    assert result["outcome"] == "failed"
    assert REAUTHORISE in result["error"]
    assert REAUTHORISE in call.json()["error"]["message"]
    run = world.runs("sn-auth")[0]
    assert (run.outcome, run.trigger) == ("failed", "http")
    assert REAUTHORISE in run.error
    assert [e.kind for e in world.errors("sn-auth")] == [SyncErrorKind.REAUTHORISE]
    state = world.state("sn-auth")
    assert REAUTHORISE in state.last_error
    assert state.watermark == mark
    assert state.lease_owner == ""
    world.host.timer("sync_work_items")  # the timer logs the same failure; it does not raise
    code, output = world.stack.cli("sync", "run", "--connection", "sn-auth")
    assert code == 1
    assert REAUTHORISE in output

    world.snow.add_user(world.snow.username, original)  # the operator fixed the credentials
    recovered = one(world.engine.run("sn-auth"))
    assert recovered.outcome is SyncOutcome.SUCCEEDED, recovered.error
    world.assert_synced("sn-auth")


# -- the watermark and the feed changing underneath ------------------------------------------------


def test_the_watermark_moves_only_after_a_page_is_committed_to_every_sink(world: World) -> None:
    world.connect("sn-mark", sync="incidents")
    world.seed("incident", 46, rng_seed=30)
    order = world.order(INC)
    seen: list[Position | None] = []

    def record_watermark(index: int, items: Sequence[WorkItem]) -> None:
        seen.append(cursor_position(world.state("sn-mark").watermark))
        if index == 3:  # Log Analytics refuses this page (after the WorkItems table stored it)
            world.stack.logs.fail_next(1, 400)

    with hooked(world.engine, "log_analytics", record_watermark):
        failed = one(world.engine.run("sn-mark"))

    # while page i is being written, the watermark is still the end of page i-1
    assert seen == [None] + [position(order[i * PAGE - 1]) for i in (1, 2, 3)]
    assert failed.outcome is SyncOutcome.FAILED
    assert "Logs Ingestion upload to stream Custom-ServiceDesk_CL failed: HTTP 400" in failed.error
    # the table has page 3, Log Analytics does not: the watermark stays before it
    assert {r["sys_id"] for r in order[: 4 * PAGE]} <= set(world.stored("sn-mark"))
    assert cursor_position(world.state("sn-mark").watermark) == position(order[3 * PAGE - 1])
    assert not {r["sys_id"] for r in order[3 * PAGE : 4 * PAGE]} & set(world.latest_ingested("sn-mark"))
    [sink_error] = [e for e in world.errors("sn-mark") if e.kind is SyncErrorKind.SINK]
    assert "HTTP 400" in sink_error.message
    assert [r["Kind_s"] for r in world.error_records("sn-mark")] == ["sink"]

    resumed = one(world.engine.run("sn-mark"))

    assert resumed.outcome is SyncOutcome.SUCCEEDED
    world.assert_synced("sn-mark")


def test_rows_updated_while_a_run_pages_through_are_all_present_afterwards_in_their_latest_version(
    world: World,
) -> None:
    world.connect("sn-paging", sync="incidents")
    world.seed("incident", 52, rng_seed=31)
    order = world.order(INC)
    passed, twice, ahead = order[0]["sys_id"], order[12]["sys_id"], order[-1]["sys_id"]
    created: list[str] = []

    def edit_between_pages(index: int, items: Sequence[WorkItem]) -> None:
        if index == 2:  # pages 0 and 1 are stored; page 3 onwards not read yet
            world.clock.advance(seconds=1)
            world.snow.update_record("incident", passed, state="2", short_description="edited behind the run")
            world.snow.update_record("incident", twice, state="3", short_description="edited once")
            world.snow.update_record(
                "incident", ahead, state="2", short_description="edited ahead of the run"
            )
            created.append(world.snow.insert_record("incident", short_description="opened mid-run")["sys_id"])
        if index == 4:
            world.clock.advance(seconds=1)
            world.snow.update_record("incident", twice, state="2", short_description="edited twice")

    with hooked(world.engine, "table", edit_between_pages) as sink:
        result = one(world.engine.run("sn-paging"))

    assert sink.writes >= 6
    assert result.outcome is SyncOutcome.SUCCEEDED
    # The second edit of ``twice`` races the prefetch of the last page (it is fetched while page 4 is
    # written): when the last page was read before the edit, this run ends without the newest
    # version, and the next run must read it (the watermark is not past it, the overlap covers it).
    # Either way nothing is lost: after the next run every row is there in its latest version.
    world.clock.advance(seconds=5)
    again = one(world.engine.run("sn-paging"))
    assert again.outcome is SyncOutcome.SUCCEEDED
    world.assert_synced("sn-paging")
    stored = world.stored("sn-paging")
    assert (stored[passed].title, stored[passed].state) == ("edited behind the run", "In Progress")
    assert (stored[twice].title, stored[twice].state) == ("edited twice", "In Progress")
    assert (stored[ahead].title, stored[ahead].state) == ("edited ahead of the run", "In Progress")
    assert stored[created[0]].title == "opened mid-run"
    assert world.latest_ingested("sn-paging")[twice]["IncidentState_s"] == "In Progress"
    assert cursor_position(world.state("sn-paging").watermark) == position(world.order(INC)[-1])


def test_an_incremental_run_reads_only_the_changed_rows_and_the_overlap(world: World) -> None:
    world.connect("sn-incr", sync="incidents")
    world.seed("incident", 60, rng_seed=32)
    first = one(world.engine.run("sn-incr"))
    assert first.outcome is SyncOutcome.SUCCEEDED
    mark = world.state("sn-incr").watermark
    assert mark is not None
    since = mark.updated_at - timedelta(seconds=OVERLAP)
    overlap = {r["sys_id"] for r in world.order(INC) if position(r)[0] > since}
    before = len(world.ingested("sn-incr"))
    world.clock.advance(minutes=10)
    changed = set(world.snow.touch("incident", 6))
    world.snow.reset_request_log()

    world.host.timer("sync_work_items")

    second = world.runs("sn-incr")[0]
    assert second.outcome == "succeeded"
    assert second.counts["synced"] == len(changed | overlap)
    read_again = [r["ServiceDeskSysId_s"] for r in world.ingested("sn-incr")[before:]]
    assert sorted(read_again) == sorted(changed | overlap)
    queries = [
        q["sysparm_query"] for m, p, q in world.snow.requests if m == "GET" and p.endswith("/incident")
    ]
    assert queries[0].startswith(f"sys_updated_on>{since:%Y-%m-%d %H:%M:%S}^")
    world.assert_synced("sn-incr")
    assert cursor_position(world.state("sn-incr").watermark) == position(world.order(INC)[-1])


def test_a_row_committed_late_within_the_watermarks_second_is_picked_up_by_the_overlap(world: World) -> None:
    world.connect("sn-late", sync="incidents")
    world.seed("incident", 18, rng_seed=33)
    world.clock.advance(minutes=1)
    last = world.snow.insert_record("incident", short_description="the newest row", sys_id="f" * 32)
    assert one(world.engine.run("sn-late")).outcome is SyncOutcome.SUCCEEDED
    assert cursor_position(world.state("sn-late").watermark) == position(last)
    # a transaction that began in that same second commits only now, with a smaller sys_id: keyset
    # paging from the watermark alone would never see it
    late = world.snow.insert_record("incident", short_description="committed late", sys_id="0" * 32)
    assert late["sys_updated_on"] == last["sys_updated_on"]

    assert one(world.engine.run("sn-late")).outcome is SyncOutcome.SUCCEEDED

    assert world.stored("sn-late")[late["sys_id"]].title == "committed late"
    world.assert_synced("sn-late")


# -- bad rows ---------------------------------------------------------------------------------------


def test_an_unparseable_row_is_logged_with_its_id_and_skipped_without_passing_unsynced_rows(
    world: World,
) -> None:
    world.connect("sn-bad", sync="incidents")
    world.seed("incident", 40, rng_seed=34)
    middle = position(world.order(INC)[24])[0]
    world.clock.now, resume = middle + timedelta(seconds=1), world.clock.now
    bad = world.snow.insert_record(
        "incident", short_description="imported with a broken date", resolved_at="31/12/2025"
    )
    good = world.snow.insert_record("incident", short_description="same second, good")
    world.clock.now = resume
    order = world.order(INC)
    bad_page = [r["sys_id"] for r in order].index(bad["sys_id"]) // PAGE

    # first the page holding the bad row fails in Log Analytics: nothing of it may count as synced
    with hooked(world.engine, "log_analytics", kill_at(bad_page)):
        failed = one(world.engine.run("sn-bad"))

    assert failed.outcome is SyncOutcome.FAILED
    assert cursor_position(world.state("sn-bad").watermark) == position(order[bad_page * PAGE - 1])
    assert not [e for e in world.errors("sn-bad") if e.kind is SyncErrorKind.REJECTED_ROW]
    world.assert_no_gap_below_watermark("sn-bad")

    result = one(world.engine.run("sn-bad"))

    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.rejected == 1
    stored = world.stored("sn-bad")
    assert bad["sys_id"] not in stored
    assert stored[good["sys_id"]].title == "same second, good"
    world.assert_synced("sn-bad", exclude=[bad["sys_id"]])
    assert cursor_position(world.state("sn-bad").watermark) == position(order[-1])
    [rejected] = [e for e in world.errors("sn-bad") if e.kind is SyncErrorKind.REJECTED_ROW]
    assert rejected.source_id == bad["sys_id"]
    assert rejected.item_type == "incidents"
    assert "resolved_at" in rejected.message
    assert "31/12/2025" in rejected.message
    [logged] = [r for r in world.error_records("sn-bad") if r["Kind_s"] == "rejected_row"]
    assert logged["SourceId_s"] == bad["sys_id"]
    assert logged["ServiceDeskWorkItemType_s"] == "Incident"
    run = world.runs("sn-bad")[0]
    assert (run.outcome, run.counts["rejected"], run.counts["synced"]) == ("succeeded", 1, result.synced)
    assert world.state("sn-bad").rejected_total == 1


# -- backward sync ------------------------------------------------------------------------------------


def test_backward_sync_closes_the_azure_alert_of_a_resolved_alert_path_incident_once(world: World) -> None:
    world.connect("sn-back", "--close-azure-alerts", sync="incidents")
    world.seed("incident", 9, rng_seed=40)
    body = alert_payload()
    alert_id = alert_id_of(body)
    world.stack.alerts.add_alert(alert_id)
    post_alert(world, "sn-back", body)
    world.host.drain("deliver_alert")
    opened = correlation_of(world, "sn-back")
    assert opened.state is CorrelationState.OPEN
    assert opened.alert_ids == (alert_id,)

    world.host.timer("sync_work_items")  # the incident is open: nothing to close

    incident = world.stored("sn-back")[opened.work_item_id]
    assert incident.correlation_id == f"azmon-{opened.key}-g1"
    assert world.stack.alerts.alert_state(alert_id) == "New"
    assert world.stack.alerts.state_changes() == []
    resolved = resolve_incident(world, opened.work_item_id)

    world.host.timer("sync_work_items")

    assert world.stack.alerts.alert_state(alert_id) == "Closed"
    assert [(c.alert_id, c.new_state) for c in world.stack.alerts.state_changes()] == [(alert_id, "Closed")]
    run = world.runs("sn-back")[0]
    assert (run.counts["alerts_closed"], run.counts["correlations_updated"]) == (1, 1)
    row = correlation_of(world, "sn-back")
    assert row.state is CorrelationState.RESOLVED
    assert row.resolved_at == parse_ts(resolved["resolved_at"])
    assert row.generation == opened.generation

    world.clock.advance(minutes=5)  # a later edit brings the resolved incident through the sync again
    world.snow.update_record("incident", opened.work_item_id, work_notes="customer confirmed", state="7")

    world.host.timer("sync_work_items")

    assert world.stored("sn-back")[opened.work_item_id].state == "Closed"
    assert len(world.stack.alerts.state_changes()) == 1
    again = world.runs("sn-back")[0]
    assert (again.counts["alerts_closed"], again.counts["correlations_updated"]) == (0, 0)
    assert correlation_of(world, "sn-back").state is CorrelationState.RESOLVED


def test_backward_sync_with_close_azure_alerts_off_updates_the_correlation_and_closes_no_alert(
    world: World,
) -> None:
    world.connect("sn-keep", sync="incidents")
    body = alert_payload()
    alert_id = alert_id_of(body)
    world.stack.alerts.add_alert(alert_id)
    post_alert(world, "sn-keep", body)
    world.host.drain("deliver_alert")
    opened = correlation_of(world, "sn-keep")
    resolve_incident(world, opened.work_item_id)

    result = one(world.engine.run("sn-keep"))

    assert result.outcome is SyncOutcome.SUCCEEDED
    assert (result.correlations_updated, result.alerts_closed) == (1, 0)
    assert correlation_of(world, "sn-keep").state is CorrelationState.RESOLVED
    assert world.stack.alerts.alert_state(alert_id) == "New"
    assert world.stack.alerts.state_changes() == []
    assert not [r for r in world.stack.alerts.requests() if r.method == "POST"]


def test_backward_sync_changes_only_the_correlation_whose_own_work_item_was_resolved(world: World) -> None:
    # two connections to one instance whose problems carry the same key and generation (correlation
    # rows written before keys included the connection): each row names its own incident
    world.connect("sn-one", "--close-azure-alerts", sync="incidents")
    world.connect("sn-two", "--close-azure-alerts", sync="incidents")
    key, alerts = "c0ffee" * 6, {}
    for n, name in enumerate(("sn-one", "sn-two"), start=1):
        alerts[name] = (
            "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.AlertsManagement/"
            f"alerts/0b9a8c7d-0000-4000-8000-00000000000{n}"
        )
        world.stack.alerts.add_alert(alerts[name])
        incident = world.snow.insert_record(
            "incident", short_description=f"CPU high ({name})", correlation_id=f"azmon-{key}-g1"
        )
        world.app.correlations.insert(
            Correlation(
                connection=name,
                key=key,
                key_text="rule|cpu|ci|vm-web-01",
                state=CorrelationState.OPEN,
                work_item_id=incident["sys_id"],
                work_item_number=incident["number"],
                alert_ids=(alerts[name],),
            )
        )
    resolve_incident(world, correlation_of(world, "sn-one").work_item_id)  # only sn-one's incident

    world.host.timer("sync_work_items")

    assert correlation_of(world, "sn-one").state is CorrelationState.RESOLVED
    assert world.stack.alerts.alert_state(alerts["sn-one"]) == "Closed"
    assert correlation_of(world, "sn-two").state is CorrelationState.OPEN
    assert world.stack.alerts.alert_state(alerts["sn-two"]) == "New"
    assert [c.alert_id for c in world.stack.alerts.state_changes()] == [alerts["sn-one"]]
    world.assert_synced("sn-two")  # sn-two synced both incidents, sn-one's resolved one included


# -- a row stamped in the future, state codes, stale snapshots ------------------------------------------


def test_a_row_stamped_in_the_future_does_not_pin_the_watermark_and_later_edits_are_synced(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.connect("sn-future", sync="incidents")
    world.seed("incident", 16, rng_seed=50)
    world.clock.advance(minutes=1)
    newest_real = world.snow.insert_record("incident", short_description="the newest real row")
    # an import that set sys_updated_on itself (or a node with a skewed clock): 30 days ahead
    resume = world.clock.now
    world.clock.now = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    future = world.snow.insert_record("incident", short_description="imported with a future update time")
    world.clock.now = resume

    with caplog.at_level("WARNING", logger="shared_code.workitems.engine"):
        first = one(world.engine.run("sn-future"))

    assert first.outcome is SyncOutcome.SUCCEEDED, first.error
    world.assert_synced("sn-future")  # the future row is stored like any other
    assert cursor_position(world.state("sn-future").watermark) == position(newest_real)
    [warning] = [r.getMessage() for r in caplog.records if "after this run started" in r.getMessage()]
    assert "sn-future incidents" in warning
    assert parse_ts(future["sys_updated_on"]).isoformat() in warning

    world.clock.advance(minutes=10)  # an engineer edits an incident after the run
    edited = world.order(INC)[3]["sys_id"]
    world.snow.update_record("incident", edited, state="2", short_description="edited after the import")

    second = one(world.engine.run("sn-future"))

    assert second.outcome is SyncOutcome.SUCCEEDED, second.error
    assert world.stored("sn-future")[edited].title == "edited after the import"
    world.assert_synced("sn-future")
    edited_row = world.snow.record("incident", edited)
    assert edited_row is not None
    assert cursor_position(world.state("sn-future").watermark) == position(edited_row)


GERMAN_INCIDENT_STATES = {
    "1": "Neu",
    "2": "In Bearbeitung",
    "3": "Zurückgestellt",
    "6": "Gelöst",
    "7": "Geschlossen",
    "8": "Abgebrochen",
}


def test_backward_sync_decides_on_the_state_code_for_an_integration_user_reading_german(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    for code, label in GERMAN_INCIDENT_STATES.items():  # what the Table API shows this user
        monkeypatch.setitem(servicenow_loopback._INCIDENT_STATES, code, label)
    world.connect("sn-de", "--close-azure-alerts", sync="incidents")
    body = alert_payload()
    alert_id = alert_id_of(body)
    world.stack.alerts.add_alert(alert_id)
    post_alert(world, "sn-de", body)
    world.host.drain("deliver_alert")
    opened = correlation_of(world, "sn-de")
    resolved = resolve_incident(world, opened.work_item_id)

    world.host.timer("sync_work_items")

    assert world.stack.alerts.alert_state(alert_id) == "Closed"
    row = correlation_of(world, "sn-de")
    assert row.state is CorrelationState.RESOLVED
    assert row.resolved_at == parse_ts(resolved["resolved_at"])
    stored = world.stored("sn-de")[opened.work_item_id]
    assert (stored.state, stored.state_code) == ("Gelöst", "6")
    assert world.latest_ingested("sn-de")[opened.work_item_id]["IncidentState_s"] == "Gelöst"


def test_backward_sync_leaves_a_problem_alone_when_its_alert_fired_again_after_the_resolution(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.connect("sn-refire", "--close-azure-alerts", sync="incidents")
    body = alert_payload()
    alert_id = alert_id_of(body)
    world.stack.alerts.add_alert(alert_id)
    post_alert(world, "sn-refire", body)
    world.host.drain("deliver_alert")
    opened = correlation_of(world, "sn-refire")
    resolved = resolve_incident(world, opened.work_item_id)  # the engineer resolves it in ServiceNow
    # ... and the problem comes back before the sync runs: another alert of the same rule and CI
    again = json.loads(body)
    again_id = alert_id.rsplit("/", 1)[0] + "/0b9a8c7d-0000-4000-8000-0000000000aa"
    again["data"]["essentials"]["alertId"] = again_id
    again["data"]["essentials"]["firedDateTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    world.stack.alerts.add_alert(again_id)
    post_alert(world, "sn-refire", json.dumps(again).encode())
    world.host.drain("deliver_alert")
    noted = correlation_of(world, "sn-refire")
    assert noted.state is CorrelationState.OPEN
    assert noted.last_fired_at is not None
    assert noted.last_fired_at > parse_ts(resolved["resolved_at"])

    with caplog.at_level("INFO", logger="shared_code.workitems.backsync"):
        world.host.timer("sync_work_items")

    assert world.stack.alerts.alert_state(alert_id) == "New"
    assert world.stack.alerts.alert_state(again_id) == "New"
    assert world.stack.alerts.state_changes() == []
    row = correlation_of(world, "sn-refire")
    assert (row.state, row.generation, row.resolved_at) == (CorrelationState.OPEN, opened.generation, None)
    run = world.runs("sn-refire")[0]
    assert (run.outcome, run.counts["correlations_updated"], run.counts["alerts_closed"]) == (
        "succeeded",
        0,
        0,
    )
    [skipped] = [r.getMessage() for r in caplog.records if "fired again" in r.getMessage()]
    assert f"sn-refire {opened.work_item_number}" in skipped
    assert world.stored("sn-refire")[opened.work_item_id].state_code == "6"  # it was synced, resolved
