"""Shared fixtures: the network guard, one Azurite per test process, the loopback stack.

Every test runs under a socket audit hook that fails it if anything connects (or resolves a name)
outside 127.0.0.1 / ::1, so "tests talk only to loopback" is checked, not hoped for.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from shared_code.bootstrap import Container
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


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    """One in-memory Azurite per test process (xdist worker), on free ports."""
    server = Azurite().start()
    yield server
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
