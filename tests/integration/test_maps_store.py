"""The Maps and MapSources tables against Azurite: round trips, diff-only writes, failures that
keep the previous map, lookups by name or machine id, long and awkward keys."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from azure.data.tables import TableClient, TableServiceClient

from shared_code.domain.maps import MapStatus, ServerMap
from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.errors import AlreadyExistsError, NotFoundError
from shared_code.state.maps import MapRepository, graph_rows
from shared_code.state.mapsources import MapSourceRepository
from tests.fakes.maps import IMPORTED_AT, synthetic_map
from tests.loopback.azurite import Azurite

_names = itertools.count(1)


@pytest.fixture
def table(azurite: Azurite) -> Iterator[TableClient]:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    name = f"maps{next(_names)}x{id(service) % 100000}"
    service.create_table(name)
    yield service.get_table_client(name)
    service.delete_table(name)


def canonical(server_map: ServerMap) -> dict[str, object]:
    """The JSON form with nodes and edges in a fixed order (the table returns rows by key)."""
    body = server_map.to_json()
    body["nodes"] = sorted(body["nodes"], key=lambda n: n["id"])
    body["edges"] = sorted(body["edges"], key=lambda e: (e["kind"], e["source"], e["target"], str(e["port"])))
    return body


def etags(table: TableClient) -> dict[tuple[str, str], str]:
    return {(e["PartitionKey"], e["RowKey"]): str(e.metadata["etag"]) for e in table.list_entities()}


def test_a_map_round_trips_and_a_same_graph_writes_no_graph_row(table: TableClient) -> None:
    maps = MapRepository(table)
    first = synthetic_map(300, server="Web/01#?", hostile=True, source="vmi")
    first = first.with_changes_since(None)
    assert maps.save(first) == len(first.nodes) + len(first.edges)
    loaded = maps.load("WEB/01#?")
    assert loaded is not None
    assert canonical(loaded) == canonical(first)
    before = {k: v for k, v in etags(table).items() if k[0] != "index"}
    again = first.with_changes_since(loaded)
    assert maps.save(again) == 0
    after = {k: v for k, v in etags(table).items() if k[0] != "index"}
    assert after == before
    reloaded = maps.load("web/01#?")
    assert reloaded is not None
    assert not reloaded.changes.any


def test_a_changed_map_writes_only_its_difference_and_deletes_what_went(table: TableClient) -> None:
    maps = MapRepository(table)
    old = synthetic_map(40, seed=1, source="vmi")
    new = synthetic_map(40, seed=2, source="vmi")
    maps.save(old)
    old_rows, new_rows = graph_rows(old), graph_rows(new)
    expected = sum(1 for k, v in new_rows.items() if old_rows.get(k) != v) + len(
        old_rows.keys() - new_rows.keys()
    )
    assert maps.save(new.with_changes_since(old)) == expected
    loaded = maps.load(new.server)
    assert loaded is not None
    assert sorted(n.id for n in loaded.nodes) == sorted(n.id for n in new.nodes)
    assert loaded.dependency_keys() == new.dependency_keys()


def test_a_failure_keeps_the_previous_map_and_shows_in_the_listing(table: TableClient) -> None:
    maps = MapRepository(table)
    kept = synthetic_map(30, server="db-01", source="vmi").model_copy(update={"machine_id": "m-ABC"})
    maps.save(kept)
    maps.record_failure(
        "DB-01",
        machine_id="m-abc",
        source="vmi",
        source_kind="vminsights",
        error="504 timeout",
        at=IMPORTED_AT,
    )
    maps.record_failure(
        "never-01", machine_id="", source="vmi", source_kind="vminsights", error="no data", at=IMPORTED_AT
    )
    loaded = maps.load("db-01")
    assert loaded is not None
    assert loaded.dependency_keys() == kept.dependency_keys()
    listing = maps.find("M-abc")
    assert listing is not None
    assert (listing.server, listing.status, listing.last_error) == ("db-01", MapStatus.FAILED, "504 timeout")
    assert listing.nodes == 30
    assert maps.load("never-01") is None
    by_server = {item.server: item for item in maps.listings()}
    assert by_server["never-01"].status is MapStatus.FAILED
    assert by_server["never-01"].imported_at is None
    assert maps.find("nobody") is None


def test_huge_node_properties_are_split_over_columns_and_read_back(table: TableClient) -> None:
    maps = MapRepository(table)
    base = synthetic_map(10, source="vmi")
    big = base.nodes[0].model_copy(update={"properties": {"commandLine": "x" * 100_000}})
    server_map = base.model_copy(update={"nodes": (big, *base.nodes[1:])})
    maps.save(server_map)
    loaded = maps.load(base.server)
    assert loaded is not None
    assert loaded.node(big.id) == big


def test_source_definitions_add_list_get_remove(table: TableClient) -> None:
    sources = MapSourceRepository(table)
    definition = MapSourceDefinition.model_validate(
        {
            "name": "vmi-prod",
            "kind": "vminsights",
            "workspaces": [
                {
                    "resource_id": "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg"
                    "/providers/Microsoft.OperationalInsights/workspaces/ws-maps",
                    "customer_id": "11111111-2222-4333-8444-555555555555",
                }
            ],
            "group": {"kind": "computers", "computers": ["web-01"]},
        }
    )
    sources.add(definition)
    with pytest.raises(AlreadyExistsError):
        sources.add(definition.model_copy(update={"name": "VMI-prod"}))
    assert sources.get("vmi-prod") == definition
    assert [d.name for d in sources.list()] == ["vmi-prod"]
    sources.remove("vmi-prod")
    with pytest.raises(NotFoundError):
        sources.get("vmi-prod")
    with pytest.raises(NotFoundError):
        sources.get("../bad'name")
