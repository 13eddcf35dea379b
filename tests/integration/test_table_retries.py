"""Storage hiccups against a real Azurite, through a proxy that resets connections on demand.

A pooled connection the server is closing (Azurite closes idle keep-alive connections after 5 s)
fails the request sent on it; azure-core does not retry a POST or a PATCH after that. The table
helpers must not reuse idle connections, and must repeat the writes that are safe to repeat.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.data.tables import EdmType, EntityProperty, TableClient, TableServiceClient

from shared_code.alerts.schema import parse_alert
from shared_code.cli import Cli, main
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.errors import AlreadyExistsError, EtagConflict, StateError
from shared_code.state.tablebatch import upsert_transaction, write_all
from shared_code.state.tables import (
    WRITE_ATTEMPTS,
    delete_entity,
    get_entity,
    insert_entity,
    merge_entity,
    replace_if_match,
    transport_options,
)
from tests.integration.test_alerts_e2e import load
from tests.loopback.azurite import ACCOUNT_KEY, Azurite
from tests.loopback.resetproxy import ResetProxy
from tests.loopback.stack import LoopbackStack


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[ResetProxy]:
    with ResetProxy(azurite.table_port) as started:
        yield started


def table_through(proxy: ResetProxy, idle_seconds: float | None = 4.0) -> Iterator[TableClient]:
    conn = connection_string(proxy.port)
    endpoint = f"http://127.0.0.1:{proxy.port}/devstoreaccount1"
    service = TableServiceClient.from_connection_string(
        conn, **transport_options(endpoint, idle_seconds=idle_seconds)
    )
    name = f"retries{uuid.uuid4().hex[:12]}"
    service.create_table(name)
    try:
        yield service.get_table_client(name)
    finally:
        service.delete_table(name)
        service.close()


@pytest.fixture
def table(proxy: ResetProxy) -> Iterator[TableClient]:
    yield from table_through(proxy)


def row(key: str, **values: object) -> dict[str, object]:
    return {"PartitionKey": "p", "RowKey": key, **values}


# -- idle connections -------------------------------------------------------------------------------


def test_without_an_idle_limit_a_post_on_a_connection_the_server_closes_fails(azurite: Azurite) -> None:
    """The fault as Azurite produces it, reproduced in 0.3 s: the SDK alone does not survive it."""
    with ResetProxy(azurite.table_port, idle_reset_seconds=0.2) as proxy:
        for table in table_through(proxy, idle_seconds=None):
            table.create_entity(row("a"))
            time.sleep(0.3)
            with pytest.raises(ServiceResponseError):
                table.create_entity(row("b"))
            assert proxy.resets == 1


def test_idle_pooled_connections_are_not_reused(azurite: Azurite) -> None:
    with ResetProxy(azurite.table_port, idle_reset_seconds=0.2) as proxy:
        for table in table_through(proxy, idle_seconds=0.1):
            table.create_entity(row("a"))  # the SDK's own call: no repeat can hide a reset
            time.sleep(0.3)
            table.create_entity(row("b"))
            table.create_entity(row("c"))  # a busy connection is reused
            assert proxy.resets == 0
            assert proxy.requests - proxy.connections >= 1


# -- writes repeated on a connection error ----------------------------------------------------------


def test_writes_are_repeated_when_the_connection_fails_before_they_land(
    table: TableClient, proxy: ResetProxy
) -> None:
    proxy.fail_next("before")
    etag = insert_entity(table, row("r", Value=1))
    proxy.fail_next("before")
    etag = replace_if_match(table, row("r", Value=2), etag)
    proxy.fail_next("before")
    merge_entity(table, row("r", Other="x"))
    proxy.fail_next("before")
    write_all(table, [row(f"b{i}", Value=i) for i in range(5)])
    proxy.fail_next("before")
    delete_entity(table, "p", "b0")

    assert proxy.resets == 5
    stored = get_entity(table, "p", "r")
    assert stored is not None
    assert (stored["Value"], stored["Other"]) == (2, "x")
    assert sorted(e["RowKey"] for e in table.list_entities()) == ["b1", "b2", "b3", "b4", "r"]


@pytest.mark.parametrize("fault", ["before", "after"])
def test_the_sync_batch_writer_repeats_a_batch_whose_connection_failed(
    table: TableClient, proxy: ResetProxy, fault: str
) -> None:
    proxy.fail_next("before" if fault == "before" else "after")

    upsert_transaction(table, [row(f"w{i}", Value=i, Title=f"incident {i}") for i in range(50)])

    assert proxy.resets == 1
    assert len(list(table.list_entities())) == 50


def test_an_insert_whose_answer_was_lost_is_not_reported_as_a_conflict(
    table: TableClient, proxy: ResetProxy
) -> None:
    moment = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    proxy.fail_next("after")  # Azurite stores the row; the client never hears so

    big = EntityProperty(2**40, EdmType.INT64)
    etag = insert_entity(table, row("r", Value=1, Big=big, At=moment, Text="ü"))

    stored = get_entity(table, "p", "r")
    assert stored is not None
    assert etag == stored["_etag"]
    assert proxy.resets == 1


def test_an_etag_replace_whose_answer_was_lost_is_not_reported_as_a_conflict(
    table: TableClient, proxy: ResetProxy
) -> None:
    etag = insert_entity(table, row("r", Value=1))
    proxy.fail_next("after")

    new_etag = replace_if_match(table, row("r", Value=2), etag)

    stored = get_entity(table, "p", "r")
    assert stored is not None
    assert (stored["Value"], stored["_etag"]) == (2, new_etag)
    with pytest.raises(EtagConflict):  # the old ETag is spent: a real conflict still is one
        replace_if_match(table, row("r", Value=3), etag)


def test_a_conflict_with_another_writer_stays_a_conflict_after_a_repeat(
    table: TableClient, proxy: ResetProxy
) -> None:
    insert_entity(table, row("r", Value="theirs"))
    proxy.fail_next("after")  # our insert is refused (409) and the refusal lost

    with pytest.raises(AlreadyExistsError):
        insert_entity(table, row("r", Value="ours"))

    stored = get_entity(table, "p", "r")
    assert stored is not None
    assert stored["Value"] == "theirs"


def test_the_repeats_are_bounded(table: TableClient, proxy: ResetProxy) -> None:
    proxy.fail_next("before", count=WRITE_ATTEMPTS)
    with pytest.raises(StateError):
        insert_entity(table, row("r"))
    assert proxy.resets == WRITE_ATTEMPTS
    assert get_entity(table, "p", "r") is None


# -- alerts redrive goes on past a row whose storage fails --------------------------------------------


def test_alerts_redrive_reports_a_row_whose_storage_fails_and_delivers_the_others(
    stack: LoopbackStack, azurite: Azurite
) -> None:
    prefix = f"rd{uuid.uuid4().hex[:10]}"
    with (
        ResetProxy(azurite.table_port) as proxy,
        stack.app(TABLE_PREFIX=prefix, AzureWebJobsStorage=connection_string(proxy.port)) as container,
    ):
        name = f"sn-{uuid.uuid4().hex[:10]}"
        stack.add_servicenow_connection(name)
        now = datetime.now(UTC)
        ids = []
        for i in range(3):
            payload = load("metric_fired")
            payload["data"]["essentials"]["alertId"] += f"-redrive-{i}"
            signal = parse_alert(payload)
            delivery_id = f"{i:032x}"
            container.deliveries.insert(
                Delivery(
                    connection=name,
                    delivery_id=delivery_id,
                    status=DeliveryStatus.FAILED,
                    attempts=5,
                    last_error="ItsmUnavailableError: earlier outage",
                    received_at=now,
                    updated_at=now,
                    signal=signal,
                )
            )
            ids.append(delivery_id)
        broken = ids[1]
        proxy.fail_matching(f"RowKey='{broken}'".encode())
        out = io.StringIO()

        code = main(["alerts", "redrive", "--connection", name], Cli(out=out, err=out))

        output = out.getvalue()
        assert code == 1, output
        assert f"{broken} not redriven: updating" in output
        assert "redrove 3: 2 delivered, 0 failed, 1 not redriven" in output
        for delivery_id in (ids[0], ids[2]):
            delivered = container.deliveries.get(name, delivery_id)
            assert delivered is not None
            assert delivered.status is DeliveryStatus.DELIVERED, delivered.last_error
