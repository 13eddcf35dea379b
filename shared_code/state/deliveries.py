"""The AlertDeliveries table: every received alert, stored before the webhook answers.

Partitions are ``<connection>-<bucket>`` with the bucket taken from the delivery id, so a storm on
one connection spreads over 16 partitions and a delivery is still found from its id alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from azure.data.tables import TableClient

from shared_code.domain.alert import AlertSignal
from shared_code.domain.delivery import Delivery, DeliveryKey, DeliveryStatus
from shared_code.state.tables import bucket_of, get_entity, insert_entity, merge_entity, query_entities

log = logging.getLogger(__name__)


TABLE = "AlertDeliveries"
BUCKETS = 16


def partition_of(connection: str, delivery_id: str) -> str:
    return f"{connection}-{bucket_of(delivery_id, BUCKETS):02d}"


def _to_entity(delivery: Delivery) -> dict[str, object]:
    return {
        "PartitionKey": partition_of(delivery.connection, delivery.delivery_id),
        "RowKey": delivery.delivery_id,
        "Connection": delivery.connection,
        "Status": delivery.status.value,
        "Attempts": delivery.attempts,
        "LastError": delivery.last_error[:2000],
        "Outcome": delivery.outcome,
        "WorkItemId": delivery.work_item_id,
        "WorkItemNumber": delivery.work_item_number,
        "CorrelationKey": delivery.correlation_key,
        "ReceivedAt": delivery.received_at,
        "UpdatedAt": delivery.updated_at,
        "AlertId": delivery.signal.alert_id,
        "Rule": delivery.signal.rule,
        "Condition": delivery.signal.condition.value,
        "Severity": delivery.signal.severity.value,
        "Signal": delivery.signal.model_dump_json(),
    }


def _as_utc(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value))


def _from_entity(entity: dict[str, object]) -> Delivery:
    return Delivery(
        connection=str(entity["Connection"]),
        delivery_id=str(entity["RowKey"]),
        status=DeliveryStatus(str(entity["Status"])),
        attempts=int(str(entity.get("Attempts", 0))),
        last_error=str(entity.get("LastError", "")),
        outcome=str(entity.get("Outcome", "")),
        work_item_id=str(entity.get("WorkItemId", "")),
        work_item_number=str(entity.get("WorkItemNumber", "")),
        correlation_key=str(entity.get("CorrelationKey", "")),
        received_at=_as_utc(entity.get("ReceivedAt") or entity["UpdatedAt"]),
        updated_at=_as_utc(entity["UpdatedAt"]),
        signal=AlertSignal.model_validate_json(str(entity["Signal"])),
    )


class DeliveryRepository:
    def __init__(self, table: TableClient) -> None:
        self._table = table

    def insert(self, delivery: Delivery) -> None:
        """Store a new delivery; AlreadyExistsError when this exact notification arrived before."""
        insert_entity(self._table, _to_entity(delivery))

    def get(self, connection: str, delivery_id: str) -> Delivery | None:
        entity = get_entity(self._table, partition_of(connection, delivery_id), delivery_id)
        return _from_entity(entity) if entity else None

    def save(self, delivery: Delivery) -> None:
        merge_entity(self._table, _to_entity(delivery))

    def save_result(self, delivery: Delivery) -> None:
        """Record the outcome columns (and the alert, which does not change); the receipt time
        stays as stored. A row deleted meanwhile comes back whole enough to be listed."""
        entity = _to_entity(delivery)
        merge_entity(self._table, {name: value for name, value in entity.items() if name != "ReceivedAt"})

    def touch(self, connection: str, delivery_id: str, now: datetime) -> None:
        """Stamp ``UpdatedAt`` (a pending delivery was queued again: not stale for a while)."""
        merge_entity(
            self._table,
            {"PartitionKey": partition_of(connection, delivery_id), "RowKey": delivery_id, "UpdatedAt": now},
        )

    def stale_pending(self, before: datetime, *, limit: int = 500) -> list[DeliveryKey]:
        """Pending deliveries not updated since ``before``: only their keys, at most ``limit``.

        The filter runs in the service and only three short columns come back, so the sweep costs
        what it finds, not the size of the table (delivered rows, with their alerts, stay put).
        """
        found: list[DeliveryKey] = []
        if limit <= 0:
            return found
        rows = query_entities(
            self._table,
            "Status eq @status and UpdatedAt lt @before",
            {"status": DeliveryStatus.PENDING.value, "before": before},
            select=["RowKey", "Connection"],
            page_size=min(limit, 1000),
        )
        for entity in rows:
            if len(found) >= limit:
                break
            connection, delivery_id = str(entity.get("Connection", "")), str(entity.get("RowKey", ""))
            if connection and delivery_id:
                found.append(DeliveryKey(connection=connection, delivery_id=delivery_id))
        return found

    def list(
        self, *, connection: str | None = None, status: DeliveryStatus | None = None, limit: int = 1000
    ) -> Iterator[Delivery]:
        clauses: list[str] = []
        params: dict[str, object] = {}
        if connection:
            # partitions of one connection sort between "<name>-" and "<name>." ('.' follows '-');
            # the Connection column tells "sn" from "sn-prod" inside that range
            clauses.append("PartitionKey ge @lo and PartitionKey lt @hi and Connection eq @connection")
            params |= {"lo": f"{connection}-", "hi": f"{connection}.", "connection": connection}
        if status:
            clauses.append("Status eq @status")
            params["status"] = status.value
        query = " and ".join(clauses) or "PartitionKey ne ''"
        count = 0
        for entity in query_entities(self._table, query, params):
            if count >= limit:
                return
            try:
                delivery = _from_entity(entity)
            except (KeyError, ValueError) as exc:  # one damaged row must not hide the others
                log.warning(
                    "skipping unreadable delivery row %s: %s", entity.get("RowKey"), type(exc).__name__
                )
                continue
            count += 1
            yield delivery
