"""Cherwell behind the ITSM ports (incidents, change feed, CIs) over the REST API (``{api}/api/V1``).

Names are configured, ids are looked up: a business object's ``busObId`` comes from
``getbusinessobjectsummary/busobname``, its field ids and relationships from
``getbusinessobjectschema`` (with relationships), the fields of a new record from
``getbusinessobjecttemplate``, the allowed Status values from ``fieldvalueslookup``. All of it is
cached per connector; an answer that says a field id is unknown (a site re-created the field)
drops the object's cache and the call is made once more with fresh ids.

Every call goes through ``send_with_retries`` (bounded retries of transport errors, 408, 429 with
``Retry-After``, 5xx) and its answer is mapped to the ``ItsmError`` family:

    2xx JSON                              the result, unless it says ``hasError``:
        hasError, field id unknown        the schema is read again and the call repeated once
        hasError, httpStatusCode 5xx      ItsmUnavailableError
        hasError otherwise                ItsmRejectedError (errorCode, errorMessage and the
                                          fieldValidationErrors by field name; status from
                                          httpStatusCode, so a deleted record is a 404)
    2xx that is not JSON                  ItsmUnavailableError (a proxy's or sign-in page)
    401 (after the auth's one retry)      ItsmAuthError
    3xx                                   ItsmRejectedError (a wrong URL or an SSO redirect)
    other 4xx                             ItsmRejectedError with Cherwell's message
    5xx/408/429/timeouts, exhausted       ItsmUnavailableError (raised by send_with_retries)

Writes that create something (an incident, a journal note, a CI) are sent ``idempotent=False``:
an ambiguous failure (read timeout, reset, 500/502/504) is not retried blindly. A create is looked
up by its correlation id; a note is looked for among the incident's journal notes, and sent once
more only when it is not there. Updates of fields (Status) are idempotent and retried normally.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from shared_code.domain.connection import SyncData
from shared_code.domain.sync import RejectedRow, SyncCursor, SyncPage
from shared_code.domain.workitem import IncidentDraft, WorkItem, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import ItsmError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy, not_json, refuse_unauthorised_or_redirected, send_with_retries
from shared_code.itsm.cherwell.mapping import (
    CI_NAME,
    CLOSE_DESCRIPTION,
    CORRELATION_MARKER,
    CREATED,
    DESCRIPTION,
    LAST_MODIFIED,
    NOTE_DETAILS,
    REC_ID,
    REQUIRED_SYNC_FIELDS,
    SHORT_DESCRIPTION,
    STATUS,
    IncidentDefaults,
    RecordOptions,
    draft_to_incident_fields,
    format_datetime,
    incident_state,
    marker_of,
    normalised_note,
    parse_datetime,
    record_id,
    record_to_work_item,
    record_values,
    sync_field_names,
    zone_of,
)
from shared_code.itsm.cherwell.settings import CherwellConnection
from shared_code.itsm.recovery import landed_create

log = logging.getLogger(__name__)

API = "api/V1"
MAX_ERROR_TEXT = 300
MAX_PAGE_SIZE = 2000
"""The most rows one ``getsearchresults`` page is asked for; a larger engine page is read in parts."""
ASCENDING = 1
"""``SortInfo.sortDirection`` for ascending order."""
CI_CACHE_SIZE = 1024
UNCONFIRMED_NOTES = 256
NOTE_LOOKUP_PAGE = 100
NOTE_LOOKUP_PAGES = 5
CORRELATION_LOOKUP_PAGE = 50
_STALE_FIELD = re.compile(
    r"field\s*(id\s*)?(was\s*)?not\s*found|fieldnotfound|invalid\s*field\s*id", re.IGNORECASE
)
_T = TypeVar("_T")


class _StaleFieldIds(ItsmRejectedError):
    """Cherwell does not know a field id we sent: the cached schema is out of date."""


@dataclass(frozen=True)
class FieldDefinition:
    field_id: str
    name: str
    required: bool = False


@dataclass(frozen=True)
class ObjectSchema:
    """What the connector knows about one business object: its id, fields and relationships."""

    name: str
    bus_ob_id: str
    fields: Mapping[str, FieldDefinition]  # by lower-case name
    relationships: Mapping[str, tuple[str, str]]  # lower-case display name -> (relationshipId, target)

    def has(self, name: str) -> bool:
        return name.lower() in self.fields

    def field(self, name: str) -> FieldDefinition | None:
        return self.fields.get(name.lower())

    def field_id(self, name: str, setting: str = "") -> str:
        """The id of a field the operation cannot do without; a clear error when the site lacks it."""
        found = self.fields.get(name.lower())
        if found is None:
            hint = f" (set {setting})" if setting else ""
            raise ItsmRejectedError(f"the Cherwell business object {self.name} has no field {name!r}{hint}")
        return found.field_id

    def name_of(self, field_id: str) -> str:
        for definition in self.fields.values():
            if definition.field_id == field_id:
                return definition.name
        return field_id


@dataclass(frozen=True)
class _NoteTarget:
    incident: ObjectSchema
    relationship_id: str
    note: ObjectSchema


class CherwellConnector:
    """One Cherwell connection. Thread-safe: besides its settings it keeps only lookup caches."""

    def __init__(
        self,
        connection: CherwellConnection,
        client: httpx.Client,
        auth: httpx.Auth,
        *,
        retry: RetryPolicy | None = None,
        owns_client: bool = False,
    ) -> None:
        timeout = client.timeout
        if timeout.connect is None or timeout.read is None:
            raise ValueError("the HTTP client for Cherwell needs explicit connect and read timeouts")
        self.connection_name = connection.name
        self._settings = connection
        self._api = connection.server_url.rstrip("/")
        self._client = client
        self._auth = auth
        self._retry = retry or RetryPolicy()
        self._owns_client = owns_client
        self._zone = zone_of(connection.time_zone)
        self._record_options = RecordOptions(
            zone=self._zone,
            correlation_field=connection.correlation_field,
            resolved_status=connection.resolved_status,
        )
        self._defaults = IncidentDefaults(
            service=connection.service,
            category=connection.category,
            subcategory=connection.subcategory,
            correlation_field=connection.correlation_field,
        )
        self._lock = threading.Lock()
        self._schemas: dict[str, ObjectSchema] = {}
        self._templates: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
        self._statuses: dict[str, str] | None = None  # lower-case -> as Cherwell spells it
        self._ci_cache: dict[str, str] = {}
        self._ci_create_lock = threading.Lock()
        self._ci_missing_logged = False
        self._unconfirmed: dict[tuple[str, str], None] = {}
        self._unknown_statuses: set[str] = set()

    def __repr__(self) -> str:
        return f"CherwellConnector(connection={self.connection_name!r}, api={self._api!r})"

    # -- the ports ---------------------------------------------------------------------------------

    def check(self) -> str:
        """Authenticated lookups of everything the connection names: proves URL, credentials, the
        business objects, the journal relationship and the configured statuses."""
        incident = self._schema(self._settings.incident_object, "--incident-object")
        self._note_target()
        statuses = self._allowed_statuses()
        resolved, reopen = self._status("resolved"), self._status("reopen")
        synced = [incident.name]
        if SyncData.CHANGE_REQUESTS in self._settings.sync_data:
            synced.append(self._schema(self._settings.change_object, "--change-object").name)
        host = httpx.URL(self._api).host
        user = getattr(self._auth, "username", None)
        who = f" as {user!r}" if user else ""
        return (
            f"Cherwell at {host} answered{who}: {', '.join(synced)} readable, journal notes through "
            f"{self._settings.note_relationship!r}, Status {resolved!r} and {reopen!r} allowed "
            f"({len(statuses)} statuses)"
        )

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        ci_rec_id: str | None = None
        if draft.configuration_item:
            ci_rec_id = self.ensure_configuration_item(
                draft.configuration_item, create=draft.create_configuration_item
            )
        values = draft_to_incident_fields(
            draft, self._defaults, ci_rec_id=ci_rec_id, ci_name=draft.configuration_item
        )
        needed = {SHORT_DESCRIPTION, DESCRIPTION} | (
            {self._settings.correlation_field} if self._settings.correlation_field else set()
        )
        try:
            saved = self._fresh(
                self._settings.incident_object,
                lambda: self._save_new(self._settings.incident_object, values, needed),
            )
        except ItsmUnavailableError:
            # Cherwell may have saved it before the answer was lost: look before giving up
            found = landed_create(self.find_by_correlation, draft.correlation_id, self.connection_name)
            if found is None:
                raise
            return found
        return self._ref(saved)

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        """The newest open incident stamped with ``correlation_id`` (crash recovery of a create)."""
        correlation_id = correlation_id.strip()
        if not correlation_id:
            return None
        return self._fresh(self._settings.incident_object, lambda: self._find_by_correlation(correlation_id))

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        self._add_note(ref, text)

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        """Status to the resolved status with the note as close description, then the journal note."""
        status = self._status("resolved")
        incident = self._settings.incident_object
        self._fresh(incident, lambda: self._update(incident, ref, {STATUS: status, CLOSE_DESCRIPTION: note}))
        self._add_note(ref, note)

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        status = self._status("reopen")
        incident = self._settings.incident_object
        self._fresh(incident, lambda: self._update(incident, ref, {STATUS: status}))
        self._add_note(ref, note)

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        schema = self._schema(self._settings.incident_object, "--incident-object")
        body = self._send(
            "GET",
            f"getbusinessobject/busobid/{_segment(schema.bus_ob_id)}/busobrecid/{_segment(ref.id)}",
            what="getbusinessobject",
        )
        values = _values(body, "getbusinessobject")
        return incident_state(values.get(STATUS, ""), self._settings.resolved_status)

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        """The CI's RecID (created when allowed), or None: the incident is then created without one."""
        name = name.strip()
        if not name:
            return None
        with self._lock:
            cached = self._ci_cache.get(name.lower())
        if cached is not None:
            return cached
        ci_object = self._settings.ci_object
        try:
            schema = self._schema(ci_object, "--ci-object")
            schema.field_id(CI_NAME)
            schema.field_id(REC_ID)
        except ItsmRejectedError as exc:
            if not self._ci_missing_logged:
                self._ci_missing_logged = True
                log.warning(
                    "connection %r: configuration items cannot be looked up (%s); incidents are created "
                    "without one",
                    self.connection_name,
                    exc,
                )
            return None
        rec_id = self._fresh(ci_object, lambda: self._lookup_ci(name))
        if rec_id is None and create:
            with self._ci_create_lock:  # two alerts for a new CI must not create it twice
                rec_id = self._fresh(ci_object, lambda: self._lookup_ci(name))
                if rec_id is None:
                    saved = self._fresh(
                        ci_object, lambda: self._save_new(ci_object, {CI_NAME: name}, {CI_NAME})
                    )
                    rec_id = record_id(saved) or None
                    log.info("created configuration item %r in %s", name, ci_object)
        if rec_id is not None:
            with self._lock:
                if len(self._ci_cache) >= CI_CACHE_SIZE:
                    self._ci_cache.pop(next(iter(self._ci_cache)))
                self._ci_cache[name.lower()] = rec_id
        return rec_id

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        """Keyset paging on (LastModifiedDateTime, RecID), stable while records change underneath.

        With a ``last_id`` the rest of that second is drained first (``LastModifiedDateTime eq T``
        and ``RecID gt ID``, by RecID); whatever room the page has left is filled from
        ``LastModifiedDateTime gt T`` ordered by both. The page is the last only when that second
        search came back short. Rows must come back in the order asked for and after the cursor;
        an answer that does not is refused rather than trusted to skip nothing.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        page_size = min(page_size, MAX_PAGE_SIZE)
        object_name, setting = self._object_of(item_type)
        return self._fresh(
            object_name, lambda: self._fetch(item_type, object_name, setting, cursor, page_size)
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- sync ----------------------------------------------------------------------------------------

    def _object_of(self, item_type: WorkItemType) -> tuple[str, str]:
        if item_type is WorkItemType.INCIDENT:
            return self._settings.incident_object, "--incident-object"
        return self._settings.change_object, "--change-object"

    def _fetch(
        self, item_type: WorkItemType, object_name: str, setting: str, cursor: SyncCursor, page_size: int
    ) -> SyncPage:
        schema = self._schema(object_name, setting)
        wanted = [n for n in sync_field_names(item_type, self._settings.correlation_field) if schema.has(n)]
        for name in REQUIRED_SYNC_FIELDS:
            schema.field_id(name)
        if self._settings.correlation_field:
            schema.field_id(self._settings.correlation_field, "--correlation-field")
        fields = [schema.field_id(name) for name in wanted]
        modified, rec_id = schema.field_id(LAST_MODIFIED), schema.field_id(REC_ID)
        at = format_datetime(cursor.updated_at, self._zone)
        records: list[Mapping[str, Any]] = []
        if cursor.last_id:
            records = self._search(
                schema,
                fields,
                [(modified, "eq", at), (rec_id, "gt", cursor.last_id)],
                [rec_id],
                page_size,
            )
            if len(records) >= page_size:
                return self._page(item_type, cursor, records, is_last=False)
        room = page_size - len(records)
        more = self._search(schema, fields, [(modified, "gt", at)], [modified, rec_id], room)
        return self._page(item_type, cursor, [*records, *more], is_last=len(more) < room)

    def _page(
        self,
        item_type: WorkItemType,
        cursor: SyncCursor,
        records: Sequence[Mapping[str, Any]],
        *,
        is_last: bool,
    ) -> SyncPage:
        items: list[WorkItem] = []
        rejected: list[RejectedRow] = []
        previous = (cursor.updated_at, cursor.last_id.lower())
        last: tuple[datetime, str] | None = None
        for record in records:
            values, here = self._position(record)
            if here is not None:
                key = (here[0], here[1].lower())
                if key <= previous:
                    raise ItsmError(
                        f"Cherwell answered the {item_type.value} search of connection "
                        f"{self.connection_name!r} with record {here[1]} out of "
                        f"({LAST_MODIFIED}, {REC_ID}) order: the sync cannot page it "
                        "without skipping or repeating records",
                    )
                previous, last = key, here
            try:
                item = record_to_work_item(
                    self.connection_name,
                    item_type,
                    record,
                    self._record_options,
                    values=values,
                    updated_at=here[0] if here is not None else None,
                )
            except ValueError as exc:
                rejected.append(RejectedRow(source_id=_record_label(record), error=str(exc)[:MAX_ERROR_TEXT]))
                continue
            if item.lifecycle is None and item.state:
                self._note_unknown_status(item_type, item.state)
            items.append(item)
        position = cursor if last is None else SyncCursor(updated_at=last[0], last_id=last[1])
        if not is_last and position == cursor and records:
            raise ItsmError(
                f"Cherwell {item_type.value} records of connection {self.connection_name!r} carry no "
                f"readable {LAST_MODIFIED}/{REC_ID}, so the sync cannot move past them",
            )
        return SyncPage(items=items, rejected=rejected, next_cursor=position, is_last=is_last)

    def _position(
        self, record: Mapping[str, Any]
    ) -> tuple[dict[str, str] | None, tuple[datetime, str] | None]:
        """The record's values (None when unreadable; the mapping then says why) and where it sits
        in the feed as (UTC last modified, RecID), or None if it cannot say (the cursor then stays)."""
        try:
            values = record_values(record)
        except ValueError:
            return None, None
        try:
            updated = parse_datetime(values.get(LAST_MODIFIED, ""), LAST_MODIFIED, self._zone)
        except ValueError:
            return values, None
        rec = record_id(record, values)
        if not rec or updated is None:
            return values, None
        return values, (updated.astimezone(UTC), rec)

    def _note_unknown_status(self, item_type: WorkItemType, status: str) -> None:
        key = f"{item_type.value}:{status.lower()}"
        with self._lock:
            if key in self._unknown_statuses or len(self._unknown_statuses) > 100:
                return
            self._unknown_statuses.add(key)
        log.warning(
            "connection %r: %s status %r is not a stock Cherwell status; its work items keep the raw status "
            "and no lifecycle",
            self.connection_name,
            item_type.value,
            status[:80],
        )

    def _search(
        self,
        schema: ObjectSchema,
        fields: Sequence[str],
        filters: Sequence[tuple[str, str, str]],
        sorting: Sequence[str],
        page_size: int,
        page_number: int = 1,
    ) -> list[Mapping[str, Any]]:
        body = self._search_body(schema, fields, filters, sorting, page_size, page_number)
        records = body.get("businessObjects")
        if records is None:
            records = []
        if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
            raise ItsmUnavailableError(
                f"getsearchresults of {schema.name}: Cherwell answered without a record list"
            )
        return records

    def _search_body(
        self,
        schema: ObjectSchema,
        fields: Sequence[str],
        filters: Sequence[tuple[str, str, str]],
        sorting: Sequence[str],
        page_size: int,
        page_number: int,
    ) -> Mapping[str, Any]:
        request = {
            "busObId": schema.bus_ob_id,
            "fields": list(fields),
            "filters": [{"fieldId": f, "operator": op, "value": value} for f, op, value in filters],
            "sorting": [{"fieldId": f, "sortDirection": ASCENDING} for f in sorting],
            "pageNumber": page_number,
            "pageSize": page_size,
            "includeAllFields": False,
            "includeSchema": False,
        }
        body = self._send("POST", "getsearchresults", json=request, what=f"getsearchresults of {schema.name}")
        return _object(body, f"getsearchresults of {schema.name}")

    # -- incidents -------------------------------------------------------------------------------------

    def _find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        schema = self._schema(self._settings.incident_object, "--incident-object")
        field = self._settings.correlation_field
        if field:
            condition = (schema.field_id(field, "--correlation-field"), "eq", correlation_id)
        else:
            condition = (schema.field_id(DESCRIPTION), "contains", f"{CORRELATION_MARKER}{correlation_id}")
        names = [REC_ID, STATUS, CREATED, field or DESCRIPTION]
        fields = [schema.field_id(n) for n in names if schema.has(n)]
        sort = [schema.field_id(CREATED)] if schema.has(CREATED) else []
        body = self._search_body(schema, fields, [condition], sort, CORRELATION_LOOKUP_PAGE, 1)
        records = list(_records(body))
        total = body.get("totalRows")
        if isinstance(total, int) and total > len(records):  # the newest are on the last page
            last = math.ceil(total / CORRELATION_LOOKUP_PAGE)
            records += _records(
                self._search_body(schema, fields, [condition], sort, CORRELATION_LOOKUP_PAGE, last)
            )
        best: tuple[datetime, int] | None = None
        found: WorkItemRef | None = None
        for index, record in enumerate(records):
            values = record_values(record)
            stamped = values.get(field, "").strip() if field else marker_of(values.get(DESCRIPTION, ""))
            if stamped != correlation_id:
                continue  # ``contains`` also matches a longer id (-g1 in -g12)
            if (
                incident_state(values.get(STATUS, ""), self._settings.resolved_status)
                is not WorkItemState.OPEN
            ):
                continue  # a resolved incident of an old generation must not be taken over
            created = parse_datetime(values.get(CREATED, ""), CREATED, self._zone) or datetime.min.replace(
                tzinfo=UTC
            )
            if best is None or (created, index) > best:
                best, found = (created, index), self._ref(record)
        return found

    def _update(self, object_name: str, ref: WorkItemRef, values: Mapping[str, str]) -> None:
        """One savebusinessobject of existing fields (those the site lacks, bar Status, are skipped)."""
        schema = self._schema(object_name)
        fields = []
        for name, value in values.items():
            definition = schema.field(name)
            if definition is None:
                if name == STATUS:
                    schema.field_id(STATUS)
                continue
            fields.append(
                {"fieldId": definition.field_id, "name": definition.name, "value": value, "dirty": True}
            )
        request = {"busObId": schema.bus_ob_id, "busObRecId": ref.id, "fields": fields, "persist": True}
        body = self._send(
            "POST",
            "savebusinessobject",
            json=request,
            what=f"savebusinessobject of {ref.number}",
            schema=schema,
        )
        _object(body, f"savebusinessobject of {ref.number}")

    def _status(self, which: str) -> str:
        """The resolved or reopen status as Cherwell spells it, checked against the allowed values."""
        wanted = self._settings.resolved_status if which == "resolved" else self._settings.reopen_status
        allowed = self._allowed_statuses()
        spelled = allowed.get(wanted.lower())
        if spelled is None:
            flag = "--resolved-status" if which == "resolved" else "--reopen-status"
            shown = ", ".join(sorted(allowed.values())[:30])
            raise ItsmRejectedError(
                f"Status {wanted!r} ({flag}) is not a value Cherwell allows for "
                f"{self._settings.incident_object}: {shown}"
            )
        return spelled

    def _allowed_statuses(self) -> dict[str, str]:
        with self._lock:
            if self._statuses is not None:
                return self._statuses

        def lookup() -> dict[str, str]:
            schema = self._schema(self._settings.incident_object, "--incident-object")
            request = {"busObId": schema.bus_ob_id, "fieldId": schema.field_id(STATUS), "fieldName": STATUS}
            body = _object(
                self._send(
                    "POST",
                    "fieldvalueslookup",
                    json=request,
                    what="fieldvalueslookup of Status",
                    schema=schema,
                ),
                "fieldvalueslookup of Status",
            )
            values = body.get("values")
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values) or not values:
                raise ItsmUnavailableError("fieldvalueslookup of Status: Cherwell answered without values")
            return {v.strip().lower(): v.strip() for v in values if v.strip()}

        statuses = self._fresh(self._settings.incident_object, lookup)
        with self._lock:
            self._statuses = statuses
        return statuses

    def _ref(self, record: Mapping[str, Any]) -> WorkItemRef:
        rec = record_id(record)
        public = record.get("busObPublicId")
        if not rec or not isinstance(public, str) or not public.strip():
            raise ItsmUnavailableError(
                "Cherwell answered without the incident's busObRecId and busObPublicId"
            )
        bus_ob_id = self._schema(self._settings.incident_object).bus_ob_id
        link = httpx.URL(self._api).copy_with(
            path="/CherwellClient/Access/Command/Queries.GoToRecord",
            params={"BusObID": bus_ob_id, "RecID": rec},
        )
        return WorkItemRef(id=rec, number=public.strip(), url=str(link))

    # -- journal notes ---------------------------------------------------------------------------------

    def _note_target(self) -> _NoteTarget:
        incident = self._schema(self._settings.incident_object, "--incident-object")
        note = self._schema(self._settings.note_object, "--note-object")
        relationship = incident.relationships.get(self._settings.note_relationship.lower())
        if relationship is None:
            known = ", ".join(sorted(incident.relationships)[:20]) or "none"
            raise ItsmRejectedError(
                f"the Cherwell business object {incident.name} has no relationship "
                f"{self._settings.note_relationship!r} (--note-relationship); it has: {known}"
            )
        note.field_id(NOTE_DETAILS)
        return _NoteTarget(incident, relationship[0], note)

    def _add_note(self, ref: WorkItemRef, text: str) -> None:
        """One Journal - Note on the incident; after an ambiguous failure it is looked for before it is
        sent again, and a note this process could not confirm is looked for before any new attempt."""
        key = (ref.id, normalised_note(text))
        with self._lock:
            unconfirmed = key in self._unconfirmed
        if unconfirmed and self._note_landed(ref, text):
            self._confirmed(key)
            return
        for attempt in (1, 2):
            try:
                self._fresh(self._settings.note_object, lambda: self._save_note(ref, text))
            except ItsmUnavailableError:
                try:
                    landed = self._note_landed(ref, text)
                except ItsmError:
                    self._remember_unconfirmed(key)
                    raise
                if landed:
                    log.warning(
                        "connection %r: the note on %s failed in transit but was saved: not sending it again",
                        self.connection_name,
                        ref.number,
                    )
                    self._confirmed(key)
                    return
                if attempt == 2:
                    raise
                log.warning(
                    "connection %r: the note on %s failed in transit and was not saved: sending it once more",
                    self.connection_name,
                    ref.number,
                )
                continue
            self._confirmed(key)
            return

    def _save_note(self, ref: WorkItemRef, text: str) -> None:
        target = self._note_target()
        fields = self._template_fields(target.note, {NOTE_DETAILS: text})
        request = {
            "parentBusObId": target.incident.bus_ob_id,
            "parentBusObRecId": ref.id,
            "relationshipId": target.relationship_id,
            "busObId": target.note.bus_ob_id,
            "fields": fields,
            "persist": True,
        }
        body = self._send(
            "POST",
            "saverelatedbusinessobject",
            json=request,
            idempotent=False,
            what=f"saverelatedbusinessobject (note on {ref.number})",
            schema=target.note,
        )
        _object(body, f"saverelatedbusinessobject (note on {ref.number})")

    def _note_landed(self, ref: WorkItemRef, text: str) -> bool:
        target = self._note_target()
        wanted = normalised_note(text)
        path = (
            f"getrelatedbusinessobject/parentbusobid/{_segment(target.incident.bus_ob_id)}"
            f"/parentbusobrecid/{_segment(ref.id)}/relationshipid/{_segment(target.relationship_id)}"
        )
        for page in range(1, NOTE_LOOKUP_PAGES + 1):
            body = _object(
                self._send(
                    "GET",
                    path,
                    params={"pageNumber": str(page), "pageSize": str(NOTE_LOOKUP_PAGE), "allfields": "true"},
                    what=f"getrelatedbusinessobject (notes of {ref.number})",
                ),
                "getrelatedbusinessobject",
            )
            related = body.get("relatedBusinessObjects") or []
            if not isinstance(related, list):
                raise ItsmUnavailableError(
                    "getrelatedbusinessobject: Cherwell answered without a record list"
                )
            for record in related:
                if isinstance(record, Mapping):
                    with_details = record_values(record).get(NOTE_DETAILS, "")
                    if normalised_note(with_details) == wanted:
                        return True
            total = body.get("totalRecords")
            if len(related) < NOTE_LOOKUP_PAGE or (
                isinstance(total, int) and page * NOTE_LOOKUP_PAGE >= total
            ):
                return False
        return False

    def _remember_unconfirmed(self, key: tuple[str, str]) -> None:
        with self._lock:
            if len(self._unconfirmed) >= UNCONFIRMED_NOTES:
                self._unconfirmed.pop(next(iter(self._unconfirmed)))
            self._unconfirmed[key] = None

    def _confirmed(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._unconfirmed.pop(key, None)

    # -- configuration items ---------------------------------------------------------------------------

    def _lookup_ci(self, name: str) -> str | None:
        """The RecID of the CI named ``name``; the record's own name is checked, not trusted."""
        schema = self._schema(self._settings.ci_object, "--ci-object")
        name_id = schema.field_id(CI_NAME)
        fields = [schema.field_id(REC_ID), name_id]
        for record in self._search(schema, fields, [(name_id, "eq", name)], [], 5):
            values = record_values(record)
            if values.get(CI_NAME, "").strip().lower() == name.lower():
                return record_id(record, values) or None
        return None

    # -- schema, templates, saves ----------------------------------------------------------------------

    def _fresh(self, object_name: str, call: Callable[[], _T]) -> _T:
        """Run ``call``; when Cherwell says a field id is unknown, read the schema again and retry once."""
        try:
            return call()
        except _StaleFieldIds as exc:
            log.warning(
                "connection %r: Cherwell does not know a cached field id of %s (%s): reading it again",
                self.connection_name,
                object_name,
                exc,
            )
            self._forget(object_name)
        return call()

    def _forget(self, object_name: str) -> None:
        key = object_name.lower()
        with self._lock:
            self._schemas.pop(key, None)
            for template_key in [k for k in self._templates if k[0] == key]:
                del self._templates[template_key]
            self._statuses = None

    def _schema(self, object_name: str, setting: str = "") -> ObjectSchema:
        key = object_name.lower()
        with self._lock:
            cached = self._schemas.get(key)
        if cached is not None:
            return cached
        summaries = self._send(
            "GET",
            f"getbusinessobjectsummary/busobname/{_segment(object_name)}",
            what="getbusinessobjectsummary",
        )
        if isinstance(summaries, Mapping):
            summaries = [summaries]
        if not isinstance(summaries, list):
            raise ItsmUnavailableError("getbusinessobjectsummary: Cherwell answered without a summary list")
        match = next(
            (
                s
                for s in summaries
                if isinstance(s, Mapping) and str(s.get("name", "")).lower() == key and s.get("busObId")
            ),
            None,
        )
        if match is None:
            hint = f" ({setting})" if setting else ""
            raise ItsmRejectedError(f"Cherwell has no business object named {object_name!r}{hint}")
        bus_ob_id = str(match["busObId"])
        body = _object(
            self._send(
                "GET",
                f"getbusinessobjectschema/busobid/{_segment(bus_ob_id)}",
                params={"includerelationships": "true"},
                what=f"getbusinessobjectschema of {object_name}",
            ),
            f"getbusinessobjectschema of {object_name}",
        )
        schema = _parse_schema(object_name, bus_ob_id, body)
        with self._lock:
            self._schemas[key] = schema
        return schema

    def _template_fields(self, schema: ObjectSchema, values: Mapping[str, str]) -> list[dict[str, Any]]:
        """The template of a new record (required fields with their defaults) with ``values`` set."""
        names = tuple(sorted(n for n in values if schema.has(n)))
        key = (schema.name.lower(), names)
        with self._lock:
            template = self._templates.get(key)
        if template is None:
            request = {
                "busObId": schema.bus_ob_id,
                "fieldNames": list(names),
                "includeRequired": True,
                "includeAll": False,
            }
            body = _object(
                self._send(
                    "POST",
                    "getbusinessobjecttemplate",
                    json=request,
                    what=f"getbusinessobjecttemplate of {schema.name}",
                    schema=schema,
                ),
                f"getbusinessobjecttemplate of {schema.name}",
            )
            raw = body.get("fields")
            if not isinstance(raw, list) or not all(isinstance(f, Mapping) and f.get("fieldId") for f in raw):
                raise ItsmUnavailableError(
                    f"getbusinessobjecttemplate of {schema.name}: Cherwell answered without fields"
                )
            template = [dict(f) for f in raw]
            with self._lock:
                self._templates[key] = template
        by_name = {name.lower(): value for name, value in values.items()}
        fields: list[dict[str, Any]] = []
        for item in template:
            field = dict(item)
            name = str(field.get("name") or schema.name_of(str(field["fieldId"]))).lower()
            if name in by_name:
                field["value"] = by_name.pop(name)
                field["dirty"] = True
            fields.append(field)
        for name, value in by_name.items():  # in the schema but left out of the template: add it
            definition = schema.field(name)
            if definition is not None:
                fields.append(
                    {"fieldId": definition.field_id, "name": definition.name, "value": value, "dirty": True}
                )
        return fields

    def _save_new(self, object_name: str, values: Mapping[str, str], needed: set[str]) -> Mapping[str, Any]:
        """A new record from the object's template; fields the site lacks are left out unless needed."""
        schema = self._schema(object_name)
        for name in needed:
            schema.field_id(name, "--correlation-field" if name == self._settings.correlation_field else "")
        dropped = [n for n in values if not schema.has(n)]
        if dropped:
            log.debug(
                "connection %r: %s has no field %s; not set", self.connection_name, object_name, dropped
            )
        fields = self._template_fields(schema, {n: v for n, v in values.items() if schema.has(n)})
        request = {"busObId": schema.bus_ob_id, "fields": fields, "persist": True}
        body = _object(
            self._send(
                "POST",
                "savebusinessobject",
                json=request,
                idempotent=False,
                what=f"savebusinessobject of a new {object_name}",
                schema=schema,
            ),
            f"savebusinessobject of a new {object_name}",
        )
        if not record_id(body):
            raise ItsmUnavailableError(
                f"savebusinessobject of a new {object_name}: Cherwell answered without a busObRecId"
            )
        return body

    # -- HTTP --------------------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        schema: ObjectSchema | None = None,
    ) -> Any:
        url = f"{self._api}/{API}/{path}"
        headers = {"Accept": "application/json"}

        def build() -> httpx.Request:
            return self._client.build_request(method, url, params=params, json=json, headers=headers)

        response = send_with_retries(self._client, build, self._retry, auth=self._auth, idempotent=idempotent)
        status = response.status_code
        refuse_unauthorised_or_redirected(
            response, product="Cherwell", what=what, connection=self.connection_name, url="connection's URL"
        )
        try:
            body: Any = response.json() if response.content else None
        except ValueError:
            body = _NOT_JSON
        if status >= 400:
            self._raise_product_error(body if isinstance(body, Mapping) else {}, what, schema, status)
        if body is _NOT_JSON:
            raise not_json(
                response,
                product="Cherwell",
                what=what,
                guess="a proxy's error page, or a sign-in page in front of the API?",
            )
        if isinstance(body, Mapping) and body.get("hasError") is True:
            self._raise_product_error(body, what, schema, None)
        return body

    def _raise_product_error(
        self, body: Mapping[str, Any], what: str, schema: ObjectSchema | None, http_status: int | None
    ) -> None:
        code = _text(body.get("errorCode"))
        message = _text(body.get("errorMessage")) or _text(body.get("Message")) or _text(body.get("message"))
        status = _status_of(body.get("httpStatusCode")) or http_status
        details = []
        for item in body.get("fieldValidationErrors") or []:
            if isinstance(item, Mapping):
                field = _text(item.get("fieldId"))
                name = schema.name_of(field) if schema is not None and field else field
                details.append(f"{name}: {_text(item.get('error')) or _text(item.get('errorCode'))}")
        text = "; ".join(part for part in (code, message, *details) if part) or "no error details"
        text = " ".join(text.split())
        text = text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"
        shown = f"HTTP {http_status}" if http_status else "hasError"
        if _STALE_FIELD.search(f"{code} {message}"):
            raise _StaleFieldIds(f"Cherwell rejected {what} ({shown}): {text}", status=status)
        if status is not None and status >= 500:
            raise ItsmUnavailableError(f"Cherwell failed {what} ({shown}): {text}", status=status)
        raise ItsmRejectedError(f"Cherwell rejected {what} ({shown}): {text}", status=status or 400)


