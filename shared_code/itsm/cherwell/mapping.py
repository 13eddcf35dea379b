"""Pure translations between this app's value objects and Cherwell business object records.

Kept apart from the connector so the field choices (the contract with existing ``ServiceDesk_CL``
workbooks) are testable without HTTP. Records come from ``getsearchresults`` / ``getbusinessobject``
as ``{"busObRecId", "busObPublicId", "fields": [{"fieldId", "name", "value", ...}]}``; every value
is a string as the integration user sees it: date-times in the user's culture (``5/6/2024 7:00:00
AM``, en-US, whole seconds) and time zone, choices by their label.

Field names are the stock ones; a site that lacks one (the schema says which exist) simply leaves
that column empty. The connector asks only for the fields the schema has. The raw ``Status`` is
kept (``WorkItem.state_code``) next to the normalised ``lifecycle`` derived from it here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItem, WorkItemState, WorkItemType

# -- field names of the stock business objects -------------------------------------------------------

REC_ID = "RecID"
LAST_MODIFIED = "LastModifiedDateTime"
CREATED = "CreatedDateTime"
STATUS = "Status"
DESCRIPTION = "Description"
SHORT_DESCRIPTION = "ShortDescription"
IMPACT = "Impact"
URGENCY = "Urgency"
CUSTOMER = "CustomerDisplayName"
OWNED_BY_TEAM = "OwnedByTeam"
SERVICE = "Service"
CATEGORY = "Category"
SUBCATEGORY = "Subcategory"
CLOSE_DESCRIPTION = "CloseDescription"
CI_REC_ID = "ConfigItemRecID"
CI_DISPLAY_NAME = "ConfigItemDisplayName"
NOTE_DETAILS = "Details"
CI_NAME = "FriendlyName"

INCIDENT_PUBLIC_ID = "IncidentID"
CHANGE_PUBLIC_ID = "ChangeID"

_COMMON_COLUMNS: dict[str, str] = {
    "state": STATUS,
    "priority": "Priority",
    "created_by": "CreatedBy",
    "closed_by": "ClosedBy",
    "assigned_to": "OwnedBy",
    "category": CATEGORY,
    "description": DESCRIPTION,
    "computer": CI_DISPLAY_NAME,
}
COLUMNS: dict[WorkItemType, dict[str, str]] = {
    WorkItemType.INCIDENT: _COMMON_COLUMNS
    | {
        "number": INCIDENT_PUBLIC_ID,
        "urgency": URGENCY,
        "impact": IMPACT,
        "resolved_by": "ResolvedBy",
        "source": "Source",
        "title": SHORT_DESCRIPTION,
    },
    WorkItemType.CHANGE_REQUEST: _COMMON_COLUMNS
    | {
        "number": CHANGE_PUBLIC_ID,
        "urgency": URGENCY,
        "impact": IMPACT,
        "title": "Title",
        "change_type": "Type",
        "risk": "Risk",
    },
}
"""WorkItem attribute -> Cherwell field name, for the text columns of each work-item type."""

DATE_COLUMNS: dict[WorkItemType, dict[str, str]] = {
    WorkItemType.INCIDENT: {
        "created_at": CREATED,
        "resolved_at": "ResolvedDateTime",
        "closed_at": "ClosedDateTime",
    },
    WorkItemType.CHANGE_REQUEST: {
        "created_at": CREATED,
        "closed_at": "ClosedDateTime",
        "requested_at": "RequestedDateTime",
        "planned_start": "ScheduledStartDate",
        "planned_end": "ScheduledEndDate",
        "work_start": "ActualStartDate",
        "work_end": "ActualEndDate",
    },
}
"""WorkItem attribute -> Cherwell field name, for the date-time columns."""

REQUIRED_SYNC_FIELDS = (REC_ID, LAST_MODIFIED)
"""Fields the keyset paging cannot do without; a business object lacking one cannot be synced."""


def sync_field_names(item_type: WorkItemType, correlation_field: str = "") -> list[str]:
    """Every field the sync would read for ``item_type`` (the connector keeps those the schema has)."""
    names = [*REQUIRED_SYNC_FIELDS, *COLUMNS[item_type].values(), *DATE_COLUMNS[item_type].values()]
    if correlation_field:
        names.append(correlation_field)
    return list(dict.fromkeys(names))


# -- statuses ----------------------------------------------------------------------------------------

STOCK_LIFECYCLE: dict[WorkItemType, dict[str, Lifecycle]] = {
    WorkItemType.INCIDENT: {
        "new": Lifecycle.NEW,
        "assigned": Lifecycle.IN_PROGRESS,
        "in progress": Lifecycle.IN_PROGRESS,
        "pending": Lifecycle.IN_PROGRESS,
        "on hold": Lifecycle.IN_PROGRESS,
        "reopened": Lifecycle.IN_PROGRESS,
        "resolved": Lifecycle.RESOLVED,
        "closed": Lifecycle.CLOSED,
        "cancelled": Lifecycle.CANCELLED,
        "canceled": Lifecycle.CANCELLED,
    },
    WorkItemType.CHANGE_REQUEST: {
        "new": Lifecycle.NEW,
        "logged": Lifecycle.NEW,
        "classify": Lifecycle.IN_PROGRESS,
        "assess": Lifecycle.IN_PROGRESS,
        "pending approval": Lifecycle.IN_PROGRESS,
        "approval": Lifecycle.IN_PROGRESS,
        "approved": Lifecycle.IN_PROGRESS,
        "scheduled": Lifecycle.IN_PROGRESS,
        "implementation": Lifecycle.IN_PROGRESS,
        "implementing": Lifecycle.IN_PROGRESS,
        "in progress": Lifecycle.IN_PROGRESS,
        "review": Lifecycle.IN_PROGRESS,
        "pending": Lifecycle.IN_PROGRESS,
        "on hold": Lifecycle.IN_PROGRESS,
        "completed": Lifecycle.RESOLVED,
        "implemented": Lifecycle.RESOLVED,
        "closed": Lifecycle.CLOSED,
        "cancelled": Lifecycle.CANCELLED,
        "canceled": Lifecycle.CANCELLED,
        "rejected": Lifecycle.CANCELLED,
        "withdrawn": Lifecycle.CANCELLED,
    },
}
"""Status label (lower case) -> lifecycle, for the stock statuses; a site's own ones map to None."""


