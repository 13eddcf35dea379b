"""Records every connection and name lookup outside 127.0.0.1 / ::1 (a socket audit hook).

The test suite fails a test that reached out (tests/conftest.py); the benchmarks fail the run.
Audit hooks cannot be removed, so the hook is inert unless ``watching`` is set.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
foreign: list[Any] = []
watching = threading.Event()
_installed = threading.Lock()
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not watching.is_set():
        return
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address and address[0] not in LOOPBACK:
            foreign.append(address)
    elif event == "socket.getaddrinfo" and args and args[0] is not None:
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if host not in LOOPBACK:
            foreign.append(("dns", host))


def watch() -> None:
    """Install the hook once per process and start recording."""
    global _hooked
    with _installed:
        if not _hooked:
            sys.addaudithook(_audit)
            _hooked = True
    watching.set()
