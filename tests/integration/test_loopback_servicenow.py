"""The loopback ServiceNow instance speaks the documented protocol (OAuth, Table API, encoded queries)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.loopback.servicenow import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ServiceNowLoopback,
    parse_encoded_query,
)
from tests.loopback.tls import loopback_tls

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def snow(clock: Clock) -> Iterator[ServiceNowLoopback]:
    with ServiceNowLoopback(rotate_refresh_tokens=True, clock=clock) as server:
        yield server


@pytest.fixture
def http(snow: ServiceNowLoopback) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=snow.url, verify=loopback_tls().client_context(), timeout=10) as client:
        yield client


def password_grant(http: httpx.Client, **overrides: str) -> httpx.Response:
    form = {
        "grant_type": "password",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
        "username": DEFAULT_USERNAME,
        "password": DEFAULT_PASSWORD,
    } | overrides
    return http.post("/oauth_token.do", data=form)


@pytest.fixture
def auth(http: httpx.Client) -> dict[str, str]:
    token = password_grant(http).json()["access_token"]
    return {"Authorization": f"Bearer {token}", "Accept": "application/json"}


def names(response: httpx.Response, field: str = "short_description") -> list[str]:
    assert response.status_code == 200, response.text
    return [row[field] for row in response.json()["result"]]


# -- OAuth ---------------------------------------------------------------------------------------


def test_password_grant_then_refresh_rotates(http: httpx.Client, snow: ServiceNowLoopback) -> None:
    first = password_grant(http)
    assert first.status_code == 200
    body = first.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "useraccount"
    assert body["expires_in"] == 1799

    refresh = {
        "grant_type": "refresh_token",
        "client_id": DEFAULT_CLIENT_ID,
        "client_secret": DEFAULT_CLIENT_SECRET,
        "refresh_token": body["refresh_token"],
    }
    second = http.post("/oauth_token.do", data=refresh)
    assert second.status_code == 200
    assert second.json()["refresh_token"] != body["refresh_token"]
    again = http.post("/oauth_token.do", data=refresh)  # the rotated-out token is revoked
    assert again.status_code == 401
    assert again.json()["error_description"] == "access_denied"

    assert password_grant(http, password="wrong").status_code == 401
    snow.revoke_refresh_tokens()
    refresh["refresh_token"] = second.json()["refresh_token"]
    assert http.post("/oauth_token.do", data=refresh).status_code == 401


def test_expired_tokens_answer_401_and_basic_auth_works(
    http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str], clock: Clock
) -> None:
    assert http.get("/api/now/table/incident", headers=auth).status_code == 200
    snow.expire_access_tokens()
    denied = http.get("/api/now/table/incident", headers=auth)
    assert denied.status_code == 401
    assert denied.json() == {
        "error": {"message": "User Not Authenticated", "detail": "Required to provide Auth information"},
        "status": "failure",
    }
    fresh = {"Authorization": f"Bearer {snow.mint_access_token()}"}
    assert http.get("/api/now/table/incident", headers=fresh).status_code == 200
    clock.advance(1800)  # past expires_in
    assert http.get("/api/now/table/incident", headers=fresh).status_code == 401
    basic = http.get("/api/now/table/incident", auth=(DEFAULT_USERNAME, DEFAULT_PASSWORD))
    assert basic.status_code == 200
    assert http.get("/api/now/table/incident", auth=(DEFAULT_USERNAME, "nope")).status_code == 401


# -- Table API -----------------------------------------------------------------------------------


def test_create_incident_numbers_priority_and_journal(
    http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str]
) -> None:
    (ci,) = snow.seed_cis(["web-01"])
    created = http.post(
        "/api/now/table/incident",
        headers=auth,
        json={
            "short_description": "Disk full",
            "impact": 1,
            "urgency": "2",
            "cmdb_ci": ci,
            "work_notes": "First",
        },
    )
    assert created.status_code == 201, created.text
    rec = created.json()["result"]
    assert rec["number"] == "INC0010001"
    assert len(rec["sys_id"]) == 32
    assert rec["sys_id"] == rec["sys_id"].lower()
    assert (rec["priority"], rec["state"], rec["active"], rec["work_notes"]) == ("2", "1", "true", "")
    assert rec["sys_created_on"] == rec["sys_updated_on"] == "2024-03-01 12:00:00"
    assert rec["sys_created_by"] == DEFAULT_USERNAME
    assert rec["cmdb_ci"]["value"] == ci
    assert rec["cmdb_ci"]["link"].endswith(f"/api/now/table/cmdb_ci/{ci}")

    second = http.post("/api/now/table/incident", headers=auth, json={"short_description": "Other"})
    assert second.json()["result"]["number"] == "INC0010002"
    change = http.post("/api/now/table/change_request", headers=auth, json={"short_description": "Patch"})
    assert change.json()["result"]["number"] == "CHG0030001"
    assert change.json()["result"]["state"] == "-5"

    sys_id = rec["sys_id"]
    patched = http.patch(
        f"/api/now/table/incident/{sys_id}", headers=auth, json={"comments": "Caller informed"}
    )
    assert patched.json()["result"]["sys_mod_count"] == "1"
    assert [(e["element"], e["value"]) for e in snow.journal(sys_id)] == [
        ("work_notes", "First"),
        ("comments", "Caller informed"),
    ]
    listed = http.get(
        "/api/now/table/sys_journal_field",
        headers=auth,
        params={"sysparm_query": f"element_id={sys_id}^element=work_notes", "sysparm_fields": "value,name"},
    )
    assert listed.json()["result"] == [{"value": "First", "name": "incident"}]
    assert http.post("/api/now/table/sys_journal_field", headers=auth, json={"value": "x"}).status_code == 403

    missing = http.get(f"/api/now/table/incident/{'0' * 32}", headers=auth)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "No Record found"
    assert http.get("/api/now/table/not_a_table", headers=auth).status_code == 400


def test_data_policy_refuses_resolve_without_close_fields(
    http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str], clock: Clock
) -> None:
    sys_id = http.post("/api/now/table/incident", headers=auth, json={"short_description": "x"}).json()[
        "result"
    ]["sys_id"]
    clock.advance(60)
    refused = http.patch(
        f"/api/now/table/incident/{sys_id}", headers=auth, json={"state": "6", "close_code": "x"}
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["message"] == "Operation Failed"
    assert "Data Policy Exception" in refused.json()["error"]["detail"]
    assert "Resolution notes" in refused.json()["error"]["detail"]
    unchanged = snow.record("incident", sys_id)
    assert unchanged is not None
    assert (unchanged["state"], unchanged["sys_mod_count"], unchanged["close_code"]) == ("1", "0", "")

    ok = http.put(
        f"/api/now/table/incident/{sys_id}",
        headers=auth,
        json={"state": 6, "close_code": "Solved (Permanently)", "close_notes": "Rebooted"},
    )
    assert ok.status_code == 200
    result = ok.json()["result"]
    assert result["resolved_at"] == "2024-03-01 12:01:00"
    assert result["sys_updated_on"] == "2024-03-01 12:01:00"
    assert result["active"] == "false"


def test_cmdb_server_is_found_through_parent_table(http: httpx.Client, auth: dict[str, str]) -> None:
    created = http.post("/api/now/table/cmdb_ci_server", headers=auth, json={"name": "db-07", "os": "Linux"})
    assert created.status_code == 201
    found = http.get("/api/now/table/cmdb_ci", headers=auth, params={"sysparm_query": "name=db-07"})
    rows = found.json()["result"]
    assert [(r["name"], r["sys_class_name"]) for r in rows] == [("db-07", "cmdb_ci_server")]
    assert "os" not in rows[0]  # cmdb_ci columns only


def test_encoded_queries(http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str]) -> None:
    for name, impact, urgency in [
        ("alpha", 1, 1),
        ("beta", 2, 2),
        ("a^ORb", 3, 3),
        ("gamma", 1, 3),
        ("delta", 3, 1),
    ]:
        snow.insert_record("incident", short_description=name, impact=impact, urgency=urgency)

    def query(q: str) -> list[str]:
        return names(http.get("/api/now/table/incident", headers=auth, params={"sysparm_query": q}))

    assert query("short_description=alpha^ORshort_description=beta") == ["alpha", "beta"]
    # ^OR binds to the previous condition: priority=3 AND (name=gamma OR name=delta)
    assert query("priority=3^short_description=gamma^ORshort_description=delta") == ["gamma", "delta"]
    assert query("short_description=alpha^NQpriority=5") == ["alpha", "a^ORb"]
    assert query("short_description=a^^ORb") == ["a^ORb"]
    assert query("priority<3^ORpriority=5^ORDERBYDESCshort_description") == ["alpha", "a^ORb"]
    assert query("short_descriptionSTARTSWITHa^ORDERBYpriority^ORDERBYshort_description") == [
        "alpha",
        "a^ORb",
    ]
    assert query("short_descriptionINgamma,delta^ORDERBYshort_description") == ["delta", "gamma"]
    assert query("short_descriptionLIKETA^short_descriptionNOT LIKEz") == ["beta", "delta"]
    assert query("priority>=10") == []  # numeric, not string, comparison
    assert query("no_such_field=1^short_description=beta") == ["beta"]  # invalid conditions are ignored
    assert query("this is ^^ not ^ a query^short_description=beta") == ["beta"]
    response = http.get(
        "/api/now/table/incident",
        headers=auth,
        params={"sysparm_query": "ORDERBYnumber", "sysparm_limit": "2"},
    )
    assert response.headers["X-Total-Count"] == "5"
    assert len(response.json()["result"]) == 2
    assert 'rel="next"' in response.headers["Link"]

    parsed = parse_encoded_query("a=1^ORb=2^c=3^NQd=4^ORDERBYe")
    assert [[[c.field for c in clause] for clause in group] for group in parsed.groups] == [
        [["a", "b"], ["c"]],
        [["d"]],
    ]


def test_display_value_shapes(http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str]) -> None:
    (user,) = snow.seed_users(["Beth Anglin"])
    snow.insert_record("incident", short_description="x", assigned_to=user, state=2)
    params = {"sysparm_fields": "number,state,assigned_to,short_description,assigned_to.email"}
    all_ = http.get("/api/now/table/incident", headers=auth, params=params | {"sysparm_display_value": "all"})
    row = all_.json()["result"][0]
    assert row["state"] == {"display_value": "In Progress", "value": "2"}
    assert row["assigned_to"] == {
        "display_value": "Beth Anglin",
        "value": user,
        "link": f"{snow.url}/api/now/table/sys_user/{user}",
    }
    assert row["assigned_to.email"] == {
        "display_value": "beth.anglin@example.com",
        "value": "beth.anglin@example.com",
    }
    true_ = http.get(
        "/api/now/table/incident",
        headers=auth,
        params=params | {"sysparm_display_value": "true", "sysparm_exclude_reference_link": "true"},
    )
    assert true_.json()["result"][0]["assigned_to"] == "Beth Anglin"
    assert true_.json()["result"][0]["state"] == "In Progress"
    plain = http.get(
        "/api/now/table/incident", headers=auth, params=params | {"sysparm_exclude_reference_link": "true"}
    )
    assert plain.json()["result"][0]["assigned_to"] == user


def test_keyset_paging_returns_each_row_once(
    http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str]
) -> None:
    ids = snow.seed_work_items("incident", 5000, start=T0 - timedelta(days=2), end=T0, rng_seed=3)
    stamps = [r["sys_updated_on"] for r in snow.records("incident")]
    assert len(set(stamps)) < len(stamps) - 500  # plenty of rows share a second
    seen: list[str] = []
    cursor: tuple[str, str] | None = None
    while True:
        if cursor is None:
            q = "sys_updated_on>=2000-01-01 00:00:00^ORDERBYsys_updated_on^ORDERBYsys_id"
        else:
            q = (
                f"sys_updated_on={cursor[0]}^sys_id>{cursor[1]}^NQsys_updated_on>{cursor[0]}"
                "^ORDERBYsys_updated_on^ORDERBYsys_id"
            )
        page = http.get(
            "/api/now/table/incident",
            headers=auth,
            params={"sysparm_query": q, "sysparm_limit": "700", "sysparm_fields": "sys_id,sys_updated_on"},
        )
        assert snow.last_plan == "index"
        rows = page.json()["result"]
        if not rows:
            break
        seen.extend(r["sys_id"] for r in rows)
        cursor = (rows[-1]["sys_updated_on"], rows[-1]["sys_id"])
    assert len(seen) == len(set(seen)) == 5000
    assert set(seen) == set(ids)

    # same-second paging alone (the two-request style) also runs on the index
    busiest = max(set(stamps), key=stamps.count)
    same_second = http.get(
        "/api/now/table/incident",
        headers=auth,
        params={
            "sysparm_query": f"sys_updated_on={busiest}^sys_id>0^ORDERBYsys_id",
            "sysparm_fields": "sys_id",
        },
    )
    assert snow.last_plan == "index"
    got = [r["sys_id"] for r in same_second.json()["result"]]
    assert got == sorted(got)
    assert len(got) == stamps.count(busiest)

    # an edit moves the row to the end of the feed
    snow.update_record("incident", ids[0], work_notes="edited")
    tail = http.get(
        "/api/now/table/incident",
        headers=auth,
        params={"sysparm_query": f"sys_updated_on>{cursor[0] if cursor else ''}^ORDERBYsys_updated_on"},
    )
    assert [r["sys_id"] for r in tail.json()["result"]] == [ids[0]]


def test_fail_next_429_with_retry_after_and_request_log(
    http: httpx.Client, snow: ServiceNowLoopback, auth: dict[str, str]
) -> None:
    snow.reset_request_log()
    snow.fail_next(2, status=429, retry_after=7, path_contains="/table/incident")
    for _ in range(2):
        failed = http.post("/api/now/table/incident", headers=auth, json={"short_description": "x"})
        assert failed.status_code == 429
        assert failed.headers["Retry-After"] == "7"
        assert failed.json()["status"] == "failure"
    assert (
        http.post("/api/now/table/incident", headers=auth, json={"short_description": "x"}).status_code == 201
    )
    assert snow.count("incident") == 1
    assert snow.write_count() == 3
    assert snow.requests[0] == ("POST", "/api/now/table/incident", {})
    snow.fail_next(1, status=503)
    assert http.get("/api/now/table/incident", headers=auth, params={"sysparm_limit": "1"}).status_code == 503
    assert snow.requests[-1] == ("GET", "/api/now/table/incident", {"sysparm_limit": "1"})


def test_subprocess_mode_and_control_endpoints() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.loopback.servicenow",
            "--seed",
            "incident=300",
            "--span-days",
            "2",
            "--no-tls",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        line = proc.stdout.readline().split()
        assert line[0] == "READY"
        assert line[1].startswith("http://127.0.0.1:")
        with httpx.Client(base_url=line[1], timeout=10) as client:
            stats: dict[str, Any] = client.get("/__loopback/stats").json()
            assert stats["tables"]["incident"] == 300
            assert (
                client.post(
                    "/__loopback/touch", content=json.dumps({"table": "incident", "count": 5})
                ).json()["updated"]
                == 5
            )
            listed = client.get(
                "/api/now/table/incident",
                auth=(DEFAULT_USERNAME, DEFAULT_PASSWORD),
                params={"sysparm_limit": "3"},
            )
            assert listed.headers["X-Total-Count"] == "300"
            assert client.get("/__loopback/stats").json()["request_count"] == 1
        proc.stdin.close()  # closing stdin stops the server
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
