"""The Correlations table: the open work item of each problem, one row per correlation key.

Every change is a conditional insert or an ETag-matched replace, never a blind write: that is
what makes "one work item per problem" hold when many instances handle the same storm at once.
Partitions are ``<connection>-<bucket>`` (bucket from the key) so one storm spreads out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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
CI_LIMIT = 100
"""Configuration items a row remembers (the newest), and those waiting for the next note."""
ALERT_ID_LIMIT = 100
"""Azure alert ids a row remembers per list (alert_ids, firing_alerts, resolved_alerts), the newest.

Every list on the row is bounded: Table Storage refuses a string property over 64 KiB (and an
entity over 1 MiB), so an unbounded list would one day make every write of the problem fail."""


def newest(items: Iterable[str], limit: int) -> tuple[str, ...]:
    """``items`` without repeats (a repeated item counts where it last occurs), the last ``limit``."""
    ordered = list(dict.fromkeys(reversed(list(items))))
    ordered.reverse()
    return tuple(ordered[-limit:]) if limit > 0 else ()


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
    """Every Azure alert id of the problem seen lately (backward sync closes them), the newest 100."""
    firing_alerts: tuple[str, ...] = ()
    """Alert ids of the current work item that fired and did not resolve yet."""
    resolved_alerts: tuple[str, ...] = ()
    """Alert ids that resolved (kept across generations): a late 'fired' of one of them is ignored."""
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

    def is_resolved_alert(self, alert_id: str) -> bool:
        return alert_id in self.resolved_alerts

    def is_late_firing(self, alert_id: str, fired_at: datetime) -> bool:
        """A 'fired' that belongs to an alert already resolved (delivered after its resolution).

        Decided by the alert's own id: another alert of the problem that fired earlier but is still
        active is not late. Rows written before the id sets existed fall back to the firing time.
        """
        if self.resolved_alerts:
            return alert_id in self.resolved_alerts
        return self.resolved_alert_fired_at is not None and fired_at <= self.resolved_alert_fired_at

    def firing_change(self, alert_id: str) -> dict[str, object]:
        """The lists after ``alert_id`` fired: it is active (unless it resolved already) and known."""
        change: dict[str, object] = {"alert_ids": newest((*self.alert_ids, alert_id), ALERT_ID_LIMIT)}
        if alert_id not in self.resolved_alerts:
            change["firing_alerts"] = newest((*self.firing_alerts, alert_id), ALERT_ID_LIMIT)
        return change

    def still_firing_without(self, alert_id: str) -> tuple[str, ...]:
        """The alert ids still active once ``alert_id`` resolved."""
        return tuple(other for other in self.firing_alerts if other != alert_id)

    def resolution_change(self, alert_id: str) -> dict[str, object]:
        """The lists after ``alert_id`` resolved: no longer active, remembered as resolved."""
        return {
            "firing_alerts": self.still_firing_without(alert_id),
            "resolved_alerts": newest((*self.resolved_alerts, alert_id), ALERT_ID_LIMIT),
            "alert_ids": newest((*self.alert_ids, alert_id), ALERT_ID_LIMIT),
        }


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
