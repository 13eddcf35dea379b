"""Work-item sync end to end: Azurite tables, Logs Ingestion and Alerts Management over TLS with
the real SDK clients, and an ITSM change feed.

TEMPORARY: ``tests/conftest.py``, the loopback ServiceNow and the ServiceNow connector are being
written alongside; until they land this module starts its own Azurite and its own Logs Ingestion
/ Alerts Management loopbacks, and pages through an in-memory keyset feed.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.credentials import AccessToken
from azure.data.tables import TableServiceClient

from shared_code.connections import Connection
from shared_code.errors import NotFoundError
from shared_code.itsm.base import SyncCursor, SyncPage
from shared_code.state.correlations import Correlation, CorrelationRepository, CorrelationState
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.tables import TableStore
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.backsync import AlertsManagementClient, BackSync
from shared_code.workitems.engine import SyncEngine, SyncOutcome
from shared_code.workitems.model import WorkItem, WorkItemType
from shared_code.workitems.sinks import LogAnalyticsSink, LogsUploader, SyncErrorLog, TableSink, WorkItemSink
from tests.loopback.base import LoopbackHandler, LoopbackServer
from tests.loopback.tls import loopback_tls

ROOT = Path(__file__).resolve().parents[2]
INC = WorkItemType.INCIDENT
RULE_ID = "dcr-00000000000000000000000000000000"
STREAM = "Custom-ServiceDesk_CL"
ERROR_STREAM = "Custom-ServiceDeskLog_CL"
PAGE = 50


# -- temporary infrastructure (to be replaced by tests/conftest.py fixtures) ------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def azurite() -> Iterator[str]:
    """An in-memory Azurite Table service on a free port; yields its connection string."""
    binary = ROOT / "node_modules" / ".bin" / "azurite-table"
    if not binary.exists():
        pytest.skip("Azurite is not installed (npm ci)")
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(binary),
            "--inMemoryPersistence",
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
        f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    proc.terminate()
    proc.wait(timeout=10)


class LogsIngestionHandler(LoopbackHandler):
    def do_POST(self) -> None:
        path, _ = self.parsed()
        parts = path.strip("/").split("/")
        if len(parts) != 4 or parts[0] != "dataCollectionRules" or parts[2] != "streams":
            self.send_json(404, {"error": {"code": "NotFound"}})
            return
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            self.send_json(401, {"error": {"code": "InvalidAuthenticationToken"}})
            return
        body = self.read_body()
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.app.received(parts[1], parts[3], json.loads(body))
        self.send_json(204, None)


class LogsIngestionLoopback(LoopbackServer):
    handler_class = LogsIngestionHandler

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def received(self, rule: str, stream: str, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self.records.setdefault(stream, []).extend(rows)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()


class AlertsHandler(LoopbackHandler):
    def do_POST(self) -> None:
        path, query = self.parsed()
        if not path.endswith("/changestate") or query.get("newState") != ["Closed"]:
            self.send_json(400, {"error": {"code": "BadRequest"}})
            return
        if self.headers.get("Authorization") != "Bearer arm-token":
            self.send_json(401, {"error": {"code": "InvalidAuthenticationToken"}})
            return
        alert_id = path.removesuffix("/changestate")
        self.app.closed.append(alert_id)
        self.send_json(200, {"id": alert_id, "properties": {"essentials": {"alertState": "Closed"}}})


class AlertsLoopback(LoopbackServer):
    handler_class = AlertsHandler

    def __init__(self) -> None:
        super().__init__()
        self.closed: list[str] = []


class StaticCredential:
    """The app credential's role: a token per scope (Logs Ingestion and ARM scopes differ)."""

    def __init__(self) -> None:
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.extend(scopes)
        token = "arm-token" if "management.azure.com" in scopes[0] else "monitor-token"
        return AccessToken(token, int(time.time()) + 3600)


@pytest.fixture(scope="module")
def logs_ingestion() -> Iterator[LogsIngestionLoopback]:
    with LogsIngestionLoopback() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def alerts_api() -> Iterator[AlertsLoopback]:
    with AlertsLoopback() as server:
        yield server  # type: ignore[misc]


