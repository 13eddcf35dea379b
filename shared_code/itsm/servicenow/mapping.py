"""Pure translations between this app's value objects and ServiceNow table rows.

Kept apart from the connector so the field choices (which are the contract with existing
``ServiceDesk_CL`` workbooks) can be tested without HTTP. Rows come from the Table API with
``sysparm_display_value=all``: every field is ``{"value": ..., "display_value": ...}``; people and
choice fields are shown by display value, dates are parsed from ``value`` (UTC, whole seconds).
The state keeps its raw value too (``WorkItem.state_code``): its label depends on the integration
user's language and on the instance's choice labels, so decisions are taken on the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AliasPath, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, Lifecycle, WorkItem, WorkItemState, WorkItemType
from shared_code.itsm.servicenow.query import DATETIME_FORMAT

INCIDENT_TABLE = "incident"
CHANGE_REQUEST_TABLE = "change_request"
CI_TABLE = "cmdb_ci"
CI_CREATE_TABLE = "cmdb_ci_server"
JOURNAL_TABLE = "sys_journal_field"

TABLES: dict[WorkItemType, str] = {
    WorkItemType.INCIDENT: INCIDENT_TABLE,
    WorkItemType.CHANGE_REQUEST: CHANGE_REQUEST_TABLE,
}

CONTACT_TYPE = "monitoring"

# incident.state choices of a stock instance
INCIDENT_NEW = "1"
INCIDENT_IN_PROGRESS = "2"
INCIDENT_ON_HOLD = "3"
INCIDENT_RESOLVED = "6"
INCIDENT_CLOSED = "7"
INCIDENT_CANCELED = "8"

# change_request.state choices of a stock instance
CHANGE_NEW = "-5"
CHANGE_CLOSED = "3"
CHANGE_CANCELED = "4"

LIFECYCLE_OF_CODE: dict[WorkItemType, dict[str, Lifecycle]] = {
    # raw state values (the stock choices); any other value, custom ones included, is in progress
    WorkItemType.INCIDENT: {
        INCIDENT_NEW: Lifecycle.NEW,
        INCIDENT_IN_PROGRESS: Lifecycle.IN_PROGRESS,
        INCIDENT_ON_HOLD: Lifecycle.IN_PROGRESS,
        INCIDENT_RESOLVED: Lifecycle.RESOLVED,
        INCIDENT_CLOSED: Lifecycle.CLOSED,
        INCIDENT_CANCELED: Lifecycle.CANCELLED,
    },
    WorkItemType.CHANGE_REQUEST: {
        CHANGE_NEW: Lifecycle.NEW,
        CHANGE_CLOSED: Lifecycle.CLOSED,
        CHANGE_CANCELED: Lifecycle.CANCELLED,
    },
}
# only for rows that carry no raw state value: the English stock labels
LIFECYCLE_OF_LABEL: dict[str, Lifecycle] = {
    "new": Lifecycle.NEW,
    "resolved": Lifecycle.RESOLVED,
    "closed": Lifecycle.CLOSED,
    "canceled": Lifecycle.CANCELLED,
    "cancelled": Lifecycle.CANCELLED,
}


def lifecycle_of(
    item_type: WorkItemType,
    code: str,
    label: str = "",
    *,
    resolved_at: datetime | None = None,
    closed_at: datetime | None = None,
) -> Lifecycle:
    """The normalised lifecycle of a row, decided on the raw state value.

    The label ("Resolved") is in the integration user's language and follows relabelled choices,
    so it is read only when the row carries no raw value; then the resolution dates decide.
    """
    code = code.strip()
    if code:
        return LIFECYCLE_OF_CODE[item_type].get(code, Lifecycle.IN_PROGRESS)
    by_label = LIFECYCLE_OF_LABEL.get(label.strip().lower())
    if by_label is not None:
        return by_label
    if not label.strip():
        if closed_at is not None:
            return Lifecycle.CLOSED
        if resolved_at is not None:
            return Lifecycle.RESOLVED
    return Lifecycle.IN_PROGRESS


def draft_to_incident_fields(draft: IncidentDraft, ci_sys_id: str | None) -> dict[str, str]:
    """The POST body of a new incident. Optional references are left out rather than sent empty.

    ``assignment_group`` and ``caller_id`` may be names: the Table API looks a reference up by its
    display value when the value is not a sys_id.
    """
    fields: dict[str, str] = {
        "short_description": draft.short_description,
        "description": draft.description,
        "impact": str(draft.impact),
        "urgency": str(draft.urgency),
        "correlation_id": draft.correlation_id,
        "contact_type": CONTACT_TYPE,
    }
    optional = {
        "correlation_display": draft.correlation_display,
        "cmdb_ci": ci_sys_id,
        "assignment_group": draft.assignment_group,
        "caller_id": draft.caller,
        "category": draft.category,
    }
    fields |= {name: value for name, value in optional.items() if value}
    return fields


def incident_state_to_lifecycle(state: str) -> WorkItemState:
    """The coarse lifecycle of an incident state value (unknown custom states count as open)."""
    state = state.strip()
    if state == INCIDENT_RESOLVED:
        return WorkItemState.RESOLVED
    if state in (INCIDENT_CLOSED, INCIDENT_CANCELED):
        return WorkItemState.CLOSED
    return WorkItemState.OPEN


def field_value(row: Mapping[str, Any], name: str) -> str:
    """The stored value of a field, whether the row has display_value=all pairs or plain strings."""
    return _part(row, name, "value")


def field_display(row: Mapping[str, Any], name: str) -> str:
    """What people see for a field (a name for a reference, a label for a choice)."""
    return _part(row, name, "display_value")


def _part(row: Mapping[str, Any], name: str, key: str) -> str:
    raw = row.get(name)
    # ``type(...) is`` first: this runs ~40 times per synced row, and an ABC isinstance is slow
    if type(raw) is dict or (type(raw) is not str and isinstance(raw, Mapping)):
        raw = raw.get(key)
        if raw is None and key == "display_value":
            return _part(row, name, "value")
    if type(raw) is str:
        return raw
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float):
        return str(raw)
    raise ValueError(f"{name}: unexpected {type(raw).__name__} value")


def parse_datetime(text: str, name: str) -> datetime | None:
    """A ServiceNow ``YYYY-MM-DD HH:MM:SS`` (UTC) value as an aware datetime; empty means None."""
    text = text.strip()
    if not text:
        return None
    try:
        if len(text) == 19 and text[10] == " " and text[4] == text[7] == "-" and text[13] == text[16] == ":":
            # the exact ``YYYY-MM-DD HH:MM:SS`` shape: fromisoformat reads it ~10x faster than strptime
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        return datetime.strptime(text, DATETIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"{name}: not a ServiceNow date-time: {text[:40]!r}") from None


def _value(row: Mapping[str, Any], name: str) -> str:
    """``field_value`` for the sync's hot loop: the ``{"value": str}`` pair read inline, anything
    else (plain strings, numbers, a missing part) through ``field_value``."""
    raw = row.get(name)
    if type(raw) is dict:
        text = raw.get("value")
        if type(text) is str:
            return text
    return field_value(row, name)


def _display(row: Mapping[str, Any], name: str) -> str:
    """``field_display`` for the sync's hot loop (see ``_value``)."""
    raw = row.get(name)
    if type(raw) is dict:
        text = raw.get("display_value")
        if type(text) is str:
            return text
    return field_display(row, name)


