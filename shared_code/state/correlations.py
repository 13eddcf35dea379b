"""The Correlations table: the open work item of each problem, one row per correlation key.

Every change is a conditional insert or an ETag-matched replace, never a blind write: that is
what makes "one work item per problem" hold when many instances handle the same storm at once.
Partitions are ``<connection>-<bucket>`` (bucket from the key) so one storm spreads out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from enum import StrEnum

from azure.data.tables import TableClient
from pydantic import BaseModel, ConfigDict

from shared_code.itsm.base import WorkItemRef
from shared_code.state.tables import (
    bucket_of,
    get_entity,
    insert_entity,
    query_entities,
    replace_if_match,
)

TABLE = "Correlations"
BUCKETS = 16
RECENT_DELIVERIES = 64


class CorrelationState(StrEnum):
    CREATING = "creating"
    OPEN = "open"
    RESOLVED = "resolved"
    CLOSED = "closed"


class Correlation(BaseModel):
    """One problem's work item and the bookkeeping that coalesces its notifications."""

    model_config = ConfigDict(frozen=True)

    connection: str
    key: str
    key_text: str
    state: CorrelationState
    work_item_id: str = ""
    work_item_number: str = ""
    work_item_url: str = ""
    generation: int = 1
    fire_count: int = 0
    unnoted_fires: int = 0
    last_note_at: datetime | None = None
    first_fired_at: datetime | None = None
    last_fired_at: datetime | None = None
    resolved_at: datetime | None = None
    resolved_alert_fired_at: datetime | None = None
    lease_owner: str = ""
    lease_until: datetime | None = None
    recent_deliveries: tuple[str, ...] = ()
    configuration_items: tuple[str, ...] = ()
    pending_cis: tuple[str, ...] = ()
    alert_ids: tuple[str, ...] = ()
    etag: str = ""

    @property
    def ref(self) -> WorkItemRef | None:
        if not self.work_item_id:
            return None
        return WorkItemRef(id=self.work_item_id, number=self.work_item_number, url=self.work_item_url or None)

    def leased_by_other(self, owner: str, now: datetime) -> bool:
        return bool(self.lease_owner) and self.lease_owner != owner and (self.lease_until or now) > now

    def seen(self, delivery_id: str) -> bool:
        return delivery_id in self.recent_deliveries

    def with_delivery(self, delivery_id: str) -> tuple[str, ...]:
        return (*self.recent_deliveries, delivery_id)[-RECENT_DELIVERIES:]


def partition_of(connection: str, key: str) -> str:
    return f"{connection}-{bucket_of(key, BUCKETS):02d}"


_TUPLES = ("recent_deliveries", "configuration_items", "pending_cis", "alert_ids")


def _to_entity(row: Correlation) -> dict[str, object]:
    data = row.model_dump(exclude={"etag", "connection", "key", *_TUPLES})
    entity: dict[str, object] = {
        "PartitionKey": partition_of(row.connection, row.key),
        "RowKey": row.key,
        "Connection": row.connection,
    }
    for name, value in data.items():
        if value is None:
            continue
        entity[name] = value.value if isinstance(value, StrEnum) else value
    for name in _TUPLES:
        entity[name] = json.dumps(list(getattr(row, name)))
    return entity


def _from_entity(entity: dict[str, object]) -> Correlation:
    data: dict[str, object] = {
        name: value for name, value in entity.items() if name[0].islower() and name not in _TUPLES
    }
    for name, value in list(data.items()):
        if isinstance(value, datetime) and value.tzinfo is None:
            data[name] = value.replace(tzinfo=UTC)
    for name in _TUPLES:
        data[name] = tuple(json.loads(str(entity.get(name) or "[]")))
    return Correlation.model_validate(
        {**data, "connection": entity["Connection"], "key": entity["RowKey"], "etag": entity.get("_etag", "")}
    )


class CorrelationRepository:
    def __init__(self, table: TableClient) -> None:
        self._table = table

    def get(self, connection: str, key: str) -> Correlation | None:
        entity = get_entity(self._table, partition_of(connection, key), key)
        if entity is None:
            return None
        return _from_entity(entity)

    def insert(self, row: Correlation) -> Correlation:
        """Conditional insert: AlreadyExistsError when another instance got there first."""
        etag = insert_entity(self._table, _to_entity(row))
        return row.model_copy(update={"etag": etag})

    def replace(self, row: Correlation) -> Correlation:
        """ETag-matched replace of a row read earlier; EtagConflict if it changed since."""
        etag = replace_if_match(self._table, _to_entity(row), row.etag)
        return row.model_copy(update={"etag": etag})

    def list(self, connection: str, state: CorrelationState | None = None) -> Iterator[Correlation]:
        query = "PartitionKey ge @lo and PartitionKey lt @hi and Connection eq @c"
        params: dict[str, object] = {"lo": f"{connection}-", "hi": f"{connection}.", "c": connection}
        if state is not None:
            query += " and state eq @state"
            params["state"] = state.value
        for entity in query_entities(self._table, query, params):
            yield _from_entity(entity)
