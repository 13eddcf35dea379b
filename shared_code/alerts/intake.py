"""The webhook's half of delivery: validate, store durably, and say whether to enqueue.

Everything here must finish well inside Azure Monitor's 10 s webhook timeout: one cached
connection lookup, pure validation, one conditional insert.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared_code.alerts.schema import error_path, parse_alert
from shared_code.domain.alert import AlertSignal
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.errors import (
    AlreadyExistsError,
    MalformedPayloadError,
    PayloadTooLargeError,
    UnsupportedPayloadError,
    shown,
)
from shared_code.ports.state import ConnectionStore, DeliveryStore
from shared_code.telemetry import bind_correlation_id

MAX_BODY_BYTES = 256 * 1024
STALE_PENDING = timedelta(seconds=60)
DELIVERY_ID = re.compile(r"^[0-9a-f]{32}$")
"""What ``delivery_id_for`` makes: anything else names no delivery, and never reaches storage."""


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
        raise UnsupportedPayloadError(f"content type {shown(media)} is not JSON; send application/json")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise MalformedPayloadError(f"the body is not valid JSON{where}") from None
    except ValueError:  # the decoder's only other refusal: an int of more than sys.get_int_max_str_digits()
        raise MalformedPayloadError(
            "the body cannot be read as JSON: it holds an integer of more than "
            f"{sys.get_int_max_str_digits():,} digits"
        ) from None
    except RecursionError:  # "[[[[..." fits in the size limit but not on the decoder's stack
        raise MalformedPayloadError("the body is not valid JSON: it is nested too deeply") from None
    if _may_hold_surrogates(body):
        _refuse_lone_surrogates(document)
    return document


# a JSON escape of a surrogate (\ud800-\udfff), or one encoded as UTF-8 (which json.loads lets through)
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _may_hold_surrogates(body: bytes) -> bool:
    """Whether the decoded text may hold an unpaired surrogate (cheap: most bodies are plain UTF-8)."""
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body[:4]:
        return True  # UTF-16 or UTF-32: a surrogate would be a code unit, not an escape
    return _SURROGATE_BYTES.search(body) is not None


def _refuse_lone_surrogates(document: object) -> None:
    """Refuse text that is not Unicode: an unpaired UTF-16 surrogate (``"\\ud800"``) decodes to a
    Python string that cannot be encoded as UTF-8, so it could be neither stored nor sent on."""
    stack: list[tuple[object, tuple[int | str, ...]]] = [(document, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            _check_text(node, path)
        elif isinstance(node, dict):
            for key, value in reversed(node.items()):
                _check_text(key, (*path, key))
                stack.append((value, (*path, key)))
        elif isinstance(node, list):
            stack.extend((item, (*path, index)) for index, item in reversed(list(enumerate(node))))


def _check_text(text: str, path: tuple[int | str, ...]) -> None:
    found = None if text.isascii() else _SURROGATE.search(text)
    if found is None:
        return
    parts = [_escaped(part)[:80] if isinstance(part, str) else part for part in path[:10]]
    where = (error_path(parts) + (".…" if len(path) > 10 else "")) or "the body"
    raise MalformedPayloadError(
        f"the body is not valid JSON text: {where} holds an unpaired UTF-16 surrogate "
        f"(\\u{ord(found.group()):04x}), which is not a Unicode character"
    )


def _escaped(text: str) -> str:
    """A member name as printable text: a surrogate in it is shown as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class AlertIntake:
    connections: ConnectionStore
    deliveries: DeliveryStore
    clock: Callable[[], datetime]

    def receive(self, connection_name: str, body: bytes, content_type: str | None) -> Receipt:
        payload = decode_json_body(body, content_type)
        connection = self.connections.get(connection_name)
        signal = parse_alert(payload, default_severity=connection.default_severity)
        now = self.clock()
        delivery_id = delivery_id_for(connection.name, signal)
        bind_correlation_id(delivery_id)
        delivery = Delivery(
            connection=connection.name,
            delivery_id=delivery_id,
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