# -- the sync's rows --------------------------------------------------------------------------------

VALUE, DISPLAY = "value", "display_value"
_COMMON_SPEC: list[tuple[str, str, str]] = [
    # (WorkItem field, Table API field, which part of its {"value", "display_value"} pair)
    ("source_id", "sys_id", VALUE),
    ("number", "number", VALUE),
    ("updated_at", "sys_updated_on", VALUE),
    ("state", "state", DISPLAY),
    ("state_code", "state", VALUE),
    ("urgency", "urgency", DISPLAY),
    ("impact", "impact", DISPLAY),
    ("priority", "priority", DISPLAY),
    ("created_by", "sys_created_by", VALUE),
    ("closed_by", "closed_by", DISPLAY),
    ("source", "contact_type", DISPLAY),
    ("assigned_to", "assigned_to", DISPLAY),
    ("category", "category", DISPLAY),
    ("title", "short_description", DISPLAY),
    ("description", "description", DISPLAY),
    ("computer", "cmdb_ci", DISPLAY),
    ("created_at", "sys_created_on", VALUE),
    ("closed_at", "closed_at", VALUE),
    ("correlation_id", "correlation_id", VALUE),
]
ROW_SPEC: dict[WorkItemType, list[tuple[str, str, str]]] = {
    WorkItemType.INCIDENT: [
        *_COMMON_SPEC,
        ("resolved_by", "resolved_by", DISPLAY),
        ("resolved_at", "resolved_at", VALUE),
    ],
    WorkItemType.CHANGE_REQUEST: [
        *_COMMON_SPEC,
        ("change_type", "type", DISPLAY),
        ("risk", "risk", DISPLAY),
        ("requested_at", "requested_by_date", VALUE),
        ("planned_start", "start_date", VALUE),
        ("planned_end", "end_date", VALUE),
        ("work_start", "work_start", VALUE),
        ("work_end", "work_end", VALUE),
    ],
}
"""Where each WorkItem field comes from: one table for both ways of reading a row (below)."""
_DATES = {
    "updated_at",
    "created_at",
    "closed_at",
    "resolved_at",
    "requested_at",
    "planned_start",
    "planned_end",
    "work_start",
    "work_end",
}
_KEY_SPEC = _COMMON_SPEC[:3]  # sys_id, number, sys_updated_on: where a row sits and what it is
_OPTIONAL_DATES: dict[WorkItemType, list[tuple[str, str]]] = {
    item_type: [(name, source) for name, source, _ in spec if name in _DATES and name != "updated_at"]
    for item_type, spec in ROW_SPEC.items()
}

SYNC_FIELDS: dict[WorkItemType, list[str]] = {
    item_type: list(dict.fromkeys(source for _, source, _ in spec)) for item_type, spec in ROW_SPEC.items()
}
"""The Table API fields the sync asks for: only those the mapping reads (smaller pages, faster sync)."""

