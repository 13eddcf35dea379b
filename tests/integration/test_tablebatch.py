"""The hand-serialised entity group transactions (``shared_code/state/tablebatch.py``) against Azurite.

What the SDK reads back must be what the SDK itself would have written: every property type the
state tables use, keys with the characters a URL or an OData key literal treats specially, whole
replacement of a row, and the service's refusals surfacing as ``StateError``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from azure.data.tables import EdmType, EntityProperty, TableClient, TableServiceClient

from shared_code.errors import StateError
from shared_code.state.tablebatch import MAX_OPERATIONS, upsert_transaction
from shared_code.state.tables import Entity
from tests.loopback.azurite import Azurite

_names = itertools.count(1)


@pytest.fixture
def table(azurite: Azurite) -> Iterator[TableClient]:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    name = f"batch{next(_names)}x{id(service) % 100000}"
    service.create_table(name)
    client = service.get_table_client(name)
    yield client
    service.delete_table(name)
    client.close()
    service.close()


def test_every_property_type_round_trips_as_the_sdk_reads_it(table: TableClient) -> None:
    moment = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    entity: Entity = {
        "PartitionKey": "p",
        "RowKey": "r",
        "text": 'é ü ☃ "quoted" \\ line\nbreak',
        "empty": "",
        "small": -5,
        "big": 2**40,
        "ratio": 1.5,
        "flag": False,
        "at": moment,
        "elsewhere": moment.astimezone(timezone(timedelta(hours=2))),
        "missing": None,
    }
    upsert_transaction(table, [entity])
    stored = table.get_entity("p", "r")
    assert stored["text"] == entity["text"]
    assert stored["empty"] == ""
    assert stored["small"] == -5
    assert stored["big"] == EntityProperty(2**40, EdmType.INT64)
    assert stored["ratio"] == 1.5
    assert stored["flag"] is False
    assert stored["at"] == moment
    assert stored["elsewhere"] == moment
    assert "missing" not in stored


def test_keys_with_quotes_spaces_and_url_characters_address_their_own_rows(table: TableClient) -> None:
    partition = "conn-incidents 'x'"
    keys = ["a'b", "c%2Fd", "e f", "ü+&=", "plain"]
    upsert_transaction(
        table, [{"PartitionKey": partition, "RowKey": key, "n": i} for i, key in enumerate(keys)]
    )
    stored = {
        e["RowKey"]: e["n"] for e in table.query_entities("PartitionKey eq @p", parameters={"p": partition})
    }
    assert stored == {key: i for i, key in enumerate(keys)}


def test_an_upsert_replaces_the_whole_row_and_a_full_transaction_is_accepted(table: TableClient) -> None:
    rows: list[Entity] = [{"PartitionKey": "p", "RowKey": f"{n:03d}", "a": "1", "b": "2"} for n in range(100)]
    assert len(rows) == MAX_OPERATIONS
    upsert_transaction(table, rows)
    upsert_transaction(table, [{"PartitionKey": "p", "RowKey": "000", "a": "changed"}])
    assert len(list(table.list_entities())) == 100
    first = table.get_entity("p", "000")
    assert first["a"] == "changed"
    assert "b" not in first


def test_refusals_become_state_errors_and_nothing_of_the_transaction_is_written(table: TableClient) -> None:
    with pytest.raises(StateError, match=r"HTTP 400 .*PropertyValueTooLarge"):
        upsert_transaction(
            table,
            [
                {"PartitionKey": "p", "RowKey": "ok", "x": "y"},
                {"PartitionKey": "p", "RowKey": "big", "x": "y" * 40_000},
            ],
        )
    assert list(table.list_entities()) == []
    with pytest.raises(StateError, match="HTTP 400"):
        upsert_transaction(
            table, [{"PartitionKey": "p", "RowKey": "1"}, {"PartitionKey": "p", "RowKey": "1"}]
        )


def test_a_missing_table_is_a_state_error_and_bad_input_is_refused_before_sending(azurite: Azurite) -> None:
    with TableServiceClient.from_connection_string(azurite.connection_string) as service:
        missing = service.get_table_client("nosuchtable")
        with pytest.raises(StateError, match="HTTP 404"):
            upsert_transaction(missing, [{"PartitionKey": "p", "RowKey": "r"}])
        with pytest.raises(ValueError, match="same partition"):
            upsert_transaction(
                missing, [{"PartitionKey": "a", "RowKey": "1"}, {"PartitionKey": "b", "RowKey": "1"}]
            )
        with pytest.raises(ValueError, match="at most 100"):
            upsert_transaction(missing, [{"PartitionKey": "a", "RowKey": str(n)} for n in range(101)])
        with pytest.raises(TypeError, match="not a supported table type"):
            upsert_transaction(missing, [{"PartitionKey": "a", "RowKey": "1", "x": object()}])
        upsert_transaction(missing, [])  # nothing to do: no request at all
