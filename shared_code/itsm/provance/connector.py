"""Provance (Dataverse) behind the ITSM ports (incidents, change feed) over the Web API v9.2.

Every call is built by ``_call`` (JSON, the OData headers), sent through ``send_with_retries``
(bounded retries of transport errors, 408, 429 with ``Retry-After`` and 5xx) with at most
``MAX_CONCURRENT`` requests in flight per connection (Dataverse allows 52 per user), and mapped to
the ``ItsmError`` family:

    2xx JSON                          the result
    401 (after the auth's one retry)  ItsmAuthError      the connection must be re-authorised
    3xx                               ItsmRejectedError  a redirect is a wrong URL or a sign-in page
    other 4xx                         ItsmRejectedError  with Dataverse's error code and message
    5xx/408/429/timeouts, exhausted   ItsmUnavailableError (raised by send_with_retries)
    2xx that is not the JSON asked    ItsmUnavailableError (an HTML page from a proxy or sign-in)

Writes that create something are made safe to repeat by choosing the new record's id here
(Dataverse accepts the caller's primary key and refuses a second create with 412 "duplicate key"):
an incident's id derives from its correlation id, a note's from its record and text. After an
ambiguous failure (timeout, reset, 5xx) of such a write, the connector first reads whether it
landed, and only then writes again. Tables and their columns come from ``EntityDefinitions``
(cached per connector), so the configured table and column names are checked once, with a clear
error naming what is missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from shared_code.domain.sync import RejectedRow, SyncCursor, SyncPage
from shared_code.domain.workitem import IncidentDraft, WorkItem, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import ItsmError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy, not_json, refuse_unauthorised_or_redirected, send_with_retries
from shared_code.itsm.provance.mapping import (
    ANNOTATION_SET,
    MODIFIED,
    STATE_ACTIVE,
    STATUS_IN_PROGRESS,
    VERSION,
    TableInfo,
    draft_to_incident_fields,
    note_fields,
    note_id,
    parse_datetime,
    parse_version,
    record_id,
    resolution_parameters,
    row_to_work_item,
    row_version,
    work_item_state,
)
from shared_code.itsm.provance.settings import ProvanceConnection

log = logging.getLogger(__name__)

API_PATH = "/api/data/v9.2/"
MAX_ERROR_TEXT = 300
MAX_PAGE_SIZE = 5000  # Dataverse's largest odata.maxpagesize
MAX_CONCURRENT = 16  # per connection, well under Dataverse's 52 concurrent requests per user
ID_ATTEMPTS = 4
DUPLICATE_KEY = "0x80040237"
FORMATTED_VALUES = 'odata.include-annotations="OData.Community.Display.V1.FormattedValue"'
_BASE_HEADERS = {
    "Accept": "application/json",
    "OData-MaxVersion": "4.0",
    "OData-Version": "4.0",
}

JsonBody = Mapping[str, object]


class ProvanceConnector:
    """One Provance connection. Thread-safe: it keeps only discovered table definitions."""

    def __init__(
        self,
        connection: ProvanceConnection,
        client: httpx.Client,
        auth: httpx.Auth,
        *,
        retry: RetryPolicy | None = None,
        owns_client: bool = False,
    ) -> None:
        timeout = client.timeout
        if timeout.connect is None or timeout.read is None:
            raise ValueError("the HTTP client for Dataverse needs explicit connect and read timeouts")
        self.connection = connection
        self.connection_name = connection.name
        self._base = connection.server_url.rstrip("/") + API_PATH
        self._client = client
        self._auth = auth
        self._retry = retry or RetryPolicy()
        self._owns_client = owns_client
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._tables: dict[str, TableInfo] = {}
        self._tables_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ProvanceConnector(connection={self.connection_name!r}, base={self._base!r})"

    # -- connections test ---------------------------------------------------------------------------

    def check(self) -> str:
        """``WhoAmI`` (the token and the application user), then the configured tables and columns."""
        who = self._json("GET", "WhoAmI", what="WhoAmI")
        user = who.get("UserId")
        if not isinstance(user, str) or not user:
            raise ItsmUnavailableError("WhoAmI: Dataverse answered without a UserId")
        tables = [self._table(self.connection.incident_table, self.connection.incident_number_column)]
        if self.connection.change_table:
            tables.append(self._table(self.connection.change_table, self.connection.change_number_column))
        host = httpx.URL(self._base).host
        described = "; ".join(
            f"table {t.logical_name} (entity set {t.entity_set}, number column {t.number}, "
            f"change tracking {'on' if t.change_tracking else 'off'})"
            for t in tables
        )
        return f"Dataverse environment {host} answered as application user {user}: {described}"

    # -- IncidentWriter -----------------------------------------------------------------------------

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        table = self._incidents()
        select = {"$select": f"{table.primary_id},{table.number},statecode"}
        for attempt in range(ID_ATTEMPTS):
            new_id = record_id(table.logical_name, draft.correlation_id, attempt)
            fields = draft_to_incident_fields(draft, table, new_id, customer=self.connection.customer)
            try:
                response = self._call(
                    "POST",
                    table.entity_set,
                    params=select,
                    json=fields,
                    prefer="return=representation",
                    idempotent=False,
                )
            except ItsmUnavailableError:
                # the answer was lost, the create may have landed: look before anything else
                landed = self._read(table, new_id, missing_ok=True)
                if landed is None:
                    raise
                if work_item_state(table, landed) is not WorkItemState.OPEN:
                    continue
                log.warning(
                    "the create of an incident for connection %r failed in transit, but it landed: using it",
                    self.connection_name,
                )
                return self._ref(table, landed)
            if response.status_code == 412 and DUPLICATE_KEY in _error_code(response):
                existing = self._read(table, new_id, missing_ok=True)
                if existing is None:
                    raise ItsmUnavailableError(
                        f"Dataverse refused incident id {new_id} as a duplicate but has no such record"
                    )
                if work_item_state(table, existing) is WorkItemState.OPEN:
                    return self._ref(table, existing)  # an earlier attempt of this create landed
                continue  # an old, finished incident holds the id: the next attempt's id
            return self._ref(table, self._body(response, f"POST {table.entity_set}"))
        raise ItsmRejectedError(
            f"every id for correlation {draft.correlation_id!r} is held by a finished incident in "
            f"{table.logical_name}: remove the old incidents or use a new connection name"
        )

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        if not correlation_id.strip():
            return None
        table = self._incidents()
        ids = [record_id(table.logical_name, correlation_id, n) for n in range(ID_ATTEMPTS)]
        either = " or ".join(f"{table.primary_id} eq {guid}" for guid in ids)
        rows = self._list(
            table,
            {
                "$select": f"{table.primary_id},{table.number},statecode",
                "$filter": f"({either}) and statecode eq {STATE_ACTIVE}",
            },
            page_size=ID_ATTEMPTS,
        )[0]
        if not rows:
            return None
        # the latest attempt is the current one
        by_id = {str(row.get(table.primary_id, "")).lower(): row for row in rows}
        newest = next(by_id[guid] for guid in reversed(ids) if guid in by_id)
        return self._ref(table, newest)

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        self._note(self._incidents(), ref.id, text)

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        """``CloseIncident`` on the incident table (its incidentresolution holds the note), else a
        note and the state change on the site's own table."""
        table = self._incidents()
        status = self.connection.resolution_status
        if not table.is_incident:
            self._note(table, ref.id, note)
            self._patch(table, ref.id, {"statecode": 1, "statuscode": status})
            return
        if self._state(table, ref.id) is not WorkItemState.OPEN:
            log.info("incident %s of %r is already resolved or closed", ref.number, self.connection_name)
            return
        body = resolution_parameters(table, ref.id, note, status)
        for _ in range(2):
            try:
                self._json("POST", "CloseIncident", json=body, idempotent=False, what="CloseIncident")
                return
            except ItsmUnavailableError:
                # did the resolution land before the answer was lost? Only an open incident is retried
                if self._state(table, ref.id) is not WorkItemState.OPEN:
                    return
        raise ItsmUnavailableError(f"CloseIncident of {ref.number} failed twice without landing")

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        table = self._incidents()
        self._patch(table, ref.id, {"statecode": STATE_ACTIVE, "statuscode": STATUS_IN_PROGRESS})
        self._note(table, ref.id, note)

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        return self._state(self._incidents(), ref.id)

    # -- ChangeFeed ---------------------------------------------------------------------------------

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        """Keyset paging on (modifiedon, versionnumber), one request per page.

        ``modifiedon gt T`` after a bare time; with a row version, the rest of that second first:
        ``(modifiedon eq T and versionnumber gt V) or modifiedon gt T``. The page is the last when
        Dataverse gives no ``@odata.nextLink`` (``odata.maxpagesize`` rows did not fill it).
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        table = self._table_for(item_type)
        at = as_of(cursor.updated_at)
        version = parse_version(cursor.last_id)
        after = f"{MODIFIED} gt {at}"
        condition = (
            after if version is None else f"({MODIFIED} eq {at} and {VERSION} gt {version}) or {after}"
        )
        rows, more = self._list(
            table,
            {
                "$select": ",".join(table.sync_select()),
                "$filter": condition,
                "$orderby": f"{MODIFIED} asc,{VERSION} asc",
            },
            page_size=min(page_size, MAX_PAGE_SIZE),
        )
        return self._page(item_type, table, cursor, rows, is_last=not more)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- tables -------------------------------------------------------------------------------------

    def _incidents(self) -> TableInfo:
        return self._table(self.connection.incident_table, self.connection.incident_number_column)

    def _table_for(self, item_type: WorkItemType) -> TableInfo:
        if item_type is WorkItemType.INCIDENT:
            return self._incidents()
        if not self.connection.change_table:
            raise ItsmRejectedError(
                f"connection {self.connection_name!r} names no change table: set --change-table to sync "
                "change requests"
            )
        return self._table(self.connection.change_table, self.connection.change_number_column)

    def _table(self, logical_name: str, number_column: str) -> TableInfo:
        with self._tables_lock:
            known = self._tables.get(logical_name)
        if known is not None:
            return known
        what = f"EntityDefinitions(LogicalName='{logical_name}')"
        try:
            body = self._json(
                "GET",
                what,
                params={
                    "$select": "LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,"
                    "ChangeTrackingEnabled",
                    "$expand": "Attributes($select=LogicalName)",
                },
                what=f"table {logical_name}",
            )
        except ItsmRejectedError as exc:
            if exc.status == 404:
                raise ItsmRejectedError(
                    f"table {logical_name!r} does not exist in the Dataverse environment of connection "
                    f"{self.connection_name!r} (EntityDefinitions): check the table's logical name",
                    status=404,
                ) from exc
            raise
        table = _table_info(body, logical_name, number_column, self.connection.correlation_column)
        missing = table.missing_columns()
        if missing:
            raise ItsmRejectedError(
                f"table {logical_name!r} of connection {self.connection_name!r} has no column "
                f"{', '.join(repr(name) for name in missing)} (EntityDefinitions): check the column names"
            )
        with self._tables_lock:
            self._tables[logical_name] = table
        return table

    # -- records ------------------------------------------------------------------------------------

    def _read(self, table: TableInfo, record: str, *, missing_ok: bool = False) -> Mapping[str, Any] | None:
        path = f"{table.entity_set}({_guid(record)})"
        try:
            return self._json(
                "GET",
                path,
                params={"$select": f"{table.primary_id},{table.number},statecode"},
                what=f"GET {table.entity_set}",
            )
        except ItsmRejectedError as exc:
            if missing_ok and exc.status == 404:
                return None
            raise

    def _state(self, table: TableInfo, record: str) -> WorkItemState:
        row = self._read(table, record)
        assert row is not None
        try:
            return work_item_state(table, row)
        except ValueError as exc:
            raise ItsmUnavailableError(f"GET {table.entity_set}: {exc}") from None

    def _patch(self, table: TableInfo, record: str, fields: JsonBody) -> None:
        self._json(
            "PATCH",
            f"{table.entity_set}({_guid(record)})",
            json=fields,
            headers={"If-Match": "*"},  # update only: never create a record that was deleted
            what=f"PATCH {table.entity_set}",
        )

    def _note(self, table: TableInfo, record: str, text: str) -> None:
        """An annotation with an id of its own: after an ambiguous failure, it is read back first;
        a repeated create is refused as a duplicate, never written twice."""
        body = note_fields(table, _guid(record), text)
        annotation = note_id(_guid(record), text)
        for _ in range(2):
            try:
                response = self._call("POST", ANNOTATION_SET, json=body, idempotent=False)
            except ItsmUnavailableError:
                if self._note_exists(annotation):
                    return
                continue
            if response.status_code == 412 and DUPLICATE_KEY in _error_code(response):
                return  # written before (an earlier attempt or delivery): nothing to add
            self._body(response, f"POST {ANNOTATION_SET}")
            return
        raise ItsmUnavailableError(f"POST {ANNOTATION_SET} failed twice without landing")

    def _note_exists(self, annotation: str) -> bool:
        try:
            self._json(
                "GET",
                f"{ANNOTATION_SET}({annotation})",
                params={"$select": "annotationid"},
                what=f"GET {ANNOTATION_SET}",
            )
        except ItsmRejectedError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _list(
        self, table: TableInfo, params: Mapping[str, str], *, page_size: int
    ) -> tuple[list[Mapping[str, Any]], bool]:
        """One page of a query: its rows, and whether Dataverse has more (``@odata.nextLink``)."""
        body = self._json(
            "GET",
            table.entity_set,
            params=params,
            prefer=f"{FORMATTED_VALUES},odata.maxpagesize={page_size}",
            what=f"GET {table.entity_set}",
        )
        rows = body.get("value")
        if not isinstance(rows, list) or not all(
            type(row) is dict or isinstance(row, Mapping)
            for row in rows  # dict first: no ABC check
        ):
            raise ItsmUnavailableError(f"GET {table.entity_set}: Dataverse answered without a value list")
        return rows, isinstance(body.get("@odata.nextLink"), str)

    def _page(
        self,
        item_type: WorkItemType,
        table: TableInfo,
        cursor: SyncCursor,
        rows: Sequence[Mapping[str, Any]],
        *,
        is_last: bool,
    ) -> SyncPage:
        items: list[WorkItem] = []
        rejected: list[RejectedRow] = []
        for row in rows:
            try:
                items.append(row_to_work_item(self.connection_name, item_type, table, row))
            except ValueError as exc:
                rejected.append(RejectedRow(source_id=_row_id(table, row), error=str(exc)[:MAX_ERROR_TEXT]))
        position = next(filter(None, (_row_position(row) for row in reversed(rows))), cursor)
        if not is_last and position == cursor and rows:
            raise ItsmError(
                f"Dataverse {table.logical_name} rows of connection {self.connection_name!r} carry no "
                f"readable {MODIFIED}/{VERSION}, so the sync cannot move past them"
            )
        return SyncPage(items=items, rejected=rejected, next_cursor=position, is_last=is_last)

    def _ref(self, table: TableInfo, row: Mapping[str, Any]) -> WorkItemRef:
        record = row.get(table.primary_id)
        number = row.get(table.number)
        if not isinstance(record, str) or not record or not isinstance(number, str) or not number:
            raise ItsmUnavailableError(
                f"Dataverse answered without the {table.logical_name}'s {table.primary_id} and {table.number}"
            )
        link = (
            f"{self.connection.server_url}/main.aspx?etn={table.logical_name}&pagetype=entityrecord"
            f"&id={quote(record)}"
        )
        return WorkItemRef(id=record.lower(), number=number, url=link)

    # -- HTTP ---------------------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: JsonBody | None = None,
        prefer: str = "",
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
        what: str,
    ) -> dict[str, Any]:
        response = self._call(
            method, path, params=params, json=json, prefer=prefer, headers=headers, idempotent=idempotent
        )
        return self._body(response, what)

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: JsonBody | None = None,
        prefer: str = "",
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """One logical call after bounded retries; the caller maps the answer (``_body``)."""
        url = self._base + path
        sent = dict(_BASE_HEADERS)
        if prefer:
            sent["Prefer"] = prefer
        if headers:
            sent.update(headers)

        def build() -> httpx.Request:
            return self._client.build_request(method, url, params=params, json=json, headers=sent)

        with self._slots:
            return send_with_retries(self._client, build, self._retry, auth=self._auth, idempotent=idempotent)

    def _body(self, response: httpx.Response, what: str) -> dict[str, Any]:
        status = response.status_code
        refuse_unauthorised_or_redirected(
            response,
            product="Dataverse",
            what=what,
            connection=self.connection_name,
            refused="the token",
            advice="check the application user, then re-authorise the connection",
            url="environment URL",
        )
        if status >= 400:
            raise ItsmRejectedError(
                f"Dataverse rejected {what} (HTTP {status}): {_product_error(response)}", status=status
            )
        if status == 204 or not response.content:
            return {}
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise not_json(response, product="Dataverse", what=what, guess="a proxy's or a sign-in page?")
        return body


def _table_info(
    body: Mapping[str, Any], logical_name: str, number_column: str, correlation: str
) -> TableInfo:
    names = {key: body.get(key) for key in ("EntitySetName", "PrimaryIdAttribute", "PrimaryNameAttribute")}
    if not all(isinstance(value, str) and value for value in names.values()):
        raise ItsmUnavailableError(
            f"EntityDefinitions of {logical_name!r}: Dataverse answered without its names"
        )
    attributes = body.get("Attributes")
    columns = frozenset(
        str(item.get("LogicalName"))
        for item in (attributes if isinstance(attributes, list) else [])
        if isinstance(item, Mapping) and item.get("LogicalName")
    )
    return TableInfo(
        logical_name=logical_name,
        entity_set=str(names["EntitySetName"]),
        primary_id=str(names["PrimaryIdAttribute"]),
        primary_name=str(names["PrimaryNameAttribute"]),
        columns=columns,
        change_tracking=body.get("ChangeTrackingEnabled") is True,
        number_column=number_column,
        correlation_column=correlation,
    )


def _guid(value: str) -> str:
    """A record id as it may appear in a URL: a GUID, nothing else (ids come from Dataverse or us)."""
    text = value.strip().lower()
    if len(text) != 36 or any(ch not in "0123456789abcdef-" for ch in text):
        raise ItsmRejectedError(f"{value[:60]!r} is not a Dataverse record id")
    return text


def _row_id(table: TableInfo, row: Mapping[str, Any]) -> str:
    for name in (table.primary_id, table.number):
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _row_position(row: Mapping[str, Any]) -> SyncCursor | None:
    """Where a row sits in the feed, or None if it cannot say (the cursor then stays where it was)."""
    try:
        updated = parse_datetime(row.get(MODIFIED), MODIFIED)
        version = row_version(row)
    except ValueError:
        return None
    if updated is None:
        return None
    return SyncCursor(updated_at=updated, last_id=version)


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def _product_error(response: httpx.Response) -> str:
    """Dataverse's own ``error.code: error.message``, shortened; never the request."""
    try:
        body = response.json()
    except ValueError:
        content_type = response.headers.get("Content-Type", "").split(";")[0] or "no content type"
        return f"no error details ({content_type})"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no error details"
    parts = [str(error.get(key) or "").strip() for key in ("code", "message")]
    text = ": ".join(part for part in parts if part) or "no error details"
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def as_of(value: datetime) -> str:
    """A date-time as an OData literal (whole seconds, UTC), as Dataverse keeps them."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
