"""Pure translations between this app's value objects and Dataverse Web API rows.

Rows come from the Web API with ``Prefer: odata.include-annotations="OData.Community.Display.V1.
FormattedValue"``: a choice or lookup column carries its raw value (``statuscode: 5``,
``_ownerid_value: <guid>``) and, beside it, what people read (``statuscode@OData.Community.Display.
V1.FormattedValue: "Problem Solved"``). Decisions are taken on raw values (``statecode``), the work
item shows the formatted ones. Which columns a table has is known from ``EntityDefinitions``
(``TableInfo``), so a site's own Provance tables map as far as their columns go.

Dataverse keeps date-times to the second, so the change feed is keyed on (``modifiedon``,
``versionnumber``): ``versionnumber`` is the row version the database bumps on every write, unique
across the environment, so rows changed within one second still have a strict order, and a row
changed again while the sync pages moves behind the cursor instead of being skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItem, WorkItemState, WorkItemType

INCIDENT_TABLE = "incident"
ANNOTATION_SET = "annotations"
FORMATTED = "@OData.Community.Display.V1.FormattedValue"
MODIFIED = "modifiedon"
VERSION = "versionnumber"
VERSION_DIGITS = 20
"""``versionnumber`` is a 64-bit row version; zero-padded in the cursor so text order is number order."""

TITLE_MAX = 200  # incident.title
DESCRIPTION_MAX = 2000  # incident.description
NOTE_SUBJECT_MAX = 500  # annotation.subject
NOTE_TEXT_MAX = 100_000  # annotation.notetext
RESOLUTION_SUBJECT_MAX = 200  # incidentresolution.subject
NOTE_SUBJECT = "Azure Monitor"

# statecode of the Customer Service incident table
STATE_ACTIVE = 0
INCIDENT_STATE_RESOLVED = 1
INCIDENT_STATE_CANCELLED = 2
STATUS_IN_PROGRESS = 1  # incident statuscode of a reactivated case

INCIDENT_LIFECYCLE: dict[int, Lifecycle] = {
    STATE_ACTIVE: Lifecycle.IN_PROGRESS,
    INCIDENT_STATE_RESOLVED: Lifecycle.RESOLVED,
    INCIDENT_STATE_CANCELLED: Lifecycle.CANCELLED,
}
CUSTOM_TABLE_LIFECYCLE: dict[int, Lifecycle] = {
    STATE_ACTIVE: Lifecycle.IN_PROGRESS,
    1: Lifecycle.CLOSED,  # a custom table has Active (0) and Inactive (1)
}
WORK_ITEM_STATE: dict[Lifecycle, WorkItemState] = {
    Lifecycle.NEW: WorkItemState.OPEN,
    Lifecycle.IN_PROGRESS: WorkItemState.OPEN,
    Lifecycle.RESOLVED: WorkItemState.RESOLVED,
    Lifecycle.CLOSED: WorkItemState.CLOSED,
    Lifecycle.CANCELLED: WorkItemState.CLOSED,
}

PRIORITY_CODE: dict[int, int] = {1: 1, 2: 1, 3: 2, 4: 3, 5: 3}
"""ServiceNow-style priority (impact + urgency - 1) -> incident.prioritycode: 1 High, 2 Normal, 3 Low."""

CUSTOMER_BIND = {"accounts": "customerid_account", "contacts": "customerid_contact"}

# (attribute, Web API property): lookups are read as ``_<name>_value``
_LOOKUPS = ("ownerid", "createdby", "modifiedby")
_WANTED_COLUMNS = (
    "title",
    "description",
    "statecode",
    "statuscode",
    "prioritycode",
    "caseorigincode",
    "casetypecode",
    "createdon",
    MODIFIED,
    VERSION,
    *_LOOKUPS,
)
_ID_NAMESPACE = uuid.UUID("5b8f6f9e-7d1c-4c6b-9a51-2f4a8e0d3c71")


@dataclass(frozen=True)
class TableInfo:
    """One table as ``EntityDefinitions`` describes it, plus the connection's column choices."""

    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str
    columns: frozenset[str] = field(default_factory=frozenset)
    change_tracking: bool = False
    number_column: str = ""
    correlation_column: str = ""

    @property
    def number(self) -> str:
        """The column with the number people read (default: the primary name column)."""
        return self.number_column or self.primary_name

    @property
    def title_column(self) -> str:
        return "title" if "title" in self.columns else self.primary_name

    @property
    def is_incident(self) -> bool:
        return self.logical_name == INCIDENT_TABLE

    def has(self, column: str) -> bool:
        return column in self.columns

    def sync_select(self) -> list[str]:
        """The ``$select`` of the change feed: only columns the table has, lookups as ``_x_value``."""
        names = [self.primary_id, self.number]
        for column in (self.title_column, *_WANTED_COLUMNS, self.correlation_column):
            if column and self.has(column) and column not in names:
                names.append(column)
        return [f"_{name}_value" if name in _LOOKUPS else name for name in names]

    def missing_columns(self) -> list[str]:
        """Configured or required columns the table does not have (``connections test`` names them)."""
        required = [self.number, "statecode", "statuscode", MODIFIED, VERSION, self.correlation_column]
        return [column for column in required if column and not self.has(column)]


