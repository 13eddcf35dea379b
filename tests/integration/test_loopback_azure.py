"""The loopback Azure services, driven by the REAL Azure SDK clients.

Azurite (tables, queues) is started once for the module; Entra ID, Key Vault, Logs Ingestion and
Alerts Management are the TLS loopbacks in ``tests/loopback``. Credentials come from
azure-identity's DefaultAzureCredential configured by environment variables, exactly as the app
builds them; a socket audit hook fails any test that connects anywhere but 127.0.0.1 / ::1.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from azure.core import MatchConditions, PipelineClient
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy
from azure.core.rest import HttpRequest
from azure.data.tables import TableServiceClient, UpdateMode
from azure.identity import ClientSecretCredential, DefaultAzureCredential
from azure.keyvault.secrets import SecretClient
from azure.monitor.ingestion import LogsIngestionClient
from azure.storage.queue import QueueClient

from tests.loopback.alerts_management import AlertsManagementLoopback
from tests.loopback.azurite import Azurite
from tests.loopback.entra import EntraLoopback, StaticTokenCredential
from tests.loopback.keyvault import KeyVaultLoopback
from tests.loopback.logs_ingestion import LogsIngestionLoopback
from tests.loopback.tls import loopback_tls

RULE_ID = "dcr-00000000000000000000000000000001"
STREAM = "Custom-ItsmWorkItems_CL"
SUBSCRIPTION = "3b540246-808d-4331-99aa-917b808a9166"
ARM_SCOPE = "https://management.azure.com/.default"


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca_path() -> str:
    return loopback_tls().ca_bundle_path


@pytest.fixture(scope="module")
def entra() -> Iterator[EntraLoopback]:
    with EntraLoopback() as server:
        yield server


@pytest.fixture
def azure_env(entra: EntraLoopback, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The standard variables the app reads, pointing at the loopback Entra."""
    for name in (
        "AZURE_REGIONAL_AUTHORITY_NAME",
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_USERNAME",
        "AZURE_PASSWORD",
        "IDENTITY_ENDPOINT",
        "MSI_ENDPOINT",
        "REQUESTS_CA_BUNDLE",
    ):
        monkeypatch.delenv(name, raising=False)
    env = entra.environment()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def credential(azure_env: dict[str, str], ca_path: str) -> Iterator[DefaultAzureCredential]:
    cred = DefaultAzureCredential(disable_instance_discovery=True, connection_verify=ca_path)
    yield cred
    cred.close()


@pytest.fixture
def http(ca_path: str) -> Iterator[httpx.Client]:
    with httpx.Client(verify=loopback_tls().client_context(), timeout=10) as client:
        yield client


# -- Azurite -------------------------------------------------------------------------------------
def test_azurite_tables(azurite: Azurite) -> None:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    table = service.create_table(f"t{uuid.uuid4().hex[:12]}")
    table.create_entity({"PartitionKey": "p", "RowKey": "r1", "State": "New"})
    with pytest.raises(ResourceExistsError):
        table.create_entity({"PartitionKey": "p", "RowKey": "r1", "State": "dup"})

    current = table.get_entity("p", "r1")
    etag = current.metadata["etag"]
    table.update_entity(
        {"PartitionKey": "p", "RowKey": "r1", "State": "Closed"},
        mode=UpdateMode.MERGE,
        etag=etag,
        match_condition=MatchConditions.IfNotModified,
    )
    with pytest.raises(ResourceModifiedError):
        table.update_entity(
            {"PartitionKey": "p", "RowKey": "r1", "State": "stale"},
            mode=UpdateMode.MERGE,
            etag=etag,  # the pre-update etag: must be refused
            match_condition=MatchConditions.IfNotModified,
        )
    assert table.get_entity("p", "r1")["State"] == "Closed"

    operations: list[Any] = [
        ("upsert", {"PartitionKey": "batch", "RowKey": f"{i:03d}", "N": i}) for i in range(100)
    ]
    results = table.submit_transaction(operations)
    assert len(results) == 100
    assert len(list(table.query_entities("PartitionKey eq 'batch'"))) == 100
    service.delete_table(table.table_name)