def status_lifecycle(item_type: WorkItemType, status: str, resolved_status: str = "") -> Lifecycle | None:
    """The lifecycle of a raw Status; the connection's own resolved status counts as resolved.
    None for a status this app does not know (a site's custom one): the row keeps its raw value."""
    key = " ".join(status.split()).lower()
    if not key:
        return None
    if resolved_status and item_type is WorkItemType.INCIDENT and key == resolved_status.strip().lower():
        return Lifecycle.RESOLVED
    return STOCK_LIFECYCLE[item_type].get(key)


def incident_state(status: str, resolved_status: str) -> WorkItemState:
    """The coarse state the alert path needs; unknown statuses count as open."""
    lifecycle = status_lifecycle(WorkItemType.INCIDENT, status, resolved_status)
    if lifecycle is Lifecycle.RESOLVED:
        return WorkItemState.RESOLVED
    if lifecycle in (Lifecycle.CLOSED, Lifecycle.CANCELLED):
        return WorkItemState.CLOSED
    return WorkItemState.OPEN


# -- impact and urgency ------------------------------------------------------------------------------

LEVELS: dict[int, str] = {1: "High", 2: "Medium", 3: "Low"}
"""Impact and urgency 1..3 as the stock Impact and Urgency lookups name them (Priority follows)."""


# -- date-times --------------------------------------------------------------------------------------

_US_DATETIME = re.compile(
    r"^(\d{1,2})/(\d{1,2})/(\d{4})\s+(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?\s*([AaPp][Mm])?$"
)


@lru_cache(maxsize=32)
def zone_of(name: str) -> tzinfo:
    """The zone of a connection's ``time_zone`` setting (validated when the connection was parsed)."""
    return UTC if name.upper() == "UTC" else ZoneInfo(name)


