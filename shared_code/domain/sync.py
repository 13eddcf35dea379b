"""The work-item change feed: keyset cursors, pages, and what a sync run reports as errors."""

from __future__ import annotations

import uuid
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


class SyncPage(BaseModel):
    """One page of changed work items, in cursor order, with the cursor just past the last row."""

    items: list[WorkItem]
    rejected: list[RejectedRow] = Field(default_factory=list)
    next_cursor: SyncCursor
    is_last: bool


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
