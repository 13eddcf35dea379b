"""Error paths of the SCSM connector and its sign-in, over ``httpx.MockTransport`` (no network)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, WorkItemRef, WorkItemType
from shared_code.errors import ItsmAuthError, ItsmRejectedError, ItsmUnavailableError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.scsm.auth import CiresonTokenAuth
from shared_code.itsm.scsm.connector import ScsmConnector
from shared_code.itsm.scsm.settings import ScsmConnection

PORTAL = "https://portal.contoso.com"
PASSWORD = "correct horse battery staple"
USER_ID = "3b9d2f40-5a1c-4e7e-9c1d-2f3a4b5c6d7e"
Handler = Callable[[httpx.Request], httpx.Response]


class Portal:
    """Answers the sign-in; every other request goes to ``api`` (counted per path)."""

    def __init__(self, api: Handler, sign_in: Handler | None = None) -> None:
        self.api = api
        self.sign_in = sign_in or (lambda request: httpx.Response(200, json="token-1"))
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/api/V3/Authorization/GetToken":
            return self.sign_in(request)
        return self.api(request)


def connector(portal: Portal, **settings: str) -> ScsmConnector:
    client = httpx.Client(transport=httpx.MockTransport(portal), timeout=5)
    connection = ScsmConnection(
        name="scsm-1",
        server_url=PORTAL,
        username="CONTOSO\\svc-azmon",
        **({"created_by_id": USER_ID} | settings),
    )
    auth = CiresonTokenAuth(
        PORTAL, username=connection.username, password=SecretStr(PASSWORD), connection_name="scsm-1"
    )
    return ScsmConnector(connection, client, auth, retry=RetryPolicy(max_attempts=3, sleep=lambda _: None))


REF = WorkItemRef(id="0c6bd0b8-5d5f-4b5b-9a43-5c1a1e8c7d01", number="IR4711")
DRAFT = IncidentDraft(
    short_description="t", description="d", impact=2, urgency=2, correlation_id="azmon-1a2b3c4d-g1"
)


def test_an_html_page_where_json_belongs_is_a_clear_unavailable_error() -> None:
    page = "<html><body>Sign in to continue</body></html>"
    portal = Portal(lambda request: httpx.Response(200, text=page, headers={"Content-Type": "text/html"}))

    with pytest.raises(ItsmUnavailableError, match=r"answered HTTP 200 with text/html, not JSON"):
        connector(portal).get_state(REF)


def test_a_commit_refused_inside_a_200_answer_is_rejected_with_the_portals_reason_and_not_retried() -> None:
    commits: list[dict[str, object]] = []

    def api(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("CreateProjectionByTemplate"):
            return httpx.Response(
                200, json={"ClassTypeId": "a604b942-4c7b-2fb2-28dc-61dc6f465c68", "Id": "IR{0}"}
            )
        if request.url.path.endswith("Commit"):
            commits.append(json.loads(request.content))
            return httpx.Response(
                200,
                json={
                    "success": False,
                    "exception": "The enumeration value 'x' of property 'Impact' is not valid.",
                },
            )
        return httpx.Response(200, json=[])

    with pytest.raises(ItsmRejectedError, match="refused to save the new incident: The enumeration value"):
        connector(Portal(api)).create_incident(DRAFT)
    assert len(commits) == 1
    assert commits[0]["formJson"]["original"] is None  # type: ignore[index]


def test_a_redirect_and_a_web_api_error_name_what_happened() -> None:
    redirect = Portal(
        lambda request: httpx.Response(302, headers={"Location": "https://adfs.contoso.com/adfs/ls"})
    )
    with pytest.raises(ItsmRejectedError, match=r"redirected .* to adfs.contoso.com \(HTTP 302\)"):
        connector(redirect).get_state(REF)

    bad = Portal(
        lambda request: httpx.Response(
            400, json={"Message": "The request is invalid.", "MessageDetail": "Id"}
        )
    )
    with pytest.raises(ItsmRejectedError, match=r"HTTP 400\): The request is invalid.: Id") as caught:
        connector(bad).get_state(REF)
    assert caught.value.status == 400


def test_a_refused_sign_in_asks_to_reauthorise_and_never_shows_the_password() -> None:
    portal = Portal(
        lambda request: httpx.Response(200, json=[]),
        sign_in=lambda request: httpx.Response(
            401, json={"Message": "The user name or password is incorrect."}
        ),
    )
    scsm = connector(portal)

    with pytest.raises(ItsmAuthError, match="re-authorise the connection") as caught:
        scsm.get_state(REF)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(scsm) + repr(scsm._auth)


def test_a_sign_in_that_answers_a_web_page_is_not_taken_for_a_token() -> None:
    portal = Portal(
        lambda request: httpx.Response(200, json=[]),
        sign_in=lambda request: httpx.Response(
            200, text="<html>login</html>", headers={"Content-Type": "text/html"}
        ),
    )

    with pytest.raises(ItsmUnavailableError, match="text/html without a token"):
        connector(portal).get_state(REF)


def test_a_sign_in_outage_is_retried_within_the_policy() -> None:
    answers = iter([httpx.Response(503), httpx.Response(200, json="token-2")])
    seen: list[str] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json=[])

    assert (
        connector(Portal(api, sign_in=lambda request: next(answers)))
        .fetch_changes(WorkItemType.INCIDENT, SyncCursor(updated_at=datetime.now(UTC)), 10)
        .is_last
    )
    assert seen == ["Token token-2"]


def test_an_expired_token_is_renewed_once_and_a_second_refusal_asks_to_reauthorise() -> None:
    tokens = iter(["old", "new", "newer"])
    accepted = {"new"}
    sign_ins: list[str] = []

    def sign_in(request: httpx.Request) -> httpx.Response:
        sign_ins.append(json.loads(request.content)["UserName"])
        return httpx.Response(200, json=next(tokens))

    def api(request: httpx.Request) -> httpx.Response:
        token = request.headers["Authorization"].removeprefix("Token ")
        if token not in accepted:
            return httpx.Response(401, json={"Message": "Authorization has been denied for this request."})
        return httpx.Response(200, json=[{"BaseId": REF.id, "Id": REF.number, "Status": {"Id": "x"}}])

    scsm = connector(Portal(api, sign_in=sign_in))
    assert scsm.get_state(REF).value == "open"
    assert sign_ins == ["CONTOSO\\svc-azmon", "CONTOSO\\svc-azmon"]

    accepted.clear()
    with pytest.raises(ItsmAuthError, match="HTTP 401"):
        scsm.get_state(REF)
    assert len(sign_ins) == 3  # one more sign-in, then the second 401 goes back to the caller


def test_an_ambiguous_user_search_asks_for_the_user_objects_guid() -> None:
    users = [
        {"Id": "a" * 8 + "-0000-4000-8000-000000000001", "Name": "svc-azmon"},
        {"Id": USER_ID, "Name": "x"},
    ]
    portal = Portal(lambda request: httpx.Response(200, json=users))

    with pytest.raises(ItsmRejectedError, match="found 2; set the user object's GUID with --created-by-id"):
        connector(portal, created_by_id="").create_incident(DRAFT)


def test_a_client_without_timeouts_is_refused() -> None:
    connection = ScsmConnection(name="scsm-1", server_url=PORTAL, username="u")
    auth = CiresonTokenAuth(PORTAL, username="u", password=SecretStr("p"))
    with pytest.raises(ValueError, match="explicit connect and read timeouts"):
        ScsmConnector(connection, httpx.Client(timeout=None), auth)
