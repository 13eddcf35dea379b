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
from itertools import islice

from azure.data.tables import TableClient

from shared_code.domain.correlation import (
    Correlation,
    CorrelationState,
)
from shared_code.state.tables import bucket_of, get_entity, insert_entity, query_entities, replace_if_match

TABLE = "Correlations"
BUCKETS = 16


def partition_of(connection: str, key: str) -> str:
    return f"{connection}-{bucket_of(key, BUCKETS):02d}"


_TUPLES = (
    "recent_deliveries",
    "configuration_items",
    "pending_cis",
    "alert_ids",
    "firing_alerts",
    "resolved_alerts",
)


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
        return row.with_etag(etag)

    def replace(self, row: Correlation) -> Correlation:
        """ETag-matched replace of a row read earlier; EtagConflict if it changed since."""
        etag = replace_if_match(self._table, _to_entity(row), row.etag)
        return row.with_etag(etag)

    def list(self, connection: str, state: CorrelationState | None = None) -> Iterator[Correlation]:
        query = "PartitionKey ge @lo and PartitionKey lt @hi and Connection eq @c"
        params: dict[str, object] = {"lo": f"{connection}-", "hi": f"{connection}.", "c": connection}
        if state is not None:
            query += " and state eq @state"
            params["state"] = state.value
        for entity in query_entities(self._table, query, params):
            yield _from_entity(entity)

    def pending(self, connection: str, limit: int) -> tuple[Correlation, ...]:
        """Open rows with counted, unnoted firings: the service filters, only those come back."""
        query = (
            "PartitionKey ge @lo and PartitionKey lt @hi and Connection eq @c "
            "and state eq @state and unnoted_fires gt 0"
        )
        params: dict[str, object] = {
            "lo": f"{connection}-",
            "hi": f"{connection}.",
            "c": connection,
            "state": CorrelationState.OPEN.value,
        }
        return tuple(
            _from_entity(entity) for entity in islice(query_entities(self._table, query, params), limit)
        )
