"""A loopback Azure Resource Manager endpoint for the Azure Monitor Alerts Management API.

* ``POST {alertId}/changestate?api-version=...&newState={New|Acknowledged|Closed}`` (an optional
  JSON body ``{"comments": "..."}`` is accepted, as newer api-versions define it) returns the alert;
* ``GET {alertId}?api-version=...`` returns the alert;

where ``alertId`` is the full ARM id, ``/subscriptions/{sub}/providers/Microsoft.AlertsManagement/
alerts/{guid}`` (or scoped under a resource group / resource, as newer api-versions allow). ARM ids
are case-insensitive, and so is the lookup here. Unknown alert: 404 ``ResourceNotFound``. Bearer
token for ``https://management.azure.com/.default`` required (401 ``AuthenticationFailed`` /
``InvalidAuthenticationToken`` / ``InvalidAuthenticationTokenAudience`` otherwise).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from tests.loopback.base import LoopbackServer
from tests.loopback.entra import (
    NoDelayHandler,
    RecordedRequest,
    RequestLog,
    TokenValidator,
    bearer_token,
    token_problem,
)

ARM_AUDIENCE = "https://management.azure.com"
ALERT_TYPE = "Microsoft.AlertsManagement/alerts"
STATES = {"new": "New", "acknowledged": "Acknowledged", "closed": "Closed"}
API_VERSIONS = (
    "2018-05-05",
    "2018-05-05-preview",
    "2019-03-01",
    "2019-05-05-preview",
    "2023-07-12-preview",
    "2024-01-01-preview",
    "2025-05-25-preview",
)
ALERT_PATH = re.compile(
    r"^(?P<id>/subscriptions/[^/]+(?:/[^/]+/[^/]+)*?/providers/microsoft\.alertsmanagement/alerts/[^/]+)"
    r"(?P<action>/changestate)?/?$",
    re.IGNORECASE,
)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class ArmMount(Protocol):
    """Another ARM API served by this loopback (e.g. ``tests.loopback.servicemap.ServiceMapApi``)."""

    def handles(self, path: str) -> bool: ...

    def dispatch(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes, base_url: str
    ) -> tuple[int, Any, dict[str, str]]: ...


@dataclass(frozen=True)
class StateChange:
    alert_id: str
    old_state: str
    new_state: str
    comments: str | None
    api_version: str
    at: float


class AlertsHandler(NoDelayHandler):
    app: AlertsManagementLoopback

    def _handle(self, method: str) -> None:
        path, query = self.parsed()
        raw = self.read_body()
        problem = token_problem(self.app.auth, bearer_token(self), ARM_AUDIENCE)
        if problem is not None:
            status, body = 401, self._auth_error(problem)
            self.app.requests.add(RecordedRequest(method, path, query, status, authorized=False))
            self.send_json(
                status,
                body,
                headers={
                    "WWW-Authenticate": f'Bearer authorization_uri="{self.app.authority}", '
                    f'error="invalid_token", error_description="{body["error"]["message"]}"'
                },
            )
            return
        headers = {"x-ms-request-id": str(uuid.uuid4())}
        fault = self.app.take_fault()
        if fault is not None:
            status, body = fault[0], _error("InjectedFault", "Injected fault")
            if fault[1] is not None:
                headers["Retry-After"] = f"{fault[1]:g}"
        elif (mount := self.app.mount_for(unquote(path))) is not None:
            try:
                status, body, extra = mount.dispatch(method, unquote(path), query, raw, self.app.url)
                headers.update(extra)
            except Exception as exc:  # a bug there must not kill the connection silently
                status, body = 500, _error("InternalServerError", repr(exc)[:300])
        else:
            try:
                status, body = self.app.dispatch(method, unquote(path), query, raw)
            except Exception as exc:  # a bug here must not kill the connection silently
                status, body = 500, _error("InternalServerError", repr(exc)[:300])
        self.app.requests.add(RecordedRequest(method, path, query, status, authorized=True, body=body))
        self.send_json(status, body, headers=headers)

    @staticmethod
    def _auth_error(problem: str) -> dict[str, Any]:
        if problem == "missing":
            return _error(
                "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing."
            )
        if problem == "audience":
            return _error(
                "InvalidAuthenticationTokenAudience",
                "The access token has been obtained for wrong audience or resource. It should exactly "
                "match with one of the allowed audiences 'https://management.core.windows.net/','https://management.core."
                "windows.net','https://management.azure.com/','https://management.azure.com'.",
            )
        if problem == "expired":
            return _error(
                "ExpiredAuthenticationToken", "The access token expiry UTC time is earlier than now."
            )
        return _error("InvalidAuthenticationToken", "The access token is invalid.")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class AlertsManagementLoopback(LoopbackServer):
    """Loopback ARM for alerts. ``auth`` validates bearer tokens (None: any bearer token);
    ``api_versions`` the accepted ``api-version`` values (None: any)."""

    handler_class = AlertsHandler

    def __init__(
        self,
        auth: TokenValidator | None = None,
        *,
        api_versions: Iterable[str] | None = API_VERSIONS,
        authority: str | None = None,
    ) -> None:
        super().__init__()
        self.auth = auth
        self.api_versions = None if api_versions is None else tuple(api_versions)
        self.authority = authority or getattr(auth, "authority_host", None) or "https://login.windows.net/"
        self._lock = threading.Lock()
        self._alerts: dict[str, dict[str, Any]] = {}  # lower-case id -> alert object
        self._faults: list[tuple[int, float | None]] = []
        self._history: list[StateChange] = []
        self.requests = RequestLog()
        self._mounts: list[ArmMount] = []

    def mount(self, api: ArmMount) -> None:
        """Serve another ARM API from this endpoint: requests whose path ``api.handles`` go to it
        (after the token check and ``fail_next``), so the app needs one ``ARM_ENDPOINT``."""
        self._mounts.append(api)

    def mount_for(self, path: str) -> ArmMount | None:
        return next((api for api in self._mounts if api.handles(path)), None)

    # -- test accessors ------------------------------------------------------------------------
    def add_alert(
        self,
        alert_id: str,
        state: str = "New",
        *,
        monitor_condition: str = "Fired",
        severity: str = "Sev3",
        alert_rule: str | None = None,
        target_resource: str | None = None,
    ) -> dict[str, Any]:
        match = ALERT_PATH.match(alert_id)
        if not match or match["action"]:
            raise ValueError(f"not an alert id: {alert_id}")
        canonical = STATES.get(state.lower())
        if canonical is None:
            raise ValueError(f"state must be one of {sorted(STATES.values())}")
        now = time.time()
        subscription = alert_id.split("/")[2]
        target = (
            target_resource
            or f"/subscriptions/{subscription}/resourceGroups/rg-loopback/providers/Microsoft.Compute/"
            "virtualMachines/vm1"
        )
        alert = {
            "id": alert_id,
            "name": alert_id.rsplit("/", 1)[1],
            "type": ALERT_TYPE,
            "properties": {
                "essentials": {
                    "severity": severity,
                    "signalType": "Metric",
                    "alertState": canonical,
                    "monitorCondition": monitor_condition,
                    "monitorService": "Platform",
                    "targetResource": target,
                    "targetResourceName": target.rsplit("/", 1)[1],
                    "targetResourceGroup": "rg-loopback",
                    "targetResourceType": "virtualmachines",
                    "sourceCreatedId": str(uuid.uuid4()),
                    "smartGroupId": str(uuid.uuid4()),
                    "smartGroupingReason": "",
                    "alertRule": alert_rule
                    or f"/subscriptions/{subscription}/resourceGroups/rg-loopback/providers/"
                    "microsoft.insights/metricalerts/cpu",
                    "startDateTime": _iso(now),
                    "lastModifiedDateTime": _iso(now),
                    "lastModifiedUserName": "System",
                },
                "context": {},
                "egressConfig": {},
            },
        }
        with self._lock:
            self._alerts[alert_id.lower()] = alert
        return copy.deepcopy(alert)

    def alert_state(self, alert_id: str) -> str | None:
        with self._lock:
            alert = self._alerts.get(alert_id.lower())
            return None if alert is None else str(alert["properties"]["essentials"]["alertState"])

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        with self._lock:
            alert = self._alerts.get(alert_id.lower())
            return copy.deepcopy(alert) if alert else None

    def state_changes(self) -> list[StateChange]:
        """Every successful ``changestate`` call, oldest first (with its comments and api-version)."""
        with self._lock:
            return list(self._history)

    def remove_alert(self, alert_id: str) -> None:
        """Forget an alert (as after its 30-day retention): calls for it then get 404."""
        with self._lock:
            self._alerts.pop(alert_id.lower(), None)

    def fail_next(self, count: int, status: int, retry_after: float | None = None) -> None:
        """The next ``count`` authorized requests get ``status`` (with ``Retry-After`` if given)."""
        with self._lock:
            self._faults.extend((status, retry_after) for _ in range(count))

    def take_fault(self) -> tuple[int, float | None] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    # -- protocol ------------------------------------------------------------------------------
    def dispatch(self, method: str, path: str, query: dict[str, list[str]], raw: bytes) -> tuple[int, Any]:
        api_version = (query.get("api-version") or [""])[0]
        if not api_version:
            return 400, _error(
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if self.api_versions is not None and api_version not in self.api_versions:
            return 400, _error(
                "NoRegisteredProviderFound",
                "No registered resource provider found for location 'global' and API version "
                f"'{api_version}' for type 'alerts'. The supported api-versions are "
                f"'{', '.join(self.api_versions)}'.",
            )
        match = ALERT_PATH.match(path)
        if not match:
            return 404, _error(
                "InvalidResourceType", f"The resource type could not be found for path '{path}'."
            )
        alert_id, action = match["id"], match["action"]
        if action and method != "POST":
            return 405, _error("MethodNotAllowed", f"The requested method {method} is not allowed.")
        if not action and method != "GET":
            return 405, _error("MethodNotAllowed", f"The requested method {method} is not allowed.")
        with self._lock:
            alert = self._alerts.get(alert_id.lower())
            if alert is None:
                return 404, _error(
                    "ResourceNotFound",
                    f"The Resource '{ALERT_TYPE}/{alert_id.rsplit('/', 1)[1]}' under subscription "
                    f"'{alert_id.split('/')[2]}' was not found. For more details please go to "
                    "https://aka.ms/ARMResourceNotFoundFix",
                )
            if not action:
                return 200, copy.deepcopy(alert)
            new_state = STATES.get((query.get("newState") or [""])[0].lower())
            if new_state is None:
                return 400, _error(
                    "InvalidParameter",
                    f"newState '{(query.get('newState') or [''])[0]}' is not valid; allowed values: New, "
                    "Acknowledged, Closed.",
                )
            comments = None
            if raw.strip():
                try:
                    payload = json.loads(raw)
                except ValueError:
                    return 400, _error(
                        "InvalidRequestContent",
                        "The request content was invalid and could not be deserialized.",
                    )
                if isinstance(payload, dict) and isinstance(payload.get("comments"), str):
                    comments = payload["comments"]
            essentials = alert["properties"]["essentials"]
            now = time.time()
            self._history.append(
                StateChange(alert["id"], essentials["alertState"], new_state, comments, api_version, now)
            )
            essentials["alertState"] = new_state
            essentials["lastModifiedDateTime"] = _iso(now)
            essentials["lastModifiedUserName"] = "loopback-client"
            return 200, copy.deepcopy(alert)

    def __enter__(self) -> AlertsManagementLoopback:
        self.start()
        return self
