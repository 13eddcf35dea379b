"""Pure translations between this app's value objects and SCSM objects as the Cireson portal shows them.

The portal answers a type projection as one JSON object per work item: the class's properties
(``Id`` is the number people read, ``BaseId`` the object's GUID, ``LastModified`` its last change),
enumeration values as ``{"Id": GUID, "Name": label}``, and the projection's relationships by
their component names (``AssignedWorkItem`` a user object, ``AboutConfigItem`` a list of CIs,
``AppliesToTroubleTicket`` the action log). Decisions are taken on enumeration GUIDs, never on
labels (those follow the portal language and the site's own names); the label is kept for people.

Stock SCSM has no correlation field on incidents, so the correlation id lives in one marker line
at the end of the description (``MARKER``), which ``find_by_correlation`` searches with ``Like``
and the sync reads back into ``WorkItem.correlation_id``.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItem, WorkItemState, WorkItemType
from shared_code.itsm.scsm.criteria import format_datetime, like_literal

# -- classes and projections of a stock SCSM ----------------------------------------------------------

WORK_ITEM_CLASS = "f59821e2-0364-ed2c-19e3-752efbb1ece9"  # System.WorkItem (Title, Description)
INCIDENT_CLASS = "a604b942-4c7b-2fb2-28dc-61dc6f465c68"  # System.WorkItem.Incident
CHANGE_REQUEST_CLASS = "e6c9cf6e-d7fe-1b5d-216c-c3f5d2c7670c"  # System.WorkItem.ChangeRequest
CONFIG_ITEM_PROJECTION = "8ab27adb-13b1-2b7b-56e6-91598417cbee"  # System.ConfigItem.Projection

STATUS_CLASS: dict[WorkItemType, str] = {
    WorkItemType.INCIDENT: INCIDENT_CLASS,
    WorkItemType.CHANGE_REQUEST: CHANGE_REQUEST_CLASS,
}

# -- enumeration values (GUIDs of the stock management packs) ------------------------------------------

INCIDENT_ACTIVE = "5e2d3932-ca6d-1515-7310-6f58584df73e"  # IncidentStatusEnum.Active
INCIDENT_PENDING = "b6679968-e84e-96fa-1fec-8cd4ab39c3de"  # IncidentStatusEnum.Active.Pending
INCIDENT_UPDATED_BY_USER = (
    "b7ba8903-66a1-485f-4418-00d06abf1235"  # a child of Active ("Updated by Affected User")
)
INCIDENT_RESOLVED = "2b8830b6-59f0-f574-9c2a-f4b4682f1681"  # IncidentStatusEnum.Resolved
INCIDENT_CLOSED = "bd0ae7c4-3315-2eb3-7933-82dfc482dbaf"  # IncidentStatusEnum.Closed

CHANGE_NEW = "a87c003e-8c19-a25f-f8b2-151b56670e5c"
CHANGE_DRAFT = "13fcec71-3230-f6ac-0a73-9b261c57d6c9"
CHANGE_SUBMITTED = "504f294c-ae38-2a65-f395-bff4f085698b"
CHANGE_PENDING_APPROVAL = "b5e8b30d-c621-f989-05a6-421ba37353af"
CHANGE_IN_PROGRESS = "6d6c64dd-07ac-aaf5-f812-6a7cceb5154d"
CHANGE_ON_HOLD = "dd6b0870-bcea-1520-993d-9f1337e39d4d"
CHANGE_COMPLETED = "68277330-a0d3-cfdd-298d-d5c31d1d126f"
CHANGE_FAILED = "85f00ead-2603-6c68-dfec-531c83bf900f"
CHANGE_CANCELLED = "877defb6-0d21-7d19-89d5-a1107d621270"
CHANGE_CLOSED = "f228d50b-2b5a-010f-b1a4-5c7d95703a9b"

LIFECYCLES: dict[WorkItemType, dict[str, Lifecycle]] = {
    WorkItemType.INCIDENT: {
        INCIDENT_ACTIVE: Lifecycle.IN_PROGRESS,
        INCIDENT_PENDING: Lifecycle.IN_PROGRESS,
        INCIDENT_UPDATED_BY_USER: Lifecycle.IN_PROGRESS,
        INCIDENT_RESOLVED: Lifecycle.RESOLVED,
        INCIDENT_CLOSED: Lifecycle.CLOSED,
    },
    WorkItemType.CHANGE_REQUEST: {
        CHANGE_NEW: Lifecycle.NEW,
        CHANGE_DRAFT: Lifecycle.NEW,
        CHANGE_SUBMITTED: Lifecycle.NEW,
        CHANGE_PENDING_APPROVAL: Lifecycle.NEW,
        CHANGE_IN_PROGRESS: Lifecycle.IN_PROGRESS,
        CHANGE_ON_HOLD: Lifecycle.IN_PROGRESS,
        CHANGE_COMPLETED: Lifecycle.RESOLVED,
        CHANGE_FAILED: Lifecycle.CLOSED,
        CHANGE_CANCELLED: Lifecycle.CANCELLED,
        CHANGE_CLOSED: Lifecycle.CLOSED,
    },
}
"""Raw status GUID -> normalised lifecycle. A status not listed (a site's own child of Active, say)
leaves ``WorkItem.lifecycle`` unset rather than guessed; its label is still stored."""

# System.WorkItem.TroubleTicket.ImpactEnum / UrgencyEnum, by the draft's 1 (high) .. 3 (low)
IMPACT: dict[int, tuple[str, str]] = {
    1: ("d2b5e816-2d24-8e7d-a61f-2cceaeac2664", "High"),
    2: ("80cc222b-2653-2f68-8cee-3a7dd3b723c1", "Medium"),
    3: ("8f1a713e-53aa-9d8a-31b9-a9540074f305", "Low"),
}
URGENCY: dict[int, tuple[str, str]] = {
    1: ("2f8f0747-b6cb-7996-fd4a-84d09743f218", "High"),
    2: ("02625c30-08c6-4181-b2ed-222fa473280e", "Medium"),
    3: ("725a4cad-088c-4f55-a845-000db8872e01", "Low"),
}

OBJECT_ACTIVE = "acdcedb7-100c-8c91-d664-4629a218bd94"  # System.ConfigItem.ObjectStatusEnum.Active

# -- property and relationship names of the stock projections -----------------------------------------

BASE_ID = "BaseId"
NUMBER = "Id"
LAST_MODIFIED = "LastModified"
ACTION_LOG = "AppliesToTroubleTicket"
AFFECTED_ITEMS = "AboutConfigItem"

TITLE_LIMIT = 200
DESCRIPTION_LIMIT = 4000
COMMENT_LIMIT = 4000

NOTE_NAMESPACE = uuid.UUID("5b0f4f5e-6c1d-4a3e-9f0e-2b7c1d4e8a90")
"""Namespace of the action-log entry ids this app writes (``note_id``)."""

MARKER_PREFIX = "Azure Monitor correlation id: "
MARKER_SUFFIX = " (used by the Azure Monitor connector: keep this line)"
_MARKER = re.compile(re.escape(MARKER_PREFIX) + r"([A-Za-z0-9._:-]{1,100})" + re.escape(MARKER_SUFFIX))
_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")
_MIN_YEAR = 1900  # SCSM and the portal write 0001-01-01T00:00:00 for "no date"


# -- the alert path ------------------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def marker(correlation_id: str) -> str:
    """The description line that carries the correlation id; refuses ids that are not plain tokens."""
    if not _CORRELATION_ID.match(correlation_id):
        raise ValueError(
            "a correlation id must be 1-100 letters, digits, dots, colons, dashes or underscores"
        )
    return f"{MARKER_PREFIX}{correlation_id}{MARKER_SUFFIX}"


def marker_search_text(correlation_id: str) -> str:
    """The part of the marker a ``Like`` search looks for (the suffix's start ends the id)."""
    return marker(correlation_id)[: len(MARKER_PREFIX) + len(correlation_id) + 2]


def like_pattern(correlation_id: str) -> str:
    """The ``Like`` pattern that finds the marker line of ``correlation_id`` in a description."""
    return f"%{like_literal(marker_search_text(correlation_id))}%"


def description_with_marker(description: str, correlation_id: str) -> str:
    """The description, shortened so that it and the marker line fit SCSM's 4,000 characters."""
    line = marker(correlation_id)
    room = DESCRIPTION_LIMIT - len(line) - 2
    return f"{_clip(description.rstrip(), room)}\n\n{line}"


def correlation_of(description: str) -> str:
    if MARKER_PREFIX not in description:
        return ""
    found = _MARKER.search(description)
    return found.group(1) if found else ""


def strip_marker(description: str) -> str:
    if MARKER_PREFIX not in description:
        return description
    return _MARKER.sub("", description).rstrip()


def draft_to_incident(
    template: Mapping[str, Any], draft: IncidentDraft, ci: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``current`` object of a new incident: the template's projection with the draft's fields.

    ``ci`` is the affected configuration item as the portal returned it (``BaseId``, ``DisplayName``).
    The support group and affected user are GUIDs (the connection's settings check them).
    """
    current = copy.deepcopy(dict(template))
    impact_id, impact_name = IMPACT[draft.impact]
    urgency_id, urgency_name = URGENCY[draft.urgency]
    current["Title"] = _clip(draft.short_description, TITLE_LIMIT)
    current["Description"] = description_with_marker(draft.description, draft.correlation_id)
    current["Impact"] = {"Id": impact_id, "Name": impact_name}
    current["Urgency"] = {"Id": urgency_id, "Name": urgency_name}
    if draft.assignment_group:
        current["TierQueue"] = {"Id": draft.assignment_group}
    if draft.caller:
        current["RequestedWorkItem"] = {"BaseId": draft.caller}
    if ci is not None:
        items = [item for item in current.get(AFFECTED_ITEMS) or [] if isinstance(item, Mapping)]
        items.append({"BaseId": ci.get(BASE_ID), "DisplayName": ci.get("DisplayName")})
        current[AFFECTED_ITEMS] = items
    return current


def note_id(work_item_id: str, purpose: str, text: str) -> str:
    """A stable id for one note: the same note written again (a retried delivery) has the same id,
    so the connector can see that it landed instead of writing it twice."""
    return str(uuid.uuid5(NOTE_NAMESPACE, f"{work_item_id}\n{purpose}\n{text}"))


def note_entry(entry_id: str, text: str, entered_by: str, now: datetime) -> dict[str, Any]:
    """An analyst comment for the work item's action log (``AppliesToTroubleTicket``)."""
    stamp = format_datetime(now)
    return {
        "Id": entry_id,
        "ActionType": "AnalystComment",
        "Title": "Analyst Comment",
        "Description": _clip(text, COMMENT_LIMIT),
        "EnteredBy": entered_by,
        "EnteredDate": stamp,
        "LastModified": stamp,
        "IsPrivate": False,
    }


def has_note(row: Mapping[str, Any], entry_id: str) -> bool:
    entries = row.get(ACTION_LOG)
    if not isinstance(entries, list):
        return False
    return any(isinstance(entry, Mapping) and entry.get("Id") == entry_id for entry in entries)


def incident_state(status_id: str) -> WorkItemState:
    """The coarse state the alert path needs; any status but Resolved and Closed counts as open."""
    status_id = status_id.strip().lower()
    if status_id == INCIDENT_RESOLVED:
        return WorkItemState.RESOLVED
    if status_id == INCIDENT_CLOSED:
        return WorkItemState.CLOSED
    return WorkItemState.OPEN


# -- reading rows --------------------------------------------------------------------------------------


def parse_datetime(value: object, name: str) -> datetime | None:
    """An ISO 8601 date-time of the portal as aware UTC; no offset means UTC; empty or 0001 is None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a date-time string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: not an ISO 8601 date-time: {text[:40]!r}") from None
    if moment.year < _MIN_YEAR:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def text_of(row: Mapping[str, Any], name: str) -> str:
    """A plain property as text ("" when missing or null)."""
    value = row.get(name)
    if value is None:
        return ""
    if type(value) is str:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise ValueError(f"{name}: unexpected {type(value).__name__} value")


# the helpers below run a dozen times per synced row: ``type(...) is dict`` first, because an
# isinstance check against the Mapping ABC costs several times more


def _is_mapping(value: object) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


def enum_id(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if value is not None and _is_mapping(value):
        found = value.get("Id")
        return found.lower() if type(found) is str else ""
    return ""


def enum_name(row: Mapping[str, Any], name: str) -> str:
    """An enumeration's label (or a plain value, for sites whose projection flattens it)."""
    value = row.get(name)
    if value is not None and _is_mapping(value):
        label = value.get("Name")
        return label if type(label) is str else ""
    return text_of(row, name)


def related_name(row: Mapping[str, Any], name: str) -> str:
    """The display name of a related object (a user), or of the first of a list of them (CIs)."""
    value = row.get(name)
    if type(value) is list:
        value = next(filter(_is_mapping, value), None)
    if value is not None and _is_mapping(value):
        label = value.get("DisplayName")
        return label if type(label) is str else ""
    return ""


def _required(row: Mapping[str, Any], name: str) -> str:
    value = text_of(row, name).strip()
    if not value:
        raise ValueError(f"{name}: missing")
    return value


def position_of(row: Mapping[str, Any]) -> tuple[datetime, str] | None:
    """(LastModified, BaseId) of a row, or None when it cannot say where it sits in the feed."""
    try:
        base_id = _required(row, BASE_ID).lower()
        updated = parse_datetime(row.get(LAST_MODIFIED), LAST_MODIFIED)
    except ValueError:
        return None
    return None if updated is None else (updated, base_id)


def row_to_work_item(connection: str, item_type: WorkItemType, row: Mapping[str, Any]) -> WorkItem:
    """One projection object as a WorkItem; raises ``ValueError`` naming the field it could not read."""
    base_id = _required(row, BASE_ID).lower()
    number = _required(row, NUMBER)
    updated_at = parse_datetime(row.get(LAST_MODIFIED), LAST_MODIFIED)
    if updated_at is None:
        raise ValueError(f"{LAST_MODIFIED}: missing")
    status_id = enum_id(row, "Status")
    description = text_of(row, "Description")

    def date(name: str) -> datetime | None:
        return parse_datetime(row.get(name), name)

    values: dict[str, Any] = {
        "connection": connection,
        "item_type": item_type,
        "source_id": base_id,
        "number": number,
        "updated_at": updated_at,
        "state": enum_name(row, "Status"),
        "state_code": status_id,
        "lifecycle": LIFECYCLES[item_type].get(status_id),
        "urgency": enum_name(row, "Urgency"),
        "impact": enum_name(row, "Impact"),
        "priority": enum_name(row, "Priority"),
        "created_by": related_name(row, "CreatedWorkItem"),
        "closed_by": related_name(row, "TroubleTicketClosedByUser"),
        "assigned_to": related_name(row, "AssignedWorkItem"),
        "title": text_of(row, "Title"),
        "description": strip_marker(description),
        "computer": related_name(row, AFFECTED_ITEMS),
        "created_at": date("CreatedDate"),
        "closed_at": date("ClosedDate"),
        "correlation_id": correlation_of(description),
    }
    if item_type is WorkItemType.INCIDENT:
        values |= {
            "source": enum_name(row, "Source"),
            "category": enum_name(row, "Classification"),
            "resolved_by": related_name(row, "TroubleTicketResolvedByUser"),
            "resolved_at": date("ResolvedDate"),
        }
    else:
        values |= {
            "category": enum_name(row, "Area"),
            "change_type": enum_name(row, "Category"),
            "risk": enum_name(row, "Risk"),
            "requested_at": date("RequiredBy"),
            "planned_start": date("ScheduledStartDate"),
            "planned_end": date("ScheduledEndDate"),
            "work_start": date("ActualStartDate"),
            "work_end": date("ActualEndDate"),
        }
    return WorkItem(**values)
