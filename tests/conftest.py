"""Shared fixtures: the network guard, one Azurite per test process, the loopback stack.

Every test runs under a socket audit hook that fails it if anything connects (or resolves a name)
outside 127.0.0.1 / ::1, so "tests talk only to loopback" is checked, not hoped for.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from shared_code.bootstrap import Container
from tests.loopback.azurite import Azurite
from tests.loopback.stack import LoopbackStack

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_foreign: list[Any] = []
_guard = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _guard.is_set():
        return
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address and address[0] not in _LOOPBACK:
            _foreign.append(address)
    elif event == "socket.getaddrinfo" and args and args[0] is not None:
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if host not in _LOOPBACK:
            _foreign.append(("dns", host))


sys.addaudithook(_audit)  # audit hooks cannot be removed; inert unless _guard is set


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    """Fail the test if it reached for any address but loopback."""
    _foreign.clear()
    _guard.set()
    yield
    _guard.clear()
    assert not _foreign, f"non-loopback network access: {_foreign[:5]}"


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