def test_azurite_queue(azurite: Azurite) -> None:
    queue = QueueClient.from_connection_string(azurite.connection_string, f"q{uuid.uuid4().hex[:12]}")
    queue.create_queue()
    queue.send_message("hello")
    queue.send_message(json.dumps({"alertId": "a1"}))
    received = [m.content for m in queue.receive_messages(messages_per_page=32, visibility_timeout=30)]
    assert sorted(received) == sorted(["hello", json.dumps({"alertId": "a1"})])
    assert azurite.queue_endpoint in azurite.connection_string
    queue.delete_queue()


# -- Entra ID ------------------------------------------------------------------------------------
def test_default_credential_gets_tokens_from_loopback_entra(
    entra: EntraLoopback, credential: DefaultAzureCredential
) -> None:
    token = credential.get_token("https://vault.azure.net/.default")
    assert entra.validate(token.token, "https://vault.azure.net")
    assert not entra.validate(token.token, "https://management.azure.com")
    info = credential.get_token_info(ARM_SCOPE)
    assert entra.validate(info.token, "https://management.azure.com")
    issued = {t.token: t for t in entra.issued_tokens()}
    assert issued[info.token].scopes == (ARM_SCOPE,)
    assert issued[info.token].client_id == entra.client_id
    posts = [r for r in entra.requests() if r.method == "POST"]
    assert posts
    assert all("client_secret" not in (r.body or {}) for r in posts)


def test_wrong_secret_is_rejected_and_stops_the_chain(
    entra: EntraLoopback, azure_env: dict[str, str], ca_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "not-the-secret")
    monkeypatch.delenv("AZURE_TOKEN_CREDENTIALS")  # full chain: must still not reach IMDS
    cred = DefaultAzureCredential(disable_instance_discovery=True, connection_verify=ca_path)
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        cred.get_token(ARM_SCOPE)


def test_client_secret_credential_with_explicit_authority(entra: EntraLoopback, ca_path: str) -> None:
    cred = ClientSecretCredential(
        entra.tenant_id,
        entra.client_id,
        entra.client_secret,
        authority=entra.url,
        disable_instance_discovery=True,
        connection_verify=ca_path,
    )
    assert entra.validate(
        cred.get_token("https://monitor.azure.com/.default").token, "https://monitor.azure.com"
    )


# -- Key Vault -----------------------------------------------------------------------------------
def test_keyvault_secret_client_round_trip(
    entra: EntraLoopback, credential: DefaultAzureCredential, ca_path: str
) -> None:
    with KeyVaultLoopback(entra, delete_pending_polls=1, page_size=3) as vault:
        client = SecretClient(
            vault.url, credential, verify_challenge_resource=False, connection_verify=ca_path
        )
        first = client.set_secret("snow-password", "v1", content_type="text/plain", tags={"owner": "itsm"})
        assert first.id == f"{vault.url}/secrets/snow-password/{first.properties.version}"
        assert first.properties.content_type == "text/plain"
        assert first.properties.tags == {"owner": "itsm"}
        second = client.set_secret("snow-password", "v2")
        assert second.properties.version != first.properties.version
        assert client.get_secret("snow-password").value == "v2"
        assert client.get_secret("snow-password", first.properties.version).value == "v1"

        for i in range(5):
            client.set_secret(f"conn-{i}", f"value-{i}")
        names = sorted(str(p.name) for p in client.list_properties_of_secrets())  # 3 per page: nextLink
        assert names == ["conn-0", "conn-1", "conn-2", "conn-3", "conn-4", "snow-password"]
        assert len(list(client.list_properties_of_secret_versions("snow-password"))) == 2

        updated = client.update_secret_properties("conn-1", enabled=False)
        assert updated.enabled is False
        with pytest.raises(HttpResponseError) as disabled:
            client.get_secret("conn-1")
        assert disabled.value.status_code == 403

        with pytest.raises(ResourceNotFoundError, match="was not found in this key vault"):
            client.get_secret("missing")
        with pytest.raises(HttpResponseError) as bad:
            client.set_secret("bad_name", "x")
        assert bad.value.status_code == 400
        assert bad.value.error is not None
        assert bad.value.error.code == "BadParameter"

        deleted = client.begin_delete_secret("snow-password", _polling_interval=0).result()
        assert deleted.recovery_id == f"{vault.url}/deletedsecrets/snow-password"
        assert deleted.deleted_date is not None
        assert deleted.scheduled_purge_date is not None
        with pytest.raises(ResourceExistsError):  # name held while soft-deleted
            client.set_secret("snow-password", "v3")
        assert [d.name for d in client.list_deleted_secrets()] == ["snow-password"]
        client.purge_deleted_secret("snow-password")
        assert vault.deleted_names() == []
        assert vault.secrets_snapshot() == {f"conn-{i}": f"value-{i}" for i in range(5)}

        log = vault.requests()
        assert (log[0].status, log[0].authorized) == (401, False)  # the challenge
        assert all(r.authorized for r in log[1:])
        bodies = [r.body for r in log if isinstance(r.body, dict)]
        assert all(
            not isinstance(b.get("value"), str) or b["value"] == "***" for b in bodies
        )  # values redacted


