"""The normalised work item, compatible with the retired ITSM Connector's ``ServiceDesk_CL`` columns.

Existing Log Analytics queries and workbooks filter on ``ServiceDeskWorkItemType_s``,
``ServiceDeskId_s``, ``IncidentState_s`` and friends; ``to_service_desk_record`` produces exactly
those names so they keep working against the table this app fills.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared_code.domain.alert import Severity
from shared_code.errors import InvalidInputError, shown


class WorkItemType(StrEnum):
    INCIDENT = "Incident"
    CHANGE_REQUEST = "ChangeRequest"

    @property
    def sync_name(self) -> str:
        """The name used in settings, the CLI and the SyncState table."""
        return "incidents" if self is WorkItemType.INCIDENT else "change_requests"

    @classmethod
    def from_sync_name(cls, name: str) -> WorkItemType:
        for item in cls:
            if item.sync_name == name:
                return item
        raise ValueError(f"unknown work item type {shown(name)}: use incidents or change_requests")

    @classmethod
    def parse_many(cls, names: Sequence[str] | None) -> list[WorkItemType] | None:
        """``incidents`` / ``change_requests`` (dashes allowed) -> work-item types; None means all."""
        if not names:
            return None
        types: list[WorkItemType] = []
        for name in names:
            try:
                item_type = cls.from_sync_name(name.strip().lower().replace("-", "_"))
            except ValueError as exc:
                raise InvalidInputError(str(exc)[:200]) from None
            if item_type not in types:
                types.append(item_type)
        return types


class Lifecycle(StrEnum):
    """Where a work item is, whatever the product calls its states; set by the product's mapping."""

    NEW = "new"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    CLOSED = "closed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Lifecycle.RESOLVED, Lifecycle.CLOSED, Lifecycle.CANCELLED)


class WorkItem(BaseModel):
    """One incident or change request, as people read it (display values, not reference ids)."""

    model_config = ConfigDict(frozen=True)

    connection: str
    item_type: WorkItemType
    source_id: str = Field(min_length=1, description="the product's own id (ServiceNow sys_id)")
    number: str = Field(min_length=1, description="the id people read (INC0010001)")
    updated_at: datetime
    state: str = ""
    lifecycle: Lifecycle | None = Field(
        default=None, description="the normalised lifecycle the product's mapping derived from its raw state"
    )
    state_code: str = Field(
        default="",
        description="the product's raw state value (ServiceNow: incident 6 Resolved, 7 Closed, 8 Canceled); "
        "``state`` is its label, which depends on the integration user's language and the instance's choices",
    )
    urgency: str = ""
    impact: str = ""
    priority: str = ""
    created_by: str = ""
    resolved_by: str = ""
    closed_by: str = ""
    source: str = ""
    assigned_to: str = ""
    category: str = ""
    title: str = ""
    description: str = ""
    computer: str = ""
    created_at: datetime | None = None
    resolved_at: datetime | None = None
    closed_at: datetime | None = None
    correlation_id: str = ""
    # change requests only
    change_type: str = ""
    risk: str = ""
    requested_at: datetime | None = None
    planned_start: datetime | None = None
    planned_end: datetime | None = None
    work_start: datetime | None = None
    work_end: datetime | None = None

    def to_service_desk_record(self, observed_at: datetime) -> dict[str, Any]:
        """The row for the ``ServiceDesk_CL`` custom table (ITSMC column names).

        ``TimeGenerated`` is when the sync read this version (as ITSMC stamped its imports), not the
        item's own update time: a first sync reaches 120 days back, and Log Analytics does not keep
        a record's old ``TimeGenerated``. The update time is ``LastModifiedDate_t``.
        """

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        record: dict[str, Any] = {
            "TimeGenerated": observed_at.isoformat(),
            "ServiceDeskConnectionName_s": self.connection,
            "ServiceDeskWorkItemType_s": self.item_type.value,
            "ServiceDeskId_s": self.number,
            "ServiceDeskSysId_s": self.source_id,
            "Urgency_s": self.urgency,
            "Impact_s": self.impact,
            "Priority_s": self.priority,
            "CreatedBy_s": self.created_by,
            "ClosedBy_s": self.closed_by,
            "Source_s": self.source,
            "AssignedTo_s": self.assigned_to,
            "Category_s": self.category,
            "Title_s": self.title,
            "Description_s": self.description,
            "CreatedDate_t": iso(self.created_at),
            "ClosedDate_t": iso(self.closed_at),
            "LastModifiedDate_t": iso(self.updated_at),
            "Computer": self.computer,
        }
        if self.item_type is WorkItemType.INCIDENT:
            record |= {
                "IncidentState_s": self.state,
                "ResolvedBy_s": self.resolved_by,
                "ResolvedDate_t": iso(self.resolved_at),
            }
        else:
            record |= {
                "CRState_s": self.state,
                "Type_s": self.change_type,
                "Risk_s": self.risk,
                "RequestedDate_t": iso(self.requested_at),
                "PlannedStartDate_t": iso(self.planned_start),
                "PlannedEndDate_t": iso(self.planned_end),
                "WorkStartDate_t": iso(self.work_start),
                "WorkEndDate_t": iso(self.work_end),
            }
        return record