Fields = dict[str, Any]
"""A row's text under WorkItem field names, as the product sent it (dates not parsed yet)."""


def row_fields(item_type: WorkItemType, row: Mapping[str, Any]) -> Fields:
    """A parsed JSON row's fields, each read as ``field_value`` / ``field_display`` read it (plain
    strings, numbers and a missing display value included); raises ``ValueError`` naming the field,
    a key field's problem (sys_id, number, sys_updated_on) before any other."""
    try:
        return {
            name: (_value(row, source) if part == VALUE else _display(row, source))
            for name, source, part in ROW_SPEC[item_type]
        }
    except ValueError:
        _read_keys({name: _value(row, source) for name, source, _ in _KEY_SPEC})
        raise


def _feed_reader(item_type: WorkItemType) -> TypeAdapter[Any]:
    """pydantic-core reading a ``{"result": [...]}`` answer straight into ``Fields``: JSON parsing and
    field picking in one pass, without a Python dict per field. Strict: every field a pair of
    strings, or the answer is not the regular shape and is read the general way."""
    row = TypedDict(  # type: ignore[misc]
        f"_{item_type.name.title()}Row",
        {
            name: Annotated[str, Field(validation_alias=AliasPath(source, part))]
            for name, source, part in ROW_SPEC[item_type]
        },
    )
    row.__pydantic_config__ = ConfigDict(strict=True)  # type: ignore[attr-defined]

    class Answer(TypedDict):
        # fail_fast: an irregular instance makes every row irregular; stop at the first one
        result: Annotated[list[row], Field(fail_fast=True)]

    return TypeAdapter(Answer)


_FEED_READERS = {item_type: _feed_reader(item_type) for item_type in ROW_SPEC}


def feed_fields(item_type: WorkItemType, content: bytes) -> list[Fields] | None:
    """The rows of a Table API answer as ``Fields``, when every row has the regular shape
    (``sysparm_display_value=all`` pairs of strings for every field asked); None otherwise."""
    try:
        answer = _FEED_READERS[item_type].validate_json(content)
    except ValidationError:
        return None
    rows: list[Fields] = answer["result"]
    return rows


def _read_keys(fields: Fields) -> None:
    """The key fields in place: ids stripped and present, the update time parsed; ``ValueError``
    naming the first one that is not."""
    for name, source in (("source_id", "sys_id"), ("number", "number")):
        value = fields[name].strip()
        if not value:
            raise ValueError(f"{source}: missing")
        fields[name] = value
    updated = fields["updated_at"].strip()
    if not updated:
        raise ValueError("sys_updated_on: missing")
    fields["updated_at"] = parse_datetime(updated, "sys_updated_on")


def fields_to_work_item(connection: str, item_type: WorkItemType, fields: Fields) -> WorkItem:
    """A row's ``Fields`` as a WorkItem (``fields`` is consumed); raises ``ValueError`` naming the
    Table API field it could not read."""
    _read_keys(fields)
    for name, source in _OPTIONAL_DATES[item_type]:
        fields[name] = parse_datetime(fields[name], source)
    fields["connection"] = connection
    fields["item_type"] = item_type
    fields["lifecycle"] = lifecycle_of(
        item_type,
        fields["state_code"],
        fields["state"],
        resolved_at=fields.get("resolved_at"),
        closed_at=fields["closed_at"],
    )
    return WorkItem.model_validate(fields)


def row_to_work_item(connection: str, item_type: WorkItemType, row: Mapping[str, Any]) -> WorkItem:
    """One parsed Table API row as a WorkItem; raises ``ValueError`` naming the field it could not read."""
    return fields_to_work_item(connection, item_type, row_fields(item_type, row))


def fields_id(fields: Fields) -> str:
    """The best id of a rejected row for the error log: sys_id, else number, else nothing."""
    return str(fields.get("source_id") or "").strip() or str(fields.get("number") or "").strip()


def fields_position(fields: Fields) -> SyncCursor | None:
    """Where a row sits in the feed, or None if it cannot say (the cursor then stays where it was)."""
    sys_id = str(fields.get("source_id") or "").strip()
    try:
        updated = parse_datetime(str(fields.get("updated_at") or ""), "sys_updated_on")
    except ValueError:
        return None
    if not sys_id or updated is None:
        return None
    return SyncCursor(updated_at=updated, last_id=sys_id)


def _readable_keys(row: Mapping[str, Any]) -> Fields:
    """The key fields of a row that may not be readable as a whole (a field that is not readable
    is left out)."""
    keys: Fields = {}
    for name, source, _ in _KEY_SPEC:
        try:
            keys[name] = field_value(row, source)
        except ValueError:
            continue
    return keys


def row_id(row: Mapping[str, Any]) -> str:
    """``fields_id`` of a parsed JSON row that could not be read as a whole."""
    return fields_id(_readable_keys(row))


def row_position(row: Mapping[str, Any]) -> SyncCursor | None:
    """``fields_position`` of a parsed JSON row that could not be read as a whole."""
    return fields_position(_readable_keys(row))
