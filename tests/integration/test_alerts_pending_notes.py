"""Firings counted while another instance held the lease are noted by the timer once the note
interval has passed, when no further notification comes to do it. Driven through the registered
functions (the webhook, the queue delivery, the ``redrive_stale_alerts`` timer) against the loopback
stack with the app's controllable clock, like ``test_alerts_e2e.py``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

import function_app
from shared_code.bootstrap import Container
from shared_code.domain.correlation import CorrelationState
from tests.hostsim import FunctionHost
from tests.integration.test_alerts_e2e import NOTE_COUNT, T0, Clock, Flow, alert, install_clock
from tests.loopback.stack import LoopbackStack

TIMER = "redrive_stale_alerts"


@pytest.fixture
def world(app: Container, stack: LoopbackStack) -> Flow:
    clock = Clock()
    install_clock(app, clock)
    return Flow(stack, FunctionHost(function_app.app, stack.queues()), clock)


def hold_lease_elsewhere(flow: Flow) -> None:
    """Another instance is writing to the problem's work item (its lease on the row, 60 s)."""
    row = flow.correlation()
    flow.container.correlations.replace(
        row.model_copy(
            update={
                "lease_owner": "0" * 32 + ":elsewhere",
                "lease_until": flow.clock() + timedelta(seconds=60),
            }
        )
    )


def test_a_firing_counted_under_another_instances_lease_is_noted_by_the_timer_once_due(world: Flow) -> None:
    flow = world
    flow.connect("--note-interval-minutes", "15")
    flow.send(alert(alert_id="pending-1", fired_at=T0))
    incident = flow.incident()
    other = flow.connect("--note-interval-minutes", "15", name=f"{flow.name}-b")  # nothing pending there
    flow.send(alert(alert_id="pending-b", fired_at=T0), connection=other)
    flow.clock.advance(minutes=1)
    hold_lease_elsewhere(flow)

    counted = flow.send(alert(alert_id="pending-1", fired_at=T0 + timedelta(minutes=1)))
    assert counted.outcome.startswith("coalesced")
    assert flow.correlation().unnoted_fires == 1

    flow.clock.advance(minutes=5)  # the other instance's lease has run out; the interval has not
    flow.host.timer(TIMER)
    assert flow.notes(incident) == []

    flow.clock.advance(minutes=10)  # 16 minutes since the incident's note time
    flow.snow.reset_request_log()
    flow.host.timer(TIMER)
    (note,) = flow.notes(incident)
    assert [int(m) for m in NOTE_COUNT.findall(note)] == [1]
    assert "Azure Monitor delivery " in note
    row = flow.correlation()
    assert row.unnoted_fires == 0
    assert row.lease_owner == ""
    assert row.state is CorrelationState.OPEN
    # a first attempt is not in doubt: no journal lookup before the write
    reads = [path for method, path, _ in flow.snow.requests if method == "GET"]
    assert all("sys_journal_field" not in path for path in reads)

    flow.clock.advance(minutes=30)
    flow.host.timer(TIMER)  # nothing waits any more: no second note
    assert len(flow.notes(incident)) == 1
    assert flow.notes(flow.incidents()[-1]) == []  # the other connection's incident got none


def test_the_next_firing_after_a_timer_note_counts_from_it(world: Flow) -> None:
    flow = world
    flow.connect("--note-interval-minutes", "15")
    flow.send(alert(alert_id="pending-2", fired_at=T0))
    incident = flow.incident()
    flow.clock.advance(minutes=1)
    hold_lease_elsewhere(flow)
    flow.send(alert(alert_id="pending-2", fired_at=T0 + timedelta(minutes=1)))
    flow.clock.advance(minutes=16)
    flow.host.timer(TIMER)

    flow.clock.advance(minutes=1)  # inside the interval of the timer's note: counted, not noted
    later = flow.send(alert(alert_id="pending-2", fired_at=T0 + timedelta(minutes=18)))

    assert later.outcome.startswith("coalesced")
    assert len(flow.notes(incident)) == 1
