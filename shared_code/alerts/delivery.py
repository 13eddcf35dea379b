"""The queue's half of delivery: run the processor, record the outcome, decide retry or failure.

At-least-once end to end: a failure the next attempt may fix leaves the delivery ``pending`` and
raises ``RetryLaterError`` (the queue trigger lets the host redeliver the message); one that
cannot be fixed by waiting, or that used up its attempts, ends ``failed``: listed by
``alerts list --status failed`` and sent again by ``alerts redrive``, never dropped silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared_code.alerts.intake import DELIVERY_ID
from shared_code.alerts.pending import PendingNotes
from shared_code.alerts.processor import AlertProcessor, Outcome
from shared_code.domain.alert import AlertSignal
from shared_code.domain.connection import CONNECTION_NAME, ConnectionBase
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.errors import (
    BusyError,
    InvalidInputError,
    ItsmUnavailableError,
    NotFoundError,
    RetryLaterError,
    SecretStoreError,
    StateError,
    shown,
)
from shared_code.ports.itsm import ConnectorPorts
from shared_code.ports.state import ConnectionStore, DeliveryStore
from shared_code.telemetry import metrics

log = logging.getLogger(__name__)

TRANSIENT = (ItsmUnavailableError, BusyError, StateError, SecretStoreError)


class DeliveryMessage(BaseModel):
    """The queue message the webhook leaves for the delivery function.

    Validated as strictly as the webhook's route: a queue message is input too (anyone holding the
    storage key can write one, and a damaged one must not reach storage or the ITSM product).
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    connection: str
    delivery_id: str = Field(alias="deliveryId")
    signal: AlertSignal | None = None

    @field_validator("connection")
    @classmethod
    def _connection(cls, value: str) -> str:
        if not CONNECTION_NAME.match(value):
            raise ValueError("is not a connection name")
        return value

    @field_validator("delivery_id")
    @classmethod
    def _delivery_id(cls, value: str) -> str:
        if not DELIVERY_ID.match(value):
            raise ValueError("is not a delivery id (32 lower-case hex digits)")
        return value

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def from_queue(cls, body: bytes | str) -> DeliveryMessage:
        """The message in a queue body; InvalidInputError (naming fields, never echoing values) if
        it is not one."""
        try:
            return cls.model_validate_json(body)
        except ValidationError as exc:
            problems = [
                ".".join(shown(part, 40) if isinstance(part, str) else str(part) for part in error["loc"])
                + f" {error['msg'][:120]}"
                for error in exc.errors(include_url=False, include_input=False)[:3]
            ]
            raise InvalidInputError("not a delivery message: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class Redriven:
    """One delivery an ``alerts redrive`` handled: as it ended, or as it was (``storage_error``: the
    state tables failed for it; it is unchanged, and a later redrive tries again)."""

    delivery: Delivery
    storage_error: str = ""


@dataclass
class AlertDelivery:
    connections: ConnectionStore
    deliveries: DeliveryStore
    processor: AlertProcessor
    connector_for: Callable[[ConnectionBase], ConnectorPorts]
    clock: Callable[[], datetime]
    max_attempts: int = 5
    sleep: Callable[[float], None] = time.sleep

    def deliver(self, message: DeliveryMessage, attempt: int = 1, *, final: bool = False) -> Delivery | None:
        """Deliver one stored alert. Returns the updated delivery, or None when it was not found.

        ``final``: no retry follows (a redrive in this process), so a transient failure ends it
        ``failed`` instead of raising ``RetryLaterError`` for the queue.
        """
        if self._unknown_connection(message):
            return self._drop_for_unknown_connection(message)
        signal = message.signal
        stored: Delivery | None = None
        if signal is None:
            stored = self.deliveries.get(message.connection, message.delivery_id)
            if stored is None:
                log.error(
                    "delivery %s of %s not found; nothing to do", message.delivery_id, message.connection
                )
                return None
            signal = stored.signal
        try:
            connection = self.connections.get(message.connection)
            result = self.processor.process(
                connection, self.connector_for(connection), message.delivery_id, signal
            )
        except TRANSIENT as exc:
            return self._failed_attempt(message, signal, stored, attempt, exc, transient=not final)
        except Exception as exc:  # noqa: BLE001 - anything else cannot be fixed by waiting: end it failed
            return self._failed_attempt(message, signal, stored, attempt, exc, transient=False)
        if result.repeat:
            recorded = self._recorded_elsewhere(message)
            if recorded is not None:
                return recorded  # keep what the handling that had the effect recorded ("created"...)
        now = self.clock()
        ref = result.work_item
        done = Delivery(
            connection=message.connection,
            delivery_id=message.delivery_id,
            status=DeliveryStatus.DELIVERED,
            attempts=max(attempt, (stored.attempts + 1) if stored else 1),
            outcome=result.outcome.value + (f": {result.detail}" if result.detail else ""),
            work_item_id=ref.id if ref else "",
            work_item_number=ref.number if ref else "",
            correlation_key=result.correlation_key,
            received_at=stored.received_at if stored else signal_time(signal, now),
            updated_at=now,
            signal=signal,
        )
        self.deliveries.save_result(done)
        counters = metrics()
        counters.deliveries.add(1, {"outcome": result.outcome.value})
        if result.outcome is Outcome.COALESCED:
            counters.coalesced_firings.add(1)
        log.info(
            "delivery %s on %s: %s %s",
            message.delivery_id,
            message.connection,
            result.outcome.value,
            ref.number if ref else "",
        )
        return done

    def _unknown_connection(self, message: DeliveryMessage) -> bool:
        try:
            self.connections.get(message.connection)
        except NotFoundError:
            return True
        except TRANSIENT:
            return False  # cannot tell now: the delivery below meets the same trouble and retries
        return False

    def _drop_for_unknown_connection(self, message: DeliveryMessage) -> Delivery | None:
        """A message for a connection that does not exist writes nothing; the stored delivery of a
        connection removed since is ended ``failed`` (it would otherwise be redriven forever)."""
        stored = self.deliveries.get(message.connection, message.delivery_id)
        if stored is None:
            log.error(
                "dropping delivery %s: there is no connection named %s and no such stored delivery",
                message.delivery_id,
                message.connection,
            )
            return None
        failed = stored.model_copy(
            update={
                "status": DeliveryStatus.FAILED,
                "attempts": stored.attempts + 1,
                "last_error": f"NotFoundError: no ITSM connection named {message.connection!r} (removed?)",
                "updated_at": self.clock(),
            }
        )
        self.deliveries.save(failed)
        log.error(
            "delivery %s failed: connection %s no longer exists", message.delivery_id, message.connection
        )
        return failed

    def _recorded_elsewhere(self, message: DeliveryMessage, waits: int = 10) -> Delivery | None:
        """The row as recorded by the handling of this notification that had its effect.

        A redelivered message finds its effect done: the handling that did it records its result
        right after, so wait briefly for that rather than overwrite it with "duplicate". None when
        nothing is recorded (that handling died in between): then this one records the delivery.
        """
        for attempt in range(waits + 1):
            if attempt:
                self.sleep(0.05)
            row = self.deliveries.get(message.connection, message.delivery_id)
            if row is not None and row.status is DeliveryStatus.DELIVERED:
                return row
        return None

    def _failed_attempt(
        self,
        message: DeliveryMessage,
        signal: AlertSignal,
        stored: Delivery | None,
        attempt: int,
        exc: Exception,
        *,
        transient: bool,
    ) -> Delivery:
        stored = stored or self.deliveries.get(message.connection, message.delivery_id)
        now = self.clock()
        attempts = max(attempt, (stored.attempts + 1) if stored else 1)
        give_up = not transient or attempts >= self.max_attempts
        error = f"{type(exc).__name__}: {exc}"
        updated = Delivery(
            connection=message.connection,
            delivery_id=message.delivery_id,
            status=DeliveryStatus.FAILED if give_up else DeliveryStatus.PENDING,
            attempts=attempts,
            last_error=error,
            outcome=stored.outcome if stored else "",
            work_item_id=stored.work_item_id if stored else "",
            work_item_number=stored.work_item_number if stored else "",
            correlation_key=stored.correlation_key if stored else "",
            received_at=stored.received_at if stored else now,
            updated_at=now,
            signal=signal,
        )
        self.deliveries.save(updated)
        metrics().delivery_failures.add(1, {"final": give_up, "error": type(exc).__name__})
        if give_up:
            log.error(
                "delivery %s on %s failed after %d attempt(s): %s",
                message.delivery_id,
                message.connection,
                attempts,
                error,
            )
            return updated
        log.warning("delivery %s attempt %d failed, will retry: %s", message.delivery_id, attempts, error)
        raise RetryLaterError(f"delivery {message.delivery_id} attempt {attempts} failed: {error}") from exc

    def redrive(
        self,
        *,
        connection: str | None = None,
        status: DeliveryStatus = DeliveryStatus.FAILED,
        older_than: timedelta | None = None,
        delivery_ids: list[str] | None = None,
        limit: int = 500,
    ) -> Iterator[Redriven]:
        """Deliver again, in this process, the deliveries that ended ``status`` (or the ids given).

        A storage failure on one delivery is reported with it and the redrive goes on with the next:
        one unreadable or unwritable row must not keep the others from being delivered.
        """
        if delivery_ids:
            if not connection:
                raise NotFoundError("redriving by id needs the connection name")
            malformed = [d for d in delivery_ids if not DELIVERY_ID.match(d)]
            if malformed:
                raise NotFoundError(
                    f"no delivery {shown(malformed[0])}: a delivery id is 32 lower-case hex digits"
                )
            found = [self.deliveries.get(connection, delivery_id) for delivery_id in delivery_ids]
            missing = [d for d, row in zip(delivery_ids, found, strict=True) if row is None]
            if missing:
                raise NotFoundError(f"no delivery {', '.join(missing)} on connection {shown(connection)}")
            candidates = [row for row in found if row is not None]
        else:
            candidates = list(self.deliveries.list(connection=connection, status=status, limit=limit))
        now = self.clock()
        for row in candidates:
            if older_than is not None and now - row.updated_at < older_than:
                continue
            if row.status is DeliveryStatus.DELIVERED and not delivery_ids:
                continue
            message = DeliveryMessage(
                connection=row.connection, delivery_id=row.delivery_id, signal=row.signal
            )
            # a redrive is one more attempt, in this process: if it fails it ends failed again
            try:
                result = self.deliver(message, attempt=row.attempts + 1, final=True)
            except StateError as exc:
                log.error("redrive of delivery %s on %s: %s", row.delivery_id, row.connection, exc)
                yield Redriven(row, storage_error=str(exc))
                continue
            if result is not None:
                yield Redriven(result)

    def flush_pending_notes(self, *, limit: int = 100) -> int:
        """Write the notes that counted firings wait for once their interval has passed (see
        ``alerts/pending.py``); at most ``limit`` rows per run. Returns the notes written."""
        flusher = PendingNotes(
            self.processor.correlations, self.clock, self.processor.lease_seconds, self.sleep
        )
        written = 0
        for connection in self.connections.list():
            if limit <= 0:
                break
            rows = flusher.due(connection, limit)
            if not rows:
                continue
            limit -= len(rows)
            try:
                ports = self.connector_for(connection)
            except Exception:  # one connection's trouble must not stop the others
                log.warning(
                    "pending notes of %s wait: its connector cannot be built", connection.name, exc_info=True
                )
                continue
            for row in rows:
                self.processor.remember_row(row.key, None)
                try:
                    written += flusher.flush(connection, ports, row)
                except Exception:  # the next run tries again
                    log.warning(
                        "pending note of %s on %s not written; the next run tries again",
                        row.key_text,
                        connection.name,
                        exc_info=True,
                    )
        if written:
            log.info("wrote %d pending note(s) for firings counted while another instance wrote", written)
        return written

    def requeue_stale(self, *, older_than: timedelta, limit: int = 500) -> list[DeliveryMessage]:
        """Pending deliveries received long ago (their queue message was lost): messages to queue
        again, through the queue so they get the host's normal retries. Each is stamped so the
        next sweep leaves it alone while it is in flight."""
        now = self.clock()
        messages: list[DeliveryMessage] = []
        for key in self.deliveries.stale_pending(now - older_than, limit=limit):
            self.deliveries.touch(key.connection, key.delivery_id, now)
            messages.append(DeliveryMessage(connection=key.connection, delivery_id=key.delivery_id))
        return messages


def signal_time(signal: AlertSignal, now: datetime) -> datetime:
    return min(signal.event_time, now)
