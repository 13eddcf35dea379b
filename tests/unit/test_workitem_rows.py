"""The WorkItems row as the sync writes it: keys, columns, and the size bound batches are cut by."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared_code.domain.workitem import Lifecycle, WorkItem, WorkItemType
from shared_code.state.tablebatch import MAX_BODY_BYTES, _part, _weight, transactions
from shared_code.state.workitems import TEXT_LIMIT, row_key, to_entity


def item(**changes: object) -> WorkItem:
    values: dict[str, object] = {
        "connection": "prod",
        "item_type": WorkItemType.INCIDENT,
        "source_id": "46d44e1a2f5b1010a9f3d6a5c2c6b3e1",
        "number": "INC0010001",
        "updated_at": datetime(2024, 3, 1, 12, 30, 45, tzinfo=UTC),
        "state": "Resolved",
        "state_code": "6",
        "lifecycle": Lifecycle.RESOLVED,
        "title": "CPU high on web-prod-01",
        "created_at": datetime(2024, 3, 1, 10, 0, tzinfo=UTC),
    }
    return WorkItem.model_validate(values | changes)


@pytest.mark.parametrize(
    ("source_id", "key"),
    [
        ("46d44e1a2f5b1010a9f3d6a5c2c6b3e1", "46d44e1a2f5b1010a9f3d6a5c2c6b3e1"),
        ("3fa85f64-5717-4562-b3fc-2c963f66afa6", "3fa85f64-5717-4562-b3fc-2c963f66afa6"),
        ("a/b-c#d?e\\f%g", "a%2Fb-c%23d%3Fe%5Cf%25g"),
        ("tab\there-", "tab%09here-"),
        ("café-1", "café-1"),
    ],
)
def test_row_keys_keep_ids_with_dashes_and_encode_what_a_key_may_not_hold(source_id: str, key: str) -> None:
    assert row_key(source_id) == key


def test_the_row_holds_every_set_field_as_the_model_dumps_it_with_long_text_cut() -> None:
    long_text = "x" * (TEXT_LIMIT + 10)
    work_item = item(description=long_text, resolved_at=None)
    entity = to_entity(work_item)
    expected = {
        name: value.value if isinstance(value, WorkItemType) else value
        for name, value in work_item.model_dump().items()
        if value is not None
    }
    expected["description"] = long_text[: TEXT_LIMIT - 1] + "…"
    assert {k: v for k, v in entity.items() if k not in ("PartitionKey", "RowKey")} == expected
    assert entity["RowKey"] == work_item.source_id
    assert entity["PartitionKey"].startswith("prod-incidents-")
    assert "resolved_at" not in entity
    assert entity["item_type"] == "Incident"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"title": "é" * 500, "description": "日本語" * 300},
        {"description": "plain " * 2000, "closed_at": datetime(2024, 3, 2, tzinfo=UTC)},
    ],
)
def test_the_size_bound_is_never_below_the_part_actually_written(changes: dict[str, object]) -> None:
    entity = to_entity(item(**changes))
    written = len(_part("http://127.0.0.1:10002/devstoreaccount1/WorkItems", 99, entity).encode("ascii"))
    assert written <= _weight(entity)


def test_large_rows_are_cut_into_transactions_under_the_body_limit() -> None:
    rows = [to_entity(item(source_id=f"id{n:04d}", description="日本語" * 5000)) for n in range(40)]
    batches = list(transactions(rows))
    assert [row for batch in batches for row in batch] == rows
    assert len(batches) > 1
    for batch in batches:
        assert sum(_weight(row) for row in batch) <= MAX_BODY_BYTES
