"""Shared fixtures: the network guard, one Azurite per test process, the loopback stack.

Every test runs under a socket audit hook that fails it if anything connects (or resolves a name)
outside 127.0.0.1 / ::1, so "tests talk only to loopback" is checked, not hoped for.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator

import pytest

from shared_code.bootstrap import Container
from tests import canary
from tests.loopback import netguard
from tests.loopback.azurite import Azurite
from tests.loopback.stack import LoopbackStack


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    """Fail the test if it reached for any address but loopback."""
    netguard.foreign.clear()
    netguard.watch()
    yield
    netguard.watching.clear()
    assert not netguard.foreign, f"non-loopback network access: {netguard.foreign[:5]}"


@pytest.fixture(scope="session", autouse=True)
def canary_secret() -> Iterator[canary.CanaryDetector]:
    """Fail the session if the canary secret (the stack's ServiceNow client secret and password)
    showed up in a log record, response, CLI output, queue message, table row or exception.

    INFO records are created for the check (the root logger's default, WARNING, would not even
    make them); the SDK's per-request dumps stay off (headers only, redacted; no bodies).
    """
    root = logging.getLogger()
    sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
    levels = root.level, sdk.level
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    sdk.setLevel(logging.WARNING)
    with canary.detecting(canary.CanaryDetector()) as detector:
        yield detector
    root.setLevel(levels[0])
    sdk.setLevel(levels[1])
    assert not detector.sightings, "the canary secret leaked:\n" + detector.report()


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """The exception a test ended with is output too: it must not carry the canary either."""
    if call.excinfo is not None:
        canary.observe_exception(call.excinfo.value, f"exception ending {item.nodeid}")


@pytest.fixture(scope="session")
def azurite(canary_secret: canary.CanaryDetector) -> Iterator[Azurite]:
    """One in-memory Azurite per test process (xdist worker), on free ports; at the end of the
    session every row and queued message is scanned for the canary secret."""
    server = Azurite().start()
    yield server
    try:
        canary_secret.scan_storage(server.connection_string)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack(azurite: Azurite) -> Iterator[LoopbackStack]:
    """Entra ID, Key Vault, ServiceNow, Logs Ingestion and Alerts Management on loopback TLS."""
    with LoopbackStack(azurite=azurite) as started:
        yield started


_prefixes = itertools.count(1)


@pytest.fixture
def app(stack: LoopbackStack) -> Iterator[Container]:
    """The app's container, built from app settings that point at the stack.

    Each test gets its own table prefix (its own state tables) and an empty alert queue.
    """
    prefix = f"t{os.getpid() % 100000}x{next(_prefixes)}"
    stack.servicenow.clear_faults()
    with stack.app(TABLE_PREFIX=prefix) as container:
        queues = stack.queues()
        for queue in queues.list_queues():
            queues.get_queue_client(queue.name).clear_messages()
        yield container
