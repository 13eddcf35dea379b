"""Provance end to end: alerts through the registered functions, and the work-item sync, on loopback.

The session's loopback stack (Azurite, Entra ID, Key Vault, Logs Ingestion) plus a loopback Dataverse
of this module whose tokens come from the stack's Entra for the Provance app registration. The app
is the real container (``stack.app()``), the connection is added with the real CLI (the client
secret through stdin into the loopback Key Vault), alerts go through ``receive_alert`` and the
``deliver_alert`` queue function, the sync through ``container.sync_engine`` and the timer. Faults
are injected at the Dataverse server and, for a killed sync run, in a wrapper around the engine's
WorkItems sink.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import function_app
from shared_code import httpretry
from shared_code.bootstrap import Container
from shared_code.domain.correlation import CorrelationState
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.domain.sync import SyncErrorKind
from shared_code.domain.workitem import WorkItem, WorkItemType
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import workitems as workitems_table
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.engine import SyncOutcome, SyncResult
from tests.hostsim import FunctionHost
from tests.integration.test_alerts_e2e import T0, Clock, alert, encode, install_clock, resolution
from tests.integration.test_sync import hooked, kill_at
from tests.loopback.provance import (
    PEOPLE,
    PROVANCE_APP_SECRET,
    DataverseLoopback,
    connection_options,
    register_app,
)
from tests.loopback.stack import LoopbackStack

INC = WorkItemType.INCIDENT
PAGE = 10
_prefixes = itertools.count(1)


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    before = httpretry._testing
    httpretry.set_testing(True)
    yield
    httpretry.set_testing(before)


@pytest.fixture(scope="module")
def dataverse(stack: LoopbackStack) -> Iterator[DataverseLoopback]:
    server = DataverseLoopback(stack.entra).start()
    register_app(server)
    for name in PEOPLE:
        server.add_user(name)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class World:
    stack: LoopbackStack
    dataverse: DataverseLoopback
    app: Container
    clock: Clock
    host: FunctionHost
    account: str
    name: str = field(default_factory=lambda: f"pv-{uuid.uuid4().hex[:10]}")

    def connect(self, *options: str, secret: str = PROVANCE_APP_SECRET) -> str:
        code, output = self.stack.cli(
            "connections",
            "add",
            self.name,
            *connection_options(self.dataverse, self.account),
            *options,
            stdin=f"{secret}\n",
        )
        assert code == 0, output
        return output

    def post(self, payload: dict[str, Any]) -> str:
        call = self.host.http(
            "receive_alert",
            "POST",
            f"https://func.example/api/alerts/{self.name}",
            body=encode(payload),
            headers={"Content-Type": "application/json"},
            route_params={"connection": self.name},
        )
        assert call.status == 202, call.response.get_body()
        return str(call.json()["deliveryId"])

    def send(self, payload: dict[str, Any]) -> Delivery:
        delivery_id = self.post(payload)
        self.host.drain("deliver_alert", max_rounds=20)
        return self.delivery(delivery_id)

    def delivery(self, delivery_id: str) -> Delivery:
        row = self.app.deliveries.get(self.name, delivery_id)
        assert row is not None
        return row

    def incidents(self) -> list[dict[str, Any]]:
        """This test's incidents: those of its customer account."""
        rows = [r for r in self.dataverse.records("incident") if r.get("_customerid_value") == self.account]
        return sorted(rows, key=lambda r: r["ticketnumber"])

    # the sync's side
    def stored(self) -> dict[str, WorkItem]:
        rows: dict[str, WorkItem] = {}
        for row in WorkItemRepository(self.app.tables.table(workitems_table.TABLE)).list(self.name, INC):
            assert row.source_id not in rows, f"{row.number} is stored twice"
            rows[row.source_id] = row
        return rows

    def source(self, since: datetime) -> list[dict[str, Any]]:
        """The Dataverse incidents the sync's scope reaches, in feed order."""
        cut = since.strftime("%Y-%m-%dT%H:%M:%SZ")
        rows = [r for r in self.dataverse.records("incident") if r["modifiedon"] > cut]
        return sorted(rows, key=lambda r: (r["modifiedon"], r["versionnumber"]))

    def sync(self) -> SyncResult:
        [result] = [r for r in self.app.sync_engine.run(self.name) if r.item_type is INC]
        return result


