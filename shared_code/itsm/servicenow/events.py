"""ServiceNow Event Management behind the ``IncidentWriter`` port: alerts become events.

A connection whose work item type is ``event`` or ``alert`` hands this writer to the alert path
instead of the incident connector, so the alert path needs no special case:

    create_incident   an event (``POST /api/global/em/jsonv2``) whose ``message_key`` is the draft's
                      correlation id; the reference is the ``em_alert`` with that key when Event
                      Management has made it already, else one built from the key
    add_note          the same event again with the note as its description (Event Management
                      de-duplicates it into the open alert); nothing when no earlier event of the
                      key can be found to repeat
    resolve           a clearing event (severity 0) with the key: Event Management closes the alert,
                      and the incident its rules opened, by its own properties
    reopen            a new event with the key: within ``evt_mgmt.active_interval`` the closed alert
                      reopens, later a new alert opens
    get_state         the newest ``em_alert`` with the key: Closed is resolved, anything else (or no
                      alert yet: events are processed asynchronously) is open
    find_by_correlation  the newest ``em_alert`` with the key that is not Closed

A work item's id is always its message key, so every call works whether or not the alert was
visible yet. Posting an event is idempotent by message key (Event Management folds a repeat into
the same alert), so the POST is retried like a read and a create lost in transit is simply sent again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared_code.domain.alert import Severity
from shared_code.domain.workitem import IncidentDraft, WorkItemRef, WorkItemState
from shared_code.errors import ItsmError, ItsmUnavailableError
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.itsm.servicenow.mapping import field_value
from shared_code.itsm.servicenow.query import Query

log = logging.getLogger(__name__)

EVENTS_API = "/api/global/em/jsonv2"
EVENT_TABLE = "em_event"
ALERT_TABLE = "em_alert"
EVENT_SOURCE = "Azure Monitor"
EVENT_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # GMT, as Event Management expects ``time_of_event``
FIELD_LIMIT = 100  # source, node, type, resource: 100 characters in em_event
DESCRIPTION_LIMIT = 4_000
ALERT_CLOSED = "Closed"

CLEAR = 0
EVENT_SEVERITY: dict[Severity, int] = {
    Severity.SEV0: 1,  # Critical
    Severity.SEV1: 2,  # Major
    Severity.SEV2: 3,  # Minor
    Severity.SEV3: 4,  # Warning
    Severity.SEV4: 5,  # OK / Info
}
"""Azure Monitor severity -> Event Management severity (1 Critical .. 5 OK/Info; 0 is Clear)."""

EVENT_FIELDS = ("source", "event_class", "node", "type", "resource", "metric_name", "severity")


def event_severity(draft: IncidentDraft) -> int:
    """The event severity of a draft: from the Azure severity, else (a draft without alert facts)
    from impact and urgency the way ServiceNow derives priority (1 + 1 -> 1 ... 3 + 3 -> 5)."""
    if draft.alert is not None:
        return EVENT_SEVERITY[draft.alert.severity]
    return min(max(draft.impact + draft.urgency - 1, 1), 5)


def _clip(text: str, limit: int = FIELD_LIMIT) -> str:
    text = " ".join(text.split()) if limit <= FIELD_LIMIT else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def event_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(EVENT_TIME_FORMAT)


def draft_to_event(draft: IncidentDraft, event_class: str, now: datetime) -> dict[str, str]:
    """The first event of a problem: every field Event Management reads, strings only.

    ``node`` is the CI name (Event Management binds the event to the CI of that name), ``type`` the
    alert rule, ``resource`` the target's name, ``additional_info`` the alert's context as a JSON
    string (the original Azure severity among it, as the API asks for).
    """
    facts = draft.alert
    node = draft.configuration_item or (facts.resource if facts else "")
    info: dict[str, str] = {
        "azure_condition": "Fired",
        "short_description": draft.short_description,
        "impact": str(draft.impact),
        "urgency": str(draft.urgency),
        "correlation_display": draft.correlation_display,
        "assignment_group": draft.assignment_group or "",
        "caller": draft.caller or "",
        "category": draft.category or "",
    }
    if facts is not None:
        info |= {
            "azure_severity": facts.severity.value,
            "azure_alert_id": facts.alert_id,
            "azure_alert_rule": facts.rule,
            "azure_monitoring_service": facts.monitoring_service,
            "azure_signal_type": facts.signal_type,
            "azure_resource_id": facts.resource_id,
            "azure_portal_link": facts.portal_link,
        }
    return {
        "source": EVENT_SOURCE,
        "event_class": _clip(event_class),
        "node": _clip(node),
        "type": _clip(facts.rule if facts else draft.short_description),
        "resource": _clip(facts.resource if facts else node),
        "metric_name": _clip(facts.metric_name if facts else ""),
        "message_key": draft.correlation_id,
        "severity": str(event_severity(draft)),
        "description": _clip(draft.description, DESCRIPTION_LIMIT),
        "time_of_event": event_time(facts.fired_at if facts and facts.fired_at else now),
        "additional_info": json.dumps({k: v for k, v in info.items() if v}, ensure_ascii=False),
    }


def follow_up_event(
    message_key: str,
    text: str,
    severity: int,
    now: datetime,
    *,
    like: Mapping[str, str] | None = None,
    condition: str,
) -> dict[str, str]:
    """A later event of the same problem (a note, a reopen, the clearing event): same message key,
    the identity fields of the earlier event where known, ``text`` as the description."""
    event = {name: (like or {}).get(name, "") for name in EVENT_FIELDS}
    event |= {
        "source": event["source"] or EVENT_SOURCE,
        "message_key": message_key,
        "severity": str(severity),
        "description": _clip(text, DESCRIPTION_LIMIT),
        "time_of_event": event_time(now),
        "additional_info": json.dumps({"azure_condition": condition}),
    }
    return {name: value for name, value in event.items() if value}


def alert_state(state: str) -> WorkItemState:
    """em_alert states are Open, Reopen, Flapping and Closed: Closed is where a clearing event
    (our resolve) leaves it, so it counts as resolved; the rest are open."""
    return WorkItemState.RESOLVED if state.strip() == ALERT_CLOSED else WorkItemState.OPEN


@dataclass(frozen=True)
class _Known:
    """What an earlier event of a problem said (for the events that follow it)."""

    fields: Mapping[str, str]
    severity: int


class EventWriter:
    """One ServiceNow connection sending alerts to Event Management. Stateless besides settings."""

    def __init__(
        self,
        table: ServiceNowConnector,
        *,
        event_class: str,
        clock: Callable[[], datetime] | None = None,
        fallback_severity: int = 4,
    ) -> None:
        self._table = table
        self._event_class = event_class
        self._clock = clock or (lambda: datetime.now(UTC))
        self._fallback_severity = fallback_severity

    def __repr__(self) -> str:
        return f"EventWriter({self._table!r})"

    @property
    def _instance(self) -> str:
        return self._table._instance

    def check(self) -> str:
        """One authenticated read of em_alert: proves URL, credentials and read access to alerts."""
        self._table._list(ALERT_TABLE, None, ["sys_id"], 1, display_values=False)
        host = self._instance.split("//", 1)[-1]
        return f"ServiceNow instance {host} answered: Event Management alerts (em_alert) are readable"

    # -- the port ---------------------------------------------------------------------------------

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        self._post(draft_to_event(draft, self._event_class, self._clock()))
        return self._ref(draft.correlation_id)

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        if not correlation_id.strip():
            return None
        query = self._table._query(
            lambda q: (
                q.eq("message_key", correlation_id).ne("state", ALERT_CLOSED).order_by_desc("sys_created_on")
            )
        )
        rows = self._table._list(ALERT_TABLE, query, ["sys_id", "number"], 1, display_values=False)
        return self._alert_ref(correlation_id, rows[0]) if rows else None

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        known = self._known(ref.id)
        if known is None:
            log.info(
                "connection %r: no earlier event of %s is readable, so the note is not sent as an event",
                self._table.connection_name,
                ref.number,
            )
            return
        event = follow_up_event(
            ref.id, text, known.severity, self._clock(), like=known.fields, condition="Fired"
        )
        self._post(event)

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        known = self._known(ref.id)
        fields = known.fields if known else None
        self._post(follow_up_event(ref.id, note, CLEAR, self._clock(), like=fields, condition="Resolved"))

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        known = self._known(ref.id)
        severity = known.severity if known else self._fallback_severity
        fields = known.fields if known else None
        self._post(follow_up_event(ref.id, note, severity, self._clock(), like=fields, condition="Fired"))

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        rows = self._newest(ALERT_TABLE, ref.id, ["state"])
        return alert_state(field_value(rows[0], "state")) if rows else WorkItemState.OPEN

    def close(self) -> None:
        self._table.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _post(self, event: dict[str, str]) -> None:
        body = self._table._send(
            "POST", "em/jsonv2", path=EVENTS_API, json={"records": [event]}, idempotent=True
        )
        if not isinstance(body.get("result"), Mapping | str):
            raise ItsmUnavailableError("POST em/jsonv2: ServiceNow answered without a result")

    def _newest(
        self, table: str, message_key: str, fields: list[str], *, firing_only: bool = False
    ) -> list[Mapping[str, Any]]:
        """The newest row of ``table`` with ``message_key`` (only those not cleared, if asked)."""

        def build(query: Query) -> Query:
            query = query.eq("message_key", message_key)
            if firing_only:
                query = query.ne("severity", CLEAR)
            return query.order_by_desc("sys_created_on")

        return self._table._list(table, self._table._query(build), fields, 1, display_values=False)

    def _known(self, message_key: str) -> _Known | None:
        """The newest firing (non-clearing) event of the key, else its alert while that has a
        firing severity; None when neither is readable (processing pending, or no read access)."""
        fields = [*EVENT_FIELDS]
        for table in (EVENT_TABLE, ALERT_TABLE):
            try:
                rows = self._newest(table, message_key, fields, firing_only=True)
            except ItsmError as exc:
                log.info("connection %r: cannot read %s (%s)", self._table.connection_name, table, exc)
                continue
            if rows:
                row = {name: field_value(rows[0], name) for name in fields}
                severity = row.get("severity", "")
                if severity.isdigit() and 1 <= int(severity) <= 5:
                    return _Known(fields=row, severity=int(severity))
        return None

    def _ref(self, message_key: str) -> WorkItemRef:
        """The alert Event Management made of the event, if it has (it processes events in the
        background); else a reference by message key, which every later call works with."""
        try:
            rows = self._newest(ALERT_TABLE, message_key, ["sys_id", "number"])
        except ItsmError as exc:
            log.warning(
                "connection %r: the event was sent, but em_alert cannot be read (%s); "
                "the work item is known by its message key",
                self._table.connection_name,
                exc,
            )
            rows = []
        if rows:
            return self._alert_ref(message_key, rows[0])
        return WorkItemRef(id=message_key, number=message_key)

    def _alert_ref(self, message_key: str, row: Mapping[str, Any]) -> WorkItemRef:
        sys_id, number = field_value(row, "sys_id"), field_value(row, "number")
        url = f"{self._instance}/nav_to.do?uri=em_alert.do?sys_id={sys_id}" if sys_id else None
        return WorkItemRef(id=message_key, number=number or message_key, url=url)
