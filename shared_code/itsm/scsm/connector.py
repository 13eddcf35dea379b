"""System Center Service Manager behind the ITSM ports, through the Cireson Portal API.

SCSM has no REST API of its own; the Cireson portal in front of it has one (``/api/V3``):

    incidents   ``GET Projection/CreateProjectionByTemplate`` (the connection's incident template,
                as the integration user), filled from the draft and saved with ``POST
                Projection/Commit`` (``original`` null: a new object)
    notes       an analyst comment appended to the action log (``AppliesToTroubleTicket``) and
                saved with ``Commit`` (``original``: the incident as read, ``current``: with the
                entry); resolve and reopen change ``Status`` in the same commit
    reads       ``POST Projection/GetProjectionByCriteria`` (type projection + SCSM criteria)
    the sync    the same, on ``LastModified`` windows (the endpoint has no paging of its own)
    CIs         looked up by display name in ``System.ConfigItem.Projection``; never created

Every HTTP call goes through ``send_with_retries`` (bounded retries of transport errors, 408, 429
and 5xx) and ends in the ``ItsmError`` family:

    2xx JSON of the expected shape        the result
    Commit answered ``"success": false``  ItsmRejectedError with the portal's exception text
    401 (after the auth's one retry)      ItsmAuthError       the connection must be re-authorised
    3xx                                   ItsmRejectedError   a redirect is a wrong URL or an SSO page
    other 4xx                             ItsmRejectedError   with the portal's error message
    5xx/408/429/timeouts, exhausted       ItsmUnavailableError (raised by send_with_retries)
    2xx that is not the JSON expected     ItsmUnavailableError (an HTML page of a proxy, say)

Writes are not repeated blindly. A commit is not idempotent: after an ambiguous failure (a timeout,
a dropped connection) the incident is read again and the write counts as done when its action-log
entry is there (entries carry an id derived from the work item and the text, so a delivery retried
later finds its earlier note too). A create that failed that way is looked up by its correlation id.
A commit refused because someone else changed the incident since it was read (the portal's
concurrency check) is read again and tried again, at most ``WRITE_ATTEMPTS`` times.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from shared_code.domain.sync import RejectedRow, SyncCursor, SyncPage
from shared_code.domain.workitem import IncidentDraft, WorkItem, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import ItsmError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy, not_json, refuse_unauthorised_or_redirected, send_with_retries
from shared_code.itsm.recovery import landed_create
from shared_code.itsm.scsm import criteria
from shared_code.itsm.scsm.mapping import (
    BASE_ID,
    CONFIG_ITEM_PROJECTION,
    INCIDENT_ACTIVE,
    INCIDENT_CLASS,
    INCIDENT_CLOSED,
    INCIDENT_RESOLVED,
    LAST_MODIFIED,
    NUMBER,
    OBJECT_ACTIVE,
    WORK_ITEM_CLASS,
    correlation_of,
    draft_to_incident,
    enum_id,
    has_note,
    incident_state,
    like_pattern,
    note_entry,
    note_id,
    parse_datetime,
    position_of,
    row_to_work_item,
    text_of,
)
from shared_code.itsm.scsm.settings import ScsmConnection

log = logging.getLogger(__name__)

API = "/api/V3"
BY_CRITERIA = f"{API}/Projection/GetProjectionByCriteria"
COMMIT = f"{API}/Projection/Commit"
FROM_TEMPLATE = f"{API}/Projection/CreateProjectionByTemplate"
USER_LIST = f"{API}/User/GetUserList"

MAX_ERROR_TEXT = 300
CI_CACHE_SIZE = 1024
WRITE_ATTEMPTS = 3

# the sync's LastModified windows: sized from the rate of changes seen so far, so one query brings
# about WINDOW_TARGET of the room left in a page; a page counts as full once PAGE_FILL of it is there
ONE_MS = timedelta(milliseconds=1)
INITIAL_WINDOW = timedelta(days=1)
MIN_WINDOW = timedelta(seconds=1)
MAX_WINDOW = timedelta(days=30)
WINDOW_TARGET = 0.9
PAGE_FILL = 0.8
MAX_QUERIES_PER_PAGE = 64


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Refused(ItsmRejectedError):
    """Commit answered ``"success": false`` (raised inside this module, caught by the writers)."""


class ScsmConnector:
    """One SCSM connection. Thread-safe: it keeps only caches (CIs, the creating user, window rates)."""

    def __init__(
        self,
        connection: ScsmConnection,
        client: httpx.Client,
        auth: httpx.Auth,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
        owns_client: bool = False,
    ) -> None:
        timeout = client.timeout
        if timeout.connect is None or timeout.read is None:
            raise ValueError(
                "the HTTP client for the Cireson portal needs explicit connect and read timeouts"
            )
        self.connection_name = connection.name
        self._settings = connection
        self._portal = connection.server_url.rstrip("/")
        self._client = client
        self._auth = auth
        self._retry = retry or RetryPolicy()
        self._clock = clock
        self._owns_client = owns_client
        self._projections: dict[WorkItemType, str] = {
            WorkItemType.INCIDENT: connection.incident_projection_id,
            WorkItemType.CHANGE_REQUEST: connection.change_projection_id,
        }
        self._lock = threading.Lock()
        self._creator: str | None = connection.created_by_id or None
        self._ci_cache: dict[str, str] = {}
        self._rates: dict[WorkItemType, float] = {}

    def __repr__(self) -> str:
        return f"ScsmConnector(connection={self.connection_name!r}, portal={self._portal!r})"

    # -- the ports ----------------------------------------------------------------------------------

    def check(self) -> str:
        """The sign-in, the creating user, the incident template and one incident query."""
        creator = self._creating_user()
        template = self._template(creator)
        self._query(
            WorkItemType.INCIDENT,
            criteria.simple(criteria.generic(LAST_MODIFIED), "Greater", self._clock()),
        )
        host = httpx.URL(self._portal).host
        name = (
            text_of(template, "DisplayName")
            or text_of(template, "Title")
            or self._settings.incident_template_id
        )
        return (
            f"Cireson portal {host} answered as {self._settings.username!r} (SCSM user {creator}): "
            f"incident template {name!r} readable, incidents queryable"
        )

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        ci: dict[str, Any] | None = None
        if draft.configuration_item:
            ci_id = self.ensure_configuration_item(draft.configuration_item, create=False)
            if ci_id is not None:
                ci = {BASE_ID: ci_id, "DisplayName": draft.configuration_item.strip()}
        template = self._template(self._creating_user())
        try:
            current = draft_to_incident(template, draft, ci)
        except ValueError as exc:
            raise ItsmRejectedError(f"cannot make an SCSM incident of this alert: {exc}") from None
        try:
            answer = self._commit(None, current, "the new incident")
        except ItsmUnavailableError:
            # the portal may have saved it before the answer was lost: look before giving up
            found = landed_create(self.find_by_correlation, draft.correlation_id, self.connection_name)
            if found is None:
                raise
            return found
        base_id = answer.get(BASE_ID)
        if not isinstance(base_id, str) or not base_id.strip():
            raise ItsmUnavailableError("Commit answered success without the new incident's BaseId")
        row = self._read(WorkItemType.INCIDENT, base_id.strip())
        if row is None:
            raise ItsmUnavailableError(f"the new incident {base_id} cannot be read back from the portal")
        return self._ref(row)

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        """The newest open incident whose description carries ``correlation_id``'s marker line."""
        if not correlation_id.strip():
            return None
        try:
            pattern = like_pattern(correlation_id)
        except ValueError as exc:
            raise ItsmRejectedError(
                f"cannot look an SCSM incident up by that correlation id: {exc}"
            ) from None
        status = criteria.prop(INCIDENT_CLASS, "Status")
        rows = self._query(
            WorkItemType.INCIDENT,
            criteria.all_of(
                criteria.simple(criteria.prop(WORK_ITEM_CLASS, "Description"), "Like", pattern),
                criteria.simple(status, "NotEqual", INCIDENT_RESOLVED),
                criteria.simple(status, "NotEqual", INCIDENT_CLOSED),
            ),
        )
        # the criteria narrowed it down; the row itself decides (a Like can match more than meant)
        mine = [
            row
            for row in rows
            if correlation_of(text_of(row, "Description")) == correlation_id
            and incident_state(enum_id(row, "Status")) is WorkItemState.OPEN
        ]
        if not mine:
            return None
        newest = max(mine, key=_created)
        return self._ref(newest)

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        entry = note_id(ref.id, "note", text)

        def change(row: dict[str, Any], now: datetime) -> dict[str, Any]:
            return self._with_note(row, entry, text, now)

        self._write(ref, lambda row: has_note(row, entry), change, "a note")

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        """One commit: status Resolved, the resolution description (and category) and the note."""
        entry = note_id(ref.id, "resolve", note)
        category = self._settings.resolution_category_id

        def change(row: dict[str, Any], now: datetime) -> dict[str, Any]:
            current = self._with_note(row, entry, note, now)
            current["Status"] = {"Id": INCIDENT_RESOLVED, "Name": "Resolved"}
            current["ResolutionDescription"] = note[:4000]
            current["ResolvedDate"] = criteria.format_datetime(now)
            if category:
                current["ResolutionCategory"] = {"Id": category}
            return current

        def landed(row: Mapping[str, Any]) -> bool:
            return has_note(row, entry) and enum_id(row, "Status") == INCIDENT_RESOLVED

        self._write(ref, landed, change, "the resolution")

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        """Back to Active, the resolution cleared (as the portal's own Reactivate does), and the note."""
        entry = note_id(ref.id, "reopen", note)

        def change(row: dict[str, Any], now: datetime) -> dict[str, Any]:
            current = self._with_note(row, entry, note, now)
            current["Status"] = {"Id": INCIDENT_ACTIVE, "Name": "Active"}
            current["ResolutionCategory"] = {"Id": None, "Name": None}
            current["ResolutionDescription"] = None
            current["ResolvedDate"] = None
            return current

        def landed(row: Mapping[str, Any]) -> bool:
            return has_note(row, entry) and incident_state(enum_id(row, "Status")) is WorkItemState.OPEN

        self._write(ref, landed, change, "the reactivation")

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        return incident_state(enum_id(self._existing(ref), "Status"))

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        """The BaseId of the active CI displayed as ``name``, or None (then no CI is linked).

        SCSM's CIs come from its own connectors (AD, Configuration Manager, Operations Manager), so
        a missing one is never created here. A name that cannot be put into criteria comes from the
        alert, so it must not fail every delivery of that problem: it gives None and a warning.
        """
        name = name.strip()
        if not name:
            return None
        with self._lock:
            cached = self._ci_cache.get(name.lower())
        if cached is not None:
            return cached
        try:
            expression = criteria.simple(criteria.generic("DisplayName"), "Equal", name)
        except ValueError as exc:
            log.warning(
                "connection %r: configuration item %r cannot be looked up in SCSM (%s); "
                "the incident is created without one",
                self.connection_name,
                name[:200],
                exc,
            )
            return None
        rows = self._rows(CONFIG_ITEM_PROJECTION, expression, "configuration items")
        found = next(
            (
                text_of(row, BASE_ID).strip().lower()
                for row in rows
                if text_of(row, "DisplayName").strip().lower() == name.lower()
                and enum_id(row, "ObjectStatus") in ("", OBJECT_ACTIVE)
                and text_of(row, BASE_ID).strip()
            ),
            None,
        )
        if found is None:
            if create:
                log.info(
                    "connection %r: SCSM has no CI %r, and SCSM CIs are not created",
                    self.connection_name,
                    name,
                )
            return None
        with self._lock:
            if len(self._ci_cache) >= CI_CACHE_SIZE:
                self._ci_cache.pop(next(iter(self._ci_cache)))
            self._ci_cache[name.lower()] = found
        return found

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        """Keyset paging on (LastModified, BaseId) over ``LastModified`` windows.

        ``GetProjectionByCriteria`` answers every match at once, so each query asks for a window
        ``lower < LastModified <= upper`` sized from the rate of changes seen so far to bring about
        ``WINDOW_TARGET`` of the room left in the page; the last window has no upper bound. Rows are
        ordered and filtered here (after the cursor), so a window that brought more than the page
        can hold ends the page at its last row, and the rest is read again by the next page: rows
        changed while paging are neither skipped nor doubled. A page that read whole windows ends
        at the window's upper bound, so empty stretches of the scope cost no page of their own.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        after = (cursor.updated_at, cursor.last_id.lower())
        lower = _floor_ms(cursor.updated_at) - ONE_MS
        rows: list[Mapping[str, Any]] = []
        with self._lock:
            rate = self._rates.get(item_type)
        window = INITIAL_WINDOW
        last_modified = criteria.generic(LAST_MODIFIED)
        for _ in range(MAX_QUERIES_PER_PAGE):
            room = page_size - len(rows)
            if rows and room <= page_size * (1 - PAGE_FILL):
                return self._page(item_type, cursor, rows, SyncCursor(updated_at=lower), is_last=False)
            if rate:
                window = timedelta(seconds=room * WINDOW_TARGET / rate)
            window = min(max(window, MIN_WINDOW), MAX_WINDOW)
            now = self._clock()
            upper: datetime | None = _floor_ms(lower + window)
            if upper is not None and upper >= now:
                upper = None  # the last window is open: whatever the portal's clock says, nothing is left out
            expression = criteria.simple(last_modified, "Greater", lower)
            if upper is not None:
                expression = criteria.all_of(expression, criteria.simple(last_modified, "LessEqual", upper))
            found = self._query(item_type, expression)
            placed: list[tuple[tuple[datetime, str], Mapping[str, Any]]] = []
            unplaced: list[Mapping[str, Any]] = []
            for row in found:
                where = position_of(row)
                if where is None:
                    unplaced.append(row)  # rejected by the mapping, with its id where it has one
                elif where > after:
                    placed.append((where, row))
            placed.sort(key=lambda pair: pair[0])
            span = ((upper or max(now, lower + MIN_WINDOW)) - lower).total_seconds()
            if placed:
                rate = len(placed) / max(span, 0.001)
            else:
                rate = None
                window *= 4
            with self._lock:
                if rate:
                    self._rates[item_type] = rate
            if len(placed) > room:
                # more than the page holds: it ends at its last row, the rest comes with the next page
                taken = [row for _, row in placed[:room]]
                return self._page(item_type, cursor, [*rows, *taken, *unplaced], None, is_last=False)
            rows.extend(row for _, row in placed)
            rows.extend(unplaced)
            if upper is None:
                return self._page(item_type, cursor, rows, None, is_last=True)
            lower = upper
        return self._page(item_type, cursor, rows, SyncCursor(updated_at=lower), is_last=False)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- writes -------------------------------------------------------------------------------------

    def _with_note(self, row: Mapping[str, Any], entry: str, text: str, now: datetime) -> dict[str, Any]:
        """A copy of ``row`` with the note appended to its action log; closed incidents are read-only."""
        if enum_id(row, "Status") == INCIDENT_CLOSED:
            raise ItsmRejectedError(
                f"SCSM incident {text_of(row, NUMBER)} is closed, and closed incidents are read-only",
                status=403,
            )
        current = copy.deepcopy(dict(row))
        log_entries = current.get("AppliesToTroubleTicket")
        entries = list(log_entries) if isinstance(log_entries, list) else []
        if not has_note(row, entry):  # the same note again (a status change after a reopen): once
            entries.append(note_entry(entry, text, self._settings.username, now))
        current["AppliesToTroubleTicket"] = entries
        return current

    def _write(
        self,
        ref: WorkItemRef,
        landed: Callable[[Mapping[str, Any]], bool],
        change: Callable[[dict[str, Any], datetime], dict[str, Any]],
        what: str,
    ) -> None:
        """Read, change, commit; done as soon as ``landed`` says the incident shows the change (its
        action-log entry, and the status it asked for)."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            row = self._existing(ref)
            if landed(row):
                if attempt > 1:
                    log.warning(
                        "%s of %s for connection %r had landed: not writing it again",
                        what,
                        ref.number,
                        self.connection_name,
                    )
                return
            current = change(row, self._clock())
            try:
                self._commit(row, current, f"{what} of {ref.number}")
                return
            except (ItsmUnavailableError, _Refused) as exc:
                # ambiguous or refused: find out what the portal holds now before anything else
                try:
                    fresh = self._existing(ref)
                except ItsmError:
                    raise exc from None
                if landed(fresh):
                    log.warning(
                        "%s of %s for connection %r failed in transit (%s) but had landed",
                        what,
                        ref.number,
                        self.connection_name,
                        type(exc).__name__,
                    )
                    return
                changed_meanwhile = text_of(fresh, LAST_MODIFIED) != text_of(row, LAST_MODIFIED)
                if isinstance(exc, _Refused) and not changed_meanwhile:
                    raise ItsmRejectedError(str(exc), status=exc.status) from None
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.info(
                    "%s of %s for connection %r did not land (%s): trying again",
                    what,
                    ref.number,
                    self.connection_name,
                    type(exc).__name__,
                )

    def _commit(
        self, original: Mapping[str, Any] | None, current: Mapping[str, Any], what: str
    ) -> dict[str, Any]:
        body = {"formJson": {"isDirty": True, "original": original, "current": current}}
        answer = self._send("POST", COMMIT, json=body, idempotent=False)
        if not isinstance(answer, dict) or not isinstance(answer.get("success"), bool):
            raise ItsmUnavailableError(f"Commit of {what}: the portal answered without a success flag")
        if not answer["success"]:
            detail = _clip(" ".join(str(answer.get("exception") or "no details").split()))
            raise _Refused(f"the Cireson portal refused to save {what}: {detail}")
        return answer

    # -- reads --------------------------------------------------------------------------------------

    def _existing(self, ref: WorkItemRef) -> dict[str, Any]:
        row = self._read(WorkItemType.INCIDENT, ref.id)
        if row is None:
            raise ItsmRejectedError(
                f"SCSM incident {ref.number} ({ref.id}) does not exist any more", status=404
            )
        return row

    def _read(self, item_type: WorkItemType, base_id: str) -> dict[str, Any] | None:
        try:
            expression = criteria.simple(criteria.generic("Id"), "Equal", base_id)
        except ValueError as exc:
            raise ItsmRejectedError(f"cannot read SCSM object {base_id[:60]!r}: {exc}") from None
        rows = self._query(item_type, expression)
        wanted = base_id.lower()
        for row in rows:
            if text_of(row, BASE_ID).strip().lower() == wanted:
                return dict(row)
        return None

    def _query(self, item_type: WorkItemType, expression: criteria.Expression) -> list[Mapping[str, Any]]:
        return self._rows(self._projections[item_type], expression, f"{item_type.sync_name}")

    def _rows(self, projection: str, expression: criteria.Expression, what: str) -> list[Mapping[str, Any]]:
        body = self._send("POST", BY_CRITERIA, json=criteria.query(projection, expression))
        if not isinstance(body, list) or not all(isinstance(row, Mapping) for row in body):
            raise ItsmUnavailableError(
                f"GetProjectionByCriteria ({what}): the portal answered without a list"
            )
        return body

    def _template(self, creator: str) -> dict[str, Any]:
        params = {"id": self._settings.incident_template_id, "createdById": creator}
        body = self._send("GET", FROM_TEMPLATE, params=params)
        if not isinstance(body, dict):
            raise ItsmUnavailableError("CreateProjectionByTemplate: the portal answered without an object")
        return body

    def _creating_user(self) -> str:
        """The BaseId of the integration account's user object: as configured, else looked up once."""
        with self._lock:
            if self._creator is not None:
                return self._creator
        account = self._settings.username.rsplit("\\", 1)[-1].split("@", 1)[0]
        params = {
            "userFilter": account,
            "filterByAnalyst": "false",
            "groupsOnly": "false",
            "maxNumberOfResults": "10",
        }
        body = self._send("GET", USER_LIST, params=params)
        if not isinstance(body, list):
            raise ItsmUnavailableError("GetUserList: the portal answered without a list")
        ids = sorted(
            {str(user.get("Id")).lower() for user in body if isinstance(user, Mapping) and user.get("Id")}
        )
        if len(ids) != 1:
            raise ItsmRejectedError(
                f"cannot tell which SCSM user is {self._settings.username!r}: the portal's user search for "
                f"{account!r} found {len(ids)}; set the user object's GUID with --created-by-id"
            )
        with self._lock:
            self._creator = ids[0]
        return ids[0]

    # -- HTTP ---------------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        idempotent: bool = True,
    ) -> Any:
        url = self._portal + path
        headers = {"Accept": "application/json"}

        def build() -> httpx.Request:
            return self._client.build_request(method, url, params=params, json=json, headers=headers)

        response = send_with_retries(self._client, build, self._retry, auth=self._auth, idempotent=idempotent)
        what = f"{method} {path}"
        status = response.status_code
        refuse_unauthorised_or_redirected(
            response,
            product="the Cireson portal",
            what=what,
            connection=self.connection_name,
            url="server URL",
        )
        if status >= 400:
            raise ItsmRejectedError(
                f"the Cireson portal rejected {what} (HTTP {status}): {_product_error(response)}",
                status=status,
            )
        try:
            return response.json()
        except ValueError:
            raise not_json(
                response,
                product="the Cireson portal",
                what=what,
                guess="an error or sign-in page of a proxy in front of it?",
            ) from None

    # -- helpers ------------------------------------------------------------------------------------

    def _ref(self, row: Mapping[str, Any]) -> WorkItemRef:
        base_id, number = text_of(row, BASE_ID).strip().lower(), text_of(row, NUMBER).strip()
        if not base_id or not number:
            raise ItsmUnavailableError("the portal answered an incident without its BaseId and Id")
        return WorkItemRef(id=base_id, number=number, url=f"{self._portal}/Incident/Edit/{number}")

    def _page(
        self,
        item_type: WorkItemType,
        cursor: SyncCursor,
        rows: Sequence[Mapping[str, Any]],
        boundary: SyncCursor | None,
        *,
        is_last: bool,
    ) -> SyncPage:
        """The page of ``rows`` (feed order); it ends at ``boundary`` when whole windows were read,
        else at its last row that can say where it sits."""
        items: list[WorkItem] = []
        rejected: list[RejectedRow] = []
        for row in rows:
            try:
                items.append(row_to_work_item(self.connection_name, item_type, row))
            except ValueError as exc:
                rejected.append(RejectedRow(source_id=_row_id(row), error=_clip(str(exc))))
        if boundary is not None:
            return SyncPage(items=items, rejected=rejected, next_cursor=boundary, is_last=is_last)
        last = next(filter(None, map(position_of, reversed(rows))), None)
        position = cursor if last is None else SyncCursor(updated_at=last[0], last_id=last[1])
        return SyncPage(
            items=items, rejected=rejected, next_cursor=max(position, cursor, key=_key), is_last=is_last
        )