def record_id(table: str, correlation_id: str, attempt: int) -> str:
    """The id a new work item of ``correlation_id`` is created with (Dataverse accepts the caller's).

    The same correlation always gives the same id, so a create whose answer was lost is found (or
    refused as a duplicate) instead of made twice; ``attempt`` moves on only when an old, finished
    record already holds the id (the app's state tables were recreated and generations restarted).
    """
    return str(uuid.uuid5(_ID_NAMESPACE, f"{table}\n{correlation_id}\n{attempt}"))


def note_id(record: str, text: str) -> str:
    """The id of a note: the same text on the same record is the same note, written at most once."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"note\n{record}\n{text}"))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def draft_to_incident_fields(
    draft: IncidentDraft,
    table: TableInfo,
    new_id: str,
    *,
    customer: str = "",
) -> dict[str, object]:
    """The POST body of a new incident. References are bound (``@odata.bind``) only when configured.

    ``customer``, ``draft.assignment_group`` and ``draft.caller`` come validated from the connection
    as ``accounts(<guid>)`` / ``teams(<guid>)`` / ``contacts(<guid>)``.
    """
    fields: dict[str, object] = {
        table.primary_id: new_id,
        table.title_column: _clip(draft.short_description, TITLE_MAX),
    }
    if table.has("description"):
        fields["description"] = _clip(draft.description, DESCRIPTION_MAX)
    if table.has("prioritycode"):
        fields["prioritycode"] = PRIORITY_CODE[draft.impact + draft.urgency - 1]
    if table.correlation_column:
        fields[table.correlation_column] = draft.correlation_id
    if customer:
        entity_set = customer.split("(", 1)[0]
        fields[f"{CUSTOMER_BIND[entity_set]}@odata.bind"] = f"/{customer}"
    if draft.assignment_group:
        fields["ownerid@odata.bind"] = f"/{draft.assignment_group}"
    if draft.caller:
        fields["primarycontactid@odata.bind"] = f"/{draft.caller}"
    return fields


def note_fields(table: TableInfo, record: str, text: str) -> dict[str, object]:
    """The POST body of an annotation (a note) on ``record``, with its own deterministic id."""
    return {
        "annotationid": note_id(record, text),
        "subject": NOTE_SUBJECT,
        "notetext": _clip(text, NOTE_TEXT_MAX),
        f"objectid_{table.logical_name}@odata.bind": f"/{table.entity_set}({record})",
    }


def resolution_parameters(table: TableInfo, record: str, note: str, status: int) -> dict[str, object]:
    """The body of the ``CloseIncident`` action: an incidentresolution (the note) and the status."""
    first_line = next((line.strip() for line in note.splitlines() if line.strip()), "Resolved")
    return {
        "IncidentResolution": {
            "@odata.type": "Microsoft.Dynamics.CRM.incidentresolution",
            "subject": _clip(first_line, RESOLUTION_SUBJECT_MAX),
            "description": _clip(note, DESCRIPTION_MAX),
            "incidentid@odata.bind": f"/{table.entity_set}({record})",
        },
        "Status": status,
    }


def lifecycle_of(table: TableInfo, statecode: int) -> Lifecycle:
    """The lifecycle of a ``statecode``; a value the table does not define is refused."""
    states = INCIDENT_LIFECYCLE if table.is_incident else CUSTOM_TABLE_LIFECYCLE
    found = states.get(statecode)
    if found is None:
        known = ", ".join(str(code) for code in states)
        raise ValueError(f"statecode: {statecode} is not a state of table {table.logical_name} ({known})")
    return found


def work_item_state(table: TableInfo, row: Mapping[str, Any]) -> WorkItemState:
    return WORK_ITEM_STATE[lifecycle_of(table, _int(row, "statecode", required=True))]


def parse_datetime(value: object, name: str) -> datetime | None:
    """A Web API ``Edm.DateTimeOffset`` (``2024-05-06T07:00:00Z``) as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}: not a date-time: {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name}: not a date-time: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _int(row: Mapping[str, Any], name: str, *, required: bool = False) -> int:
    value = row.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name}: missing")
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: not a whole number: {str(value)[:40]!r}")
    return value