@pytest.fixture
def world(stack: LoopbackStack, dataverse: DataverseLoopback) -> Iterator[World]:
    prefix = f"pv{os.getpid() % 100000}x{next(_prefixes)}"
    dataverse.clear_faults()
    with stack.app(TABLE_PREFIX=prefix, SYNC_PAGE_SIZE=str(PAGE), SYNC_OVERLAP_SECONDS="120") as container:
        queues = stack.queues()
        for queue in queues.list_queues():
            queues.get_queue_client(queue.name).clear_messages()
        clock = Clock()
        install_clock(container, clock)
        account = dataverse.add_account(f"Contoso {prefix}")
        yield World(stack, dataverse, container, clock, FunctionHost(function_app.app, queues), account)
    dataverse.clear_faults()


# -- alerts ---------------------------------------------------------------------------------------


def test_fire_makes_one_incident_refire_a_note_and_resolve_resolves_it(world: World) -> None:
    world.connect("--sync", "incidents", "--note-interval-minutes", "0")
    fired = alert(alert_id="pv-cycle", fired_at=T0)

    created = world.send(fired)

    assert (created.status, created.outcome) == (DeliveryStatus.DELIVERED, "created")
    (incident,) = world.incidents()
    assert created.work_item_number == incident["ticketnumber"]
    assert incident["title"].startswith("[Sev2] ")
    assert "Alert context:" in incident["description"]
    assert incident["prioritycode"] == 2  # Sev2 -> impact 2, urgency 2 -> priority 3 -> Normal
    row = next(iter(world.app.correlations.list(world.name)))
    assert (row.work_item_id, row.state) == (incident["incidentid"], CorrelationState.OPEN)

    world.clock.advance(minutes=1)
    again = world.send(alert(alert_id="pv-cycle", fired_at=T0 + timedelta(minutes=1)))

    assert again.outcome.startswith("noted"), again.outcome
    (note,) = world.dataverse.notes(incident["incidentid"])
    assert "the alert fired again" in note["notetext"]
    assert len(world.incidents()) == 1

    world.clock.advance(minutes=4)
    resolved = world.send(resolution(fired, T0 + timedelta(minutes=5)))

    assert resolved.outcome == "resolved"
    (incident,) = world.incidents()
    assert (incident["statecode"], incident["statuscode"]) == (1, 5)
    (closing,) = world.dataverse.resolutions(incident["incidentid"])
    assert "the alert resolved at" in closing["description"]
    assert next(iter(world.app.correlations.list(world.name))).state is CorrelationState.RESOLVED
    code, output = world.stack.cli("connections", "test", world.name)
    assert code == 0, output
    assert f"OK: {world.name}: Dataverse environment 127.0.0.1 answered as application user" in output


def test_a_create_whose_answer_is_lost_leaves_one_incident(world: World) -> None:
    world.connect("--sync", "incidents")
    world.dataverse.fail_next(1, 504, path_contains="/incidents", method="POST", kind="landed")

    delivered = world.send(alert(alert_id="pv-lost", fired_at=T0))

    assert delivered.status is DeliveryStatus.DELIVERED
    (incident,) = world.incidents()
    assert delivered.work_item_number == incident["ticketnumber"]


def test_throttling_is_waited_out_within_one_delivery(world: World) -> None:
    world.connect("--sync", "incidents")
    world.dataverse.fail_next(2, 429, retry_after=3, path_contains="/incidents")

    delivered = world.send(alert(alert_id="pv-throttled", fired_at=T0))

    assert (delivered.status, delivered.attempts, delivered.outcome) == (
        DeliveryStatus.DELIVERED,
        1,
        "created",
    )
    assert len(world.incidents()) == 1


def test_a_refused_client_secret_fails_the_delivery_clearly_and_creates_nothing(world: World) -> None:
    world.connect("--sync", "incidents", secret="a-wrong-secret")

    failed = world.send(alert(alert_id="pv-refused", fired_at=T0))

    assert failed.status is DeliveryStatus.FAILED
    assert "re-authorise" in failed.last_error
    assert "AADSTS7000215" in failed.last_error
    assert "a-wrong-secret" not in json.dumps(failed.model_dump(mode="json"))
    assert world.incidents() == []