class WorkItemRef(BaseModel):
    """Where a work item lives in the product: its id, the number people read, and a link."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    number: str = Field(min_length=1)
    url: str | None = None


NOTE_MARKER_PREFIX = "Azure Monitor delivery "
_NOTE_MARKER = re.compile(r"\[" + re.escape(NOTE_MARKER_PREFIX) + r"([0-9a-f]{32})\]")


def note_marker(delivery_id: str) -> str:
    """The line that names the notification a note was written for.

    Appending a journal entry is not idempotent: when its answer is lost, the product is searched
    for this marker (the delivery id is unique, and the same for every attempt of one delivery)
    before the note is sent again. It also lets an operator go from a note to ``alerts status``.
    """
    if not re.fullmatch(r"[0-9a-f]{32}", delivery_id):  # not the webhook's: a stable stand-in
        delivery_id = hashlib.sha256(delivery_id.encode()).hexdigest()[:32]
    return f"[{NOTE_MARKER_PREFIX}{delivery_id}]"


def marker_in(text: str) -> str | None:
    """The note marker ``text`` carries (its last one), or None."""
    found = _NOTE_MARKER.findall(text)
    return f"[{NOTE_MARKER_PREFIX}{found[-1]}]" if found else None


class WorkItemState(StrEnum):
    """The coarse lifecycle the alert path cares about, whatever the product calls its states."""

    OPEN = "open"
    RESOLVED = "resolved"
    CLOSED = "closed"


class AlertFacts(BaseModel):
    """The alert behind a draft, for products whose work item is an event rather than an incident
    (ServiceNow Event Management): severity, what fired and where, in the product's own terms."""

    model_config = ConfigDict(frozen=True)

    severity: Severity
    rule: str = Field(min_length=1)
    monitoring_service: str = ""
    signal_type: str = ""
    resource: str = Field(default="", description="the primary target's name (a CI or resource name)")
    resource_id: str = Field(default="", description="the primary target's ARM id, where there is one")
    metric_name: str = ""
    alert_id: str = ""
    fired_at: datetime | None = None
    portal_link: str = ""


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
    alert: AlertFacts | None = Field(
        default=None, description="the alert's own facts, for products that send events (severity, metric)"
    )

    def without_configuration_item(self) -> IncidentDraft:
        """The draft with no CI to link (the CMDB does not know it, or the product has none)."""
        return self.model_copy(update={"configuration_item": None})


class SeverityMapping(BaseModel):
    """Impact and urgency (1 high .. 3 low) for one Azure Monitor severity."""

    model_config = ConfigDict(frozen=True)

    impact: int = Field(ge=1, le=3)
    urgency: int = Field(ge=1, le=3)


SEVERITIES: Sequence[str] = ("Sev0", "Sev1", "Sev2", "Sev3", "Sev4")
