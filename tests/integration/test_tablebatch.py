"""The hand-serialised entity group transactions (``shared_code/state/tablebatch.py``) against Azurite.

What the SDK reads back must be what the SDK itself would have written: every property type the
state tables use, keys with the characters a URL or an OData key literal treats specially, whole
replacement of a row, and the service's refusals surfacing as ``StateError``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import quote, unquote

import pytest
from azure.data.tables import EdmType, EntityProperty, TableClient, TableServiceClient

from shared_code.errors import StateError
from shared_code.state.tablebatch import (
    MAX_OPERATIONS,
    Delete,
    Operation,
    key_literal,
    transactions,
    upsert_transaction,
    write_all,
)
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


HOSTILE_KEYS = [
    "it's",
    "a b",
    "100%",
    "ümlaut",
    "a+b=c&d",
    "(paren)",
    "comma,semi;colon:",
    "~tilde.dot_",
    "map|web-01|n|10.0.0.1:443",
    '"quoted" <angle> [square] {curly} `tick` ^caret !bang @at $dollar *star',
]


def test_the_sdk_internals_the_writer_relies_on_are_still_there(table: TableClient) -> None:
    """``write_transaction`` sends through the client's own pipeline: these attributes are private
    to azure-data-tables, so an SDK upgrade that moves them must fail here, not in production."""
    assert callable(table._client.send_request)
    assert table.scheme in ("http", "https")
    assert table._primary_hostname
    assert table.api_version


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_keys_are_written_into_the_url_exactly_as_the_sdk_writes_them(table: TableClient, key: str) -> None:
    """Azurite forgives sloppy key escaping; the service does not. So the proof is not that Azurite
    took the row, but that our request line names the entity exactly as the SDK's own request does."""
    seen: list[str] = []
    table.upsert_entity(
        {"PartitionKey": key, "RowKey": key, "v": 1},
        raw_request_hook=lambda request: seen.append(request.http_request.url),
    )
    sdk_url = seen[-1]
    expected_tail = sdk_url.rsplit("/", 1)[1].split("?", 1)[0]  # Table(PartitionKey='..',RowKey='..')
    ours = f"{table.table_name}(PartitionKey='{key_literal(key)}',RowKey='{key_literal(key)}')"
    assert unquote(ours) == unquote(expected_tail)
    assert quote(unquote(ours), safe="()',=") == quote(unquote(expected_tail), safe="()',=")
    upsert_transaction(table, [{"PartitionKey": key, "RowKey": key, "v": 2}])
    assert table.get_entity(key, key)["v"] == 2


@pytest.mark.parametrize("key", ["a/b", "a\\b", "a#b", "a?b", "tab\there", "nul\x00", "del\x7f"])
def test_keys_the_service_refuses_are_refused_before_anything_is_sent(table: TableClient, key: str) -> None:
    with pytest.raises(ValueError, match="may not contain"):
        upsert_transaction(table, [{"PartitionKey": "p", "RowKey": key, "v": 1}])
    assert list(table.list_entities()) == []


def test_upserts_and_deletes_share_one_transaction_and_large_sets_are_cut_within_the_limits(
    table: TableClient,
) -> None:
    write_all(table, [{"PartitionKey": "p", "RowKey": f"r{n:03d}", "v": n} for n in range(250)])
    assert len(list(table.list_entities())) == 250
    operations: list[Operation] = [Delete("p", f"r{n:03d}") for n in range(0, 250, 2)]
    operations += [{"PartitionKey": "p", "RowKey": "new", "blob": "x" * 30_000}]
    write_all(table, operations)
    rows = {e["RowKey"] for e in table.list_entities()}
    assert rows == {f"r{n:03d}" for n in range(1, 250, 2)} | {"new"}
    blobs = {f"blob{k}": "y" * 30_000 for k in range(3)}  # a property holds at most 32K characters
    big: list[Operation] = [{"PartitionKey": "p", "RowKey": f"b{n}", **blobs} for n in range(120)]
    batches = list(transactions(big))
    assert all(len(batch) <= MAX_OPERATIONS for batch in batches)
    assert len(batches) >= 3  # 120 x ~90 kB: cut by size before the count limit
    write_all(table, big)
    assert sum(1 for e in table.list_entities() if e["RowKey"].startswith("b")) == 120
