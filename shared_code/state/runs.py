"""The Runs table: one row per job run (a sync of one connection and type), newest first.

Rows of one job share a partition and their row key is an inverted timestamp, so the newest run
is the first row a query returns; a random suffix keeps two runs started in the same tick apart.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from azure.data.tables import TableClient

from shared_code.domain.runs import RunRecord
from shared_code.state.tables import insert_entity, query_entities

TABLE = "Runs"
ERROR_LIMIT = 4000
_MAX_MICROS = 10**17  # far beyond year 9999 in microseconds since the epoch


def inverted_key(moment: datetime, suffix: str | None = None) -> str:
    """A row key that sorts newest first: (max - microseconds since epoch), zero-padded, + suffix."""
    micros = int(moment.timestamp() * 1_000_000)
    return f"{_MAX_MICROS - micros:017d}-{suffix or uuid.uuid4().hex[:8]}"


def inverted_prefix(moment: datetime) -> str:
    """The smallest ``inverted_key`` of a row older than ``moment``: older rows sort at or after it."""
    micros = int(moment.timestamp() * 1_000_000)
    return f"{_MAX_MICROS - micros + 1:017d}"


def _to_entity(run: RunRecord) -> dict[str, object]:
    return {
        "PartitionKey": run.job,
        "RowKey": inverted_key(run.started_at, run.run_id),
        "RunId": run.run_id,
        "Trigger": run.trigger,
        "Connection": run.connection,
        "ItemType": run.item_type,
        "StartedAt": run.started_at,
        "FinishedAt": run.finished_at,
        "DurationSeconds": round(run.duration_seconds, 3),
        "Outcome": run.outcome,
        "Counts": json.dumps(run.counts, sort_keys=True),
        **{f"Count_{name}": value for name, value in run.counts.items()},
        "Error": run.error[:ERROR_LIMIT],
        "Detail": run.detail[:ERROR_LIMIT],
    }


def _from_entity(entity: dict[str, Any]) -> RunRecord:
    def when(value: Any) -> datetime:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    return RunRecord(
        job=str(entity["PartitionKey"]),
        run_id=str(entity.get("RunId", "")),
        trigger=str(entity.get("Trigger", "")),
        connection=str(entity.get("Connection", "")),
        item_type=str(entity.get("ItemType", "")),
        started_at=when(entity["StartedAt"]),
        finished_at=when(entity["FinishedAt"]),
        duration_seconds=float(entity.get("DurationSeconds", 0.0)),
        outcome=str(entity.get("Outcome", "")),
        counts=json.loads(str(entity.get("Counts") or "{}")),
        error=str(entity.get("Error", "")),
        detail=str(entity.get("Detail", "")),
    )


class RunRepository:
    def __init__(self, table: TableClient) -> None:
        self._table = table

    def record(self, run: RunRecord) -> None:
        insert_entity(self._table, _to_entity(run))

    def list(
        self, job: str = "sync", *, connection: str | None = None, limit: int = 50
    ) -> Iterator[RunRecord]:
        """The newest runs of ``job`` first (optionally of one connection), at most ``limit``."""
        query, params = "PartitionKey eq @job", {"job": job}
        if connection is not None:
            query += " and Connection eq @c"
            params["c"] = connection
        for count, entity in enumerate(query_entities(self._table, query, params)):
            if count >= limit:
                return
            yield _from_entity(entity)