class Source:
    """The ITSM product's incidents: a keyset feed over (updated_at, sys_id), like ServiceNow's."""

    def __init__(self, connection: str) -> None:
        self.connection = connection
        self.rows: dict[str, WorkItem] = {}
        self.fetches = 0
        self._lock = threading.Lock()

    def seed(self, count: int, *, days: int = 30) -> None:
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=days)
        step = timedelta(days=days) / (count + 1)
        for n in range(count):
            self.put(n, (start + step * n).replace(microsecond=0))

    def put(self, n: int, updated_at: datetime | None = None, **extra: Any) -> WorkItem:
        moment = updated_at or datetime.now(UTC).replace(microsecond=0)
        row = WorkItem.model_validate(
            {
                "connection": self.connection,
                "item_type": INC,
                "source_id": f"{n:032x}",
                "number": f"INC{n:07d}",
                "updated_at": moment,
                "state": "New",
                "title": f"incident {n}",
                "description": "x" * 200,
                **extra,
            }
        )
        with self._lock:
            self.rows[row.source_id] = row
        return row

    def touch(self, source_ids: Sequence[str]) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        for source_id in source_ids:
            old = self.rows[source_id]
            with self._lock:
                self.rows[source_id] = old.model_copy(update={"updated_at": now, "state": "In Progress"})

    # the connector's part
    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        with self._lock:
            self.fetches += 1
            rows = sorted(self.rows.values(), key=lambda r: (r.updated_at, r.source_id))
        after = [r for r in rows if (r.updated_at, r.source_id) > (cursor.updated_at, cursor.last_id)]
        chunk = after[:page_size]
        last = chunk[-1] if chunk else None
        return SyncPage(
            items=chunk,
            next_cursor=SyncCursor(updated_at=last.updated_at, last_id=last.source_id) if last else cursor,
            is_last=len(after) <= page_size,
        )

    def close(self) -> None:
        return None


class Connections:
    def __init__(self, *connections: Connection) -> None:
        self.by_name = {c.name: c for c in connections}

    def get(self, name: str) -> Connection:
        if name not in self.by_name:
            raise NotFoundError(name)
        return self.by_name[name]

    def list(self) -> list[Connection]:
        return list(self.by_name.values())


class HookSink:
    """Wraps a sink: runs ``hook(page_index)`` before each write (inject a crash, update rows)."""

    def __init__(self, inner: WorkItemSink, hook: Callable[[int], None]) -> None:
        self.name = inner.name
        self.inner = inner
        self.hook = hook
        self.calls = 0

    def write(self, items: Sequence[WorkItem]) -> None:
        index = self.calls
        self.calls += 1
        self.hook(index)
        self.inner.write(items)


class World:
    def __init__(self, azurite: str, logs: LogsIngestionLoopback, alerts: AlertsLoopback, name: str) -> None:
        self.name = name
        self.connection = Connection.model_validate(
            {
                "name": name,
                "partner_type": "servicenow",
                "server_url": f"https://{name}.service-now.com",
                "client_id": "cid",
                "username": "integration",
                "sync_data": ["incidents"],
                "sync_scope_days": 120,
                "close_azure_alerts": True,
            }
        )
        self.source = Source(name)
        self.logs = logs
        self.alerts = alerts
        self.store = TableStore(TableServiceClient.from_connection_string(azurite))
        self.workitems = WorkItemRepository(self.store.table("WorkItems"))
        self.sync_state = SyncStateRepository(self.store.table("SyncState"))
        self.runs = RunRepository(self.store.table("Runs"))
        self.sync_errors = SyncErrorRepository(self.store.table("SyncErrors"))
        self.correlations = CorrelationRepository(self.store.table("Correlations"))
        self.credential = StaticCredential()
        ca = loopback_tls().ca_bundle_path
        self.uploader = LogsUploader(logs.url, RULE_ID, self.credential, ca_bundle=ca)

        self.http = httpx.Client(verify=loopback_tls().client_context(), timeout=10)
        self.alerts_client = AlertsManagementClient(self.http, self.credential, alerts.url)

    def engine(self, wrap: Callable[[WorkItemSink], WorkItemSink] | None = None) -> SyncEngine:
        sinks: list[WorkItemSink] = [TableSink(self.workitems), LogAnalyticsSink(self.uploader, STREAM)]
        if wrap is not None:
            sinks = [wrap(sinks[0]), sinks[1]]
        return SyncEngine(
            connections=Connections(self.connection),
            connector_for=lambda c: self.source,  # type: ignore[arg-type,return-value]
            sync_state=self.sync_state,
            sinks=sinks,
            errors=SyncErrorLog(self.sync_errors, self.uploader, ERROR_STREAM),
            runs=self.runs,
            clock=lambda: datetime.now(UTC),
            page_size=PAGE,
            overlap=timedelta(seconds=2),
            backsync=BackSync(self.correlations, self.alerts_client, lambda: datetime.now(UTC)),
        )

    def stored(self) -> dict[str, WorkItem]:
        rows: dict[str, WorkItem] = {}
        for row in self.workitems.list(self.name, INC):
            assert row.source_id not in rows, "a work item is stored twice"
            rows[row.source_id] = row
        return rows

    def ingested_ids(self) -> list[str]:
        return [
            r["ServiceDeskSysId_s"]
            for r in self.logs.records.get(STREAM, [])
            if r["ServiceDeskConnectionName_s"] == self.name
        ]

    def close(self) -> None:
        self.workitems.close()
        self.uploader.close()
        self.http.close()
        self.store.close()


@pytest.fixture
def world(
    request: pytest.FixtureRequest,
    azurite: str,
    logs_ingestion: LogsIngestionLoopback,
    alerts_api: AlertsLoopback,
) -> Iterator[World]:
    name = "t" + str(abs(hash(request.node.name)) % 10**8) + f"-{os.getpid() % 1000}"
    w = World(azurite, logs_ingestion, alerts_api, name)
    yield w
    w.close()


# -- tests -----------------------------------------------------------------------------------------


