"""``GET /api/health`` through the registered function, on the loopback stack.

Dependencies are taken down for real: an endpoint moved to a loopback port nothing listens on
(connection refused, the SDK's own retries, then the probe's time limit).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import function_app
from shared_code.bootstrap import Container, reset_container
from tests.hostsim import FunctionHost, HttpCall
from tests.loopback.stack import LoopbackStack

FAST = {"HEALTH_TIMEOUT_SECONDS": "1.0"}


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_health(stack: LoopbackStack) -> HttpCall:
    host = FunctionHost(function_app.app, stack.queues())
    return host.http("health", "GET", "https://func.example/api/health")


@contextmanager
def app_with(stack: LoopbackStack, **overrides: str) -> Iterator[Container]:
    with stack.app(TABLE_PREFIX=f"h{uuid.uuid4().hex[:10]}", **FAST, **overrides) as container:
        yield container


def assert_reveals_nothing(call: HttpCall, stack: LoopbackStack, *names: str) -> None:
    text = call.response.get_body().decode()
    for forbidden in ("http://", "https://", "127.0.0.1", stack.entra.client_secret, *names):
        assert forbidden not in text, forbidden


def test_healthy_app_answers_200_with_every_dependency_ok(stack: LoopbackStack) -> None:
    with app_with(stack):
        call = get_health(stack)

    assert call.status == 200, call.response.get_body()
    body = call.json()
    assert body["status"] == "ok"
    assert set(body["dependencies"]) == {"tables", "queues", "keyVault"}
    for dependency in body["dependencies"].values():
        assert dependency["status"] == "ok"
        assert dependency["latencyMs"] >= 0
    assert body["timers"] == {
        "sync_work_items": {"runs": 0, "known": True},
        "prune_state": {"runs": 0, "known": True},
        "maps_import_timer": {"runs": 0, "known": True},
    }
    assert call.response.headers["Cache-Control"] == "no-store"
    assert_reveals_nothing(call, stack)


def test_the_last_timer_run_and_its_outcome_are_reported_without_connection_names(
    stack: LoopbackStack,
) -> None:
    with app_with(stack):
        name = f"hc-{uuid.uuid4().hex[:8]}"
        stack.add_servicenow_connection(name)
        FunctionHost(function_app.app, stack.queues()).timer("sync_work_items")
        call = get_health(stack)

    timer = call.json()["timers"]["sync_work_items"]
    assert timer["outcome"] == "succeeded"
    assert timer["runs"] == 2  # incidents and change requests of the one connection
    assert abs(time.time() - _epoch(timer["lastRunAt"])) < 120
    assert_reveals_nothing(call, stack, name, stack.servicenow.url)


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


@pytest.mark.parametrize(
    ("down", "override"),
    [
        ("keyVault", lambda stack: {"KEY_VAULT_URL": f"https://127.0.0.1:{closed_port()}"}),
        (
            "queues",
            lambda stack: {
                "AzureWebJobsStorage": stack.azurite.connection_string.replace(
                    stack.azurite.queue_endpoint, f"http://127.0.0.1:{closed_port()}/devstoreaccount1"
                )
            },
        ),
        (
            "tables",
            lambda stack: {
                "AzureWebJobsStorage": stack.azurite.connection_string.replace(
                    stack.azurite.table_endpoint, f"http://127.0.0.1:{closed_port()}/devstoreaccount1"
                )
            },
        ),
    ],
)
def test_a_dependency_down_is_degraded_and_503(stack: LoopbackStack, down: str, override: Any) -> None:
    with app_with(stack, **override(stack)):
        started = time.monotonic()
        call = get_health(stack)
        took = time.monotonic() - started

    assert call.status == 503, call.response.get_body()
    body = call.json()
    assert body["status"] == "degraded"
    assert body["dependencies"][down]["status"] == "degraded"
    assert body["dependencies"][down]["problem"] in {"timeout", "unavailable"}
    assert {name for name, dep in body["dependencies"].items() if dep["status"] == "ok"} == (
        {"tables", "queues", "keyVault"} - {down}
    )
    if down == "tables":
        assert body["timers"]["sync_work_items"]["known"] is False
    assert took < 3.0  # bounded by HEALTH_TIMEOUT_SECONDS, not by the SDKs' retries
    assert call.response.headers.get("Retry-After") is None
    assert_reveals_nothing(call, stack)


def test_a_hung_probe_is_not_started_again(stack: LoopbackStack) -> None:
    """A listener that accepts and never answers: the probe hangs; the next check does not wait on it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with app_with(stack, KEY_VAULT_URL=f"https://127.0.0.1:{port}"):
            first = get_health(stack)
            started = time.monotonic()
            second = get_health(stack)
            took = time.monotonic() - started

    assert first.json()["dependencies"]["keyVault"] == {"status": "degraded", "problem": "timeout"}
    assert second.json()["dependencies"]["keyVault"] == {"status": "degraded", "problem": "timeout"}
    assert second.json()["dependencies"]["tables"]["status"] == "ok"
    assert took < 0.9  # the hung Key Vault probe was not waited for again


def test_invalid_settings_are_a_503_that_names_nothing(
    stack: LoopbackStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    with app_with(stack):
        monkeypatch.setenv("KEY_VAULT_URL", "http://plain-http.example")
        reset_container()
        call = get_health(stack)

    assert call.status == 503
    assert call.json() == {"status": "degraded", "dependencies": {"configuration": {"status": "degraded"}}}
    assert "KEY_VAULT_URL" not in json.dumps(call.json())
    assert os.environ.get("KEY_VAULT_URL") != "http://plain-http.example"
