"""Alert triggers: the action-group webhook, the delivery status lookup, the queue delivery and
the redrive timer for deliveries whose queue message was lost."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import azure.functions as func

from functions.http_errors import error_response, json_response
from functions.webhook_auth import require_secure_webhook
from shared_code.alerts.delivery import DeliveryMessage
from shared_code.alerts.intake import DELIVERY_ID
from shared_code.bootstrap import get_container
from shared_code.domain.connection import CONNECTION_NAME
from shared_code.domain.delivery import Delivery
from shared_code.errors import InvalidInputError, NotFoundError, StateError, shown
from shared_code.settings import DEFAULT_REDRIVE_SCHEDULE
from shared_code.state.queues import ALERT_QUEUE
from shared_code.telemetry import correlation_scope

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 40_000
"""A queue message holds 64 KiB, base64-encoded by the Functions host: 48 KiB of text, less room."""
# read at import, before settings are validated (Settings checks the same variable's shape)
REDRIVE_SCHEDULE = os.environ.get("ALERT_REDRIVE_SCHEDULE", DEFAULT_REDRIVE_SCHEDULE)
STALE_AFTER = timedelta(minutes=10)
PENDING_NOTES_PER_RUN = 100
"""Bounded work per timer run: the rest waits for the next run."""

bp = func.Blueprint()  # type: ignore[no-untyped-call]


def _connection_name(req: func.HttpRequest) -> str:
    name = str(req.route_params.get("connection", ""))
    if not CONNECTION_NAME.match(name):
        raise NotFoundError(f"no ITSM connection named {shown(name)}")
    return name


@bp.function_name("receive_alert")
@bp.route(route="alerts/{connection}", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.queue_output(arg_name="delivery", queue_name=ALERT_QUEUE, connection="AzureWebJobsStorage")
def receive_alert(req: func.HttpRequest, delivery: func.Out[str]) -> func.HttpResponse:
    """Store the alert, queue its delivery, answer 202 with the delivery id (also the correlation id
    of every log record from here to the ITSM call)."""
    with correlation_scope():
        return _receive_alert(req, delivery)


def _receive_alert(req: func.HttpRequest, delivery: func.Out[str]) -> func.HttpResponse:
    try:
        name = _connection_name(req)
        require_secure_webhook(name, req.headers.get("Authorization"))
        receipt = get_container().alert_intake.receive(name, req.get_body(), req.headers.get("Content-Type"))
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP answer
        return error_response(exc)
    stored = receipt.delivery
    if receipt.enqueue:
        delivery.set(_delivery_message(stored))
    log.info(
        "alert %s on connection %s: delivery %s %s%s",
        shown(stored.signal.alert_id, 80),
        stored.connection,
        stored.delivery_id,
        "stored" if receipt.is_new else "already stored",
        ", queued" if receipt.enqueue else "",
    )
    return json_response(
        202,
        {
            "deliveryId": stored.delivery_id,
            "status": stored.status.value,
            "duplicate": not receipt.is_new,
            "statusUrl": f"/api/alerts/{stored.connection}/{stored.delivery_id}",
        },
    )


def _delivery_message(stored: Delivery) -> str:
    """The queue message, with the alert in it when it fits (then the delivery need not read it)."""
    full = DeliveryMessage(connection=stored.connection, delivery_id=stored.delivery_id, signal=stored.signal)
    text = full.to_json()
    if len(text.encode()) <= MAX_MESSAGE_BYTES:
        return text
    return DeliveryMessage(connection=stored.connection, delivery_id=stored.delivery_id).to_json()


@bp.function_name("alert_status")
@bp.route(route="alerts/{connection}/{delivery_id}", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def alert_status(req: func.HttpRequest) -> func.HttpResponse:
    """Status, attempts, last error and work item of one delivery.

    A management route (ADMIN): the function key the action groups hold only lets them post alerts.
    A delivery of another connection is answered exactly like one that does not exist.
    """
    try:
        name = _connection_name(req)
        delivery_id = req.route_params.get("delivery_id", "")
        found = _stored_delivery(name, delivery_id) if DELIVERY_ID.match(delivery_id) else None
        if found is None or found.connection != name:
            raise NotFoundError(f"no delivery {shown(delivery_id)} on connection {shown(name)}")
    except Exception as exc:  # noqa: BLE001
        return error_response(exc)
    return json_response(
        200,
        {
            "deliveryId": found.delivery_id,
            "connection": found.connection,
            "status": found.status.value,
            "attempts": found.attempts,
            "lastError": found.last_error,
            "outcome": found.outcome,
            "workItem": {"id": found.work_item_id, "number": found.work_item_number}
            if found.work_item_id
            else None,
            "alert": {
                "alertId": found.signal.alert_id,
                "rule": found.signal.rule,
                "severity": found.signal.severity.value,
                "condition": found.signal.condition.value,
            },
            "receivedAt": found.received_at.isoformat(),
            "updatedAt": found.updated_at.isoformat(),
        },
    )


def _stored_delivery(connection: str, delivery_id: str) -> Delivery | None:
    """The stored delivery; a row that exists but cannot be read is the app's trouble, said plainly."""
    try:
        return get_container().deliveries.get(connection, delivery_id)
    except (KeyError, TypeError, ValueError) as exc:  # a missing column, a bad value, a damaged alert
        log.error(
            "delivery %s on connection %s is stored but cannot be read: %s",
            delivery_id,
            connection,
            type(exc).__name__,
        )
        raise StateError(
            f"delivery {delivery_id!r} on connection {connection!r} is stored but cannot be read "
            f"({type(exc).__name__}); see the app's logs"
        ) from None


@bp.function_name("deliver_alert")
@bp.queue_trigger(arg_name="msg", queue_name=ALERT_QUEUE, connection="AzureWebJobsStorage")
def deliver_alert(msg: func.QueueMessage) -> None:
    """Deliver one stored alert; raising RetryLaterError lets the host redeliver the message."""
    try:
        message = DeliveryMessage.from_queue(msg.get_body())
    except InvalidInputError as exc:  # retrying cannot fix it: dropped, and said why
        log.error("dropping queue message %s: %s", shown(msg.id), exc)
        return
    with correlation_scope(message.delivery_id):  # the id the webhook logged under
        log.info(
            "delivering %s on %s, attempt %d", message.delivery_id, message.connection, msg.dequeue_count or 1
        )
        get_container().alert_delivery.deliver(message, attempt=msg.dequeue_count or 1)


@bp.function_name("redrive_stale_alerts")
@bp.timer_trigger(arg_name="timer", schedule=REDRIVE_SCHEDULE, run_on_startup=False)
@bp.queue_output(arg_name="deliveries", queue_name=ALERT_QUEUE, connection="AzureWebJobsStorage")
def redrive_stale_alerts(timer: func.TimerRequest, deliveries: func.Out[list[str]]) -> None:
    """Queue again the alerts still pending long after receipt (their queue message was lost), and
    write the notes of firings that were counted but never noted (no notification followed them)."""
    service = get_container().alert_delivery
    messages = service.requeue_stale(older_than=STALE_AFTER)
    if messages:
        deliveries.set([message.to_json() for message in messages])
        for message in messages:
            with correlation_scope(message.delivery_id):
                log.warning("queued stale pending delivery %s again", message.delivery_id)
    try:
        service.flush_pending_notes(limit=PENDING_NOTES_PER_RUN)
    except Exception:  # the requeued messages above must still go out (outputs need a clean return)
        log.exception("writing pending notes failed; the next run tries again")
