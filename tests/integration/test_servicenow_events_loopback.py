"""The EventWriter against the loopback instance's Event Management: asynchronous processing,
the active interval, and clearing events without an alert."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from shared_code.domain.alert import Severity
from shared_code.domain.workitem import AlertFacts, IncidentDraft, WorkItemState
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.itsm.servicenow.events import EventWriter
from tests.loopback.servicenow import DEFAULT_PASSWORD, DEFAULT_USERNAME, ServiceNowLoopback
from tests.loopback.tls import loopback_tls


class World:
    def __init__(self, snow: ServiceNowLoopback, client: httpx.Client) -> None:
        self.snow = snow
        self.now = datetime(2024, 5, 6, 7, 0, tzinfo=UTC)
        snow.clock = lambda: self.now
        policy = RetryPolicy(sleep=lambda _s: None, jitter=lambda cap: 0.0)
        auth = httpx.BasicAuth(DEFAULT_USERNAME, DEFAULT_PASSWORD)
        table = ServiceNowConnector("events", snow.url, client, auth, retry=policy)
        self.events = EventWriter(table, event_class="test", clock=lambda: self.now)


@pytest.fixture
def world() -> Iterator[World]:
    with (
        ServiceNowLoopback() as snow,
        httpx.Client(verify=loopback_tls().client_context(), timeout=10) as client,
    ):
        yield World(snow, client)


def draft(key: str) -> IncidentDraft:
    return IncidentDraft(
        short_description="[Sev0] disk full on db-1",
        description="disk full",
        impact=1,
        urgency=1,
        correlation_id=key,
        configuration_item="db-1",
        alert=AlertFacts(severity=Severity.SEV0, rule="disk full", resource="db-1"),
    )


def test_an_event_processed_later_is_found_by_its_message_key_once_its_alert_exists(world: World) -> None:
    world.snow.defer_event_processing = True
    ref = world.events.create_incident(draft("azmon-k1-g1"))
    assert (ref.id, ref.number) == ("azmon-k1-g1", "azmon-k1-g1")
    assert world.events.find_by_correlation("azmon-k1-g1") is None
    assert world.events.get_state(ref) is WorkItemState.OPEN

    world.events.create_incident(draft("azmon-k1-g1"))  # a crash-recovery resend: one alert still
    assert world.snow.process_events() == 2

    found = world.events.find_by_correlation("azmon-k1-g1")
    assert found is not None
    assert found.id == ref.id
    (alert,) = world.snow.find("em_alert", message_key="azmon-k1-g1")
    assert found.number == alert["number"]
    assert (alert["severity"], alert["event_count"], alert["node"]) == ("1", "2", "db-1")


def test_a_new_event_after_the_active_interval_opens_a_new_alert(world: World) -> None:
    ref = world.events.create_incident(draft("azmon-k2-g1"))
    world.events.resolve(ref, "recovered")
    assert world.events.get_state(ref) is WorkItemState.RESOLVED

    world.now += timedelta(seconds=world.snow.active_interval_seconds + 60)
    world.events.reopen(ref, "fired again")

    old, new = sorted(world.snow.find("em_alert", message_key="azmon-k2-g1"), key=lambda a: a["number"])
    assert (old["state"], new["state"]) == ("Closed", "Open")
    assert new["severity"] == "1"  # the problem's severity, read back from its earlier event
    assert world.events.get_state(ref) is WorkItemState.OPEN


def test_a_repeated_clearing_event_for_a_closed_alert_changes_nothing(world: World) -> None:
    ref = world.events.create_incident(draft("azmon-k3-g1"))
    world.events.resolve(ref, "recovered")
    world.events.resolve(ref, "recovered again")  # a redelivered resolution
    (alert,) = world.snow.find("em_alert", message_key="azmon-k3-g1")
    assert alert["state"] == "Closed"
    states = [e["state"] for e in world.snow.find("em_event", message_key="azmon-k3-g1")]
    assert sorted(states) == ["Ignored", "Processed", "Processed"]
