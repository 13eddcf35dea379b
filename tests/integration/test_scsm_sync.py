"""The work-item sync from SCSM, through the app's own entry points and real clients, all on loopback.

Each test has its own loopback Cireson portal (its clock moved by the test) next to the session's
stack (Azurite, Entra ID, Key Vault, Logs Ingestion). The app is the real container; the connection
is added with the real CLI; the sync runs through ``container.sync_engine``, the ``sync_work_items``
timer and the ``sync_connection`` HTTP function registered in ``function_app.app``. Faults are
injected at the edges only: the portal's ``fail_next`` / ``mangle`` / password, and a wrapper around
the engine's table sink that raises (a run killed after k pages).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import azure.functions as func
import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container
from shared_code.domain.sync import SyncErrorKind
from shared_code.domain.workitem import Lifecycle, WorkItem, WorkItemType
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import syncstate as syncstate_table
from shared_code.state import workitems as workitems_table
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.engine import SyncEngine, SyncOutcome
from shared_code.workitems.sinks import WorkItemSink
from tests.hostsim import FunctionHost, HttpCall
from tests.loopback.scsm import CHANGE, INCIDENT, ScsmLoopback, parse_ts
from tests.loopback.stack import LOGS_STREAM, LoopbackStack

INC, CHG = WorkItemType.INCIDENT, WorkItemType.CHANGE_REQUEST
KIND = {INC: INCIDENT, CHG: CHANGE}
PAGE = 10  # SYNC_PAGE_SIZE: the smallest the settings allow, so a few dozen rows make many pages


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class World:
    def __init__(self, stack: LoopbackStack, app: Container, portal: ScsmLoopback, clock: Clock) -> None:
        self.stack, self.app, self.portal, self.clock = stack, app, portal, clock
        self.host = FunctionHost(function_app.app, stack.queues())
        self.workitems = WorkItemRepository(app.tables.table(workitems_table.TABLE))
        self.sync_state = SyncStateRepository(app.tables.table(syncstate_table.TABLE))
        self.errors_table = SyncErrorRepository(app.tables.table(syncerrors_table.TABLE))

    @property
    def engine(self) -> SyncEngine:
        return self.app.sync_engine

    def connect(self, name: str, sync: str = "incidents") -> None:
        code, output = self.stack.cli(
            "connections",
            "add",
            name,
            "--type",
            "scsm",
            "--url",
            self.portal.url,
            "--user",
            self.portal.username,
            "--sync",
            sync,
            "--scope-days",
            "120",
            "--secrets-stdin",
            stdin=f"{self.portal.password}\n",
        )
        assert code == 0, output

    def seed(self, kind: str, count: int, rng_seed: int) -> list[str]:
        now = self.clock.now
        return self.portal.seed_work_items(
            kind, count, start=now - timedelta(days=100), end=now - timedelta(days=1), rng_seed=rng_seed
        )

    def source(self, item_type: WorkItemType = INC) -> dict[str, tuple[str, datetime, str]]:
        return {
            obj["BaseId"]: (obj["Id"], parse_ts(obj["LastModified"]), obj["Title"])
            for obj in self.portal.objects(KIND[item_type])
        }

    def stored(self, connection: str, item_type: WorkItemType = INC) -> dict[str, WorkItem]:
        rows = list(self.workitems.list(connection, item_type))
        assert len(rows) == len({row.source_id for row in rows}), "a work item is stored twice"
        return {row.source_id: row for row in rows}

    def stored_view(
        self, connection: str, item_type: WorkItemType = INC
    ) -> dict[str, tuple[str, datetime, str]]:
        return {k: (v.number, v.updated_at, v.title) for k, v in self.stored(connection, item_type).items()}


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    before = httpretry._testing
    httpretry.set_testing(True)
    yield
    httpretry.set_testing(before)


_prefixes = itertools.count(1)


@pytest.fixture
def world(stack: LoopbackStack) -> Iterator[World]:
    """A portal whose clock runs an hour behind real time (so all it stamps is in the app's past)."""
    clock = Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1))
    prefix = f"scsmsync{os.getpid() % 100000}x{next(_prefixes)}"
    with ScsmLoopback(clock=clock) as portal, stack.app(TABLE_PREFIX=prefix, SYNC_PAGE_SIZE=str(PAGE)) as app:
        world = World(stack, app, portal, clock)
        try:
            yield world
        finally:
            world.workitems.close()


