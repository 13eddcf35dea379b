"""Correlation ids and custom metrics along the real alert path (webhook -> Azurite queue ->
delivery function -> loopback ServiceNow), and telemetry staying silent without a connection string.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import function_app
from shared_code import telemetry
from shared_code.bootstrap import Container
from tests.hostsim import FunctionHost
from tests.integration.test_alerts_e2e import T0, Clock, Flow, alert, install_clock
from tests.loopback.stack import LoopbackStack


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    handler = Collect()
    root = logging.getLogger()
    level = root.level
    sdk = logging.getLogger("azure")  # the SDK's request dumps: noise here
    sdk_level = sdk.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    sdk.setLevel(logging.WARNING)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        sdk.setLevel(sdk_level)


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    memory = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[memory])
    telemetry.bind_meter_provider(provider)
    try:
        yield memory
    finally:
        telemetry.bind_meter_provider(None)
        provider.shutdown()


@pytest.fixture
def flow(app: Container, stack: LoopbackStack) -> Flow:
    clock = Clock()
    install_clock(app, clock)
    return Flow(stack, FunctionHost(function_app.app, stack.queues()), clock)


def test_one_correlation_id_from_the_webhook_through_the_queue_to_the_itsm_call(
    flow: Flow, records: list[logging.LogRecord]
) -> None:
    flow.connect()
    records.clear()
    delivery_id = flow.accepted(alert(alert_id="traced", fired_at=T0)).json()["deliveryId"]
    assert flow.deliver() >= 1

    def tagged(logger: str, text: str) -> list[str | None]:
        return [
            getattr(r, "correlation_id", None) for r in records if r.name == logger and text in r.getMessage()
        ]

    assert tagged("functions.alerts", "stored") == [delivery_id]  # the webhook
    assert tagged("functions.alerts", "delivering") == [delivery_id]  # the queue function
    itsm_calls = tagged("shared_code.itsm.servicenow.connector", "ServiceNow POST incident")
    assert itsm_calls == [delivery_id]  # the ITSM request
    # outside an invocation the id is gone: nothing leaks into the next one
    logging.getLogger("test").info("after")
    assert records[-1].correlation_id == ""  # type: ignore[attr-defined]


def test_another_alert_gets_its_own_correlation_id(flow: Flow, records: list[logging.LogRecord]) -> None:
    flow.connect()
    first = flow.accepted(alert(alert_id="one", fired_at=T0)).json()["deliveryId"]
    second = flow.accepted(alert("log_analytics_fired", alert_id="two", fired_at=T0)).json()["deliveryId"]
    flow.deliver()

    ids = {
        getattr(r, "correlation_id", "")
        for r in records
        if r.name == "shared_code.itsm.servicenow.connector" and "POST incident" in r.getMessage()
    }
    assert ids == {first, second}


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], float]]:
    data = reader.get_metrics_data()
    found: list[tuple[dict[str, Any], float]] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), float(p.value)) for p in metric.data.data_points]  # type: ignore[union-attr]
    return found


def test_deliveries_coalesced_firings_and_sync_rows_are_counted(
    flow: Flow, reader: InMemoryMetricReader
) -> None:
    flow.connect("--note-interval-minutes", "15")
    assert flow.send(alert(alert_id="counted", fired_at=T0)).outcome == "created"
    flow.clock.advance(minutes=1)
    again = flow.send(alert(alert_id="counted", fired_at=T0 + timedelta(minutes=1)))
    assert again.outcome.startswith("coalesced")

    assert sorted(points(reader, "itsm.alert.deliveries"), key=str) == [
        ({"outcome": "coalesced"}, 1.0),
        ({"outcome": "created"}, 1.0),
    ]
    assert points(reader, "itsm.alert.coalesced_firings") == [({}, 1.0)]
    assert points(reader, "itsm.alert.delivery_failures") == []

    flow.host.timer("sync_work_items")
    synced = {attrs["type"]: value for attrs, value in points(reader, "itsm.sync.rows")}
    assert synced.get("incidents", 0) >= 1


def test_a_failed_delivery_is_counted_as_a_failure(flow: Flow, reader: InMemoryMetricReader) -> None:
    flow.connect()
    flow.stack.servicenow.fail_next(5, 400, path_contains="/api/now/table/incident")
    delivery_id = flow.accepted(alert(alert_id="refused", fired_at=T0)).json()["deliveryId"]
    flow.deliver()

    assert flow.delivery(delivery_id).status.value == "failed"
    assert points(reader, "itsm.alert.delivery_failures") == [
        ({"final": True, "error": "ItsmRejectedError"}, 1.0)
    ]


def test_without_a_connection_string_nothing_is_exported() -> None:
    assert telemetry.configure({}) is False
    # the counters still work (the API's no-op provider takes them)
    telemetry.metrics().deliveries.add(1, {"outcome": "created"})


def test_entra_export_takes_the_client_id_from_the_hosts_authentication_string() -> None:
    assert telemetry.entra_client_id("Authorization=AAD;ClientId=1234") == "1234"
    assert telemetry.entra_client_id("ClientId=1234; Authorization=aad") == "1234"
    assert telemetry.entra_client_id("Authorization=AAD") == ""  # the system-assigned identity
    assert telemetry.entra_client_id("") is None
    assert telemetry.entra_client_id("ClientId=1234") is None