def _key(cursor: SyncCursor) -> tuple[datetime, str]:
    return cursor.updated_at, cursor.last_id


def _floor_ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _created(row: Mapping[str, Any]) -> datetime:
    try:
        created = parse_datetime(row.get("CreatedDate"), "CreatedDate")
    except ValueError:
        created = None
    return created or datetime.min.replace(tzinfo=UTC)


def _row_id(row: Mapping[str, Any]) -> str:
    """The best id of a rejected row for the error log: BaseId, else its number, else nothing."""
    for name in (BASE_ID, NUMBER):
        try:
            value = text_of(row, name).strip()
        except ValueError:
            continue
        if value:
            return value
    return ""


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"


def _product_error(response: httpx.Response) -> str:
    """The portal's (ASP.NET Web API) ``Message: ExceptionMessage``, shortened; never the request."""
    try:
        body = response.json()
    except ValueError:
        content_type = response.headers.get("Content-Type", "").split(";")[0]
        return f"no error details ({content_type or 'no content type'})"
    if not isinstance(body, dict):
        return "no error details"
    parts = [str(body.get(key) or "").strip() for key in ("Message", "ExceptionMessage", "MessageDetail")]
    text = ": ".join(part for part in parts if part) or "no error details"
    return _clip(" ".join(text.split()))
