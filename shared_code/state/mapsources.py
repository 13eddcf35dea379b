"""The MapSources table: one row per dependency-map source definition (never a secret)."""

from __future__ import annotations

import json

from azure.data.tables import TableClient

from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.errors import AlreadyExistsError, NotFoundError, shown
from shared_code.state.tables import delete_entity, get_entity, insert_entity, merge_entity, query_entities

TABLE = "MapSources"
PARTITION = "mapsource"


def _to_entity(definition: MapSourceDefinition) -> dict[str, object]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": definition.name,
        "Kind": definition.kind.value,
        "Enabled": definition.enabled,
        "Definition": definition.model_dump_json(),
    }


class MapSourceRepository:
    """Definitions managed with ``maps sources add/list/show/remove``; names are unique ignoring case."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    def add(self, definition: MapSourceDefinition) -> None:
        twin = next((d.name for d in self.list() if d.name.lower() == definition.name.lower()), None)
        if twin is not None:
            raise AlreadyExistsError(f"a map source named {twin!r} exists; remove it first")
        insert_entity(self._table, _to_entity(definition))

    def save(self, definition: MapSourceDefinition) -> None:
        merge_entity(self._table, _to_entity(definition))

    def get(self, name: str) -> MapSourceDefinition:
        entity = get_entity(self._table, PARTITION, name) if _plausible(name) else None
        if entity is None:
            raise NotFoundError(f"no map source named {shown(name)}")
        return _from_entity(entity)

    def list(self) -> list[MapSourceDefinition]:
        rows = query_entities(self._table, "PartitionKey eq @p", {"p": PARTITION})
        return sorted((_from_entity(row) for row in rows), key=lambda d: d.name.lower())

    def remove(self, name: str) -> None:
        self.get(name)
        delete_entity(self._table, PARTITION, name)


def _plausible(name: str) -> bool:
    """Only names a definition can have reach the table (no key characters the service refuses)."""
    return 0 < len(name) <= 50 and all(ch.isalnum() or ch == "-" for ch in name) and name.isascii()


def _from_entity(entity: dict[str, object]) -> MapSourceDefinition:
    return MapSourceDefinition.model_validate(json.loads(str(entity["Definition"])))
