"""The SyncErrors table: the sync's error log, kept whatever else is configured.

The retired connector wrote sync problems to ``ServiceDeskLog_CL``; this table holds the same
records (and the Logs Ingestion error stream gets a copy where configured), so an operator can
see which source rows were skipped and why a run failed. Partition = connection, row = inverted
timestamp, so the newest errors of a connection come first.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from azure.data.tables import TableClient
from pydantic import BaseModel, ConfigDict, Field

from shared_code.state.runs import inverted_key
from shared_code.state.tables import query_entities, upsert_batch
from shared_code.workitems.model import WorkItemType

TABLE = "SyncErrors"
MESSAGE_LIMIT = 4000


class SyncErrorKind(StrEnum):
    REJECTED_ROW = "rejected_row"  # a source row the model could not parse; skipped
    REAUTHORISE = "reauthorise"  # the product refused the credentials
    ITSM = "itsm"  # the product failed after bounded retries
    SINK = "sink"  # a sink (WorkItems table, Log Analytics) failed; the page is retried next run
    BACKSYNC = "backsync"  # closing an Azure alert or updating its correlation failed
    INTERNAL = "internal"  # anything else; details in the app's logs


class SyncErrorRecord(BaseModel):
    """One problem seen by the sync, with the source id where it concerns one row."""

    model_config = ConfigDict(frozen=True)

    connection: str
    item_type: str = ""
    kind: SyncErrorKind
    message: str
    source_id: str = ""
    run_id: str = ""
    occurred_at: datetime
    record_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])

    def to_log_record(self) -> dict[str, Any]:
        """The row for the ``ServiceDeskLog_CL`` custom table (see docs/log-analytics.md)."""
        return {
            "TimeGenerated": self.occurred_at.isoformat(),
            "ServiceDeskConnectionName_s": self.connection,
            "ServiceDeskWorkItemType_s": _work_item_type(self.item_type),
            "Kind_s": self.kind.value,
            "SourceId_s": self.source_id,
            "Message_s": self.message[:MESSAGE_LIMIT],
            "RunId_s": self.run_id,
        }


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
            upsert_batch(self._table, entities)

    def list(self, connection: str, *, limit: int = 100) -> Iterator[SyncErrorRecord]:
        """The newest errors of ``connection`` first, at most ``limit``."""
        for count, entity in enumerate(query_entities(self._table, "PartitionKey eq @c", {"c": connection})):
            if count >= limit:
                return
            yield _from_entity(entity)


def _work_item_type(sync_name: str) -> str:
    """``incidents`` -> ``Incident``: the same value ``ServiceDesk_CL`` carries, so the two tables join."""
    try:
        return WorkItemType.from_sync_name(sync_name).value
    except ValueError:
        return sync_name
