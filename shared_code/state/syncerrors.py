"""The SyncErrors table: the sync's error log, kept whatever else is configured.

The retired connector wrote sync problems to ``ServiceDeskLog_CL``; this table holds the same
records (and the Logs Ingestion error stream gets a copy where configured), so an operator can
see which source rows were skipped and why a run failed. Partition = connection, row = inverted
timestamp, so the newest errors of a connection come first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from azure.data.tables import TableClient

from shared_code.domain.sync import SyncErrorKind, SyncErrorRecord
from shared_code.state.runs import inverted_key
from shared_code.state.tablebatch import write_all
from shared_code.state.tables import query_entities

TABLE = "SyncErrors"
MESSAGE_LIMIT = 4000


def _to_entity(record: SyncErrorRecord) -> dict[str, object]:
    return {
        "PartitionKey": record.connection,
        "RowKey": inverted_key(record.occurred_at, record.record_id),
        "ItemType": record.item_type,
        "Kind": record.kind.value,
        "Message": record.message[:MESSAGE_LIMIT],
        "SourceId": record.source_id,
        "RunId": record.run_id,
        "OccurredAt": record.occurred_at,
    }


def _from_entity(entity: dict[str, Any]) -> SyncErrorRecord:
    occurred = entity["OccurredAt"]
    if isinstance(occurred, datetime) and occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    return SyncErrorRecord(
        connection=str(entity["PartitionKey"]),
        item_type=str(entity.get("ItemType", "")),
        kind=SyncErrorKind(str(entity["Kind"])),
        message=str(entity.get("Message", "")),
        source_id=str(entity.get("SourceId", "")),
        run_id=str(entity.get("RunId", "")),
        occurred_at=occurred,
        record_id=str(entity["RowKey"]).rsplit("-", 1)[-1],
    )


class SyncErrorRepository:
    def __init__(self, table: TableClient) -> None:
        self._table = table

    def add_many(self, records: Sequence[SyncErrorRecord]) -> None:
        """Store ``records``; a retried write of the same records leaves one row each."""
        by_partition: dict[str, list[dict[str, object]]] = {}
        for record in records:
            entity = _to_entity(record)
            by_partition.setdefault(str(entity["PartitionKey"]), []).append(entity)
        for entities in by_partition.values():
            write_all(self._table, entities)

    def list(self, connection: str, *, limit: int = 100) -> Iterator[SyncErrorRecord]:
        """The newest errors of ``connection`` first, at most ``limit``."""
        for count, entity in enumerate(query_entities(self._table, "PartitionKey eq @c", {"c": connection})):
            if count >= limit:
                return
            yield _from_entity(entity)
