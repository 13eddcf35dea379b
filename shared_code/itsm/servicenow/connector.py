"""ServiceNow behind the ITSM ports (incidents, change feed, CIs) over the Table API (``/api/now/table``).

Every method is one logical call: built by ``_send`` (JSON, ``Accept: application/json``), sent
through ``send_with_retries`` (bounded retries of transport errors, 408, 429 and 5xx), and mapped
to the ``ItsmError`` family:

    2xx                               the result
    401 (after the auth's one retry)  ItsmAuthError      the connection must be re-authorised
    3xx                               ItsmRejectedError  a redirect is a wrong URL or an SSO page
    other 4xx (400/403/404/409/422)   ItsmRejectedError  with the product's error message and detail
    5xx/408/429/timeouts, exhausted   ItsmUnavailableError (raised by send_with_retries)
    2xx that is not the JSON we asked ItsmUnavailableError (e.g. a hibernating instance's page)

Appending a journal entry (a work note: ``add_note``, and the note that ``resolve`` and ``reopen``
carry) is not idempotent, nor is a create: those are sent ``idempotent=False``, so an ambiguous
failure (read timeout, reset, 500/502/504) is never retried blindly. A note that carries a marker
(``domain.workitem.note_marker``) is then looked for in ``sys_journal_field``; found, the write
landed; not found, it is not sent again here (a slow instance may still commit it): the error
goes up, and the alert path's retry asks ``has_note`` before it writes. A create is looked up by
its correlation id, a new CI by its name.

A configuration item's sys_id is cached, and so, for a while (``CI_MISS_SECONDS``), is the
answer that there is none: an alert about a machine missing from the CMDB must not cost a
ServiceNow round trip before every create.

Timeouts come from the injected client (the constructor refuses a client without them), so no
call here can hang a worker. The connector never closes a client it was given, unless told it owns it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import quote

import httpx

from shared_code.domain.sync import MappedRows, RejectedRow, SyncCursor, SyncPage
from shared_code.domain.workitem import (
    IncidentDraft,
    WorkItem,
    WorkItemRef,
    WorkItemState,
    WorkItemType,
    marker_in,
)
from shared_code.errors import ItsmError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy, not_json, refuse_unauthorised_or_redirected, send_with_retries
from shared_code.itsm.recovery import landed_create
from shared_code.itsm.servicenow.mapping import (
    CI_CREATE_TABLE,
    CI_TABLE,
    INCIDENT_TABLE,
    JOURNAL_TABLE,
    SYNC_FIELDS,
    TABLES,
    Fields,
    draft_to_incident_fields,
    feed_fields,
    field_value,
    fields_id,
    fields_position,
    fields_to_work_item,
    incident_state_to_lifecycle,
    row_fields,
    row_id,
    row_position,
)
from shared_code.itsm.servicenow.query import Query

log = logging.getLogger(__name__)
_V = TypeVar("_V")

TABLE_API = "/api/now/table"
MAX_ERROR_TEXT = 300
CI_CACHE_SIZE = 1024
CI_MISS_SECONDS = 300.0
"""How long "no such configuration item" is believed (a CI added to the CMDB meanwhile is linked
to the incidents created after that)."""


class ServiceNowConnector:
    """One ServiceNow connection. Thread-safe: it keeps only a CI cache besides its settings."""

    def __init__(
        self,
        connection_name: str,
        instance_url: str,
        client: httpx.Client,
        auth: httpx.Auth,
        *,
        retry: RetryPolicy | None = None,
        resolved_state: str = "6",
        close_code: str = "Solved (Permanently)",
        reopen_state: str = "2",
        owns_client: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        timeout = client.timeout
        if timeout.connect is None or timeout.read is None:
            raise ValueError("the HTTP client for ServiceNow needs explicit connect and read timeouts")
        self.connection_name = connection_name
        self._instance = instance_url.rstrip("/")
        self._client = client
        self._auth = auth
        self._retry = retry or RetryPolicy()
        self._resolved_state = resolved_state
        self._close_code = close_code
        self._reopen_state = reopen_state
        self._owns_client = owns_client
        self._ci_cache: dict[str, str] = {}
        self._ci_missing: dict[str, float] = {}
        """Names looked up and not found, with when that answer expires (``monotonic`` seconds)."""
        self._monotonic = monotonic
        self._ci_lock = threading.Lock()
        self._ci_create_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ServiceNowConnector(connection={self.connection_name!r}, instance={self._instance!r})"

    # -- the port ---------------------------------------------------------------------------------

    def check(self) -> str:
        """One authenticated read of one incident id: proves URL, credentials and the incident ACL."""
        self._list(INCIDENT_TABLE, None, ["sys_id"], 1, display_values=False)
        host = httpx.URL(self._instance).host
        user = getattr(self._auth, "username", None)
        who = f" as {user!r}" if user else ""
        return f"ServiceNow instance {host} answered{who}: the incident table is readable"

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        ci_sys_id: str | None = None
        if draft.configuration_item:
            ci_sys_id = self.ensure_configuration_item(
                draft.configuration_item, create=draft.create_configuration_item
            )
        fields = draft_to_incident_fields(draft, ci_sys_id)
        try:
            body = self._send(
                "POST",
                INCIDENT_TABLE,
                params={"sysparm_fields": "sys_id,number", "sysparm_exclude_reference_link": "true"},
                json=fields,
                idempotent=False,
            )
        except ItsmUnavailableError:
            # the instance may have created it before the answer was lost: look before giving up
            found = landed_create(self.find_by_correlation, draft.correlation_id, self.connection_name)
            if found is None:
                raise
            return found
        return self._ref(_result_object(body, "POST incident"))

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        if not correlation_id.strip():
            return None  # an empty value would match every incident without a correlation id
        # open ones only: a create being recovered is seconds old, and an old resolved incident with
        # the same id (state tables recreated, generations counted again) must not be taken over
        query = self._query(
            lambda q: (
                q.eq("correlation_id", correlation_id).eq("active", "true").order_by_desc("sys_created_on")
            )
        )
        rows = self._list(INCIDENT_TABLE, query, ["sys_id", "number"], 1, display_values=False)
        return self._ref(rows[0]) if rows else None

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        self._write_note(ref, {"work_notes": text}, "the note")

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        """One PATCH: state, resolution code and notes, and the work note (one write, one audit entry)."""
        self._write_note(
            ref,
            {
                "state": self._resolved_state,
                "close_code": self._close_code,
                "close_notes": note,
                "work_notes": note,
            },
            "the resolution",
        )

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        self._write_note(ref, {"state": self._reopen_state, "work_notes": note}, "the reopening")

    def has_note(self, ref: WorkItemRef, marker: str) -> bool:
        """Whether a work note of the incident carries ``marker`` (read from ``sys_journal_field``)."""
        query = self._query(
            lambda q: q.eq("element_id", ref.id).eq("element", "work_notes").like("value", marker)
        )
        rows = self._list(JOURNAL_TABLE, query, ["sys_id", "value"], 1, display_values=False)
        return any(marker in field_value(row, "value") for row in rows)

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        body = self._send(
            "GET",
            INCIDENT_TABLE,
            sys_id=ref.id,
            params={"sysparm_fields": "state", "sysparm_exclude_reference_link": "true"},
        )
        state = field_value(_result_object(body, "GET incident"), "state")
        if state and state == self._resolved_state:
            return WorkItemState.RESOLVED
        return incident_state_to_lifecycle(state)

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        """The CI's sys_id (created when allowed), or None: the incident is then created without one.

        A name that cannot be put in a query (a line break, a leading ``javascript:``) comes from the
        alert, so it must not fail every delivery of that problem: it gives None and a warning.
        """
        name = name.strip()
        if not name:
            return None
        with self._ci_lock:
            cached = self._ci_cache.get(name)
            missing_until = self._ci_missing.get(name)
        if cached is not None:
            return cached
        if not create and missing_until is not None and self._monotonic() < missing_until:
            return None
        try:
            lookup = Query().eq("name", name).encode()
        except ValueError as exc:
            log.warning(
                "connection %r: configuration item %r cannot be looked up in ServiceNow (%s); "
                "the incident is created without a configuration item",
                self.connection_name,
                name[:200],
                exc,
            )
            return None
        sys_id = self._lookup_ci(name, lookup)
        if sys_id is None and create:
            with self._ci_create_lock:  # two alerts for a new CI must not create it twice
                sys_id = self._lookup_ci(name, lookup)
                if sys_id is None:
                    sys_id = self._create_ci(name, lookup)
        with self._ci_lock:
            if sys_id is not None:
                self._ci_missing.pop(name, None)
                _bounded_put(self._ci_cache, name, sys_id)
            else:
                _bounded_put(self._ci_missing, name, self._monotonic() + CI_MISS_SECONDS)
        return sys_id

    def _create_ci(self, name: str, lookup: str) -> str | None:
        """POST the CI; a create whose answer was lost is looked up by name, never sent twice."""
        try:
            body = self._send(
                "POST",
                CI_CREATE_TABLE,
                params={"sysparm_fields": "sys_id", "sysparm_exclude_reference_link": "true"},
                json={"name": name},
                idempotent=False,
            )
        except ItsmUnavailableError:
            found = self._lookup_ci(name, lookup)
            if found is None:
                raise
            return found
        sys_id = field_value(_result_object(body, f"POST {CI_CREATE_TABLE}"), "sys_id") or None
        log.info("created configuration item %r in %s", name, CI_CREATE_TABLE)
        return sys_id

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        """Keyset paging on (sys_updated_on, sys_id): stable while rows change underneath.

        With a ``last_id`` the rest of that second is drained first (``sys_updated_on=T^sys_id>ID``);
        whatever room the page has left is filled from ``sys_updated_on>T``. The page is the last
        only when that second query came back short, so a short drain never ends the feed.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        table = TABLES[item_type]
        at = cursor.updated_at
        rows: Sequence[_FeedRow] = []
        if cursor.last_id:
            drain = self._query(
                lambda q: q.eq("sys_updated_on", at).gt("sys_id", cursor.last_id).order_by("sys_id")
            )
            rows = self._feed(item_type, table, drain, page_size)
            if len(rows) >= page_size:
                return self._page(item_type, cursor, rows, is_last=False)
        room = page_size - len(rows)
        after = self._query(
            lambda q: q.gt("sys_updated_on", at).order_by("sys_updated_on").order_by("sys_id")
        )
        more = self._feed(item_type, table, after, room)
        return self._page(item_type, cursor, [*rows, *more], is_last=len(more) < room)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- helpers ----------------------------------------------------------------------------------

    def _feed(self, item_type: WorkItemType, table: str, query: str, limit: int) -> Sequence[_FeedRow]:
        """One page of the change feed. A regular answer is read straight into ``Fields`` (see
        ``feed_fields``); anything else is parsed as JSON and read row by row, where a row that
        cannot be read is kept as rejected, with its position if it has one."""
        params = _list_params(SYNC_FIELDS[item_type], limit, query, display_values=True)
        what = f"GET {table}"
        response = self._answer("GET", f"{TABLE_API}/{table}", what=what, params=params)
        regular = feed_fields(item_type, response.content)
        if regular is not None:
            return regular
        log.debug("ServiceNow %s: an irregular answer, read row by row", what)
        rows: list[_FeedRow] = []
        body = {} if _without_body(response) else self._json_object(response, what)
        for row in _result_rows(body, what):
            try:
                rows.append(row_fields(item_type, row))
            except ValueError as exc:
                rejected = RejectedRow(source_id=row_id(row), error=str(exc)[:MAX_ERROR_TEXT])
                rows.append(_Unreadable(rejected, row_position(row)))
        return rows

    def _page(
        self, item_type: WorkItemType, cursor: SyncCursor, rows: Sequence[_FeedRow], *, is_last: bool
    ) -> SyncPage:
        """The page's position now, read from its last rows; its rows become work items when the
        engine first reads them (after it asked for the next page, when there is one to ask for)."""
        # the page ends at its last row that can say where it sits (the rows come in feed order)
        position = next(filter(None, map(_feed_position, reversed(rows))), cursor)
        if not is_last and position == cursor and rows:
            raise ItsmError(
                f"ServiceNow {TABLES[item_type]} rows of connection {self.connection_name!r} carry no "
                "readable sys_updated_on/sys_id, so the sync cannot move past them",
            )
        connection = self.connection_name

        def build() -> MappedRows:
            items: list[WorkItem] = []
            rejected: list[RejectedRow] = []
            for row in rows:
                if type(row) is _Unreadable:
                    rejected.append(row.rejected)
                    continue
                fields = cast(Fields, row)
                source_id = fields_id(fields)
                try:
                    items.append(fields_to_work_item(connection, item_type, fields))
                except ValueError as exc:
                    rejected.append(RejectedRow(source_id=source_id, error=str(exc)[:MAX_ERROR_TEXT]))
            return items, rejected

        return SyncPage.deferred(next_cursor=position, is_last=is_last, build=build)

    def _lookup_ci(self, name: str, query: str) -> str | None:
        """The sys_id of the CI named ``name``; the row's own name is checked, because an instance
        drops a condition it cannot evaluate and then answers with any row at all."""
        rows = self._list(CI_TABLE, query, ["sys_id", "name"], 1, display_values=False)
        if not rows:
            return None
        found = field_value(rows[0], "name").strip()
        if found.lower() != name.lower():
            log.warning(
                "connection %r: ServiceNow answered the lookup of configuration item %r with one named "
                "%r: not using it",
                self.connection_name,
                name[:200],
                found[:200],
            )
            return None
        return field_value(rows[0], "sys_id") or None

    def _write_note(self, ref: WorkItemRef, fields: dict[str, str], what: str) -> None:
        """One PATCH that appends a work note: never repeated after an ambiguous failure. With a
        marker in the note, a lost answer is checked in the journal (found: done)."""
        try:
            self._patch(ref, fields, idempotent=False)
        except ItsmUnavailableError as exc:
            marker = marker_in(fields["work_notes"])
            if marker is None:
                raise
            try:
                landed = self.has_note(ref, marker)
            except ItsmError:
                landed = False  # cannot tell: the failure goes up, and the retry asks again
            if not landed:
                raise
            log.warning(
                "connection %r: %s of %s failed in transit (%s) but was saved: not sending it again",
                self.connection_name,
                what,
                ref.number,
                exc,
            )

    def _patch(self, ref: WorkItemRef, fields: dict[str, str], *, idempotent: bool = True) -> None:
        self._send(
            "PATCH",
            INCIDENT_TABLE,
            sys_id=ref.id,
            params={"sysparm_fields": "sys_id", "sysparm_exclude_reference_link": "true"},
            json=fields,
            idempotent=idempotent,
        )

    def _query(self, build: Callable[[Query], Query]) -> str:
        """Run a query builder; a value that cannot be encoded is the caller's data, so rejected."""
        try:
            query = build(Query())
        except ValueError as exc:
            raise ItsmRejectedError(f"cannot query ServiceNow for that value: {exc}") from None
        return query.encode()

    def _list(
        self,
        table: str,
        query: str | None,
        fields: Sequence[str],
        limit: int,
        *,
        display_values: bool = True,
    ) -> list[Mapping[str, Any]]:
        params = _list_params(fields, limit, query, display_values=display_values)
        body = self._send("GET", table, params=params)
        return _result_rows(body, f"GET {table}")

    def _send(
        self,
        method: str,
        table: str,
        *,
        sys_id: str | None = None,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        path: str | None = None,
    ) -> dict[str, Any]:
        """One call to the Table API (``table``), or to another REST API at ``path`` (then ``table``
        only names the call in errors)."""
        if path is None:
            path = f"{TABLE_API}/{table}" + (f"/{quote(sys_id, safe='')}" if sys_id is not None else "")
        return self.send_api(
            method,
            path,
            what=f"{method} {table}",
            params=params,
            json=json,
            idempotent=idempotent,
            names_record=sys_id is not None,
        )

    def send_api(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        names_record: bool = False,
    ) -> dict[str, Any]:
        """One call to a REST API of the instance (``path`` from ``/api/...``), retried and mapped
        to the ``ItsmError`` family as the module docstring says; the JSON object it answered.
        ``names_record``: the path ends in a record's sys_id (logged as ``<sys_id>``)."""
        response = self._answer(
            method,
            path,
            what=what,
            params=params,
            json=json,
            idempotent=idempotent,
            names_record=names_record,
        )
        if _without_body(response):
            return {}
        return self._json_object(response, what)

    def _answer(
        self,
        method: str,
        path: str,
        *,
        what: str,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
        idempotent: bool = True,
        names_record: bool = False,
    ) -> httpx.Response:
        """``send_api``'s call and status checks, the answer not read yet."""
        url = self._instance + path
        headers = {"Accept": "application/json"}

        def build() -> httpx.Request:
            return self._client.build_request(method, url, params=params, json=json, headers=headers)

        response = send_with_retries(self._client, build, self._retry, auth=self._auth, idempotent=idempotent)
        status = response.status_code
        log.info("ServiceNow %s%s: HTTP %d", what, "/<sys_id>" if names_record else "", status)
        refuse_unauthorised_or_redirected(
            response, product="ServiceNow", what=what, connection=self.connection_name, url="instance URL"
        )
        if status >= 400:
            raise ItsmRejectedError(
                f"ServiceNow rejected {what} (HTTP {status}): {_product_error(response)}", status=status
            )
        return response

    @staticmethod
    def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
        """The JSON object of an answer; anything else (a login or hibernation page) is unavailable."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise not_json(
                response,
                product="ServiceNow",
                what=what,
                guess="is the instance hibernating or behind a login page?",
            )
        return body

    def _ref(self, row: Mapping[str, Any]) -> WorkItemRef:
        sys_id, number = field_value(row, "sys_id"), field_value(row, "number")
        if not sys_id or not number:
            raise ItsmUnavailableError("ServiceNow answered without the incident's sys_id and number")
        return WorkItemRef(
            id=sys_id, number=number, url=f"{self._instance}/nav_to.do?uri=incident.do?sys_id={sys_id}"
        )


def _bounded_put(cache: dict[str, _V], key: str, value: _V) -> None:
    """Insert into a dict used as a bounded cache: the oldest entry goes when it is full."""
    cache.pop(key, None)
    if len(cache) >= CI_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def _result_object(body: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    result = body.get("result")
    if not isinstance(result, Mapping):
        raise ItsmUnavailableError(f"{what}: ServiceNow answered without a result object")
    return result


@dataclass(frozen=True)
class _Unreadable:
    """A feed row that could not be read into ``Fields``: rejected, and where it sits if it says."""

    rejected: RejectedRow
    position: SyncCursor | None


_FeedRow = Fields | _Unreadable


def _feed_position(row: _FeedRow) -> SyncCursor | None:
    return row.position if type(row) is _Unreadable else fields_position(cast(Fields, row))


def _without_body(response: httpx.Response) -> bool:
    return response.status_code == 204 or not response.content


def _list_params(
    fields: Sequence[str], limit: int, query: str | None, *, display_values: bool
) -> dict[str, str]:
    params = {
        "sysparm_limit": str(limit),
        "sysparm_fields": ",".join(fields),
        "sysparm_exclude_reference_link": "true",
        "sysparm_no_count": "true",
    }
    if display_values:
        params["sysparm_display_value"] = "all"
    if query:
        params["sysparm_query"] = query
    return params


def _result_rows(body: Mapping[str, Any], what: str) -> list[Mapping[str, Any]]:
    result = body.get("result")
    if not isinstance(result, list) or not all(isinstance(row, Mapping) for row in result):
        raise ItsmUnavailableError(f"{what}: ServiceNow answered without a result list")
    return result


def _product_error(response: httpx.Response) -> str:
    """ServiceNow's own ``error.message: error.detail``, shortened; never the request."""
    try:
        body = response.json()
    except ValueError:
        return "no error details"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no error details"
    parts = [str(error.get(key) or "").strip() for key in ("message", "detail")]
    text = ": ".join(part for part in parts if part) or "no error details"
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"
