"""The alert path against a ServiceNow that carries out writes but answers after the client gave up.

Appending a work note is not idempotent: with ``HTTP_TIMEOUT_SECONDS=1`` and an instance that
answers a write 1.5 s later (having committed it at once), every note, resolution and create must
still land exactly once, whether the lost answer is confirmed in the same attempt or only by the
queue's retry of the delivery. Driven through the registered functions against the loopback
stack, like ``test_alerts_e2e.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

import function_app
from shared_code import httpretry
from shared_code.domain.correlation import CorrelationState
from shared_code.domain.delivery import DeliveryStatus
from tests.hostsim import FunctionHost
from tests.integration.test_alerts_e2e import T0, Clock, Flow, alert, install_clock, resolution
from tests.loopback.stack import LoopbackStack

CLIENT_TIMEOUT = "1"
LATE = 1.5  # seconds after the client stopped waiting... and half a second more
INCIDENT_PATH = "/api/now/table/incident"


@pytest.fixture
def slow_flow(stack: LoopbackStack) -> Iterator[Flow]:
    """A fresh app with a 1 s HTTP timeout, without retry backoff (restored afterwards)."""
    was = httpretry._testing
    httpretry.set_testing(True)
    stack.servicenow.clear_faults()
    with stack.app(TABLE_PREFIX=f"slow{uuid.uuid4().hex[:12]}", HTTP_TIMEOUT_SECONDS=CLIENT_TIMEOUT) as app:
        queues = stack.queues()
        for queue in queues.list_queues():
            queues.get_queue_client(queue.name).clear_messages()
        clock = Clock()
        install_clock(app, clock)
        yield Flow(stack, FunctionHost(function_app.app, queues), clock)
    stack.servicenow.clear_faults()
    httpretry.set_testing(was)


def incident_patches(flow: Flow) -> int:
    return sum(1 for method, path, _ in flow.snow.requests if method == "PATCH" and INCIDENT_PATH in path)


def test_a_refire_note_answered_after_the_timeout_is_written_once(slow_flow: Flow) -> None:
    flow = slow_flow
    flow.connect("--note-interval-minutes", "15")
    created = flow.send(alert(alert_id="late-note", fired_at=T0))
    incident = flow.incident()
    flow.clock.advance(minutes=16)
    flow.snow.reset_request_log()
    flow.snow.answer_late(1, LATE, method="PATCH", path_contains=INCIDENT_PATH)

    noted = flow.send(alert(alert_id="late-note", fired_at=T0 + timedelta(minutes=16)))

    assert created.outcome == "created"
    assert noted.outcome.startswith("noted")
    assert noted.attempts == 1  # confirmed in the same attempt, from the journal
    (note,) = flow.notes(incident)
    assert "the alert fired again" in note
    assert f"[Azure Monitor delivery {noted.delivery_id}]" in note
    assert incident_patches(flow) == 1  # never sent again
    row = flow.correlation()
    assert row.unnoted_fires == 0
    assert row.seen(noted.delivery_id)


def test_a_note_that_cannot_be_confirmed_is_not_written_again_by_the_queue_retry(slow_flow: Flow) -> None:
    flow = slow_flow
    flow.connect("--note-interval-minutes", "15")
    flow.send(alert(alert_id="late-retry", fired_at=T0))
    incident = flow.incident()
    flow.clock.advance(minutes=16)
    flow.snow.reset_request_log()
    flow.snow.answer_late(1, LATE, method="PATCH", path_contains=INCIDENT_PATH)
    # the journal cannot be read in that attempt either (4 tries): the attempt cannot tell
    flow.snow.fail_next(4, 503, path_contains="sys_journal_field")

    delivery_id = flow.accepted(alert(alert_id="late-retry", fired_at=T0 + timedelta(minutes=16))).json()[
        "deliveryId"
    ]
    errors: list[Exception] = []
    calls = flow.host.drain("deliver_alert", max_rounds=10, on_error=errors.append)

    assert calls == 2  # the first attempt failed, the queue's retry finished it
    assert len(errors) == 1
    done = flow.delivery(delivery_id)
    assert done.status is DeliveryStatus.DELIVERED
    assert done.attempts == 2
    assert done.outcome.startswith("noted")
    (note,) = flow.notes(incident)
    assert "the alert fired again" in note
    assert incident_patches(flow) == 1
    assert flow.correlation().unnoted_fires == 0


def test_a_resolution_answered_after_the_timeout_resolves_with_one_note(slow_flow: Flow) -> None:
    flow = slow_flow
    flow.connect()
    fired = alert(alert_id="late-resolve", fired_at=T0)
    flow.send(fired)
    flow.clock.advance(minutes=5)
    flow.snow.reset_request_log()
    flow.snow.answer_late(1, LATE, method="PATCH", path_contains=INCIDENT_PATH)

    resolved = flow.send(resolution(fired, T0 + timedelta(minutes=5)))

    assert resolved.outcome == "resolved"
    incident = flow.incident()
    assert incident["state"] == "6"
    (note,) = flow.notes(incident)
    assert "the alert resolved at" in note
    assert incident_patches(flow) == 1
    assert flow.correlation().state is CorrelationState.RESOLVED


def test_a_create_answered_after_the_timeout_gives_one_incident(slow_flow: Flow) -> None:
    flow = slow_flow
    flow.connect()
    flow.snow.reset_request_log()
    flow.snow.answer_late(1, LATE, method="POST", path_contains=INCIDENT_PATH)

    created = flow.send(alert(alert_id="late-create", fired_at=T0))

    incident = flow.incident()  # exactly one
    assert created.outcome == "created"
    assert created.work_item_number == incident["number"]
    posts = [path for method, path, _ in flow.snow.requests if method == "POST" and INCIDENT_PATH in path]
    assert len(posts) == 1
    assert flow.correlation().work_item_id == incident["sys_id"]
