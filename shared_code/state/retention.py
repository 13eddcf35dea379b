"""Deleting expired rows: a filtered key query, then entity group transactions per partition.

Only keys (and ETags) are read. Deletes go in transactions of up to 100 rows of one partition; each
delete is ETag-matched, so a row written after it was read (a delivery redriven back to pending)
is kept. A transaction refused because one of its rows changed or vanished is retried row by row,
so one busy row does not keep the other 99 alive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, TableTransactionError, TransactionOperation

from shared_code.domain.delivery import DeliveryStatus
from shared_code.state.runs import inverted_prefix
from shared_code.state.tables import Entity, query_entities, translate_errors

log = logging.getLogger(__name__)

MAX_OPERATIONS = 100  # the service's limit per transaction
KEYS = ["PartitionKey", "RowKey"]


@dataclass(frozen=True)
class Expiry:
    """Which rows of one table are expired: an OData filter (with parameters) over the table."""

    query: str
    parameters: dict[str, Any]


def deliveries_expired(before: datetime) -> Expiry:
    """Delivered or failed deliveries last updated before ``before``; never a pending one.

    (The SDK substitutes parameters in words split on spaces: hence the spaced parentheses.)
    """
    return Expiry(
        "( Status eq @delivered or Status eq @failed ) and UpdatedAt lt @before",
        {
            "delivered": DeliveryStatus.DELIVERED.value,
            "failed": DeliveryStatus.FAILED.value,
            "before": before,
        },
    )


def newest_first_expired(before: datetime) -> Expiry:
    """Rows keyed by ``inverted_key`` (Runs, SyncErrors) that started before ``before``: a row-key
    range, which the service answers from its index instead of reading every column."""
    return Expiry("RowKey ge @oldest", {"oldest": inverted_prefix(before)})


def delete_expired(table: TableClient, expiry: Expiry, *, limit: int) -> int:
    """Delete at most ``limit`` expired rows; returns how many were deleted."""
    if limit <= 0:
        return 0
    rows: list[Entity] = []
    for entity in query_entities(
        table, expiry.query, expiry.parameters, select=KEYS, page_size=min(limit, 1000)
    ):
        if len(rows) >= limit:
            break
        rows.append(entity)
    return delete_rows(table, rows)


def delete_rows(table: TableClient, rows: list[Entity]) -> int:
    """Delete ``rows`` (read with their ETags; any partitions) unless written since; how many went."""
    by_partition: dict[str, list[Entity]] = {}
    for row in rows:
        by_partition.setdefault(str(row["PartitionKey"]), []).append(row)
    deleted = 0
    for group in by_partition.values():
        for start in range(0, len(group), MAX_OPERATIONS):
            deleted += _delete_chunk(table, group[start : start + MAX_OPERATIONS])
    return deleted


def _delete_chunk(table: TableClient, rows: list[Entity]) -> int:
    operations: list[tuple[TransactionOperation, Entity, dict[str, Any]]] = [
        (TransactionOperation.DELETE, _keys(row), _if_match(row)) for row in rows
    ]
    try:
        with translate_errors(f"deleting expired rows from {table.table_name}"):
            try:
                table.submit_transaction(operations)
            except TableTransactionError:
                return _delete_one_by_one(table, rows)
    except ResourceNotFoundError:  # the table itself is gone: nothing left to delete
        return 0
    return len(rows)


def _delete_one_by_one(table: TableClient, rows: list[Entity]) -> int:
    deleted = 0
    for row in rows:
        try:
            table.delete_entity(_keys(row), **_if_match(row))
        except (ResourceModifiedError, ResourceNotFoundError):
            continue  # written since it was read (kept), or deleted by someone else
        deleted += 1
    return deleted


def _keys(row: Entity) -> Entity:
    return {"PartitionKey": row["PartitionKey"], "RowKey": row["RowKey"]}


def _if_match(row: Entity) -> dict[str, Any]:
    etag = str(row.get("_etag") or "")
    if not etag:
        return {}
    return {"etag": etag, "match_condition": MatchConditions.IfNotModified}


class ExpiredRows:
    """One table's retention rule, as the retention job's port: delete what is older than a time."""

    def __init__(self, table: TableClient, expiry: Callable[[datetime], Expiry]) -> None:
        self._table = table
        self._expiry = expiry

    def delete_older_than(self, before: datetime, *, limit: int) -> int:
        return delete_expired(self._table, self._expiry(before), limit=limit)
