"""What the capabilities need from the state tables, as small Protocols.

The Table Storage repositories in ``shared_code/state/`` implement them; unit tests pass
hand-written fakes that type-check without ignores. Conditional semantics are part of the
contract: ``insert`` raises ``AlreadyExistsError`` when the row exists, ``replace`` raises
``EtagConflict`` when the row changed since it was read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Protocol

from shared_code.domain.connection import ConnectionBase
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.delivery import Delivery, DeliveryKey, DeliveryStatus
from shared_code.domain.runs import RunRecord, SyncStateRow
from shared_code.domain.sync import SyncErrorRecord
from shared_code.domain.workitem import WorkItem


class ConnectionStore(Protocol):
    def get(self, name: str) -> ConnectionBase:
        """The connection called ``name``; NotFoundError when there is none."""
        ...

    def list(self) -> list[ConnectionBase]: ...


class DeliveryStore(Protocol):
    def insert(self, delivery: Delivery) -> None:
        """Store a new delivery; AlreadyExistsError when this exact notification arrived before."""
        ...

    def get(self, connection: str, delivery_id: str) -> Delivery | None: ...

    def save(self, delivery: Delivery) -> None: ...

    def save_result(self, delivery: Delivery) -> None:
        """Record the outcome columns; the receipt time stays as stored."""
        ...

    def touch(self, connection: str, delivery_id: str, now: datetime) -> None:
        """Stamp the delivery as just queued again."""
        ...

    def stale_pending(self, before: datetime, *, limit: int = 500) -> list[DeliveryKey]:
        """Keys of the pending deliveries not updated since ``before`` (at most ``limit``)."""
        ...

    def list(
        self, *, connection: str | None = None, status: DeliveryStatus | None = None, limit: int = 1000
    ) -> Iterator[Delivery]: ...


class CorrelationStore(Protocol):
    def get(self, connection: str, key: str) -> Correlation | None: ...

    def insert(self, row: Correlation) -> Correlation:
        """Conditional insert; AlreadyExistsError when another instance got there first."""
        ...

    def replace(self, row: Correlation) -> Correlation:
        """ETag-matched replace; EtagConflict when the row changed since it was read."""
        ...

    def list(self, connection: str, state: CorrelationState | None = None) -> Iterator[Correlation]: ...

    def pending(self, connection: str, limit: int) -> tuple[Correlation, ...]:
        """Open rows with firings counted but not noted yet (at most ``limit``): read by a filtered
        query, never by reading every row of the connection."""
        ...


class WorkItemStore(Protocol):
    def upsert_many(self, items: Sequence[WorkItem]) -> int:
        """Insert or replace every item (idempotent); the number written."""
        ...


class SyncErrorStore(Protocol):
    def add_many(self, records: Sequence[SyncErrorRecord]) -> None: ...


class SyncStateStore(Protocol):
    """The leased, watermarked state rows of a timed job (SyncState for the sync)."""

    def get(self, connection: str, item_type: str) -> SyncStateRow | None: ...

    def insert(self, row: SyncStateRow) -> SyncStateRow:
        """Conditional insert; AlreadyExistsError when another run created the row first."""
        ...

    def replace(self, row: SyncStateRow) -> SyncStateRow:
        """ETag-matched replace; EtagConflict when another run wrote since ``row`` was read."""
        ...


class RunLog(Protocol):
    def record(self, run: RunRecord) -> None: ...


class ExpiringRows(Protocol):
    """One table's rows that expire with age (the retention job deletes them)."""

    def delete_older_than(self, before: datetime, *, limit: int) -> int:
        """Delete at most ``limit`` rows that expired before ``before``; how many were deleted."""
        ...
