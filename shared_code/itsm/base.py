"""The port every ITSM product implements, and the value objects that cross it.

A connector speaks one product's REST API over an injected ``httpx.Client``. It knows nothing of
Azure Functions, Table Storage or Key Vault: credentials arrive as an ``httpx.Auth`` built by the
composition root, and errors leave as the ``ItsmError`` family from ``shared_code.errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from shared_code.workitems.model import WorkItem, WorkItemType


class WorkItemRef(BaseModel):
    """Where a work item lives in the product: its id, the number people read, and a link."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    number: str = Field(min_length=1)
    url: str | None = None


class WorkItemState(StrEnum):
    """The coarse lifecycle the alert path cares about, whatever the product calls its states."""

    OPEN = "open"
    RESOLVED = "resolved"
    CLOSED = "closed"


class IncidentDraft(BaseModel):
    """What the alert path asks a product to create. Products map it to their own fields."""

    model_config = ConfigDict(frozen=True)

    short_description: str = Field(min_length=1, max_length=160)
    description: str
    impact: int = Field(ge=1, le=3)
    urgency: int = Field(ge=1, le=3)
    correlation_id: str = Field(min_length=1, max_length=100)
    correlation_display: str = Field(default="", max_length=100)
    configuration_item: str | None = None
    create_configuration_item: bool = False
    assignment_group: str | None = None
    caller: str | None = None
    category: str | None = None


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


class ItsmConnector(Protocol):
    """One ITSM product. Every method is one logical call that either succeeds or raises ItsmError."""

    def check(self) -> str:
        """Make one authenticated call and describe what answered (for ``connections test``)."""
        ...

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        """Create an incident (or event) and return where it lives."""
        ...

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        """The newest open work item stamped with ``correlation_id``, if any (crash recovery of a create)."""
        ...

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        """Append a work note."""
        ...

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        """Resolve the work item, leaving ``note`` as the resolution notes and a work note."""
        ...

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        """Put a resolved work item back in progress with a work note."""
        ...

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        """Where the work item is in its lifecycle now."""
        ...

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        """The product's id of the CI called ``name``; create it when missing and ``create`` is set."""
        ...

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        """One page of work items of ``item_type`` changed after ``cursor``, oldest first."""
        ...

    def close(self) -> None:
        """Release the HTTP client when the connector owns it."""
        ...


class SeverityMapping(BaseModel):
    """Impact and urgency (1 high .. 3 low) for one Azure Monitor severity."""

    model_config = ConfigDict(frozen=True)

    impact: int = Field(ge=1, le=3)
    urgency: int = Field(ge=1, le=3)


SEVERITIES: Sequence[str] = ("Sev0", "Sev1", "Sev2", "Sev3", "Sev4")
