"""The SyncState table: one row per connection and work-item type, holding the sync watermark.

The watermark is the keyset position (update time, then id) just past the last page whose rows
are committed to every sink, and never after its run's start plus a small clock skew (a row
stamped in the future must not make later runs skip real updates; see the engine). The row
doubles as a lease, so the timer and an on-demand run of the same connection and type never page
through the feed at the same time: every write is a conditional insert or an ETag-matched
replace, never a blind write.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from azure.data.tables import TableClient

from shared_code.domain.runs import SyncStateRow
from shared_code.state.tables import get_entity, insert_entity, query_entities, replace_if_match

TABLE = "SyncState"
ERROR_LIMIT = 2000


def _to_entity(row: SyncStateRow) -> dict[str, object]:
    entity: dict[str, object] = {"PartitionKey": row.connection, "RowKey": row.item_type}
    for name, value in row.model_dump(exclude={"etag", "connection", "item_type"}).items():
        if value is None:
            continue
        entity[name] = value[:ERROR_LIMIT] if name == "last_error" else value
    return entity


def _from_entity(entity: dict[str, object]) -> SyncStateRow:
    data: dict[str, object] = {name: value for name, value in entity.items() if name[0].islower()}
    data.pop("_etag", None)
    for name, value in list(data.items()):
        if isinstance(value, datetime) and value.tzinfo is None:
            data[name] = value.replace(tzinfo=UTC)
    return SyncStateRow.model_validate(
        {
            **data,
            "connection": entity["PartitionKey"],
            "item_type": entity["RowKey"],
            "etag": entity.get("_etag", ""),
        }
    )


class SyncStateRepository:
    """Conditional reads and writes of SyncState rows (the engine holds the lease logic)."""

    def __init__(self, table: TableClient) -> None:
        self._table = table

    def get(self, connection: str, item_type: str) -> SyncStateRow | None:
        entity = get_entity(self._table, connection, item_type)
        return None if entity is None else _from_entity(entity)

    def insert(self, row: SyncStateRow) -> SyncStateRow:
        """Conditional insert: AlreadyExistsError when another run created the row first."""
        etag = insert_entity(self._table, _to_entity(row))
        return row.with_etag(etag)

    def replace(self, row: SyncStateRow) -> SyncStateRow:
        """ETag-matched replace; EtagConflict when another run wrote since ``row`` was read."""
        etag = replace_if_match(self._table, _to_entity(row), row.etag)
        return row.with_etag(etag)

    def list(self, connection: str | None = None) -> Iterator[SyncStateRow]:
        if connection is None:
            rows = query_entities(self._table, "PartitionKey ne @none", {"none": ""})
        else:
            rows = query_entities(self._table, "PartitionKey eq @c", {"c": connection})
        for entity in rows:
            yield _from_entity(entity)
