"""The map importer over a fake source and in-memory stores: diffs, unchanged re-imports, failed
servers keeping their previous map, the lease, server filters and the ``Runs`` row."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from shared_code.domain.maps import MapListing, MapStatus, MapWindow, ServerMap, listing_of
from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.domain.runs import RunRecord
from shared_code.errors import MapSourceError, NotFoundError
from shared_code.jobs.lease import JobLease
from shared_code.maps.importer import ImportOutcome, ImportProgress, MapImporter
from shared_code.ports.maps import MapSource, ServerMapResult, ServerRef
from tests.fakes.maps import synthetic_map
from tests.unit.test_sync_engine import MemoryRuns, MemorySyncState

NOW = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
WORKSPACE = {
    "resource_id": "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg"
    "/providers/Microsoft.OperationalInsights/workspaces/ws-maps",
    "customer_id": "11111111-2222-4333-8444-555555555555",
}


def definition(
    name: str = "vmi", *, enabled: bool = True, computers: Sequence[str] = ("web-01",)
) -> MapSourceDefinition:
    return MapSourceDefinition.model_validate(
        {
            "name": name,
            "kind": "vminsights",
            "workspaces": [WORKSPACE],
            "group": {"kind": "computers", "computers": list(computers)},
            "enabled": enabled,
        }
    )


class MemorySources:
    def __init__(self, *definitions: MapSourceDefinition) -> None:
        self.rows = {d.name: d for d in definitions}

    def get(self, name: str) -> MapSourceDefinition:
        if name not in self.rows:
            raise NotFoundError(f"no map source named {name!r}")
        return self.rows[name]

    def list(self) -> list[MapSourceDefinition]:
        return list(self.rows.values())


class MemoryMaps:
    """Stores graphs as the table does: written only when they differ."""

    def __init__(self) -> None:
        self.maps: dict[str, ServerMap] = {}
        self.status: dict[str, tuple[MapStatus, str]] = {}
        self.graph_writes = 0

    def load(self, server: str) -> ServerMap | None:
        return self.maps.get(server.lower())

    def save(self, server_map: ServerMap) -> int:
        previous = self.maps.get(server_map.server.lower())
        same = previous is not None and (previous.nodes, previous.edges) == (
            server_map.nodes,
            server_map.edges,
        )
        self.maps[server_map.server.lower()] = server_map
        self.status[server_map.server.lower()] = (MapStatus.OK, "")
        written = 0 if same else len(server_map.nodes) + len(server_map.edges)
        self.graph_writes += written
        return written

    def record_failure(
        self, server: str, *, machine_id: str, source: str, source_kind: str, error: str, at: datetime
    ) -> None:
        self.status[server.lower()] = (MapStatus.FAILED, error)

    def find(self, text: str) -> MapListing | None:
        stored = self.maps.get(text.lower())
        return None if stored is None else listing_of(stored)

    def listings(self) -> list[MapListing]:
        return [listing_of(m) for m in self.maps.values()]


class FakeSource:
    """Serves the maps it is given; a server mapped to an error string fails."""

    def __init__(self, answers: dict[str, ServerMap | str], *, fail_servers: bool = False) -> None:
        self.answers = answers
        self.fail_servers = fail_servers
        self.fetched: list[list[str]] = []
        self.windows: list[MapWindow] = []
        self.closed = False

    def servers(self) -> list[ServerRef]:
        if self.fail_servers:
            raise MapSourceError("the workspace refused the query (403): grant Log Analytics Reader")
        return [ServerRef(computer=name, machine_id=f"m-{name}") for name in self.answers]

    def fetch(self, servers: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        self.fetched.append([s.computer for s in servers])
        self.windows.append(window)
        for ref in servers:
            answer = self.answers[ref.computer]
            if isinstance(answer, str):
                yield ServerMapResult(server=ref, error=answer)
            else:
                yield ServerMapResult(server=ref, map=answer)

    def check(self) -> str:
        return "ok"

    def close(self) -> None:
        self.closed = True


def a_map(server: str, *, seed: int = 7, nodes: int = 20) -> ServerMap:
    return synthetic_map(nodes, server=server, seed=seed, source="vmi", imported_at=NOW)


class Rig:
    def __init__(self, source: FakeSource, *definitions: MapSourceDefinition) -> None:
        self.source = source
        self.maps = MemoryMaps()
        self.runs = MemoryRuns()
        self.state = MemorySyncState()
        self.now = NOW
        self.importer = MapImporter(
            sources=MemorySources(*(definitions or (definition(),))),
            build_source=self.build,
            maps=self.maps,
            lease=JobLease(self.state, self.clock, what="map import"),
            runs=self.runs,
            clock=self.clock,
        )

    def clock(self) -> datetime:
        return self.now

    def build(self, _: MapSourceDefinition) -> MapSource:
        return self.source

    def last_run(self) -> RunRecord:
        return self.runs.runs[-1]


def test_first_import_stores_every_map_with_everything_added_and_records_the_run() -> None:
    rig = Rig(FakeSource({"web-01": a_map("web-01"), "db-01": a_map("db-01", seed=3)}))
    [result] = rig.importer.run(trigger="timer")
    assert result.outcome is ImportOutcome.OK
    assert (result.imported, result.unchanged, result.failed) == (2, 0, 0)
    stored = rig.maps.load("WEB-01")
    assert stored is not None
    assert set(stored.changes.added) == stored.dependency_keys()
    assert stored.changes.removed == ()
    run = rig.last_run()
    assert (run.job, run.connection, run.item_type, run.trigger) == ("maps", "vmi", "import", "timer")
    assert run.counts["imported"] == 2
    assert run.counts["added"] == result.added > 0
    assert rig.source.windows[0] == MapWindow(start=NOW - timedelta(minutes=60), end=NOW)
    assert rig.source.closed
    row = rig.state.get("vmi", "import")
    assert row is not None
    assert row.lease_owner == ""
    assert row.last_outcome == "ok"


def test_reimporting_the_same_data_writes_no_graph_and_counts_unchanged() -> None:
    rig = Rig(FakeSource({"web-01": a_map("web-01")}))
    rig.importer.run()
    writes = rig.maps.graph_writes
    rig.now = NOW + timedelta(hours=1)
    [result] = rig.importer.run()
    assert (result.imported, result.unchanged) == (0, 1)
    assert rig.maps.graph_writes == writes
    stored = rig.maps.load("web-01")
    assert stored is not None
    assert not stored.changes.any


def test_changed_dependencies_are_recorded_as_added_and_removed() -> None:
    before, after = a_map("web-01", seed=7), a_map("web-01", seed=8)
    source = FakeSource({"web-01": before})
    rig = Rig(source)
    rig.importer.run()
    source.answers["web-01"] = after
    [result] = rig.importer.run()
    stored = rig.maps.load("web-01")
    assert stored is not None
    assert set(stored.changes.added) == after.dependency_keys() - before.dependency_keys()
    assert set(stored.changes.removed) == before.dependency_keys() - after.dependency_keys()
    assert result.added == len(stored.changes.added)
    assert result.removed == len(stored.changes.removed)
    assert stored.changes.any


def test_a_failed_server_keeps_its_previous_map_and_the_others_go_on() -> None:
    source = FakeSource({"web-01": a_map("web-01"), "db-01": a_map("db-01", seed=3)})
    rig = Rig(source)
    rig.importer.run()
    kept = rig.maps.load("db-01")
    source.answers["db-01"] = "the query timed out (504) for this batch"
    source.answers["web-01"] = a_map("web-01", seed=9)
    [result] = rig.importer.run()
    assert result.outcome is ImportOutcome.PARTIAL
    assert (result.imported, result.failed) == (1, 1)
    assert rig.maps.load("db-01") == kept
    assert rig.maps.status["db-01"] == (MapStatus.FAILED, "the query timed out (504) for this batch")
    detail = json.loads(rig.last_run().detail)
    assert detail["errors"] == {"db-01": "the query timed out (504) for this batch"}
    assert rig.last_run().outcome == "partial"


def test_a_source_that_cannot_list_its_servers_fails_the_run_with_the_reason() -> None:
    rig = Rig(FakeSource({"web-01": a_map("web-01")}, fail_servers=True))
    [result] = rig.importer.run()
    assert result.outcome is ImportOutcome.FAILED
    assert "Log Analytics Reader" in result.error
    assert rig.last_run().outcome == "failed"
    assert "Log Analytics Reader" in rig.last_run().error
    assert rig.maps.maps == {}


def test_a_held_lease_makes_the_run_busy_without_fetching() -> None:
    source = FakeSource({"web-01": a_map("web-01")})
    rig = Rig(source)
    JobLease(rig.state, rig.clock).acquire("vmi", "import", "someone-else")
    [result] = rig.importer.run()
    assert result.outcome is ImportOutcome.BUSY
    assert source.fetched == []


def test_servers_filter_maps_only_those_and_reports_unknown_names() -> None:
    source = FakeSource({"web-01": a_map("web-01"), "db-01": a_map("db-01", seed=3)})
    rig = Rig(source)
    seen: list[ImportProgress] = []
    [result] = rig.importer.run(servers=["m-DB-01", "nope-99"], progress=seen.append)
    assert source.fetched == [["db-01"]]
    assert [p.server for p in seen] == ["db-01"]
    assert seen[0].total == 1
    assert result.errors == {"nope-99": "not in any map source's server group"}
    assert result.outcome is ImportOutcome.PARTIAL


def test_only_enabled_sources_run_unless_one_is_named() -> None:
    source = FakeSource({"web-01": a_map("web-01")})
    rig = Rig(source, definition("on"), definition("off", enabled=False))
    assert [r.source for r in rig.importer.run()] == ["on"]
    assert [r.source for r in rig.importer.run(source="off")] == ["off"]
    with pytest.raises(NotFoundError):
        rig.importer.run(source="missing")
