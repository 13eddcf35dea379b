"""The ServiceNow connector, its auth flows, encoded queries and row mapping, over httpx.MockTransport."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import (
    IncidentDraft,
    Lifecycle,
    WorkItem,
    WorkItemRef,
    WorkItemState,
    WorkItemType,
)
from shared_code.errors import ItsmAuthError, ItsmRejectedError, ItsmUnavailableError, SecretStoreError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.servicenow.auth import ServiceNowBasicAuth, ServiceNowOAuth
from shared_code.itsm.servicenow.connector import CI_MISS_SECONDS, ServiceNowConnector
from shared_code.itsm.servicenow.mapping import (
    SYNC_FIELDS,
    draft_to_incident_fields,
    feed_fields,
    fields_to_work_item,
    incident_state_to_lifecycle,
    row_fields,
    row_to_work_item,
)
from shared_code.itsm.servicenow.query import Query, escape_value, format_datetime

INSTANCE = "https://dev12345.service-now.com"
TOKEN_URL = f"{INSTANCE}/oauth_token.do"
CLIENT_ID = "3f1c0e5e9a2b4c7d8e9f0a1b2c3d4e5f"
CLIENT_SECRET = "cl1ent-s3cret-NEVER-LOG"
PASSWORD = "p4ssw0rd-NEVER-LOG"
SECRETS = (CLIENT_SECRET, PASSWORD)
INC_ID = "9d385017c611228701d22104cc95c371"
T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)

Handler = Callable[[httpx.Request], httpx.Response]


# -- a scripted instance ---------------------------------------------------------------------------


class TokenEndpoint:
    """``/oauth_token.do``: password and refresh_token grants, optional rotation."""

    def __init__(
        self, *, accept_password: bool = True, refresh_tokens: tuple[str, ...] = (), rotate: bool = False
    ) -> None:
        self.accept_password = accept_password
        self.refresh_tokens = set(refresh_tokens)
        self.rotate = rotate
        self.forms: list[dict[str, str]] = []
        self.access: set[str] = set()
        self.issued = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    @property
    def grants(self) -> list[str]:
        return [form["grant_type"] for form in self.forms]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = dict(parse_qsl(request.content.decode()))
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.forms.append(form)
            assert form["client_id"] == CLIENT_ID
            assert form["client_secret"] == CLIENT_SECRET
            self.issued += 1
            new_refresh = f"refresh-{self.issued}"
            if form["grant_type"] == "password":
                ok = self.accept_password and form["username"] == "itsm.user" and form["password"] == PASSWORD
            else:
                ok = form["refresh_token"] in self.refresh_tokens
                if ok and self.rotate:
                    self.refresh_tokens.discard(form["refresh_token"])
                elif ok:
                    new_refresh = form["refresh_token"]
            if not ok:
                return httpx.Response(
                    401, json={"error_description": "access_denied", "error": "server_error"}
                )
            self.refresh_tokens.add(new_refresh)
            access = f"access-{self.issued}"
            self.access.add(access)
        body = {
            "access_token": access,
            "refresh_token": new_refresh,
            "scope": "useraccount",
            "token_type": "Bearer",
            "expires_in": 1799,
        }
        return httpx.Response(200, json=body)


class Instance:
    """Routes the token endpoint and the Table API; ``api`` answers authenticated API calls."""

    def __init__(self, api: Handler | None = None, tokens: TokenEndpoint | None = None) -> None:
        self.tokens = tokens or TokenEndpoint()
        self.api = api or (lambda request: httpx.Response(200, json={"result": []}))
        self.requests: list[httpx.Request] = []
        self.api_requests: list[httpx.Request] = []
        self.api_auth: list[str] = []  # as sent: a retried request is the same object, re-headed

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == "/oauth_token.do":
            return self.tokens(request)
        self.api_requests.append(request)
        self.api_auth.append(request.headers.get("Authorization", ""))
        token = self.api_auth[-1].removeprefix("Bearer ")
        if token not in self.tokens.access:
            return httpx.Response(
                401, json={"error": {"message": "User Not Authenticated"}, "status": "failure"}
            )
        return self.api(request)


class MemoryStore:
    def __init__(self, token: str | None = None, *, fail_save: bool = False) -> None:
        self.token = token
        self.saved: list[str] = []
        self.fail_save = fail_save

    def load(self) -> str | None:
        return self.token

    def save(self, token: str) -> None:
        if self.fail_save:
            raise SecretStoreError("writing secret 'x' to Key Vault failed: HttpResponseError")
        self.saved.append(token)
        self.token = token


def oauth(store: MemoryStore | None = None, clock: Callable[[], float] = time.monotonic) -> ServiceNowOAuth:
    return ServiceNowOAuth(
        TOKEN_URL,
        client_id=CLIENT_ID,
        client_secret=SecretStr(CLIENT_SECRET),
        username="itsm.user",
        password=lambda: SecretStr(PASSWORD),
        refresh_token_store=store,
        connection_name="prod",
        clock=clock,
    )


class Setup:
    def __init__(
        self,
        api: Handler | None = None,
        *,
        tokens: TokenEndpoint | None = None,
        store: MemoryStore | None = None,
        auth: httpx.Auth | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        self.instance = Instance(api, tokens)
        self.sleeps: list[float] = []
        self.client = httpx.Client(transport=httpx.MockTransport(self.instance), timeout=5)
        self.auth = auth or oauth(store, clock)
        policy = RetryPolicy(sleep=self.sleeps.append, jitter=lambda cap: cap)
        self.connector = ServiceNowConnector(
            "prod", INSTANCE, self.client, self.auth, retry=policy, **options
        )

    @property
    def tokens(self) -> TokenEndpoint:
        return self.instance.tokens


def params(request: httpx.Request) -> dict[str, str]:
    return dict(request.url.params)


def body(request: httpx.Request) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(request.content)
    return data


def result(payload: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json={"result": payload})


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# -- OAuth -------------------------------------------------------------------------------------------


def test_password_grant_then_cached_token() -> None:
    setup = Setup()
    setup.connector.check()
    setup.connector.check()
    assert setup.tokens.grants == ["password"]
    form = setup.tokens.forms[0]
    assert form == {
        "grant_type": "password",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "username": "itsm.user",
        "password": PASSWORD,
    }
    assert setup.instance.api_auth == ["Bearer access-1"] * 2


def test_stored_refresh_token_is_used_first() -> None:
    store = MemoryStore("stored-refresh")
    setup = Setup(tokens=TokenEndpoint(refresh_tokens=("stored-refresh",)), store=store)
    setup.connector.check()
    assert setup.tokens.grants == ["refresh_token"]
    assert setup.tokens.forms[0]["refresh_token"] == "stored-refresh"
    assert store.saved == []  # no rotation: nothing to write back


def test_401_triggers_exactly_one_refresh_and_one_retry() -> None:
    setup = Setup()
    setup.connector.check()
    setup.tokens.access.clear()  # the instance revoked or expired the access token
    setup.connector.check()
    assert setup.tokens.grants == ["password", "refresh_token"]
    assert setup.tokens.forms[1]["refresh_token"] == "refresh-1"
    assert setup.instance.api_auth == [
        "Bearer access-1",
        "Bearer access-1",
        "Bearer access-2",
    ]


def test_401_after_the_retry_is_an_auth_error() -> None:
    setup = Setup(api=lambda request: httpx.Response(401, json={"error": {"message": "no"}}))
    with pytest.raises(ItsmAuthError) as info:
        setup.connector.check()
    assert info.value.status == 401
    assert len(setup.instance.api_requests) == 2  # the call and its one retry, no loop
    assert setup.tokens.grants == ["password", "refresh_token"]
    assert setup.sleeps == []


def test_rotated_refresh_token_is_saved() -> None:
    store = MemoryStore("refresh-0")
    tokens = TokenEndpoint(refresh_tokens=("refresh-0",), rotate=True)
    setup = Setup(tokens=tokens, store=store)
    setup.connector.check()
    assert store.saved == ["refresh-1"]
    tokens.access.clear()
    setup.connector.check()
    assert setup.tokens.forms[1]["refresh_token"] == "refresh-1"
    assert store.saved == ["refresh-1", "refresh-2"]


def test_password_grant_refresh_token_is_saved_for_the_next_cold_start() -> None:
    store = MemoryStore(None)
    Setup(store=store).connector.check()
    assert store.saved == ["refresh-1"]


def test_failing_to_save_the_refresh_token_does_not_fail_the_call(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(None, fail_save=True)
    Setup(store=store).connector.check()
    assert "could not store the new refresh token" in caplog.text


def test_refused_refresh_falls_back_to_password_grant() -> None:
    store = MemoryStore("revoked-refresh")
    setup = Setup(store=store)
    setup.connector.check()
    assert setup.tokens.grants == ["refresh_token", "password"]
    assert store.saved == ["refresh-2"]


def test_both_grants_refused_is_an_auth_error_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = MemoryStore("revoked-refresh")
    setup = Setup(tokens=TokenEndpoint(accept_password=False), store=store)
    with pytest.raises(ItsmAuthError) as info:
        setup.connector.check()
    message = str(info.value)
    assert message.startswith("ServiceNow refused the OAuth credentials of connection 'prod'")
    assert message.endswith("re-authorise the connection")
    assert setup.tokens.grants == ["refresh_token", "password"]
    assert setup.instance.api_requests == []
    for text in (message, repr(info.value), caplog.text, repr(setup.auth), "revoked-refresh"):
        assert_no_secret(text)
    assert "revoked-refresh" not in message
    assert "revoked-refresh" not in caplog.text


def test_token_endpoint_outage_is_retried_by_the_policy() -> None:
    tokens = TokenEndpoint()
    answers = [httpx.Response(503, headers={"Retry-After": "3"})]

    def flaky(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else tokens(request)

    setup = Setup(tokens=tokens)
    setup.instance.tokens = flaky  # type: ignore[assignment]
    setup.instance.tokens.access = tokens.access
    setup.connector.check()
    assert setup.sleeps == [3.0]
    assert tokens.grants == ["password"]


def test_token_endpoint_outage_names_the_token_endpoint() -> None:
    setup = Setup()
    setup.instance.tokens = lambda request: httpx.Response(502)  # type: ignore[assignment]
    with pytest.raises(ItsmUnavailableError) as info:
        setup.connector.check()
    assert str(info.value) == "POST /oauth_token.do failed after 4 attempts: HTTP 502"


def test_expired_access_token_is_refreshed_before_use() -> None:
    now = [1000.0]
    setup = Setup(clock=lambda: now[0])
    setup.connector.check()
    now[0] += 1799
    setup.connector.check()
    assert setup.tokens.grants == ["password", "refresh_token"]
    assert len(setup.instance.api_requests) == 2  # no 401 round trip


def test_concurrent_callers_share_one_token_request() -> None:
    setup = Setup()
    setup.tokens.delay = 0.05
    errors: list[BaseException] = []

    def call() -> None:
        try:
            setup.connector.check()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert setup.tokens.grants == ["password"]
    assert len(setup.instance.api_requests) == 8


def test_basic_auth() -> None:
    basic = ServiceNowBasicAuth("itsm.user", SecretStr(PASSWORD), connection_name="prod")

    def api(request: httpx.Request) -> httpx.Response:
        return result([])

    instance_calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        header = request.headers["Authorization"]
        instance_calls.append(header)
        return (
            api(request) if header.startswith("Basic ") and len(instance_calls) == 1 else httpx.Response(401)
        )

    client = httpx.Client(transport=httpx.MockTransport(handler), timeout=5)
    connector = ServiceNowConnector("prod", INSTANCE, client, basic, retry=RetryPolicy(sleep=lambda _: None))
    assert connector.check() == (
        "ServiceNow instance dev12345.service-now.com answered as 'itsm.user': the incident table is readable"
    )
    assert instance_calls[0] == httpx.BasicAuth("itsm.user", PASSWORD)._auth_header
    with pytest.raises(ItsmAuthError) as info:
        connector.check()
    assert "user name and password of connection 'prod'" in str(info.value)
    assert_no_secret(str(info.value))
    assert_no_secret(repr(basic))


# -- retries and error mapping through the connector ------------------------------------------------


def test_429_with_retry_after_is_honoured() -> None:
    answers = [httpx.Response(429, headers={"Retry-After": "5"}), result([])]
    setup = Setup(api=lambda request: answers.pop(0))
    setup.connector.check()
    assert setup.sleeps == [5.0]


def test_503_then_200_is_retried() -> None:
    answers = [httpx.Response(503), result([])]
    setup = Setup(api=lambda request: answers.pop(0))
    setup.connector.check()
    assert setup.sleeps == [0.5]


def test_500_every_time_is_unavailable() -> None:
    setup = Setup(api=lambda request: httpx.Response(500, json={"error": {"message": "boom"}}))
    with pytest.raises(ItsmUnavailableError) as info:
        setup.connector.check()
    assert str(info.value) == "GET /api/now/table/incident failed after 4 attempts: HTTP 500"
    assert len(setup.instance.api_requests) == 4


def test_timeouts_are_retried() -> None:
    calls = [0]

    def api(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] <= 2:
            raise httpx.ReadTimeout("timed out", request=request)
        return result({"state": "2"})

    setup = Setup(api=api)
    assert setup.connector.get_state(WorkItemRef(id=INC_ID, number="INC0010001")) is WorkItemState.OPEN
    assert calls[0] == 3


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_4xx_is_rejected_at_once_with_the_products_text(status: int) -> None:
    error = {
        "message": "Operation Failed",
        "detail": "Data Policy Exception: \n\tThe following fields " + "x" * 500,
    }
    setup = Setup(api=lambda request: httpx.Response(status, json={"error": error, "status": "failure"}))
    with pytest.raises(ItsmRejectedError) as info:
        setup.connector.add_note(WorkItemRef(id=INC_ID, number="INC0010001"), "hello")
    message = str(info.value)
    assert message.startswith(
        f"ServiceNow rejected PATCH incident (HTTP {status}): Operation Failed: Data Policy"
    )
    assert "\n" not in message
    assert len(message) < 400
    assert info.value.status == status
    assert len(setup.instance.api_requests) == 1
    assert setup.sleeps == []


def test_non_json_success_is_unavailable() -> None:
    setup = Setup(api=lambda request: httpx.Response(200, text="<html>Instance hibernating</html>"))
    with pytest.raises(ItsmUnavailableError, match="not JSON"):
        setup.connector.check()


def test_client_without_timeouts_is_refused() -> None:
    client = httpx.Client(transport=httpx.MockTransport(lambda r: result([])), timeout=None)
    with pytest.raises(ValueError, match="timeouts"):
        ServiceNowConnector("prod", INSTANCE, client, oauth())


# -- work item calls ---------------------------------------------------------------------------------


def test_resolve_is_one_patch_with_every_field() -> None:
    setup = Setup(api=lambda request: result({"sys_id": INC_ID}), close_code="Resolved by caller")
    setup.connector.resolve(WorkItemRef(id=INC_ID, number="INC0010001"), "The alert resolved.")
    [request] = setup.instance.api_requests
    assert request.method == "PATCH"
    assert request.url.path == f"/api/now/table/incident/{INC_ID}"
    assert request.headers["Accept"] == "application/json"
    assert body(request) == {
        "state": "6",
        "close_code": "Resolved by caller",
        "close_notes": "The alert resolved.",
        "work_notes": "The alert resolved.",
    }


def test_reopen_and_add_note() -> None:
    setup = Setup(api=lambda request: result({"sys_id": INC_ID}))
    ref = WorkItemRef(id=INC_ID, number="INC0010001")
    setup.connector.reopen(ref, "fired again")
    setup.connector.add_note(ref, "still firing")
    assert [body(r) for r in setup.instance.api_requests] == [
        {"state": "2", "work_notes": "fired again"},
        {"work_notes": "still firing"},
    ]


def test_sys_id_cannot_escape_the_path() -> None:
    setup = Setup(api=lambda request: result({"sys_id": "x"}))
    setup.connector.add_note(WorkItemRef(id="../sys_user?x=1", number="INC1"), "n")
    assert setup.instance.api_requests[0].url.raw_path.startswith(
        b"/api/now/table/incident/..%2Fsys_user%3Fx%3D1"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", WorkItemState.OPEN),
        ("2", WorkItemState.OPEN),
        ("3", WorkItemState.OPEN),
        ("6", WorkItemState.RESOLVED),
        ("7", WorkItemState.CLOSED),
        ("8", WorkItemState.CLOSED),
    ],
)
def test_get_state(value: str, expected: WorkItemState) -> None:
    setup = Setup(api=lambda request: result({"state": value}))
    assert setup.connector.get_state(WorkItemRef(id=INC_ID, number="INC0010001")) is expected
    assert params(setup.instance.api_requests[0])["sysparm_fields"] == "state"


def draft(**overrides: Any) -> IncidentDraft:
    fields: dict[str, Any] = {
        "short_description": "Sev1 CPU high on web-prod-01",
        "description": "Azure Monitor alert fired",
        "impact": 1,
        "urgency": 2,
        "correlation_id": "azmon:0123abcd:1",
        "correlation_display": "Azure Monitor",
    } | overrides
    return IncidentDraft(**fields)


def test_create_incident_without_ci() -> None:
    setup = Setup(api=lambda request: result({"sys_id": INC_ID, "number": "INC0010001"}, 201))
    ref = setup.connector.create_incident(draft(assignment_group="Service Desk"))
    assert ref == WorkItemRef(
        id=INC_ID, number="INC0010001", url=f"{INSTANCE}/nav_to.do?uri=incident.do?sys_id={INC_ID}"
    )
    [request] = setup.instance.api_requests
    assert (request.method, request.url.path) == ("POST", "/api/now/table/incident")
    assert body(request) == {
        "short_description": "Sev1 CPU high on web-prod-01",
        "description": "Azure Monitor alert fired",
        "impact": "1",
        "urgency": "2",
        "correlation_id": "azmon:0123abcd:1",
        "correlation_display": "Azure Monitor",
        "contact_type": "monitoring",
        "assignment_group": "Service Desk",
    }


class CmdbApi:
    def __init__(self, known: dict[str, str] | None = None) -> None:
        self.known = known or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path == "/api/now/table/cmdb_ci":
            query = params(request)["sysparm_query"]
            assert query.startswith("name=")
            name = query.removeprefix("name=").replace("^^", "^")
            return result([{"sys_id": self.known[name], "name": name}] if name in self.known else [])
        if request.method == "POST" and path == "/api/now/table/cmdb_ci_server":
            self.known[body(request)["name"]] = "ci-new"
            return result({"sys_id": "ci-new"}, 201)
        if request.method == "POST" and path == "/api/now/table/incident":
            return result({"sys_id": INC_ID, "number": "INC0010001"}, 201)
        raise AssertionError(f"unexpected {request.method} {path}")


def test_ci_lookup_escapes_carets_and_does_not_create_without_permission() -> None:
    setup = Setup(api=CmdbApi())
    name = "web^ORname=x^NQactive=true"
    assert setup.connector.ensure_configuration_item(name, create=False) is None
    [lookup] = setup.instance.api_requests
    assert params(lookup)["sysparm_query"] == "name=web^^ORname=x^^NQactive=true"
    assert params(lookup)["sysparm_limit"] == "1"
    assert params(lookup)["sysparm_fields"] == "sys_id,name"

    setup.connector.create_incident(draft(configuration_item=name))
    methods = [(r.method, r.url.path) for r in setup.instance.api_requests]
    assert ("POST", "/api/now/table/cmdb_ci_server") not in methods
    assert "cmdb_ci" not in body(setup.instance.api_requests[-1])


def test_ci_is_created_in_cmdb_ci_server_when_allowed_and_cached() -> None:
    setup = Setup(api=CmdbApi())
    setup.connector.create_incident(draft(configuration_item="web-prod-01", create_configuration_item=True))
    calls = [(r.method, r.url.path) for r in setup.instance.api_requests]
    assert calls == [
        ("GET", "/api/now/table/cmdb_ci"),
        ("GET", "/api/now/table/cmdb_ci"),  # looked up again under the create lock
        ("POST", "/api/now/table/cmdb_ci_server"),
        ("POST", "/api/now/table/incident"),
    ]
    assert body(setup.instance.api_requests[2]) == {"name": "web-prod-01"}
    assert body(setup.instance.api_requests[3])["cmdb_ci"] == "ci-new"
    before = len(setup.instance.api_requests)
    assert setup.connector.ensure_configuration_item("web-prod-01", create=True) == "ci-new"
    assert len(setup.instance.api_requests) == before  # cache hit


def test_existing_ci_is_used() -> None:
    setup = Setup(api=CmdbApi({"db-01": "ci-db"}))
    assert setup.connector.ensure_configuration_item("db-01", create=True) == "ci-db"
    assert [r.method for r in setup.instance.api_requests] == ["GET"]


@pytest.mark.parametrize(
    "name",
    [
        "javascript:gs.getUserID()",
        "  JavaScript:current.name",
        "JAVASCRIPT:x",
        "web-01\nweb-02",
        "web\r01",
        "a\x00b",
    ],
)
def test_a_ci_name_that_cannot_be_queried_is_left_out_of_the_incident(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup(api=CmdbApi({"web-01": "ci-web"}))
    caplog.set_level(logging.WARNING, logger="shared_code.itsm.servicenow.connector")

    ref = setup.connector.create_incident(draft(configuration_item=name, create_configuration_item=True))

    assert ref.number == "INC0010001"
    [create] = setup.instance.api_requests  # no CI lookup, no CI create: only the incident
    assert (create.method, create.url.path) == ("POST", "/api/now/table/incident")
    assert "cmdb_ci" not in body(create)
    assert "configuration item" in caplog.text
    assert "without a configuration item" in caplog.text
    assert setup.connector.ensure_configuration_item(name, create=True) is None


def test_a_ci_lookup_row_is_used_only_when_its_name_matches() -> None:
    answers: dict[str, list[dict[str, str]]] = {
        "web-01": [{"sys_id": "ci-other", "name": "db-07"}],  # the instance ignored the condition
        "Web-02": [{"sys_id": "ci-web-02", "name": "web-02 "}],  # names compare ignoring case
        "web-03": [{"sys_id": "ci-nameless"}],
    }
    created: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            created.append(body(request)["name"])
            return result({"sys_id": "ci-new"}, 201)
        assert params(request)["sysparm_fields"] == "sys_id,name"
        return result(answers[params(request)["sysparm_query"].removeprefix("name=")])

    setup = Setup(api=api)
    assert setup.connector.ensure_configuration_item("web-01", create=False) is None
    assert setup.connector.ensure_configuration_item("Web-02", create=False) == "ci-web-02"
    assert setup.connector.ensure_configuration_item("web-03", create=False) is None
    assert setup.connector.ensure_configuration_item("web-01", create=True) == "ci-new"
    assert created == ["web-01"]


def test_find_by_correlation() -> None:
    setup = Setup(api=lambda request: result([{"sys_id": INC_ID, "number": "INC0010001"}]))
    ref = setup.connector.find_by_correlation("azmon:a^b")
    assert ref is not None
    assert ref.number == "INC0010001"
    p = params(setup.instance.api_requests[0])
    assert p["sysparm_query"] == "correlation_id=azmon:a^^b^active=true^ORDERBYDESCsys_created_on"
    assert p["sysparm_limit"] == "1"
    assert setup.connector.find_by_correlation("  ") is None
    with pytest.raises(ItsmRejectedError, match="line breaks"):
        setup.connector.find_by_correlation("a\nb")


def test_create_lost_in_transit_is_recovered_by_correlation() -> None:
    created = [False]

    def api(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            created[0] = True
            raise httpx.ReadTimeout("timed out", request=request)
        return result([{"sys_id": INC_ID, "number": "INC0010001"}] if created[0] else [])

    setup = Setup(api=api)
    ref = setup.connector.create_incident(draft())
    assert ref.id == INC_ID
    assert [r.method for r in setup.instance.api_requests] == ["POST", "GET"]  # no blind second POST


def test_create_failure_without_a_trace_raises() -> None:
    def api(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502) if request.method == "POST" else result([])

    setup = Setup(api=api)
    with pytest.raises(ItsmUnavailableError):
        setup.connector.create_incident(draft())


# -- fetch_changes -----------------------------------------------------------------------------------


def row(sys_id: str, updated: str, *, number: str | None = None, **extra: Any) -> dict[str, Any]:
    fields = {"sys_id": sys_id, "number": number or f"INC{sys_id}", "sys_updated_on": updated} | extra
    return {name: {"value": value, "display_value": value} for name, value in fields.items()}


class FeedApi:
    def __init__(self, *pages: list[dict[str, Any]]) -> None:
        self.pages = list(pages)
        self.queries: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.queries.append(params(request))
        return result(self.pages.pop(0))


def test_fetch_changes_drains_the_second_then_continues_with_newer_rows() -> None:
    api = FeedApi(
        [row("b2", "2024-03-01 12:00:00")],
        [row("a1", "2024-03-01 12:00:05"), row("c3", "2024-03-01 12:00:07", sys_created_on="garbage")],
    )
    setup = Setup(api=api)
    page = setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0, last_id="a9"), 3)
    drain, newer = api.queries
    assert drain["sysparm_query"] == "sys_updated_on=2024-03-01 12:00:00^sys_id>a9^ORDERBYsys_id"
    assert drain["sysparm_limit"] == "3"
    assert newer["sysparm_query"] == "sys_updated_on>2024-03-01 12:00:00^ORDERBYsys_updated_on^ORDERBYsys_id"
    assert newer["sysparm_limit"] == "2"
    for query in (drain, newer):
        assert query["sysparm_display_value"] == "all"
        assert query["sysparm_exclude_reference_link"] == "true"
        assert query["sysparm_fields"] == ",".join(SYNC_FIELDS[WorkItemType.INCIDENT])
    assert [item.source_id for item in page.items] == ["b2", "a1"]
    [rejected] = page.rejected
    assert rejected.source_id == "c3"
    assert rejected.error.startswith("sys_created_on:")
    assert page.next_cursor == SyncCursor(updated_at=datetime(2024, 3, 1, 12, 0, 7, tzinfo=UTC), last_id="c3")
    assert page.is_last is False  # the newer query filled its room: there may be more


def test_full_drain_page_is_not_last_and_skips_the_newer_query() -> None:
    api = FeedApi([row("b1", "2024-03-01 12:00:00"), row("b2", "2024-03-01 12:00:00")])
    setup = Setup(api=api)
    page = setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0, last_id="a"), 2)
    assert len(api.queries) == 1
    assert page.is_last is False
    assert page.next_cursor == SyncCursor(updated_at=T0, last_id="b2")


def test_short_drain_and_short_newer_query_is_last() -> None:
    api = FeedApi([], [row("z", "2024-03-01 12:00:01")])
    setup = Setup(api=api)
    page = setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0, last_id="a"), 5)
    assert page.is_last is True
    assert [q["sysparm_limit"] for q in api.queries] == ["5", "5"]
    assert page.next_cursor.last_id == "z"


def test_first_page_without_last_id_and_empty_feed() -> None:
    api = FeedApi([])
    setup = Setup(api=api)
    cursor = SyncCursor(updated_at=T0)
    page = setup.connector.fetch_changes(WorkItemType.CHANGE_REQUEST, cursor, 100)
    [query] = api.queries
    assert query["sysparm_query"].startswith("sys_updated_on>2024-03-01 12:00:00^")
    assert setup.instance.api_requests[0].url.path == "/api/now/table/change_request"
    assert page.items == []
    assert page.is_last is True
    assert page.next_cursor == cursor


def test_rows_without_a_position_cannot_stall_the_feed() -> None:
    api = FeedApi([{"number": {"value": "INC1", "display_value": "INC1"}}])
    setup = Setup(api=api)
    with pytest.raises(Exception, match="cannot move past"):
        setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 1)


# -- mapping -----------------------------------------------------------------------------------------


def pair(value: str, display: str | None = None) -> dict[str, str]:
    return {"value": value, "display_value": value if display is None else display}


INCIDENT_ROW: dict[str, Any] = {
    "sys_id": pair(INC_ID),
    "number": pair("INC0010001"),
    "sys_updated_on": pair("2024-03-01 12:30:45", "03/01/2024 04:30:45 AM"),
    "sys_created_on": pair("2024-03-01 10:00:00", "03/01/2024 02:00:00 AM"),
    "sys_created_by": pair("itsm.connector"),
    "state": pair("6", "Resolved"),
    "urgency": pair("1", "1 - High"),
    "impact": pair("2", "2 - Medium"),
    "priority": pair("2", "2 - High"),
    "resolved_by": pair("5137153cc611227c000bbd1bd8cd2005", "Fred Luddy"),
    "resolved_at": pair("2024-03-01 12:30:45", "03/01/2024 04:30:45 AM"),
    "closed_by": pair(""),
    "closed_at": pair(""),
    "contact_type": pair("monitoring", "Monitoring"),
    "assigned_to": pair("46d44a23a9fe19810012d100cca80666", "Beth Anglin"),
    "category": pair("network", "Network"),
    "short_description": pair("Sev1 CPU high on web-prod-01"),
    "description": pair("Azure Monitor alert fired"),
    "cmdb_ci": pair("b0c25d1bc0a800090168be1bfcdcd759", "web-prod-01"),
    "correlation_id": pair("azmon:0123abcd:1"),
}

CHANGE_ROW: dict[str, Any] = {
    "sys_id": pair("c286d61347c12200e0ef563dbb9a7109"),
    "number": pair("CHG0030001"),
    "sys_updated_on": pair("2024-03-02 08:00:00"),
    "sys_created_on": pair("2024-02-28 09:15:00"),
    "sys_created_by": pair("admin"),
    "state": pair("-1", "Implement"),
    "urgency": pair("3", "3 - Low"),
    "impact": pair("3", "3 - Low"),
    "priority": pair("4", "4 - Low"),
    "closed_by": pair(""),
    "closed_at": pair(""),
    "contact_type": pair(""),
    "assigned_to": pair("46d44a23a9fe19810012d100cca80666", "Beth Anglin"),
    "category": pair("Hardware"),
    "short_description": pair("Patch web tier"),
    "description": pair("Monthly patching"),
    "cmdb_ci": pair("", ""),
    "correlation_id": pair(""),
    "type": pair("normal", "Normal"),
    "risk": pair("3", "Moderate"),
    "requested_by_date": pair("2024-03-05 00:00:00"),
    "start_date": pair("2024-03-04 22:00:00"),
    "end_date": pair("2024-03-05 02:00:00"),
    "work_start": pair("2024-03-04 22:05:00"),
    "work_end": pair(""),
}


def utc(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_incident_row_mapping() -> None:
    item = row_to_work_item("prod", WorkItemType.INCIDENT, INCIDENT_ROW)
    assert item.model_dump(exclude_defaults=True) == {
        "connection": "prod",
        "item_type": WorkItemType.INCIDENT,
        "source_id": INC_ID,
        "number": "INC0010001",
        "updated_at": utc(2024, 3, 1, 12, 30, 45),
        "state": "Resolved",
        "state_code": "6",
        "lifecycle": Lifecycle.RESOLVED,
        "urgency": "1 - High",
        "impact": "2 - Medium",
        "priority": "2 - High",
        "created_by": "itsm.connector",
        "resolved_by": "Fred Luddy",
        "source": "Monitoring",
        "assigned_to": "Beth Anglin",
        "category": "Network",
        "title": "Sev1 CPU high on web-prod-01",
        "description": "Azure Monitor alert fired",
        "computer": "web-prod-01",
        "created_at": utc(2024, 3, 1, 10, 0, 0),
        "resolved_at": utc(2024, 3, 1, 12, 30, 45),
        "correlation_id": "azmon:0123abcd:1",
    }
    assert set(INCIDENT_ROW) == set(SYNC_FIELDS[WorkItemType.INCIDENT])


def test_change_request_row_mapping() -> None:
    item = row_to_work_item("prod", WorkItemType.CHANGE_REQUEST, CHANGE_ROW)
    assert (item.state, item.state_code) == ("Implement", "-1")
    assert (item.change_type, item.risk, item.priority) == ("Normal", "Moderate", "4 - Low")
    assert item.requested_at == utc(2024, 3, 5, 0, 0, 0)
    assert (item.planned_start, item.planned_end) == (utc(2024, 3, 4, 22, 0, 0), utc(2024, 3, 5, 2, 0, 0))
    assert (item.work_start, item.work_end) == (utc(2024, 3, 4, 22, 5, 0), None)
    assert item.computer == ""
    assert item.closed_at is None
    assert item.resolved_at is None
    record = item.to_service_desk_record(utc(2024, 3, 6, 0, 0, 0))
    assert record["TimeGenerated"] == "2024-03-06T00:00:00+00:00"
    assert record["LastModifiedDate_t"] == item.updated_at.isoformat()
    assert record["CRState_s"] == "Implement"
    assert record["Type_s"] == "Normal"
    assert set(CHANGE_ROW) == set(SYNC_FIELDS[WorkItemType.CHANGE_REQUEST])


@pytest.mark.parametrize("missing", ["sys_id", "number", "sys_updated_on"])
def test_row_without_a_key_field_names_it(missing: str) -> None:
    bad = dict(INCIDENT_ROW) | {missing: pair("")}
    with pytest.raises(ValueError, match=f"^{missing}: missing"):
        row_to_work_item("prod", WorkItemType.INCIDENT, bad)
    del bad[missing]
    with pytest.raises(ValueError, match=f"^{missing}: missing"):
        row_to_work_item("prod", WorkItemType.INCIDENT, bad)


def test_unparseable_date_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"^resolved_at: not a ServiceNow date-time"):
        row_to_work_item("prod", WorkItemType.INCIDENT, INCIDENT_ROW | {"resolved_at": pair("03/01/2024")})


def test_plain_value_rows_are_read_too() -> None:
    plain = {name: value["value"] for name, value in INCIDENT_ROW.items()}
    item = row_to_work_item("prod", WorkItemType.INCIDENT, plain)
    assert item.state == "6"
    assert item.source_id == INC_ID


@pytest.mark.parametrize(
    ("item_type", "row"),
    [
        (WorkItemType.INCIDENT, INCIDENT_ROW),
        (WorkItemType.CHANGE_REQUEST, CHANGE_ROW),
        (WorkItemType.INCIDENT, {name: value["value"] for name, value in INCIDENT_ROW.items()}),
        # a display value the instance left out (null) falls back to the stored value
        (WorkItemType.INCIDENT, INCIDENT_ROW | {"urgency": {"value": "1", "display_value": None}}),
        (WorkItemType.INCIDENT, INCIDENT_ROW | {"impact": 2, "priority": True}),
    ],
)
def test_the_inline_pair_readers_map_every_row_shape_as_the_general_ones(
    item_type: WorkItemType, row: dict[str, Any]
) -> None:
    """``row_to_work_item`` reads ``{"value", "display_value"}`` pairs inline and leaves every other
    shape to ``field_value``/``field_display``: a null display value, plain values, numbers and
    booleans map as before, and a validated copy of the item is equal, type for type."""
    item = row_to_work_item("prod", item_type, row)
    validated = WorkItem.model_validate(item.model_dump())
    assert validated == item
    for name, value in item.__dict__.items():
        assert type(value) is type(getattr(validated, name)), name
    if "urgency" in row and row["urgency"] == {"value": "1", "display_value": None}:
        assert item.urgency == "1"
    if row.get("impact") == 2:
        assert (item.impact, item.priority) == ("2", "true")


def test_draft_fields_and_states() -> None:
    fields = draft_to_incident_fields(draft(caller="Abel Tuter", category="software"), "ci-1")
    assert fields["cmdb_ci"] == "ci-1"
    assert fields["caller_id"] == "Abel Tuter"
    assert fields["category"] == "software"
    assert fields["contact_type"] == "monitoring"
    assert "assignment_group" not in fields
    assert incident_state_to_lifecycle("6") is WorkItemState.RESOLVED
    assert incident_state_to_lifecycle("") is WorkItemState.OPEN


# -- encoded queries ---------------------------------------------------------------------------------


def split_reference(query: str) -> list[str]:
    """Split on a single ``^``; ``^^`` is a literal caret (read left to right)."""
    terms, current, i = [], [], 0
    while i < len(query):
        if query.startswith("^^", i):
            current.append("^")
            i += 2
        elif query[i] == "^":
            terms.append("".join(current))
            current = []
            i += 1
        else:
            current.append(query[i])
            i += 1
    terms.append("".join(current))
    return terms


NASTY = ["^", "=", "OR", "^OR", "^NQ", "^^", "ORDERBY", "NQ", "a", " ", "!=", "ENDRLQUERY", ">"]


def nasty_values() -> list[str]:
    rng = random.Random(20240301)
    values = [*NASTY, "web^ORname=x", "x^NQactive=true", "^ORDERBYDESCsys_id", "trailing^", "^leading"]
    values += ["".join(rng.choice(NASTY) for _ in range(rng.randint(1, 8))) for _ in range(500)]
    return values


def test_values_never_change_the_query_structure() -> None:
    ts = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    for value in nasty_values():
        encoded = (
            Query()
            .eq("name", value)
            .gt("sys_updated_on", ts)
            .order_by("sys_updated_on")
            .order_by("sys_id")
            .encode()
        )
        assert split_reference(encoded) == [
            f"name={value}",
            "sys_updated_on>2024-03-01 12:00:00",
            "ORDERBYsys_updated_on",
            "ORDERBYsys_id",
        ], value


def test_escape_value_and_guards() -> None:
    assert escape_value("a^b^^c") == "a^^b^^^^c"
    for bad in ("a\nb", "a\rb", "a\x00b"):
        with pytest.raises(ValueError, match="line breaks"):
            escape_value(bad)
    with pytest.raises(ValueError, match="field name"):
        Query().eq("name^ORactive", "x")
    for script in ("javascript:gs.getUserID()", " JavaScript:x", "\tJAVASCRIPT:", "javascript:"):
        with pytest.raises(ValueError, match="javascript:"):
            Query().eq("name", script)
        with pytest.raises(ValueError, match="javascript:"):
            escape_value(script)
    assert escape_value("web javascript:x") == "web javascript:x"  # only a leading one is run
    assert escape_value("javascript x") == "javascript x"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_datetime(datetime(2024, 3, 1))
    assert Query().eq("active", True).ge("priority", 2).order_by_desc("sys_created_on").encode() == (
        "active=true^priority>=2^ORDERBYDESCsys_created_on"
    )


# -- writes that are not idempotent, and the CI miss cache ---------------------------------------------

MARKED = "fired again\n\n[Azure Monitor delivery 0123456789abcdef0123456789abcdef]"


class LostAnswers:
    """Loses the answer of every PATCH (a read timeout); ``sys_journal_field`` reads find the note
    when ``landed`` (the instance carried the write out)."""

    def __init__(self, *, landed: bool) -> None:
        self.landed = landed
        self.journal_queries: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/now/table/sys_journal_field":
            self.journal_queries.append(params(request)["sysparm_query"])
            return result([{"sys_id": "j1", "value": MARKED}] if self.landed else [])
        raise httpx.ReadTimeout("the instance is slow", request=request)


def test_a_note_whose_answer_is_lost_is_confirmed_from_the_journal_and_not_sent_again() -> None:
    instance = LostAnswers(landed=True)
    setup = Setup(api=instance)
    ref = WorkItemRef(id=INC_ID, number="INC0010001")

    setup.connector.add_note(ref, MARKED)

    patches = [r for r in setup.instance.api_requests if r.method == "PATCH"]
    assert len(patches) == 1
    assert instance.journal_queries == [
        f"element_id={INC_ID}^element=work_notes^valueLIKE[Azure Monitor delivery "
        "0123456789abcdef0123456789abcdef]"
    ]


@pytest.mark.parametrize("text", [MARKED, "a note without a marker"])
def test_a_note_whose_answer_is_lost_and_not_found_is_not_sent_again_here(text: str) -> None:
    setup = Setup(api=LostAnswers(landed=False))
    ref = WorkItemRef(id=INC_ID, number="INC0010001")

    with pytest.raises(ItsmUnavailableError, match="ReadTimeout"):
        setup.connector.resolve(ref, text)

    assert [r.method for r in setup.instance.api_requests].count("PATCH") == 1
    assert setup.sleeps == []  # an ambiguous write is not retried blindly


class SlowCmdb:
    """Creates a CI on POST and loses the answer (``commits``: whether the create was carried out)."""

    def __init__(self, *, commits: bool) -> None:
        self.commits = commits
        self.created: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/api/now/table/cmdb_ci":
            name = params(request)["sysparm_query"].removeprefix("name=")
            return result([{"sys_id": "ci-1", "name": name}] if name in self.created else [])
        assert (request.method, request.url.path) == ("POST", "/api/now/table/cmdb_ci_server")
        if self.commits:
            self.created.append(body(request)["name"])
        raise httpx.ReadTimeout("the instance is slow", request=request)


@pytest.mark.parametrize("commits", [True, False])
def test_a_ci_create_whose_answer_is_lost_is_looked_up_not_posted_twice(commits: bool) -> None:
    setup = Setup(api=SlowCmdb(commits=commits))
    if commits:
        assert setup.connector.ensure_configuration_item("web-01", create=True) == "ci-1"
    else:
        with pytest.raises(ItsmUnavailableError, match="ReadTimeout"):
            setup.connector.ensure_configuration_item("web-01", create=True)
    assert [r.method for r in setup.instance.api_requests].count("POST") == 1


def test_a_ci_missing_from_the_cmdb_is_looked_up_once_per_ttl() -> None:
    now = [100.0]
    setup = Setup(api=CmdbApi(), monotonic=lambda: now[0])

    def lookups() -> int:
        return sum(r.url.path == "/api/now/table/cmdb_ci" for r in setup.instance.api_requests)

    for _ in range(3):
        setup.connector.create_incident(draft(configuration_item="not-in-cmdb"))
    assert lookups() == 1  # the miss is remembered
    assert all("cmdb_ci" not in body(r) for r in setup.instance.api_requests if r.method == "POST")

    now[0] += CI_MISS_SECONDS + 1
    assert setup.connector.ensure_configuration_item("not-in-cmdb", create=False) is None
    assert lookups() == 2  # asked again once the miss expired

    # a caller allowed to create does not take the remembered miss for an answer
    assert setup.connector.ensure_configuration_item("not-in-cmdb", create=True) == "ci-new"
    assert setup.connector.ensure_configuration_item("not-in-cmdb", create=False) == "ci-new"


# -- the feed read two ways: straight from the answer's bytes, and row by row ----------------------


def answer_bytes(*rows: dict[str, Any]) -> bytes:
    return json.dumps({"result": list(rows)}).encode()


def as_dict(item: WorkItem) -> dict[str, Any]:
    return {name: (type(value), value) for name, value in item.__dict__.items()}


REGULAR_ROWS = [
    (WorkItemType.INCIDENT, INCIDENT_ROW),
    (WorkItemType.CHANGE_REQUEST, CHANGE_ROW),
    # keys with blanks around them, a custom state, text beyond ASCII, every optional date empty
    (
        WorkItemType.INCIDENT,
        INCIDENT_ROW
        | {
            "sys_id": pair(f"  {INC_ID} "),
            "number": pair(" INC0010001"),
            "state": pair("11", "Awaiting vendor"),
            "short_description": pair("Dépassement mémoire sur web-prod-01 \u2014 \U0001f525"),
            "sys_created_on": pair(""),
            "resolved_at": pair(""),
        },
    ),
    # no raw state value: the label, then the resolution dates decide
    (WorkItemType.INCIDENT, INCIDENT_ROW | {"state": pair("", "Closed")}),
    (WorkItemType.INCIDENT, INCIDENT_ROW | {"state": pair("", "")}),
    (WorkItemType.CHANGE_REQUEST, CHANGE_ROW | {"state": pair("4", "Canceled"), "work_end": pair("")}),
]


@pytest.mark.parametrize(("item_type", "row"), REGULAR_ROWS)
def test_an_answer_read_straight_into_fields_maps_as_the_row_by_row_reading(
    item_type: WorkItemType, row: dict[str, Any]
) -> None:
    """The sync reads a regular answer with pydantic-core, straight from its bytes; the result is
    the same work item, value for value and type for type, as the general reading of the row."""
    fields = feed_fields(item_type, answer_bytes(row, row))
    assert fields is not None, "a regular answer takes the direct reading"
    assert len(fields) == 2
    direct = fields_to_work_item("prod", item_type, fields[0])
    assert as_dict(direct) == as_dict(row_to_work_item("prod", item_type, row))


IRREGULAR_ROWS = {
    "a null display value": INCIDENT_ROW | {"urgency": {"value": "1", "display_value": None}},
    "a number": INCIDENT_ROW | {"state": {"value": 6, "display_value": "Resolved"}},
    "a plain string": INCIDENT_ROW | {"category": "network"},
    "a field left out": {name: value for name, value in INCIDENT_ROW.items() if name != "cmdb_ci"},
    "a list": INCIDENT_ROW | {"description": {"value": "a", "display_value": ["a"]}},
}


@pytest.mark.parametrize("irregular", IRREGULAR_ROWS.values(), ids=list(IRREGULAR_ROWS))
def test_an_answer_with_one_irregular_row_is_left_to_the_row_by_row_reading(
    irregular: dict[str, Any],
) -> None:
    assert feed_fields(WorkItemType.INCIDENT, answer_bytes(INCIDENT_ROW, irregular)) is None
    assert feed_fields(WorkItemType.INCIDENT, answer_bytes(irregular, INCIDENT_ROW)) is None


INCIDENT_JSON = json.dumps(INCIDENT_ROW)


def answer_of(row_json: str, *, before: str = "", after: str = "") -> bytes:
    return (before + '{"result": [' + row_json + "]}" + after).encode("utf-8", "surrogatepass")


def with_extra(text: str) -> str:
    """The incident row with one more field (one the sync does not ask for)."""
    return INCIDENT_JSON[:-1] + f', "extra": {text}}}'


def retitled(title: str) -> str:
    return INCIDENT_JSON.replace("Sev1 CPU high", title)


TAKEN, REFUSED = True, False


@pytest.mark.parametrize(
    ("content", "taken"),
    [
        # duplicate keys: the last one counts, for the json module and for pydantic-core alike
        (answer_of(INCIDENT_JSON[:-1] + ', "number": {"value": "INC9", "display_value": "INC9"}}'), TAKEN),
        (
            answer_of(INCIDENT_JSON.replace('"value": "INC0010001"', '"value": "X", "value": "INC0010001"')),
            TAKEN,
        ),
        (('{"result": [], "result": [' + INCIDENT_JSON + "]}").encode(), TAKEN),
        # escapes, a surrogate pair, a NUL; odd numbers (NaN too) in a field nobody reads
        (answer_of(retitled('Sev1 \\u00e9\\ud83d\\udd25 \\u0000 \\" CPU')), TAKEN),
        (answer_of(with_extra("[1e400, -0.0, 12345678901234567890, NaN, -Infinity]")), TAKEN),
        (answer_of(with_extra("9" * 4000)), TAKEN),
        (answer_of(INCIDENT_JSON, before="  \n", after="\n\t "), TAKEN),
        # what pydantic-core refuses and Python reads: a lone surrogate, a byte order mark
        (answer_of(retitled("Sev1 \\ud800 CPU")), REFUSED),
        (answer_of(INCIDENT_JSON, before="\ufeff"), REFUSED),
    ],
)
def test_the_direct_reading_sees_the_rows_the_json_module_sees_or_leaves_the_answer_to_it(
    content: bytes, taken: bool
) -> None:
    """pydantic-core parses the answer's bytes itself: where it takes an answer, it must see the
    rows Python's ``json`` module sees (duplicate keys, escapes, odd numbers); where it refuses
    one, the row-by-row reading reads it as before."""
    direct = feed_fields(WorkItemType.INCIDENT, content)
    rows = json.loads(content.decode("utf-8-sig", "surrogatepass"))["result"]
    general = [row_fields(WorkItemType.INCIDENT, row) for row in rows]
    if taken:
        assert direct == general
    else:
        assert direct is None


def test_answers_that_are_not_a_result_list_are_left_to_the_general_reading() -> None:
    assert feed_fields(WorkItemType.INCIDENT, b"<html>Instance hibernating</html>") is None
    assert feed_fields(WorkItemType.INCIDENT, b'{"result": {"sys_id": "x"}}') is None
    assert feed_fields(WorkItemType.INCIDENT, b"") is None
    assert feed_fields(WorkItemType.INCIDENT, b'{"result": []}') == []


def test_a_row_with_two_faults_reports_its_key_field_first() -> None:
    """The row-by-row reading checks every field's shape, but a missing or unreadable key field is
    what the error log reports first (where the row sits and what it is), as it always did."""
    two_faults = INCIDENT_ROW | {"sys_id": pair(" "), "impact": {"value": "1", "display_value": ["x"]}}
    with pytest.raises(ValueError, match=r"^sys_id: missing"):
        row_to_work_item("prod", WorkItemType.INCIDENT, two_faults)
    bad_time = INCIDENT_ROW | {"sys_updated_on": pair("yesterday"), "description": {"display_value": {}}}
    with pytest.raises(ValueError, match=r"^sys_updated_on: not a ServiceNow date-time"):
        row_to_work_item("prod", WorkItemType.INCIDENT, bad_time)
    only_a_field = INCIDENT_ROW | {"impact": {"value": "1", "display_value": ["x"]}}
    with pytest.raises(ValueError, match=r"^impact: unexpected list value"):
        row_to_work_item("prod", WorkItemType.INCIDENT, only_a_field)


def full_row(sys_id: str, updated: str, **changes: Any) -> dict[str, Any]:
    return (
        INCIDENT_ROW
        | {"sys_id": pair(sys_id), "number": pair(f"INC{sys_id}"), "sys_updated_on": pair(updated)}
        | changes
    )


def test_a_page_read_directly_and_the_same_page_read_row_by_row_are_the_same_page() -> None:
    rows = [
        full_row("a1", "2024-03-01 12:00:01"),
        full_row("a2", "2024-03-01 12:00:02", resolved_at=pair("01/03/2024")),
        full_row("a3", "2024-03-01 12:00:03", state=pair("7", "Closed")),
    ]
    irregular = [*rows[:2], rows[2] | {"urgency": {"value": "1", "display_value": None}}]
    pages = []
    for answer in (rows, irregular):
        setup = Setup(api=FeedApi(answer))
        pages.append(setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 3))
    direct, general = pages
    assert feed_fields(WorkItemType.INCIDENT, answer_bytes(*rows)) is not None
    assert feed_fields(WorkItemType.INCIDENT, answer_bytes(*irregular)) is None
    for page in pages:
        assert [item.source_id for item in page.items] == ["a1", "a3"]
        assert [(r.source_id, r.error[:12]) for r in page.rejected] == [("a2", "resolved_at:")]
        assert page.next_cursor == SyncCursor(updated_at=utc(2024, 3, 1, 12, 0, 3), last_id="a3")
        assert page.is_last is False
    assert [as_dict(item) for item in direct.items[:1]] == [as_dict(item) for item in general.items[:1]]
    assert direct.items[1].lifecycle is Lifecycle.CLOSED
    assert general.items[1].urgency == "1"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"sys_id": pair(" ")}, "sys_id: missing"),
        ({"number": pair("")}, "number: missing"),
        ({"sys_updated_on": pair("")}, "sys_updated_on: missing"),
        ({"sys_updated_on": pair("yesterday")}, "sys_updated_on: not a ServiceNow date-time"),
        ({"resolved_at": pair("03/01/2024")}, "resolved_at: not a ServiceNow date-time"),
        ({"sys_created_on": pair("2024-13-01 00:00:00")}, "sys_created_on: not a ServiceNow date-time"),
    ],
)
def test_both_readings_reject_a_bad_row_with_the_same_words(change: dict[str, Any], error: str) -> None:
    row = INCIDENT_ROW | change
    fields = feed_fields(WorkItemType.INCIDENT, answer_bytes(row))
    assert fields is not None
    with pytest.raises(ValueError, match=error) as direct:
        fields_to_work_item("prod", WorkItemType.INCIDENT, fields[0])
    with pytest.raises(ValueError, match=error) as general:
        row_to_work_item("prod", WorkItemType.INCIDENT, row)
    assert str(direct.value) == str(general.value)


def test_a_page_with_irregular_rows_still_reads_every_row_and_sits_at_its_last_one() -> None:
    """One irregular row sends the whole answer to the row-by-row reading: the regular rows map as
    ever, a row that reads oddly but validly maps too, and an unreadable row is rejected while its
    position still counts for the cursor."""
    regular = row("a1", "2024-03-01 12:00:01")
    odd = row("a2", "2024-03-01 12:00:02") | {"urgency": {"value": "1", "display_value": None}}
    unreadable = row("a3", "2024-03-01 12:00:03") | {"description": {"value": "x", "display_value": ["x"]}}
    api = FeedApi([regular, odd, unreadable])
    setup = Setup(api=api)
    page = setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 3)
    assert [item.source_id for item in page.items] == ["a1", "a2"]
    assert page.items[1].urgency == "1"
    [rejected] = page.rejected
    assert rejected.source_id == "a3"
    assert rejected.error.startswith("description: unexpected list")
    assert page.next_cursor == SyncCursor(updated_at=utc(2024, 3, 1, 12, 0, 3), last_id="a3")
    assert page.is_last is False


def test_a_feed_answer_that_is_not_json_is_unavailable_not_an_empty_page() -> None:
    setup = Setup(api=lambda request: httpx.Response(200, text="<html>Instance hibernating</html>"))
    with pytest.raises(ItsmUnavailableError, match="not JSON"):
        setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)
    setup = Setup(api=lambda request: httpx.Response(200, json={"result": {"sys_id": "x"}}))
    with pytest.raises(ItsmUnavailableError, match="without a result list"):
        setup.connector.fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=T0), 10)
