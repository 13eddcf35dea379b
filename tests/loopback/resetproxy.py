"""A loopback TCP proxy that breaks connections the way a storage front end does.

Azurite (Node) closes a keep-alive connection after 5 s idle; a request the client sends on it at
that moment meets a reset. Waiting for that race is slow and flaky, so this proxy makes it happen
on demand, in front of a real Azurite:

* ``idle_reset_seconds``: a request arriving on a connection idle longer is answered with a reset
  (TCP RST) and never forwarded, as by a server that is closing the connection;
* ``fail_next("before")``: the next request is reset before it is forwarded (it did not land);
* ``fail_next("after")``: the next request is forwarded, Azurite answers, and the client gets a
  reset instead of the answer (it landed; its answer was lost);
* ``fail_matching(marker)``: every request whose first bytes (request line and headers) hold
  ``marker`` is reset before it is forwarded: storage that keeps failing for one row.

    with ResetProxy(azurite.table_port) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}/devstoreaccount1"
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from typing import Literal

Fault = Literal["before", "after"]


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN: the peer's next read fails at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class ResetProxy:
    def __init__(self, upstream_port: int, *, idle_reset_seconds: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.idle_reset_seconds = idle_reset_seconds
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self.requests = 0
        self.resets = 0
        self._faults: list[Fault] = []
        self._markers: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def fail_next(self, fault: Fault, count: int = 1) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    def fail_matching(self, marker: bytes) -> None:
        with self._lock:
            self._markers.append(marker)

    def _take_fault(self, head: bytes) -> Fault | None:
        with self._lock:
            if any(marker in head for marker in self._markers):
                return "before"
            return self._faults.pop(0) if self._faults else None

    def __enter__(self) -> ResetProxy:
        thread = threading.Thread(target=self._accept, name="reset-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(
                target=self._relay, args=(client,), name="reset-proxy-conn", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ)
        selector.register(upstream, selectors.EVENT_READ)
        last_activity = time.monotonic()
        awaiting_answer = False
        drop_answer = False
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    if key.fileobj is client:
                        data = client.recv(65536)
                        if not data:
                            return
                        if not awaiting_answer:  # the first bytes of a new request
                            with self._lock:
                                self.requests += 1
                            idle = time.monotonic() - last_activity
                            fault = self._take_fault(data)
                            if fault == "before" or (
                                self.idle_reset_seconds is not None and idle > self.idle_reset_seconds
                            ):
                                self._count_reset()
                                _reset(client)
                                return
                            drop_answer = fault == "after"
                            awaiting_answer = True
                        upstream.sendall(data)
                    else:
                        data = upstream.recv(65536)
                        if not data:
                            return
                        if drop_answer:
                            self._count_reset()
                            _reset(client)
                            return
                        client.sendall(data)
                        awaiting_answer = False
                        last_activity = time.monotonic()
        except OSError:
            return
        finally:
            selector.close()
            upstream.close()
            with contextlib.suppress(OSError):
                client.close()

    def _count_reset(self) -> None:
        with self._lock:
            self.resets += 1
