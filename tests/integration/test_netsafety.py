"""Where the app connects, checked on the resolved address: the guarded transport over real loopback
HTTP, the app's own client, ``connections add`` refusals and its rollback when ``--test`` fails."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest

import function_app
from shared_code.bootstrap import Container, get_container
from shared_code.domain.delivery import DeliveryStatus
from shared_code.errors import UnsafeAddressError
from shared_code.netsafety import guard_transport
from tests.hostsim import FunctionHost
from tests.integration.test_alerts_e2e import load
from tests.loopback.base import LoopbackHandler, LoopbackServer
from tests.loopback.stack import LoopbackStack


class _Handler(LoopbackHandler):
    def do_GET(self) -> None:
        self.app.hosts.append(self.headers.get("Host"))
        self.send_json(200, {"ok": True})


class CountingServer(LoopbackServer):
    handler_class = _Handler

    def __init__(self) -> None:
        super().__init__(tls=False)
        self.hosts: list[str | None] = []


@pytest.fixture
def server() -> Iterator[CountingServer]:
    with CountingServer() as started:
        yield started  # type: ignore[misc]


def client(*, allow_loopback: bool, resolve=None) -> httpx.Client:
    transport = guard_transport(httpx.HTTPTransport(), allow_loopback=allow_loopback, resolve=resolve)
    return httpx.Client(transport=transport, timeout=5)


def test_loopback_is_refused_before_anything_is_sent(server: CountingServer) -> None:
    with client(allow_loopback=False) as http, pytest.raises(UnsafeAddressError, match="loopback"):
        http.get(f"{server.url}/api")
    assert server.hosts == []


def test_with_the_opt_in_loopback_is_reached(server: CountingServer) -> None:
    with client(allow_loopback=True) as http:
        assert http.get(f"{server.url}/api").json() == {"ok": True}
    assert len(server.hosts) == 1


def test_a_name_resolving_to_a_metadata_address_is_never_connected_to() -> None:
    # were it connected to, the suite's network guard would fail this test too
    http = client(allow_loopback=True, resolve=lambda host, port: ["169.254.169.254"])
    with http, pytest.raises(UnsafeAddressError, match="metadata"):
        http.get("http://instance.example/api")


def test_the_checked_address_is_the_one_connected_to(server: CountingServer) -> None:
    """One lookup per connection: a DNS answer that changes after the check (rebinding) is not used."""
    answers = iter([["127.0.0.1"]])

    def resolve(host: str, port: int) -> list[str]:
        return next(answers)  # a second lookup would raise StopIteration

    with client(allow_loopback=True, resolve=resolve) as http:
        response = http.get(f"http://instance.example:{server.port}/api")

    assert response.status_code == 200
    assert server.hosts == [f"instance.example:{server.port}"]  # the URL's host, sent to the checked address


def test_the_app_client_is_guarded(stack: LoopbackStack) -> None:
    refused = pytest.raises(UnsafeAddressError, match="ALLOW_LOOPBACK_INSTANCES")
    with stack.app(ALLOW_LOOPBACK_INSTANCES="false") as container, refused:
        container.http.get(f"{stack.servicenow.url}/api/now/table/incident")


def test_a_stored_connection_to_a_refused_address_fails_its_delivery_without_a_call(
    stack: LoopbackStack,
) -> None:
    prefix = f"ns{uuid.uuid4().hex[:10]}"
    name = f"sn-{uuid.uuid4().hex[:8]}"
    with stack.app(TABLE_PREFIX=prefix):
        stack.add_servicenow_connection(name)
    requests_before = len(stack.servicenow.requests)
    with stack.app(TABLE_PREFIX=prefix, ALLOW_LOOPBACK_INSTANCES="false"):
        queues = stack.queues()
        for queue in queues.list_queues():
            queues.get_queue_client(queue.name).clear_messages()
        host = FunctionHost(function_app.app, queues)
        call = host.http(
            "receive_alert",
            "POST",
            f"https://func.example/api/alerts/{name}",
            body=json.dumps(load("metric_fired")).encode(),
            headers={"Content-Type": "application/json"},
            route_params={"connection": name},
        )
        assert call.status == 202
        host.drain("deliver_alert")
        (row,) = get_container().deliveries.list(connection=name)

    assert row.status is DeliveryStatus.FAILED
    assert "refusing to connect to 127.0.0.1" in row.last_error
    assert len(stack.servicenow.requests) == requests_before


# -- connections add ---------------------------------------------------------------------------------


def add(
    stack: LoopbackStack, name: str, url: str, *options: str, password: str | None = None
) -> tuple[int, str]:
    snow = stack.servicenow
    return stack.cli(
        "connections", "add", name, "--type", "servicenow", "--url", url, "--private-instance",
        "--user", snow.username, "--client-id", snow.client_id, "--secrets-stdin", *options,
        stdin=f"{snow.client_secret}\n{password or snow.password}\n",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://169.254.169.254", "metadata"),
        ("https://[::ffff:169.254.169.254]", "metadata"),
        ("https://2130706433", "dotted quad"),
        ("https://0x7f000001", "dotted quad"),
        ("https://metadata.google.internal", "metadata"),
        ("https://[fd00:ec2::254]", "metadata"),
    ],
)
def test_add_refuses_metadata_and_disguised_addresses_and_stores_nothing(
    app: Container, stack: LoopbackStack, url: str, why: str
) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    code, output = add(stack, name, url)
    assert code == 2, output
    assert why in output
    assert app.connections.list() == []
    assert not [secret for secret in stack.keyvault.secrets_snapshot() if secret.startswith(f"itsm-{name}")]


def test_add_refuses_loopback_without_the_opt_in(stack: LoopbackStack) -> None:
    with stack.app(TABLE_PREFIX=f"lb{uuid.uuid4().hex[:10]}", ALLOW_LOOPBACK_INSTANCES="false") as container:
        code, output = add(stack, "cli-loop", stack.servicenow.url)
        assert code == 2, output
        assert "ALLOW_LOOPBACK_INSTANCES=true" in output
        assert container.connections.list() == []


def test_a_failed_test_rolls_the_connection_and_its_secrets_back(
    app: Container, stack: LoopbackStack
) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"

    code, output = add(stack, name, stack.servicenow.url, "--test", password="wrong-password")

    assert code == 1, output
    assert f"FAILED: {name}" in output
    assert f"removed connection {name} and its secrets again" in output
    assert app.connections.list() == []
    assert not [secret for secret in stack.keyvault.secrets_snapshot() if secret.startswith(f"itsm-{name}-")]
    assert f"itsm-{name}-password" in stack.keyvault.deleted_names()
    code, output = add(stack, name, stack.servicenow.url, "--test")  # the name can be used again
    assert code == 0, output
    assert stack.keyvault.secrets_snapshot()[f"itsm-{name}-password"] == stack.servicenow.password