def test_keyvault_rejects_foreign_tokens(entra: EntraLoopback, http: httpx.Client) -> None:
    with KeyVaultLoopback(entra) as vault:
        url = f"{vault.url}/secrets/x?api-version=7.6"
        challenge = http.get(url)
        assert challenge.status_code == 401
        assert challenge.headers["WWW-Authenticate"] == (
            f'Bearer authorization="{entra.url}/{entra.tenant_id}", resource="https://vault.azure.net"'
        )
        arm_token = entra.mint(ARM_SCOPE).token
        assert http.get(url, headers={"Authorization": f"Bearer {arm_token}"}).status_code == 401
        vault_token = entra.mint("https://vault.azure.net/.default").token
        response = http.get(url, headers={"Authorization": f"Bearer {vault_token}"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "SecretNotFound"


def test_keyvault_with_static_credential(ca_path: str) -> None:
    static = StaticTokenCredential()
    with KeyVaultLoopback(static) as vault:
        client = SecretClient(vault.url, static, verify_challenge_resource=False, connection_verify=ca_path)
        client.set_secret("a", "1")
        assert vault.secrets_snapshot() == {"a": "1"}


# -- Logs Ingestion ------------------------------------------------------------------------------
def test_logs_ingestion_upload(
    entra: EntraLoopback, credential: DefaultAzureCredential, ca_path: str
) -> None:
    with LogsIngestionLoopback(entra, rules={RULE_ID: {STREAM}}) as dce:
        client = LogsIngestionClient(
            endpoint=dce.url, credential=credential, connection_verify=ca_path, retry_backoff_factor=0.01
        )
        rows: list[Any] = [
            {"TimeGenerated": "2026-01-01T00:00:00Z", "WorkItemId": f"INC{i:07d}"} for i in range(50)
        ]
        client.upload(rule_id=RULE_ID, stream_name=STREAM, logs=rows)
        assert dce.records(STREAM) == rows

        with pytest.raises(HttpResponseError) as unknown:
            client.upload(rule_id=RULE_ID, stream_name="Custom-Nope_CL", logs=rows[:1])
        assert unknown.value.status_code == 404
        with pytest.raises(HttpResponseError) as unknown_rule:
            client.upload(rule_id="dcr-unknown", stream_name=STREAM, logs=rows[:1])
        assert unknown_rule.value.status_code == 404

        dce.fail_next(2, 429, retry_after=0)  # azure-core retries 429 and honours Retry-After
        client.upload(rule_id=RULE_ID, stream_name=STREAM, logs=rows[:3])
        assert dce.records(STREAM)[-3:] == rows[:3]

        big: list[Any] = [{"WorkItemId": f"INC{i:07d}", "Description": "d" * 100_000} for i in range(25)]
        client.upload(rule_id=RULE_ID, stream_name=STREAM, logs=big)  # SDK splits into <= 1 MiB chunks
        assert len(dce.records(STREAM)) == 50 + 3 + 25
        uploads = [r for r in dce.requests() if r.status == 204]
        assert len(uploads) >= 1 + 1 + 3
        assert all(r.query.get("api-version") == ["2023-01-01"] for r in uploads)


def test_logs_ingestion_limits_and_auth(entra: EntraLoopback, http: httpx.Client) -> None:
    with LogsIngestionLoopback(entra, rules={RULE_ID: {STREAM}}) as dce:
        url = f"{dce.url}/dataCollectionRules/{RULE_ID}/streams/{STREAM}?api-version=2023-01-01"
        body = gzip.compress(json.dumps([{"x": "y" * (1024 * 1024)}]).encode())
        monitor = entra.mint("https://monitor.azure.com//.default").token
        headers = {"Authorization": f"Bearer {monitor}", "Content-Encoding": "gzip"}
        too_big = http.post(url, content=body, headers=headers)
        assert too_big.status_code == 413
        assert http.post(url, content=gzip.compress(b"[]")).status_code == 401
        vault = entra.mint("https://vault.azure.net/.default").token
        wrong = http.post(
            url, content=gzip.compress(b"[]"), headers={**headers, "Authorization": f"Bearer {vault}"}
        )
        assert wrong.status_code == 401
        dce.fail_next(1, 503, retry_after=7)
        faulted = http.post(url, content=gzip.compress(b"[]"), headers=headers)
        assert (faulted.status_code, faulted.headers["Retry-After"]) == (503, "7")
        assert http.post(url, content=gzip.compress(b'[{"a": 1}]'), headers=headers).status_code == 204
        assert dce.records(STREAM) == [{"a": 1}]


# -- Alerts Management ---------------------------------------------------------------------------
def _arm_client(base_url: str, credential: Any, ca_path: str) -> PipelineClient[Any, Any]:
    return PipelineClient(
        base_url,
        policies=[RetryPolicy(retry_total=2), BearerTokenCredentialPolicy(credential, ARM_SCOPE)],
        connection_verify=ca_path,
    )


def test_alerts_management_change_state(
    entra: EntraLoopback, credential: DefaultAzureCredential, ca_path: str, http: httpx.Client
) -> None:
    alert_id = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.AlertsManagement/alerts/{uuid.uuid4()}"
    with AlertsManagementLoopback(entra) as arm:
        arm.add_alert(alert_id)
        client = _arm_client(arm.url, credential, ca_path)
        request = HttpRequest(
            "POST",
            f"{arm.url}{alert_id}/changestate",
            params={"api-version": "2019-05-05-preview", "newState": "Closed"},
        )
        response = client.send_request(request)
        assert response.status_code == 200
        alert = response.json()
        assert alert["id"] == alert_id
        assert alert["type"] == "Microsoft.AlertsManagement/alerts"
        assert alert["properties"]["essentials"]["alertState"] == "Closed"
        assert alert["properties"]["essentials"]["monitorCondition"] == "Fired"
        assert arm.alert_state(alert_id) == "Closed"
        assert arm.alert_state(alert_id.lower()) == "Closed"  # ARM ids are case-insensitive

        with_comment = HttpRequest(
            "POST",
            f"{arm.url}{alert_id}/changestate",
            params={"api-version": "2024-01-01-preview", "newState": "Acknowledged"},
            json={"comments": "picked up as INC0001234"},
        )
        assert client.send_request(with_comment).status_code == 200
        assert arm.state_changes()[-1].comments == "picked up as INC0001234"

        got = client.send_request(
            HttpRequest("GET", f"{arm.url}{alert_id}", params={"api-version": "2019-05-05-preview"})
        )
        assert got.json()["properties"]["essentials"]["alertState"] == "Acknowledged"

        missing = alert_id.rsplit("/", 1)[0] + f"/{uuid.uuid4()}"
        gone = client.send_request(
            HttpRequest(
                "POST",
                f"{arm.url}{missing}/changestate",
                params={"api-version": "2019-05-05-preview", "newState": "Closed"},
            )
        )
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "ResourceNotFound"

        bad_state = client.send_request(
            HttpRequest(
                "POST",
                f"{arm.url}{alert_id}/changestate",
                params={"api-version": "2019-05-05-preview", "newState": "Done"},
            )
        )
        assert bad_state.status_code == 400

        arm.fail_next(1, 429, retry_after=0)  # retried by azure-core's RetryPolicy
        retried = client.send_request(
            HttpRequest(
                "POST",
                f"{arm.url}{alert_id}/changestate",
                params={"api-version": "2019-05-05-preview", "newState": "Closed"},
            )
        )
        assert retried.status_code == 200
        assert [r.status for r in arm.requests()][-2:] == [429, 200]

        url = f"{arm.url}{alert_id}/changestate?api-version=2019-05-05-preview&newState=Closed"
        assert http.post(url).json()["error"]["code"] == "AuthenticationFailed"
        vault = entra.mint("https://vault.azure.net/.default").token
        wrong = http.post(url, headers={"Authorization": f"Bearer {vault}"})
        assert (wrong.status_code, wrong.json()["error"]["code"]) == (
            401,
            "InvalidAuthenticationTokenAudience",
        )
        assert [r.status for r in arm.requests()][:1] == [200]