class HostRecycled(RuntimeError):
    """Stands for the process dying in the middle of a run."""


@contextlib.contextmanager
def table_sink_hook(engine: SyncEngine, hook: Callable[[int, Sequence[WorkItem]], None]) -> Iterator[None]:
    """Run ``hook(write_index, items)`` before each write of the engine's WorkItems table sink."""
    sinks: list[WorkItemSink] = engine._sinks
    [index] = [n for n, sink in enumerate(sinks) if sink.name == "table"]
    original = sinks[index]
    writes = itertools.count()

    class Hooked:
        name = original.name

        def write(self, items: Sequence[WorkItem]) -> None:
            hook(next(writes), items)
            original.write(items)

    sinks[index] = Hooked()
    try:
        yield
    finally:
        sinks[index] = original


def post_sync(world: World, connection: str) -> HttpCall:
    url = f"http://localhost/api/sync/{connection}"
    request = func.HttpRequest(
        "POST",
        url,
        headers={},
        params=dict(parse_qsl(urlsplit(url).query)),
        route_params={"connection": connection},
        body=b"",
    )
    return HttpCall(world.host.user_function("sync_connection")(request))


@pytest.mark.parametrize("killed_at", [0, 3])
def test_a_run_killed_after_k_pages_then_rerun_stores_the_source_once(world: World, killed_at: int) -> None:
    world.connect("scsm-kill")
    world.seed(INCIDENT, 64, rng_seed=10 + killed_at)
    committed: list[WorkItem] = []

    def kill(index: int, items: Sequence[WorkItem]) -> None:
        if index == killed_at:
            raise HostRecycled(f"killed while writing page {index}")
        committed.extend(items)

    with table_sink_hook(world.engine, kill):
        [killed] = world.engine.run("scsm-kill")

    assert killed.outcome is SyncOutcome.FAILED
    assert "HostRecycled" in killed.error
    assert (killed.pages, killed.synced) == (killed_at, len(committed))
    assert set(world.stored("scsm-kill")) == {item.source_id for item in committed}
    state = world.sync_state.get("scsm-kill", "incidents")
    assert state is not None
    mark = state.watermark
    if committed:
        assert mark is not None
        newest = max((item.updated_at, item.source_id) for item in committed)
        assert (mark.updated_at, mark.last_id) >= newest
        passed = {k for k, (_, at, _) in world.source().items() if at < mark.updated_at}
        assert passed <= set(world.stored("scsm-kill"))  # no gap below the watermark
    else:
        assert mark is None

    world.host.timer("sync_work_items")  # the next timer run resumes from the watermark

    assert world.stored_view("scsm-kill") == world.source()
    state = world.sync_state.get("scsm-kill", "incidents")
    assert state is not None
    assert state.lease_owner == ""


