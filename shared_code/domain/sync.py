"""The work-item change feed: keyset cursors, pages, and what a sync run reports as errors."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared_code.domain.workitem import WorkItem, WorkItemType

MESSAGE_LIMIT = 4000


class SyncCursor(BaseModel):
    """Keyset position in a product's change feed: last update time, then last id at that time."""

    model_config = ConfigDict(frozen=True)

    updated_at: datetime
    last_id: str = ""


class RejectedRow(BaseModel):
    """A source row the work-item model could not parse: logged with its id and skipped."""

    source_id: str
    error: str


MappedRows = tuple[list[WorkItem], list[RejectedRow]]
"""A page's rows as work items, and the rows that could not be read."""


class SyncPage:
    """One page of changed work items, in cursor order, with the cursor just past the last row.

    Where the page sits (``next_cursor``, ``is_last``) is known as soon as the product answered;
    its rows may be mapped later (``SyncPage.deferred``). The engine asks for the next page (when
    there is one to ask for) before it reads ``items``, so a connector that defers its mapping has
    it run while the next request is in flight. Read from one thread (the engine's).
    """

    __slots__ = ("_build", "_failure", "_items", "_rejected", "is_last", "next_cursor")

    def __init__(
        self,
        *,
        items: Sequence[WorkItem],
        next_cursor: SyncCursor,
        is_last: bool,
        rejected: Sequence[RejectedRow] = (),
    ) -> None:
        self.next_cursor = next_cursor
        self.is_last = is_last
        self._items: list[WorkItem] | None = list(items)
        self._rejected: list[RejectedRow] = list(rejected)
        self._build: Callable[[], MappedRows] | None = None
        self._failure: BaseException | None = None

    @classmethod
    def deferred(cls, *, next_cursor: SyncCursor, is_last: bool, build: Callable[[], MappedRows]) -> SyncPage:
        """A page whose rows ``build`` maps on first use, once: what it raised, every read raises."""
        page = cls(items=(), next_cursor=next_cursor, is_last=is_last)
        page._items, page._build = None, build
        return page

    def _mapped(self) -> list[WorkItem]:
        if self._items is None:
            if self._failure is not None:
                raise self._failure
            build, self._build = self._build, None
            assert build is not None
            try:
                items, rejected = build()
            except BaseException as exc:
                self._failure = exc
                raise
            self._items, self._rejected = list(items), list(rejected)
        return self._items

    @property
    def items(self) -> list[WorkItem]:
        return self._mapped()

    @property
    def rejected(self) -> list[RejectedRow]:
        self._mapped()
        return self._rejected

    def __repr__(self) -> str:
        if self._items is None:
            rows = "not mapped yet"
        else:
            rows = f"{len(self._items)} items, {len(self._rejected)} rejected"
        return f"SyncPage({rows}, next_cursor={self.next_cursor!r}, is_last={self.is_last})"


class SyncErrorKind(StrEnum):
    REJECTED_ROW = "rejected_row"  # a source row the model could not parse; skipped
    REAUTHORISE = "reauthorise"  # the product refused the credentials
    ITSM = "itsm"  # the product failed after bounded retries
    SINK = "sink"  # a sink (WorkItems table, Log Analytics) failed; the page is retried next run
    BACKSYNC = "backsync"  # closing an Azure alert or updating its correlation failed
    INTERNAL = "internal"  # anything else; details in the app's logs


class SyncErrorRecord(BaseModel):
    """One problem seen by the sync, with the source id where it concerns one row."""

    model_config = ConfigDict(frozen=True)

    connection: str
    item_type: str = ""
    kind: SyncErrorKind
    message: str
    source_id: str = ""
    run_id: str = ""
    occurred_at: datetime
    record_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])

    def to_log_record(self) -> dict[str, Any]:
        """The row for the ``ServiceDeskLog_CL`` custom table (see docs/log-analytics.md)."""
        return {
            "TimeGenerated": self.occurred_at.isoformat(),
            "ServiceDeskConnectionName_s": self.connection,
            "ServiceDeskWorkItemType_s": _work_item_type(self.item_type),
            "Kind_s": self.kind.value,
            "SourceId_s": self.source_id,
            "Message_s": self.message[:MESSAGE_LIMIT],
            "RunId_s": self.run_id,
        }


def _work_item_type(sync_name: str) -> str:
    """``incidents`` -> ``Incident``: the same value ``ServiceDesk_CL`` carries, so the two tables join."""
    try:
        return WorkItemType.from_sync_name(sync_name).value
    except ValueError:
        return sync_name
