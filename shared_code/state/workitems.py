"""The WorkItems table: the synced incidents and change requests, one row per work item.

Partitions are ``<connection>-<type>-<bucket>`` with the bucket hashed from the source id: a page
of a thousand rows becomes a few partitions whose batch transactions (at most 100 rows and well
under the 4 MiB request limit each) are written in parallel, while one item is still found from
its id alone. Rows are replaced whole, so writing the same version twice changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from azure.data.tables import TableClient

from shared_code.domain.workitem import WorkItem, WorkItemType
from shared_code.state.tablebatch import transactions, upsert_transaction
from shared_code.state.tables import Entity, bucket_of, get_entity, query_entities

TABLE = "WorkItems"
BUCKETS = 8
TEXT_LIMIT = 16_000  # characters; a string property may hold at most 64 KiB (UTF-16)
_FORBIDDEN = {"/": "%2F", "\\": "%5C", "#": "%23", "?": "%3F", "%": "%25"}


def partition_of(connection: str, item_type: WorkItemType, source_id: str) -> str:
    return f"{connection}-{item_type.sync_name}-{bucket_of(source_id, BUCKETS):02d}"


def row_key(source_id: str) -> str:
    """The source id with the characters a RowKey may not hold percent-encoded."""
    if source_id.isascii() and source_id.replace("-", "").isalnum():
        return source_id  # a ServiceNow sys_id (32 hex digits) or a GUID: nothing to encode
    out = []
    for char in source_id:
        if char in _FORBIDDEN:
            out.append(_FORBIDDEN[char])
        elif ord(char) < 32 or 127 <= ord(char) < 160:
            out.append(f"%{ord(char):02X}")
        else:
            out.append(char)
    return "".join(out)


def to_entity(item: WorkItem) -> Entity:
    """The item's row. Its fields are read from the model's ``__dict__`` (every field is a plain
    value: text, a datetime, an enum), not through ``model_dump``, which costs more than the loop."""
    entity: Entity = {
        "PartitionKey": partition_of(item.connection, item.item_type, item.source_id),
        "RowKey": row_key(item.source_id),
    }
    for name, value in item.__dict__.items():
        if value is None:
            continue
        if type(value) is str:
            entity[name] = value if len(value) <= TEXT_LIMIT else value[: TEXT_LIMIT - 1] + "…"
        elif isinstance(value, WorkItemType):
            entity[name] = value.value
        elif isinstance(value, str) and len(value) > TEXT_LIMIT:
            entity[name] = value[: TEXT_LIMIT - 1] + "…"
        else:
            entity[name] = value
    return entity


def from_entity(entity: dict[str, Any]) -> WorkItem:
    data = {name: value for name, value in entity.items() if name[0].islower()}
    data.pop("_etag", None)
    for name, value in list(data.items()):
        if isinstance(value, datetime) and value.tzinfo is None:
            data[name] = value.replace(tzinfo=UTC)
    return WorkItem.model_validate(data)


class WorkItemRepository:
    """Batched, idempotent upserts of work items; partitions are written in parallel."""

    def __init__(self, table: TableClient, *, parallelism: int = BUCKETS) -> None:
        self._table = table
        self._parallelism = max(1, parallelism)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._parallelism, thread_name_prefix="workitems")
            return self._pool

    def upsert_many(self, items: Sequence[WorkItem]) -> int:
        """Write ``items`` (replacing whole rows); returns how many distinct rows were written.

        A work item seen twice in ``items`` is written once, in its newest version: one
        transaction may not touch a row twice.
        """
        newest: dict[tuple[str, str], Entity] = {}
        stamps: dict[tuple[str, str], datetime] = {}
        for item in items:
            entity = to_entity(item)
            key = (str(entity["PartitionKey"]), str(entity["RowKey"]))
            if key not in stamps or item.updated_at >= stamps[key]:
                newest[key] = entity
                stamps[key] = item.updated_at
        partitions: dict[str, list[Entity]] = {}
        for (partition, _), entity in newest.items():
            partitions.setdefault(partition, []).append(entity)
        chunks = [chunk for rows in partitions.values() for chunk in transactions(rows)]
        if len(chunks) <= 1:
            for chunk in chunks:
                upsert_transaction(self._table, chunk)
        else:
            futures = [self._executor().submit(upsert_transaction, self._table, chunk) for chunk in chunks]
            errors = [f.exception() for f in futures]
            for error in errors:
                if error is not None:
                    raise error
        return len(newest)

    def get(self, connection: str, item_type: WorkItemType, source_id: str) -> WorkItem | None:
        entity = get_entity(self._table, partition_of(connection, item_type, source_id), row_key(source_id))
        return None if entity is None else from_entity(entity)

    def list(self, connection: str, item_type: WorkItemType) -> Iterator[WorkItem]:
        """Every stored item of one connection and type (all buckets), in no particular order."""
        prefix = f"{connection}-{item_type.sync_name}-"
        # the column filters keep out a connection whose name extends this one's ("a" vs "a-incidents")
        query = "PartitionKey ge @lo and PartitionKey lt @hi and connection eq @c and item_type eq @t"
        params = {"lo": prefix, "hi": prefix[:-1] + ".", "c": connection, "t": item_type.value}
        for entity in query_entities(self._table, query, params):
            yield from_entity(entity)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