def test_initial_sync_stores_exactly_the_source_in_tables_and_log_analytics(world: World) -> None:
    world.source.seed(260)
    [result] = world.engine().run(trigger="test")
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.synced == 260
    assert world.stored() == world.source.rows
    assert sorted(world.ingested_ids()) == sorted(world.source.rows)
    state = world.sync_state.get(world.name, "incidents")
    newest = max(world.source.rows.values(), key=lambda r: (r.updated_at, r.source_id))
    assert state is not None
    assert state.watermark == SyncCursor(updated_at=newest.updated_at, last_id=newest.source_id)
    assert state.last_outcome == "succeeded"
    assert state.lease_owner == ""
    [run] = list(world.runs.list(connection=world.name))
    assert run.outcome == "succeeded"
    assert run.counts["synced"] == 260
    assert "https://monitor.azure.com/.default" in world.credential.scopes


def test_a_run_killed_mid_way_then_rerun_leaves_no_gap_and_no_duplicate(world: World) -> None:
    world.source.seed(300)

    def crash_after_three_pages(index: int) -> None:
        if index == 3:
            raise RuntimeError("host recycled")

    [killed] = world.engine(lambda sink: HookSink(sink, crash_after_three_pages)).run()
    assert killed.outcome is SyncOutcome.FAILED
    assert killed.synced == 3 * PAGE
    stored_after_kill = world.stored()
    assert len(stored_after_kill) == 3 * PAGE
    state = world.sync_state.get(world.name, "incidents")
    assert state is not None
    assert state.watermark is not None
    ordered = sorted(world.source.rows.values(), key=lambda r: (r.updated_at, r.source_id))
    assert state.watermark.last_id == ordered[3 * PAGE - 1].source_id
    [resumed] = world.engine().run()
    assert resumed.outcome is SyncOutcome.SUCCEEDED
    assert world.stored() == world.source.rows  # every row once, latest version
    assert set(world.ingested_ids()) == set(world.source.rows)


def test_rows_updated_while_a_run_pages_through_are_all_present_afterwards(world: World) -> None:
    world.source.seed(250)
    ordered = sorted(world.source.rows)
    early, late = ordered[:10], ordered[-10:]  # some already passed, some still ahead (by id)

    def update_between_pages(index: int) -> None:
        if index == 2:
            world.source.touch(early + late)

    [result] = world.engine(lambda sink: HookSink(sink, update_between_pages)).run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    stored = world.stored()
    assert stored == world.source.rows
    assert all(stored[i].state == "In Progress" for i in early + late)


def test_incremental_run_picks_up_changed_rows_only(world: World) -> None:
    world.source.seed(120)
    world.engine().run()
    state = world.sync_state.get(world.name, "incidents")
    assert state is not None
    assert state.watermark is not None
    overlap_from = state.watermark.updated_at - timedelta(seconds=2)
    in_overlap = {r.source_id for r in world.source.rows.values() if r.updated_at >= overlap_from}
    world.logs.clear()
    changed = sorted(world.source.rows)[5:12]
    world.source.touch(changed)
    [result] = world.engine().run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert set(world.ingested_ids()) == set(changed) | in_overlap
    assert result.synced == len(set(changed) | in_overlap)
    assert world.stored() == world.source.rows


def test_backward_sync_closes_the_azure_alerts_and_updates_the_correlation(world: World) -> None:
    key = "b" * 40
    alert_ids = (
        "/subscriptions/00000000-0000-0000-0000-000000000001/providers/Microsoft.AlertsManagement/alerts/aaaa-1",
        "/subscriptions/00000000-0000-0000-0000-000000000001/providers/Microsoft.AlertsManagement/alerts/aaaa-2",
    )
    world.correlations.insert(
        Correlation(
            connection=world.name,
            key=key,
            key_text="rule|cpu|ci|vm1",
            state=CorrelationState.OPEN,
            work_item_id=f"{7:032x}",
            work_item_number="INC0000007",
            generation=1,
            alert_ids=alert_ids,
        )
    )
    world.source.seed(20)
    world.engine().run()
    assert not set(alert_ids) & set(world.alerts.closed)  # nothing resolved yet
    resolved_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    world.source.put(7, state="Resolved", correlation_id=f"azmon-{key}-g1", resolved_at=resolved_at)
    [result] = world.engine().run()
    assert result.outcome is SyncOutcome.SUCCEEDED
    assert result.alerts_closed == 2
    assert sorted(a for a in world.alerts.closed if a in alert_ids) == sorted(alert_ids)
    row = world.correlations.get(world.name, key)
    assert row is not None
    assert row.state is CorrelationState.RESOLVED
    assert row.resolved_at == resolved_at
    time.sleep(1.1)  # a later version of the resolved item is read again: nothing is closed twice
    world.source.put(7, state="Resolved", correlation_id=f"azmon-{key}-g1", resolved_at=resolved_at)
    [again] = world.engine().run()
    assert again.alerts_closed == 0
    assert sorted(a for a in world.alerts.closed if a in alert_ids) == sorted(alert_ids)