def test_incidents_and_change_requests_sync_over_http_with_their_service_desk_columns(world: World) -> None:
    world.connect("scsm-cols", sync="incidents,change_requests")
    world.seed(INCIDENT, 23, rng_seed=3)
    world.seed(CHANGE, 12, rng_seed=4)
    world.clock.advance(minutes=1)
    made = world.portal.insert(
        INCIDENT, Title="Disk full on srv-002", Impact="High", Urgency="Low", Status="Active"
    )
    world.clock.advance(minutes=5)
    world.portal.update(INCIDENT, made["BaseId"], Status="Resolved", ResolutionDescription="Cleaned up.")

    call = post_sync(world, "scsm-cols")

    assert call.status == 200, call.json()
    results = {r["type"]: r for r in call.json()["results"]}
    assert (results["incidents"]["outcome"], results["incidents"]["counts"]["synced"]) == ("succeeded", 24)
    assert (results["change_requests"]["outcome"], results["change_requests"]["counts"]["synced"]) == (
        "succeeded",
        12,
    )
    assert world.stored_view("scsm-cols", INC) == world.source(INC)
    assert world.stored_view("scsm-cols", CHG) == world.source(CHG)
    item = world.stored("scsm-cols")[made["BaseId"]]
    assert (item.state, item.lifecycle, item.priority) == ("Resolved", Lifecycle.RESOLVED, "3")
    assert item.resolved_at is not None
    records = [
        r for r in world.stack.logs.records(LOGS_STREAM) if r["ServiceDeskConnectionName_s"] == "scsm-cols"
    ]
    [record] = [r for r in records if r["ServiceDeskSysId_s"] == made["BaseId"]]
    assert (record["ServiceDeskWorkItemType_s"], record["IncidentState_s"]) == ("Incident", "Resolved")
    assert record["ServiceDeskId_s"] == made["Id"]
    assert record["ResolvedBy_s"] == "Beth Anglin"
    changes = [r for r in records if r["ServiceDeskWorkItemType_s"] == "ChangeRequest"]
    assert len(changes) == 12
    assert all(r["CRState_s"] and r["Type_s"] for r in changes)


def test_bad_rows_expired_tokens_and_html_answers_lose_nothing_and_double_nothing(world: World) -> None:
    world.connect("scsm-bad")
    ids = world.seed(INCIDENT, 40, rng_seed=7)
    world.portal.mangle(ids[5], drop=["Id"])
    world.portal.mangle(
        ids[9], set_fields={"Status": {"Id": "9accddda-fbf5-10d4-b402-69bdd276a69b", "Name": "Custom"}}
    )

    def mid_run(index: int, items: Sequence[WorkItem]) -> None:
        if index == 1:
            world.portal.expire_tokens()

    with table_sink_hook(world.engine, mid_run):
        [first] = world.engine.run("scsm-bad")

    assert first.outcome is SyncOutcome.SUCCEEDED
    assert len(world.portal.issued_tokens()) == 2  # signed in again after the 401, transparently
    assert first.rejected == 1
    stored = world.stored("scsm-bad")
    assert set(stored) == set(ids) - {ids[5]}
    assert (stored[ids[9]].state, stored[ids[9]].lifecycle) == ("Custom", None)
    [rejected] = [e for e in world.errors_table.list("scsm-bad") if e.kind is SyncErrorKind.REJECTED_ROW]
    assert (rejected.source_id, rejected.message) == (ids[5], "Id: missing")

    # the portal answers a sign-in page instead of JSON: the run fails clearly, the next fills the gap
    world.portal.clear_faults()
    world.clock.advance(minutes=10)
    touched = world.portal.touch(INCIDENT, 15)
    world.portal.fail_next(1, path_contains="GetProjectionByCriteria", body="html200")
    [html] = world.engine.run("scsm-bad")
    assert html.outcome is SyncOutcome.FAILED
    assert "text/html, not JSON" in html.error
    [again] = world.engine.run("scsm-bad")
    assert again.outcome is SyncOutcome.SUCCEEDED
    assert again.synced >= len(touched)
    assert world.stored_view("scsm-bad") == world.source()

    # the account's password was changed: re-authorise, said once, clearly
    world.portal.set_password(world.portal.username, "rotated-in-active-directory")
    world.portal.expire_tokens()
    [refused] = world.engine.run("scsm-bad")
    assert refused.outcome is SyncOutcome.FAILED
    assert "re-authorise this connection" in refused.error
    assert world.portal.password not in refused.error
    kinds = [e.kind for e in world.errors_table.list("scsm-bad")]
    assert SyncErrorKind.REAUTHORISE in kinds
    assert SyncErrorKind.ITSM in kinds
