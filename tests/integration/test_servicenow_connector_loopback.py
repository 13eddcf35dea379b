"""The ServiceNow connector against the loopback instance: real HTTP, TLS, OAuth and encoded queries."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, WorkItemState, WorkItemType
from shared_code.errors import ItsmAuthError, ItsmRejectedError
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.servicenow.auth import ServiceNowBasicAuth, ServiceNowOAuth
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from tests.loopback.servicenow import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ServiceNowLoopback,
)
from tests.loopback.tls import loopback_tls

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class MemoryStore:
    def __init__(self) -> None:
        self.token: str | None = None
        self.saves = 0

    def load(self) -> str | None:
        return self.token

    def save(self, token: str) -> None:
        self.token = token
        self.saves += 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def snow(clock: Clock) -> Iterator[ServiceNowLoopback]:
    with ServiceNowLoopback(rotate_refresh_tokens=True, clock=clock) as server:
        yield server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(verify=loopback_tls().client_context(), timeout=10) as http:
        yield http


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def make_connector(
    snow: ServiceNowLoopback,
    client: httpx.Client,
    store: MemoryStore,
    sleeps: list[float],
    close_code: str = "Solved (Permanently)",
) -> ServiceNowConnector:
    auth = ServiceNowOAuth(
        f"{snow.url}/oauth_token.do",
        client_id=DEFAULT_CLIENT_ID,
        client_secret=SecretStr(DEFAULT_CLIENT_SECRET),
        username=DEFAULT_USERNAME,
        password=lambda: SecretStr(DEFAULT_PASSWORD),
        refresh_token_store=store,
        connection_name="loopback",
    )
    policy = RetryPolicy(sleep=sleeps.append, jitter=lambda cap: 0.0)
    return ServiceNowConnector("loopback", snow.url, client, auth, retry=policy, close_code=close_code)


@pytest.fixture
def connector(
    snow: ServiceNowLoopback, client: httpx.Client, store: MemoryStore, sleeps: list[float]
) -> ServiceNowConnector:
    return make_connector(snow, client, store, sleeps)


def draft(correlation_id: str, **overrides: object) -> IncidentDraft:
    fields: dict[str, object] = {
        "short_description": "Sev1 CPU high",
        "description": "Azure Monitor alert fired",
        "impact": 1,
        "urgency": 1,
        "correlation_id": correlation_id,
        "correlation_display": "Azure Monitor",
    } | overrides
    return IncidentDraft.model_validate(fields)


def test_incident_lifecycle(
    snow: ServiceNowLoopback, connector: ServiceNowConnector, store: MemoryStore
) -> None:
    assert "answered as 'itsm.connector'" in connector.check()
    ref = connector.create_incident(
        draft("azmon:1", configuration_item="web^ORname=x", create_configuration_item=True)
    )
    record = snow.record("incident", ref.id)
    assert record is not None
    assert record["number"] == ref.number
    assert record["contact_type"] == "monitoring"
    [ci] = snow.find("cmdb_ci", name="web^ORname=x")
    assert record["cmdb_ci"] == ci["sys_id"]
    assert ci["sys_class_name"] == "cmdb_ci_server"
    assert connector.ensure_configuration_item("web^ORname=x", create=False) == ci["sys_id"]

    assert connector.find_by_correlation("azmon:1") == ref
    assert connector.find_by_correlation("azmon:2") is None
    connector.add_note(ref, "fired again")
    writes = snow.write_count()
    connector.resolve(ref, "the alert resolved")
    assert snow.write_count() == writes + 1
    assert connector.get_state(ref) is WorkItemState.RESOLVED
    assert connector.find_by_correlation("azmon:1") is None  # a resolved incident is never taken over
    connector.reopen(ref, "fired after resolution")
    assert connector.get_state(ref) is WorkItemState.OPEN
    notes = [entry["value"] for entry in snow.journal(ref.id) if entry["element"] == "work_notes"]
    assert notes == ["fired again", "the alert resolved", "fired after resolution"]
    assert store.saves == 1  # the refresh token of the password grant


def test_expired_and_revoked_tokens_recover(snow: ServiceNowLoopback, connector: ServiceNowConnector) -> None:
    connector.check()
    snow.expire_access_tokens()
    connector.check()  # 401 -> refresh grant (rotated) -> retry
    snow.expire_access_tokens()
    snow.revoke_refresh_tokens()
    connector.check()  # 401 -> refresh refused -> password grant -> retry


def test_wrong_password_is_an_auth_error(snow: ServiceNowLoopback, client: httpx.Client) -> None:
    auth = ServiceNowOAuth(
        f"{snow.url}/oauth_token.do",
        client_id=DEFAULT_CLIENT_ID,
        client_secret=SecretStr(DEFAULT_CLIENT_SECRET),
        username=DEFAULT_USERNAME,
        password=SecretStr("wrong-password"),
        connection_name="loopback",
    )
    connector = ServiceNowConnector("loopback", snow.url, client, auth)
    with pytest.raises(ItsmAuthError) as info:
        connector.check()
    assert "wrong-password" not in str(info.value)
    basic = ServiceNowConnector(
        "loopback", snow.url, client, ServiceNowBasicAuth(DEFAULT_USERNAME, SecretStr("nope"))
    )
    with pytest.raises(ItsmAuthError):
        basic.check()
    good = ServiceNowConnector(
        "loopback", snow.url, client, ServiceNowBasicAuth(DEFAULT_USERNAME, SecretStr(DEFAULT_PASSWORD))
    )
    assert good.check()


def test_faults_are_retried_and_rejections_mapped(
    snow: ServiceNowLoopback,
    connector: ServiceNowConnector,
    client: httpx.Client,
    store: MemoryStore,
    sleeps: list[float],
) -> None:
    connector.check()
    snow.fail_next(1, 429, retry_after=2)
    snow.fail_next(1, 503)
    connector.check()
    assert sleeps == [2.0, 0.0]
    ref = connector.create_incident(draft("azmon:9"))
    with pytest.raises(ItsmRejectedError) as info:
        make_connector(snow, client, store, sleeps, close_code="").resolve(ref, "no code")
    assert info.value.status == 403
    assert "mandatory" in str(info.value)


def test_fetch_changes_reads_every_row_once_across_same_second_groups(
    snow: ServiceNowLoopback, connector: ServiceNowConnector
) -> None:
    snow.seed_work_items("incident", 400, start=T0, end=T0 + timedelta(hours=2))
    expected = {rec["sys_id"] for rec in snow.records("incident")}
    cursor = SyncCursor(updated_at=T0 - timedelta(seconds=1))
    seen: list[str] = []
    for _ in range(200):
        page = connector.fetch_changes(WorkItemType.INCIDENT, cursor, 7)
        assert page.rejected == []
        seen += [item.source_id for item in page.items]
        cursor = page.next_cursor
        if page.is_last:
            break
    assert len(seen) == len(set(seen))
    assert set(seen) == expected
    drains = [params for _, path, params in snow.requests if "sys_id>" in params.get("sysparm_query", "")]
    assert drains, "the seed has same-second bursts: some pages must have ended inside one"
    last = connector.fetch_changes(WorkItemType.INCIDENT, cursor, 7)
    assert last.items == []
    assert last.is_last
