"""The Alerts Management client (azure-core pipeline) against the loopback ARM over TLS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared_code.domain.alert import parse_alert_id
from shared_code.errors import AlertsApiError
from shared_code.monitor.alerts_management import AlertsManagementClient
from shared_code.ports.monitor import CloseOutcome
from tests.loopback.alerts_management import AlertsManagementLoopback
from tests.loopback.entra import StaticTokenCredential
from tests.loopback.tls import loopback_tls

SUB = "0f1e2d3c-4b5a-4697-8887-a9b8c7d6e5f4"
ALERT = (
    f"/subscriptions/{SUB}/providers/Microsoft.AlertsManagement/alerts/6a1b2c3d-0000-4000-8000-00000000abcd"
)


@pytest.fixture
def credential() -> StaticTokenCredential:
    return StaticTokenCredential()


@pytest.fixture
def arm(credential: StaticTokenCredential) -> Iterator[AlertsManagementLoopback]:
    with AlertsManagementLoopback(credential) as server:
        yield server


@pytest.fixture
def client(
    arm: AlertsManagementLoopback, credential: StaticTokenCredential
) -> Iterator[AlertsManagementClient]:
    made = AlertsManagementClient(
        credential, arm.url, ca_bundle=loopback_tls().ca_bundle_path, timeout=5, retry_backoff_max=0.2
    )
    yield made
    made.close()


def test_closing_posts_changestate_with_a_bearer_token(
    arm: AlertsManagementLoopback, client: AlertsManagementClient
) -> None:
    arm.add_alert(ALERT)
    assert client.close_alert(ALERT) is CloseOutcome.CLOSED
    assert arm.alert_state(ALERT) == "Closed"
    (request,) = [r for r in arm.requests() if r.method == "POST"]
    assert request.authorized
    assert request.path.lower() == f"{ALERT}/changestate".lower()
    assert request.query["newState"] == ["Closed"]


def test_429_with_retry_after_and_5xx_are_retried_then_succeed(
    arm: AlertsManagementLoopback, client: AlertsManagementClient
) -> None:
    arm.add_alert(ALERT)
    arm.fail_next(1, 429, retry_after=0.05)
    arm.fail_next(1, 503)
    assert client.close_alert(ALERT) is CloseOutcome.CLOSED
    assert [r.status for r in arm.requests() if r.method == "POST"][-3:] == [429, 503, 200]


def test_a_gone_alert_is_not_found_and_a_persistent_outage_is_transient(
    arm: AlertsManagementLoopback, client: AlertsManagementClient
) -> None:
    assert client.close_alert(ALERT) is CloseOutcome.NOT_FOUND
    arm.add_alert(ALERT)
    arm.fail_next(10, 503)
    with pytest.raises(AlertsApiError) as down:
        client.close_alert(ALERT)
    assert not down.value.permanent
    assert down.value.status == 503


def test_a_refused_token_is_permanent_and_names_the_role(arm: AlertsManagementLoopback) -> None:
    arm.add_alert(ALERT)
    stranger = StaticTokenCredential()  # tokens the loopback does not accept
    client = AlertsManagementClient(stranger, arm.url, ca_bundle=loopback_tls().ca_bundle_path, timeout=5)
    with pytest.raises(AlertsApiError) as refused:
        client.close_alert(ALERT)
    assert refused.value.permanent
    assert "Monitoring Contributor" in str(refused.value)
    assert arm.alert_state(ALERT) != "Closed"


@pytest.mark.parametrize(
    "alert_id",
    [
        f"/subscriptions/{SUB}/x/../../../subscriptions/{SUB}/providers/Microsoft.AlertsManagement/alerts/1",
        f"/subscriptions/{SUB}/resourceGroups/../providers/Microsoft.AlertsManagement/alerts/1",
        f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines/vm1",
        "/subscriptions/0000/providers/Microsoft.AlertsManagement/alerts/1",  # published samples: not a GUID
        f"/subscriptions/{SUB}/providers/Microsoft.AlertsManagement/alerts/1/changestate",
        "https://evil.example/steal",
    ],
)
def test_only_exact_alert_ids_are_closed_and_nothing_is_sent_for_others(
    arm: AlertsManagementLoopback, client: AlertsManagementClient, alert_id: str
) -> None:
    assert parse_alert_id(alert_id) is None
    with pytest.raises(AlertsApiError) as refused:
        client.close_alert(alert_id)
    assert refused.value.permanent
    assert arm.requests() == []


def test_the_url_is_rebuilt_from_the_parsed_parts() -> None:
    ref = parse_alert_id(
        f"/subscriptions/{SUB.upper()}/resourceGroups/rg-1/providers/Microsoft.AlertsManagement/alerts/a-1"
    )
    assert ref is not None
    assert (
        ref.path
        == f"/subscriptions/{SUB}/resourceGroups/rg-1/providers/Microsoft.AlertsManagement/alerts/a-1"
    )