_NOT_JSON: Any = object()


def _segment(value: str) -> str:
    return quote(value, safe="")


def _text(value: object) -> str:
    return " ".join(str(value).split()) if value not in (None, "") else ""


def _status_of(value: object) -> int | None:
    """``httpStatusCode`` as a number: Cherwell sends the .NET name (``NotFound``) or a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.isdigit():
            return int(text)
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", text).upper()
        try:
            return int(HTTPStatus[name])
        except KeyError:
            return None
    return None


def _object(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ItsmUnavailableError(f"{what}: Cherwell answered without a JSON object")
    return body


def _records(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    records = body.get("businessObjects") or []
    if not isinstance(records, list):
        raise ItsmUnavailableError("getsearchresults: Cherwell answered without a record list")
    return [r for r in records if isinstance(r, Mapping)]


def _values(body: Any, what: str) -> dict[str, str]:
    try:
        return record_values(_object(body, what))
    except ValueError as exc:
        raise ItsmUnavailableError(
            f"{what}: Cherwell answered a record that cannot be read ({exc})"
        ) from None


def _record_label(record: Mapping[str, Any]) -> str:
    """The best id of a rejected record for the error log: its RecID, else its public id."""
    try:
        values = record_values(record)
    except ValueError:
        values = {}
    rec = record_id(record, values)
    if rec:
        return rec
    public = record.get("busObPublicId")
    return public.strip() if isinstance(public, str) else ""


def _parse_schema(object_name: str, bus_ob_id: str, body: Mapping[str, Any]) -> ObjectSchema:
    definitions = body.get("fieldDefinitions")
    if not isinstance(definitions, list):
        raise ItsmUnavailableError(
            f"getbusinessobjectschema of {object_name}: Cherwell answered without fields"
        )
    fields: dict[str, FieldDefinition] = {}
    for item in definitions:
        if not isinstance(item, Mapping):
            continue
        field_id, name = item.get("fieldId"), item.get("name")
        if isinstance(field_id, str) and field_id and isinstance(name, str) and name:
            fields[name.lower()] = FieldDefinition(field_id, name, bool(item.get("required")))
    relationships: dict[str, tuple[str, str]] = {}
    for item in body.get("relationships") or []:
        if not isinstance(item, Mapping):
            continue
        rel_id, label = item.get("relationshipId"), item.get("displayName")
        if isinstance(rel_id, str) and rel_id and isinstance(label, str) and label:
            relationships[" ".join(label.split()).lower()] = (rel_id, str(item.get("target") or ""))
    return ObjectSchema(object_name, bus_ob_id, fields, relationships)
