"""Operator-facing behaviour of the infrastructure: errors that say what, why and what to do, a
malformed storage setting as a settings error, TLS_CA_BUNDLE added to (never replacing) the trust
store, the delivery attempts agreeing with host.json, and container members built once."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import certifi
import httpx
import pytest
import trustme
from azure.core.exceptions import ServiceRequestError
from azure.data.tables import TableServiceClient

import function_app
from shared_code.bootstrap import Container, lazy, reset_container
from shared_code.diagnose import KEY_VAULT_ROLE, STORAGE_ROLE, describe
from shared_code.errors import ConfigurationError, StateError
from shared_code.settings import MAX_DEQUEUE_COUNT, Settings
from shared_code.state.tables import TableStore, get_entity, transport_options
from shared_code.tlstrust import trust_file
from tests.hostsim import FunctionHost
from tests.integration.test_alerts_e2e import load
from tests.loopback.azurite import ACCOUNT_KEY, Azurite
from tests.loopback.base import LoopbackHandler, LoopbackServer
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

REPO = Path(__file__).resolve().parents[2]
KEY_VAULT = "https://unused.vault.azure.net"


def settings(**values: str) -> Settings:
    return Settings.from_environ({"KEY_VAULT_URL": KEY_VAULT, **values})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- messages that say what, why and what to do --------------------------------------------------------


def test_an_unreachable_table_endpoint_is_named_with_the_cause_and_what_to_do() -> None:
    port = free_port()  # nothing listens there
    store = TableStore.from_settings(
        settings(
            AzureWebJobsStorage=(
                "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                f"AccountKey={ACCOUNT_KEY};TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
            ),
            HTTP_TIMEOUT_SECONDS="2",
        ),
        None,
    )
    try:
        with pytest.raises(StateError) as caught:
            store.table("Connections")
    finally:
        store.close()
    message = str(caught.value)
    assert message.startswith("creating table Connections failed: cannot reach 127.0.0.1:")
    assert f"127.0.0.1:{port}" in message
    assert "connection refused" in message
    assert "Azurite" in message


def test_a_403_from_storage_names_the_role_and_the_firewall(azurite: Azurite) -> None:
    wrong_key = "A" * 86 + "=="
    conn = azurite.connection_string.replace(ACCOUNT_KEY, wrong_key)
    service = TableServiceClient.from_connection_string(conn, **transport_options(azurite.table_endpoint))
    try:
        with pytest.raises(StateError) as caught:
            get_entity(service.get_table_client("Anything"), "p", "r")
    finally:
        service.close()
    message = str(caught.value)
    assert "answered HTTP 403" in message
    assert STORAGE_ROLE in message
    assert wrong_key not in message


class _Ok(LoopbackHandler):
    def do_GET(self) -> None:
        self.send_json(200, {})


def test_an_untrusted_certificate_points_at_tls_ca_bundle() -> None:
    server = LoopbackServer(tls=True)
    server.handler_class = _Ok
    untrusted = pytest.raises(httpx.ConnectError)
    with server, httpx.Client() as client, untrusted as caught:  # certifi only: not the loopback CA
        client.get(f"{server.url}/")
    message = describe(caught.value, target=server.url)
    assert message.startswith(f"cannot reach 127.0.0.1:{server.port}: TLS")
    assert "TLS_CA_BUNDLE" in message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "DNS: the name does not resolve"),
        (TimeoutError("timed out"), "did not answer in time"),
        (ConnectionResetError(104, "Connection reset by peer"), "was reset"),
    ],
)
def test_the_cause_is_found_inside_the_sdk_error(error: BaseException, expected: str) -> None:
    try:
        try:
            raise error
        except OSError as inner:
            raise ServiceRequestError("request failed", error=inner) from inner
    except ServiceRequestError as outer:
        message = describe(
            outer, target="https://kv.example.vault.azure.net/secrets/x?sig=SECRET", role=KEY_VAULT_ROLE
        )
    assert expected in message
    assert "kv.example.vault.azure.net" in message
    assert "SECRET" not in message


# -- a malformed storage setting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "AccountName=devstoreaccount1",
        "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=",
        "DefaultEndpointsProtocol=https;AcountName=x;AccountKey=abc",
        "AccountName=x;AccountKey=abc;TableEndpoint=ftp://host",
    ],
)
def test_a_malformed_storage_connection_string_is_a_settings_error(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings(AzureWebJobsStorage=value)
    assert "- AzureWebJobsStorage:" in str(caught.value)
    assert "abc" not in str(caught.value)  # the account key is never echoed


def test_the_webhook_answers_a_malformed_storage_setting_as_misconfiguration(stack: LoopbackStack) -> None:
    with stack.app():
        os.environ["AzureWebJobsStorage"] = "DefaultEndpointsProtocol=https;AccountName"  # noqa: SIM112
        reset_container()
        host = FunctionHost(function_app.app)
        call = host.http(
            "receive_alert",
            "POST",
            "https://func.example/api/alerts/sn-any",
            body=json.dumps(load("metric_fired")).encode(),
            headers={"Content-Type": "application/json"},
            route_params={"connection": "sn-any"},
        )
    assert call.status == 503, call.json()
    assert call.json()["error"]["code"] == "misconfigured"
    assert "AzureWebJobsStorage" in call.json()["error"]["message"]


# -- TLS_CA_BUNDLE adds to the trust store --------------------------------------------------------------


def test_the_trust_file_keeps_the_public_roots_and_adds_the_bundle(tmp_path: Path) -> None:
    private_ca = trustme.CA()
    bundle = tmp_path / "private-ca.pem"
    private_ca.cert_pem.write_to_path(str(bundle))

    path = trust_file(str(bundle))

    context = ssl.create_default_context(cafile=path)
    subjects = {str(cert["subject"]) for cert in context.get_ca_certs()}
    public = ssl.create_default_context(cafile=certifi.where()).get_ca_certs()
    assert len(context.get_ca_certs()) == len(public) + 1
    assert any("'trustme" in subject for subject in subjects)
    assert Path(path).read_bytes().startswith(Path(certifi.where()).read_bytes().rstrip(b"\n"))
    assert trust_file("") == ""


def test_a_missing_bundle_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="TLS_CA_BUNDLE"):
        trust_file(str(tmp_path / "nope.pem"))


@pytest.fixture(scope="module")
def tls_azurite() -> Iterator[Azurite]:
    server = Azurite(tls=True).start()
    yield server
    server.stop()


def test_the_state_tables_trust_tls_ca_bundle(tls_azurite: Azurite) -> None:
    saved = os.environ.pop("REQUESTS_CA_BUNDLE", None)
    try:
        configured = settings(
            AzureWebJobsStorage=tls_azurite.connection_string, TLS_CA_BUNDLE=loopback_tls().ca_bundle_path
        )
        container = Container(configured)
        try:
            table = container.tables.table(f"Tls{uuid.uuid4().hex[:8]}")
            assert get_entity(table, "p", "r") is None  # reached over TLS, verified with the bundle
        finally:
            container.close()
        without = Container(settings(AzureWebJobsStorage=tls_azurite.connection_string))
        try:
            with pytest.raises(StateError, match="TLS_CA_BUNDLE"):  # and only with it
                without.tables.table("Untrusted")
        finally:
            without.close()
    finally:
        if saved is not None:
            os.environ["REQUESTS_CA_BUNDLE"] = saved


def test_the_azure_clients_get_the_combined_file(stack: LoopbackStack) -> None:
    with stack.app() as container:
        assert container.ca_file == trust_file(stack.ca_bundle)
        content = Path(container.ca_file).read_bytes()
        assert Path(certifi.where()).read_bytes().rstrip(b"\n") in content
        assert Path(stack.ca_bundle).read_bytes() in content
        assert container.secrets.get("itsm-nothing-here") is None  # Key Vault over TLS with that file


# -- delivery attempts agree with host.json -----------------------------------------------------------


def test_alert_max_attempts_cannot_exceed_the_hosts_dequeue_count() -> None:
    host = json.loads((REPO / "host.json").read_text())
    assert host["extensions"]["queues"]["maxDequeueCount"] == MAX_DEQUEUE_COUNT
    assert settings(AzureWebJobsStorage="UseDevelopmentStorage=true").alert_max_attempts == MAX_DEQUEUE_COUNT
    with pytest.raises(ConfigurationError, match="maxDequeueCount"):
        settings(
            AzureWebJobsStorage="UseDevelopmentStorage=true", ALERT_MAX_ATTEMPTS=str(MAX_DEQUEUE_COUNT + 1)
        )
    sample = json.loads((REPO / "local.settings.sample.json").read_text())
    assert "maxDequeueCount" in sample["Descriptions"]["ALERT_MAX_ATTEMPTS"]


# -- lazily built members, safe under threads without cached_property's lock --------------------------


class _Slow:
    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self._lazy_lock = threading.RLock()
        self.builds = 0
        self.barrier = barrier

    @lazy
    def member(self) -> object:
        self.builds += 1
        if self.barrier is not None:
            self.barrier.wait(timeout=2)  # every builder must be in here at once
        time.sleep(0.05)
        return object()


def test_a_member_is_built_once_however_many_threads_ask() -> None:
    holder = _Slow()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(holder.member)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert holder.builds == 1
    assert len({id(result) for result in results}) == 1


def test_two_containers_build_their_members_at_the_same_time() -> None:
    """One instance's slow build never holds up another's (3.11's cached_property locked them all)."""
    barrier = threading.Barrier(2)
    holders = [_Slow(barrier), _Slow(barrier)]
    errors: list[BaseException] = []

    def build(holder: _Slow) -> None:
        try:
            holder.member  # noqa: B018 - building it is the point
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(holder,)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert errors == []


def test_the_container_takes_no_functools_cached_property() -> None:
    from functools import cached_property

    members = vars(Container).values()
    assert not [member for member in members if isinstance(member, cached_property)]
    assert {"credential", "tables", "secrets", "http", "alert_delivery"} <= {
        name for name, member in vars(Container).items() if isinstance(member, lazy)
    }


def test_pins_for_a_fresh_clone() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11,<3.13"' in pyproject
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    for tool in ("ruff", "mypy"):
        (line,) = [line for line in dev if line.startswith(f"{tool}>=")]
        assert ",<" in line, line
    package = json.loads((REPO / "package.json").read_text())
    azurite = json.loads((REPO / "node_modules" / "azurite" / "package.json").read_text())
    assert package["engines"]["node"] == azurite["engines"]["node"]