def parse_datetime(text: str, name: str, zone: tzinfo = UTC) -> datetime | None:
    """A Cherwell date-time (``M/d/yyyy h:mm:ss AM``, or ISO 8601) as an aware UTC datetime.

    A value without an offset is in ``zone``, the integration user's time zone. Empty means None;
    anything else raises ``ValueError`` naming the field.
    """
    text = text.strip()
    if not text:
        return None
    match = _US_DATETIME.match(text)
    try:
        if match:
            month, day, year, hour, minute, second, half = match.groups()
            hours = int(hour)
            if half is not None:
                if not 1 <= hours <= 12:
                    raise ValueError
                hours = hours % 12 + (12 if half.lower() == "pm" else 0)
            moment = datetime(int(year), int(month), int(day), hours, int(minute), int(second or 0))
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: not a Cherwell date-time: {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(UTC)


def format_datetime(moment: datetime, zone: tzinfo = UTC) -> str:
    """``M/d/yyyy h:mm:ss AM`` in ``zone`` (search filter values); a naive datetime is refused."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("Cherwell date-times must be timezone-aware")
    local = moment.astimezone(zone)
    hour = local.hour % 12 or 12
    half = "AM" if local.hour < 12 else "PM"
    return f"{local.month}/{local.day}/{local.year} {hour}:{local.minute:02d}:{local.second:02d} {half}"


# -- records -----------------------------------------------------------------------------------------


def record_values(record: Mapping[str, Any]) -> dict[str, str]:
    """A record's ``fields`` list as field name -> value; raises ``ValueError`` on another shape."""
    fields = record.get("fields")
    if not isinstance(fields, list):
        raise ValueError("fields: missing")
    try:  # the usual shape (named string values) in one pass; anything else is checked below
        quick = {item["name"]: item["value"] for item in fields}
    except (TypeError, KeyError):
        quick = None
    if quick is not None and all(type(k) is str and k and type(v) is str for k, v in quick.items()):
        return quick
    values: dict[str, str] = {}
    for item in fields:
        # ``type(...) is`` first: JSON gives plain dicts and strings, and the ABC check of
        # ``isinstance(item, Mapping)`` is the slow part of a 20,000-record sync
        if type(item) is not dict and not isinstance(item, Mapping):
            raise ValueError("fields: an item is not an object")
        name = item.get("name")
        value = item.get("value")
        if not isinstance(name, str) or not name:
            raise ValueError("fields: an item has no name")
        if type(value) is str:
            values[name] = value
        elif value is None:
            values[name] = ""
        elif isinstance(value, str):
            values[name] = value
        elif isinstance(value, bool):
            values[name] = "True" if value else "False"
        elif isinstance(value, int | float):
            values[name] = str(value)
        else:
            raise ValueError(f"{name}: unexpected {type(value).__name__} value")
    return values


def record_id(record: Mapping[str, Any], values: Mapping[str, str] | None = None) -> str:
    """The record id (``busObRecId``, else the RecID field), or "" when it has none."""
    raw = record.get("busObRecId")
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    return (values or {}).get(REC_ID, "").strip()


def public_id(record: Mapping[str, Any], values: Mapping[str, str], item_type: WorkItemType) -> str:
    """The id people read (``busObPublicId``, else the public id field)."""
    raw = record.get("busObPublicId")
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    return values.get(COLUMNS[item_type]["number"], "").strip()


CORRELATION_MARKER = "Azure Monitor correlation id: "
"""The line that carries the correlation id in Description when no correlation field is set."""
_MARKER_LINE = re.compile(re.escape(CORRELATION_MARKER) + r"(azmon-[0-9A-Za-z]+-g[0-9]+)\s*$", re.MULTILINE)


def description_with_marker(description: str, correlation_id: str) -> str:
    return f"{description}\n\n{CORRELATION_MARKER}{correlation_id}"


def marker_of(description: str) -> str:
    """The correlation id a Description carries on its marker line, or ""."""
    found = _MARKER_LINE.findall(description)
    return str(found[-1]) if found else ""


@dataclass(frozen=True)
class RecordOptions:
    """What a connection says about reading its records."""

    zone: tzinfo = UTC
    correlation_field: str = ""
    resolved_status: str = ""


def record_to_work_item(
    connection: str,
    item_type: WorkItemType,
    record: Mapping[str, Any],
    options: RecordOptions,
    *,
    values: Mapping[str, str] | None = None,
    updated_at: datetime | None = None,
) -> WorkItem:
    """One search result as a WorkItem; raises ``ValueError`` naming the field it could not read.

    ``values`` (``record_values(record)``) and ``updated_at`` (its parsed ``LastModifiedDateTime``)
    may be passed when the caller has them already: the sync reads both for the keyset position
    first, and reading them twice per record was a good part of a large sync's CPU.
    """
    if values is None:
        values = record_values(record)
    source_id = record_id(record, values)
    if not source_id:
        raise ValueError(f"{REC_ID}: missing")
    number = public_id(record, values, item_type)
    if not number:
        raise ValueError(f"{COLUMNS[item_type]['number']}: missing")
    updated = updated_at or parse_datetime(values.get(LAST_MODIFIED, ""), LAST_MODIFIED, options.zone)
    if updated is None:
        raise ValueError(f"{LAST_MODIFIED}: missing")
    status = values.get(STATUS, "").strip()
    data: dict[str, Any] = {
        attribute: values.get(field, "")
        for attribute, field in COLUMNS[item_type].items()
        if attribute != "number"
    }
    for attribute, field in DATE_COLUMNS[item_type].items():
        data[attribute] = parse_datetime(values.get(field, ""), field, options.zone)
    if options.correlation_field:
        correlation = values.get(options.correlation_field, "").strip()
    else:
        correlation = marker_of(values.get(DESCRIPTION, ""))
    data |= {
        "connection": connection,
        "item_type": item_type,
        "source_id": source_id,
        "number": number,
        "updated_at": updated,
        "state": status,
        "state_code": status,
        "lifecycle": status_lifecycle(item_type, status, options.resolved_status),
        "correlation_id": correlation,
    }
    return WorkItem(**data)


# -- writes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IncidentDefaults:
    """A connection's classification of the incidents it creates."""

    service: str = ""
    category: str = ""
    subcategory: str = ""
    correlation_field: str = ""


def draft_to_incident_fields(
    draft: IncidentDraft,
    defaults: IncidentDefaults,
    *,
    ci_rec_id: str | None = None,
    ci_name: str | None = None,
) -> dict[str, str]:
    """Field name -> value of a new incident. Optional ones are left out rather than sent empty.

    The correlation id goes to the connection's correlation field, or onto a marker line at the
    end of Description (stock Cherwell has no such field), where a crashed create is found again.
    """
    description = draft.description
    fields: dict[str, str] = {}
    if defaults.correlation_field:
        fields[defaults.correlation_field] = draft.correlation_id
    else:
        description = description_with_marker(description, draft.correlation_id)
    fields |= {
        SHORT_DESCRIPTION: draft.short_description,
        DESCRIPTION: description,
        IMPACT: LEVELS[draft.impact],
        URGENCY: LEVELS[draft.urgency],
    }
    optional = {
        CUSTOMER: draft.caller,
        OWNED_BY_TEAM: draft.assignment_group,
        SERVICE: defaults.service,
        CATEGORY: draft.category or defaults.category,
        SUBCATEGORY: defaults.subcategory,
        CI_REC_ID: ci_rec_id,
        CI_DISPLAY_NAME: ci_name if ci_rec_id else None,
    }
    fields |= {name: value for name, value in optional.items() if value}
    return fields


def resolution_fields(status: str, note: str) -> dict[str, str]:
    """The Status change that resolves an incident, with the note as its close description."""
    return {STATUS: status, CLOSE_DESCRIPTION: note}


def normalised_note(text: str) -> str:
    """A note's text as compared when looking for one that landed (line ends and edges ignored)."""
    return text.replace("\r\n", "\n").strip()
