"""A delivery that meets a Table Storage failure is retried by the queue, not ended ``failed``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from shared_code.alerts.delivery import AlertDelivery, DeliveryMessage
from shared_code.alerts.processor import AlertProcessor
from shared_code.domain.connection import ConnectionBase
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.delivery import Delivery, DeliveryKey, DeliveryStatus
from shared_code.errors import ItsmRejectedError, NotFoundError, RetryLaterError, StateError
from shared_code.products import parse_connection
from tests.fakes.itsm import FakeItsm
from tests.fakes.state import InMemoryCorrelations
from tests.unit.test_alert_processor import signal

T0 = datetime(2026, 11, 1, 12, tzinfo=UTC)
DELIVERY = "0123456789abcdef0123456789abcdef"


class Connections:
    def __init__(self, connection: ConnectionBase) -> None:
        self.connection = connection

    def get(self, name: str) -> ConnectionBase:
        if name != self.connection.name:
            raise NotFoundError(f"no ITSM connection named {name!r}")
        return self.connection

    def list(self) -> list[ConnectionBase]:
        return [self.connection]


class Deliveries:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Delivery] = {}

    def insert(self, delivery: Delivery) -> None:
        self.rows[(delivery.connection, delivery.delivery_id)] = delivery

    def get(self, connection: str, delivery_id: str) -> Delivery | None:
        return self.rows.get((connection, delivery_id))

    def save(self, delivery: Delivery) -> None:
        self.rows[(delivery.connection, delivery.delivery_id)] = delivery

    def save_result(self, delivery: Delivery) -> None:
        self.save(delivery)

    def touch(self, connection: str, delivery_id: str, now: datetime) -> None:
        return None

    def stale_pending(self, before: datetime, *, limit: int = 500) -> list[DeliveryKey]:
        return []

    def list(
        self, *, connection: str | None = None, status: DeliveryStatus | None = None, limit: int = 1000
    ) -> Iterator[Delivery]:
        yield from list(self.rows.values())[:limit]


class FlakyCorrelations(InMemoryCorrelations):
    """The Correlations table, unreachable for its first ``outages`` calls (reads and writes)."""

    def __init__(self, outages: int) -> None:
        super().__init__()
        self.outages = outages

    def _down(self) -> None:
        if self.outages > 0:
            self.outages -= 1
            raise StateError("Correlations failed: 127.0.0.1 did not answer in time")

    def get(self, connection: str, key: str) -> Correlation | None:
        self._down()
        return super().get(connection, key)

    def insert(self, row: Correlation) -> Correlation:
        self._down()
        return super().insert(row)

    def replace(self, row: Correlation) -> Correlation:
        self._down()
        return super().replace(row)


def service(outages: int, itsm: FakeItsm, max_attempts: int = 3) -> tuple[AlertDelivery, Deliveries]:
    connection = parse_connection(
        {
            "name": "sn",
            "partner_type": "servicenow",
            "server_url": "https://contoso.service-now.com",
            "username": "svc",
            "client_id": "cid",
        }
    )
    deliveries = Deliveries()
    processor = AlertProcessor(
        FlakyCorrelations(outages), lambda: T0, lease_seconds=60, busy_budget_seconds=0.1
    )
    delivery = AlertDelivery(
        Connections(connection),
        deliveries,
        processor,
        lambda _connection: itsm.ports(),
        lambda: T0,
        max_attempts=max_attempts,
        sleep=lambda _seconds: None,
    )
    return delivery, deliveries


def message() -> DeliveryMessage:
    return DeliveryMessage(connection="sn", delivery_id=DELIVERY, signal=signal())


def test_a_table_storage_failure_is_retried_by_the_queue_and_the_next_attempt_delivers() -> None:
    itsm = FakeItsm()
    delivery, deliveries = service(outages=1, itsm=itsm)
    with pytest.raises(RetryLaterError):
        delivery.deliver(message(), attempt=1)
    pending = deliveries.get("sn", DELIVERY)
    assert pending is not None
    assert (pending.status, pending.attempts) == (DeliveryStatus.PENDING, 1)
    assert "StateError" in pending.last_error
    assert itsm.incidents == {}  # nothing reached the product while the row could not be read

    done = delivery.deliver(message(), attempt=2)
    assert done is not None
    assert done.status is DeliveryStatus.DELIVERED
    assert len(itsm.incidents) == 1


def test_storage_that_stays_down_ends_failed_only_at_the_last_attempt() -> None:
    delivery, deliveries = service(outages=10, itsm=FakeItsm(), max_attempts=3)
    for attempt in (1, 2):
        with pytest.raises(RetryLaterError):
            delivery.deliver(message(), attempt=attempt)
        stored = deliveries.get("sn", DELIVERY)
        assert stored is not None
        assert stored.status is DeliveryStatus.PENDING
    ended = delivery.deliver(message(), attempt=3)
    assert ended is not None
    assert (ended.status, ended.attempts) == (DeliveryStatus.FAILED, 3)


def test_a_refusal_no_retry_can_fix_ends_failed_at_once() -> None:
    itsm = FakeItsm()
    itsm.fail_next.append(ItsmRejectedError("ServiceNow rejected POST incident (HTTP 400)", status=400))
    delivery, _ = service(outages=0, itsm=itsm)
    ended = delivery.deliver(message(), attempt=1)
    assert ended is not None
    assert (ended.status, ended.attempts) == (DeliveryStatus.FAILED, 1)
    assert CorrelationState.CREATING.value not in ended.last_error
