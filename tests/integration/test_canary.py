"""The canary detector sees the canary secret wherever the session check looks for it.

Each check runs with a detector of its own (``canary.detecting``), so the canary planted here is
seen by it and not by the session's; the planted table and queue are removed afterwards.
"""

from __future__ import annotations

import json
import logging
import uuid

import function_app
from shared_code.bootstrap import Container
from shared_code.errors import ItsmAuthError
from tests import canary
from tests.hostsim import FunctionHost
from tests.loopback.azurite import Azurite
from tests.loopback.stack import LoopbackStack


def test_the_stack_gives_the_canary_as_servicenow_secrets(stack: LoopbackStack) -> None:
    assert canary.CANARY in stack.servicenow.client_secret
    assert canary.CANARY in stack.servicenow.password


def test_a_log_record_and_exceptions_with_the_canary_are_seen() -> None:
    with canary.detecting(canary.CanaryDetector()) as detector:
        logging.getLogger("shared_code.somewhere").warning("token request with %s", canary.CLIENT_SECRET)
        try:
            try:
                raise ValueError(canary.PASSWORD)
            except ValueError as exc:
                raise ItsmAuthError("refused") from exc
        except ItsmAuthError:
            logging.getLogger("shared_code.elsewhere").exception("call failed")
        canary.observe_exception(RuntimeError(f"x {canary.CANARY}"), "a test's exception")
        logging.getLogger("shared_code.quiet").warning("nothing secret here")

    places = [s.where for s in detector.sightings]
    assert places[0] == "log record shared_code.somewhere:" + places[0].rsplit(":", 1)[1]
    assert any(p.startswith("log record shared_code.elsewhere") and p.endswith("(exception)") for p in places)
    assert "a test's exception" in places
    assert not any("shared_code.quiet" in p for p in places)


def test_a_response_body_and_cli_output_with_the_canary_are_seen(
    app: Container, stack: LoopbackStack
) -> None:
    host = FunctionHost(function_app.app, stack.queues())
    with canary.detecting(canary.CanaryDetector()) as detector:
        # a connection name is echoed in the 404 body: the canary as a name is the canary in a body
        host.http(
            "alert_status",
            "GET",
            "https://func.example/api/alerts/x/0",
            route_params={"connection": canary.CANARY, "delivery_id": "0" * 32},
        )
        stack.cli("connections", "show", canary.CANARY)

    places = {s.where for s in detector.sightings}
    assert "HTTP response of alert_status" in places
    assert "CLI output of connections show" in places


def test_a_table_row_and_a_queue_message_with_the_canary_are_seen(azurite: Azurite) -> None:
    name = f"canary{uuid.uuid4().hex[:8]}"
    from azure.data.tables import TableServiceClient
    from azure.storage.queue import QueueServiceClient

    tables = TableServiceClient.from_connection_string(azurite.connection_string)
    queues = QueueServiceClient.from_connection_string(azurite.connection_string)
    table = tables.create_table(name)
    queue = queues.create_queue(name)
    try:
        table.create_entity({"PartitionKey": "p", "RowKey": "r", "Note": f"oops {canary.PASSWORD}"})
        queue.send_message(json.dumps({"secret": canary.CLIENT_SECRET}))
        with canary.detecting(canary.CanaryDetector()) as detector:
            detector.scan_storage(azurite.connection_string)
    finally:
        tables.delete_table(name)
        queues.delete_queue(name)
        tables.close()
        queues.close()

    places = {s.where for s in detector.sightings}
    assert f"table {name}" in places
    assert f"queue {name}" in places
