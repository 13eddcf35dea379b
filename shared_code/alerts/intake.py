"""The webhook's half of delivery: validate, store durably, and say whether to enqueue.

Everything here must finish well inside Azure Monitor's 10 s webhook timeout: one cached
connection lookup, pure validation, one conditional insert.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared_code.alerts.schema import parse_alert
from shared_code.alerts.signal import AlertSignal
from shared_code.errors import (
    AlreadyExistsError,
    MalformedPayloadError,
    PayloadTooLargeError,
    UnsupportedPayloadError,
)
from shared_code.state.connections import ConnectionRepository
from shared_code.state.deliveries import Delivery, DeliveryRepository, DeliveryStatus

MAX_BODY_BYTES = 256 * 1024
STALE_PENDING = timedelta(seconds=60)


def delivery_id_for(connection: str, signal: AlertSignal) -> str:
    """Same notification -> same id, so action-group retries are recognised, not stored twice."""
    identity = "|".join((connection, signal.alert_id, signal.condition.value, signal.event_time.isoformat()))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Receipt:
    delivery: Delivery
    is_new: bool
    enqueue: bool


def decode_json_body(body: bytes, content_type: str | None, limit: int = MAX_BODY_BYTES) -> object:
    """Size, media type and JSON checks shared by every endpoint that takes a JSON body."""
    if len(body) > limit:
        raise PayloadTooLargeError(f"the body is {len(body)} bytes; the limit is {limit} bytes")
    media = (content_type or "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedPayloadError(f"content type {media!r} is not JSON; send application/json")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise MalformedPayloadError(f"the body is not valid JSON{where}") from None
    except RecursionError:  # "[[[[..." fits in the size limit but not on the decoder's stack
        raise MalformedPayloadError("the body is not valid JSON: it is nested too deeply") from None


@dataclass
class AlertIntake:
    connections: ConnectionRepository
    deliveries: DeliveryRepository
    clock: Callable[[], datetime]

    def receive(self, connection_name: str, body: bytes, content_type: str | None) -> Receipt:
        payload = decode_json_body(body, content_type)
        connection = self.connections.get(connection_name)
        signal = parse_alert(payload)
        now = self.clock()
        delivery = Delivery(
            connection=connection.name,
            delivery_id=delivery_id_for(connection.name, signal),
            received_at=now,
            updated_at=now,
            signal=signal,
        )
        try:
            self.deliveries.insert(delivery)
        except AlreadyExistsError:
            existing = self.deliveries.get(connection.name, delivery.delivery_id)
            if existing is None:  # removed in between: store it again
                self.deliveries.insert(delivery)
                return Receipt(delivery, is_new=True, enqueue=True)
            # a lost queue message (the first call stored the row, then died) is sent again,
            # but only once it is clearly not in flight, so twenty concurrent retries do not fan out
            stale = existing.status is DeliveryStatus.PENDING and now - existing.updated_at > STALE_PENDING
            return Receipt(existing, is_new=False, enqueue=stale)
        return Receipt(delivery, is_new=True, enqueue=True)