def text(row: Mapping[str, Any], name: str) -> str:
    """A column as text: the formatted value where the row has one, else the raw value."""
    formatted = name + FORMATTED
    value = row[formatted] if formatted in row else row.get(name)
    if type(value) is str:  # the usual case first: called a dozen times per row of a sync
        return value
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise ValueError(f"{name}: unexpected {type(value).__name__} value")


def raw_text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{name}: unexpected {type(value).__name__} value")


def _required_text(row: Mapping[str, Any], name: str) -> str:
    value = raw_text(row, name).strip()
    if not value:
        raise ValueError(f"{name}: missing")
    return value


def row_version(row: Mapping[str, Any]) -> str:
    """``versionnumber`` as the cursor's ``last_id`` (zero-padded, so text order is number order)."""
    version = _int(row, VERSION, required=True)
    if version < 0:
        raise ValueError(f"{VERSION}: negative")
    return f"{version:0{VERSION_DIGITS}d}"


def parse_version(last_id: str) -> int | None:
    """The ``versionnumber`` of a cursor's ``last_id``; None for an empty or foreign one."""
    text_value = last_id.strip()
    if not text_value or not text_value.isdigit() or len(text_value) > VERSION_DIGITS:
        return None
    return int(text_value)


def row_to_work_item(
    connection: str, item_type: WorkItemType, table: TableInfo, row: Mapping[str, Any]
) -> WorkItem:
    """One Web API row as a WorkItem; raises ``ValueError`` naming the column it could not read."""
    source_id = _required_text(row, table.primary_id)
    number = _required_text(row, table.number)
    updated_at = parse_datetime(_required_text(row, MODIFIED), MODIFIED)
    assert updated_at is not None
    row_version(row)  # a row without its row version cannot be placed in the feed
    lifecycle = lifecycle_of(table, _int(row, "statecode", required=True))
    finished = lifecycle.finished
    # a finished record is read-only until reactivated, so its last change is its resolution
    modified_by = text(row, "_modifiedby_value") if finished else ""
    values: dict[str, Any] = {
        "connection": connection,
        "item_type": item_type,
        "source_id": source_id,
        "number": number,
        "updated_at": updated_at,
        "state": text(row, "statuscode"),
        "state_code": raw_text(row, "statuscode"),
        "lifecycle": lifecycle,
        "priority": text(row, "prioritycode"),
        "created_by": text(row, "_createdby_value"),
        "source": text(row, "caseorigincode"),
        "assigned_to": text(row, "_ownerid_value"),
        "category": text(row, "casetypecode"),
        "title": raw_text(row, table.title_column),
        "description": raw_text(row, "description"),
        "created_at": parse_datetime(row.get("createdon"), "createdon"),
        "correlation_id": raw_text(row, table.correlation_column) if table.correlation_column else "",
    }
    if lifecycle is Lifecycle.RESOLVED:
        values |= {"resolved_by": modified_by, "resolved_at": updated_at}
    elif finished:
        values |= {"closed_by": modified_by, "closed_at": updated_at}
    return WorkItem(**values)
