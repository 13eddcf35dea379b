"""A received alert notification and what became of it (the AlertDeliveries row, as a value)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from shared_code.domain.alert import AlertSignal
from shared_code.domain.record import Record


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Delivery(Record):
    """One received alert notification and what became of it."""

    connection: str
    delivery_id: str
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    last_error: str = ""
    outcome: str = ""
    work_item_id: str = ""
    work_item_number: str = ""
    correlation_key: str = ""
    received_at: datetime
    updated_at: datetime
    signal: AlertSignal


class DeliveryKey(NamedTuple):
    """What finds one delivery: its connection and id."""

    connection: str
    delivery_id: str