# -- sync -----------------------------------------------------------------------------------------


def seed(world: World, count: int, rng_seed: int) -> datetime:
    now = datetime.now(UTC).replace(microsecond=0)
    world.dataverse.seed(
        "incident", count, start=now - timedelta(days=10), end=now - timedelta(days=1), rng_seed=rng_seed
    )
    return now - timedelta(days=30)


def view(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    return {r["incidentid"]: (r["ticketnumber"], r["modifiedon"], r["title"]) for r in rows}


def stored_view(world: World) -> dict[str, tuple[str, str, str]]:
    return {
        item.source_id: (item.number, item.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ"), item.title)
        for item in world.stored().values()
    }


@pytest.mark.parametrize("killed_at", [0, 3])
def test_a_sync_killed_after_k_pages_and_run_again_stores_the_source_once(
    world: World, killed_at: int
) -> None:
    world.connect("--sync", "incidents", "--scope-days", "30")
    since = seed(world, 64, rng_seed=40 + killed_at)

    with hooked(world.app.sync_engine, "table", kill_at(killed_at)):
        killed = world.sync()

    assert killed.outcome is SyncOutcome.FAILED
    assert "HostRecycled" in killed.error
    assert (killed.pages, killed.synced) == (killed_at, killed_at * PAGE)
    source = world.source(since)
    assert set(world.stored()) == {r["incidentid"] for r in source[: killed_at * PAGE]}

    world.host.timer("sync_work_items")

    assert stored_view(world) == view(world.source(since))
    assert len(world.stored()) == len(source)


def test_bad_rows_html_pages_and_expired_tokens_lose_nothing_and_double_nothing(world: World) -> None:
    world.connect("--sync", "incidents", "--scope-days", "30")
    since = seed(world, 45, rng_seed=77)
    source = world.source(since)
    odd = source[12]["incidentid"]
    with world.dataverse._lock:  # a status the table does not define, as a broken customisation leaves
        world.dataverse._rows["incident"][odd]["statecode"] = 9
    world.dataverse.fail_next(1, 200, path_contains="/incidents", method="GET", kind="html200")

    failed = world.sync()

    assert failed.outcome is SyncOutcome.FAILED
    assert "text/html, not JSON" in failed.error

    world.dataverse.expire_tokens()  # the cached token is refused: a new one is fetched, once
    done = world.sync()

    assert done.outcome is SyncOutcome.SUCCEEDED, done.error
    assert done.rejected == 1
    expected = view([r for r in world.source(since) if r["incidentid"] != odd])
    assert stored_view(world) == expected
    errors = list(SyncErrorRepository(world.app.tables.table(syncerrors_table.TABLE)).list(world.name))
    (rejected,) = [e for e in errors if e.kind is SyncErrorKind.REJECTED_ROW]
    assert rejected.source_id == odd
    assert "statecode: 9 is not a state of table incident" in rejected.message

    with world.dataverse._lock:  # fixed at the source: the next change brings it in
        world.dataverse._rows["incident"][odd]["statecode"] = 0
    world.dataverse.update_record("incident", odd, title="fixed by an admin")
    world.clock.advance(minutes=1)
    assert world.sync().outcome is SyncOutcome.SUCCEEDED
    assert world.stored()[odd].title == "fixed by an admin"
    assert len(world.stored()) == len(source)


def test_a_sync_that_rows_are_edited_during_ends_with_every_row_in_its_latest_version(world: World) -> None:
    world.connect("--sync", "incidents", "--scope-days", "30")
    since = seed(world, 52, rng_seed=31)
    order = world.source(since)
    passed, ahead = order[0]["incidentid"], order[-1]["incidentid"]

    def edit(index: int, items: list[WorkItem]) -> None:
        if index == 2:
            world.dataverse.update_record("incident", passed, title="edited behind the run")
            world.dataverse.update_record("incident", ahead, title="edited ahead of the run")

    with hooked(world.app.sync_engine, "table", edit):  # type: ignore[arg-type]
        result = world.sync()

    assert result.outcome is SyncOutcome.SUCCEEDED
    assert stored_view(world) == view(world.source(since))
    assert world.stored()[passed].title == "edited behind the run"
    assert world.stored()[ahead].title == "edited ahead of the run"
