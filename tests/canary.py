"""A canary secret: the loopback ServiceNow's client secret and password in every test stack.

``connections add`` puts both into Key Vault (the only place a secret may live). The detector
looks for the canary's distinctive core everywhere else the app writes:

* every log record of the session (message, arguments and the formatted exception with its causes),
  through a handler on the root logger;
* every HTTP response body and queue output of the functions run by ``tests/hostsim.py``, and every
  output of the CLI run by the stack;
* every exception a test ends with (the app's own exceptions reach a log record, an HTTP body
  or the CLI's output, all watched);
* at the end of the session, every row of every table and every message left in every queue of
  Azurite.

A sighting fails the session (``tests/conftest.py``); ``test_canary.py`` proves the detector sees
the canary in each of those places.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueServiceClient

CANARY = "cnry7f3a91d0e5"
"""Distinctive enough that it appears nowhere unless a secret leaked."""
CLIENT_SECRET = f"{CANARY}-client-secret"
PASSWORD = f"{CANARY}-password"


@dataclass(frozen=True)
class Sighting:
    where: str
    excerpt: str


class CanaryDetector:
    """Collects every place the canary was seen (thread-safe; cheap enough for every log record)."""

    def __init__(self, canary: str = CANARY) -> None:
        self.canary = canary
        self.sightings: list[Sighting] = []
        self._lock = threading.Lock()

    def observe(self, text: str | bytes | None, where: str) -> None:
        if not text:
            return
        value = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        at = value.find(self.canary)
        if at < 0:
            return
        with self._lock:
            self.sightings.append(Sighting(where, value[max(0, at - 80) : at + 80]))

    def observe_record(self, record: logging.LogRecord) -> None:
        where = f"log record {record.name}:{record.lineno}"
        try:
            self.observe(record.getMessage(), where)
        except Exception:
            self.observe(f"{record.msg!r} {record.args!r}", where)
        if record.exc_info and record.exc_info[1] is not None:
            self.observe(logging.Formatter().formatException(record.exc_info), where + " (exception)")
        if record.stack_info:
            self.observe(record.stack_info, where + " (stack)")

    def observe_exception(self, exc: BaseException, where: str) -> None:
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and len(seen) < 20:
            seen.add(id(current))
            self.observe(f"{type(current).__name__}: {current}", where)
            current = current.__cause__ or current.__context__

    def scan_storage(self, connection_string: str) -> None:
        """Every row of every table and every message still in every queue."""
        with TableServiceClient.from_connection_string(connection_string) as tables:
            for table in tables.list_tables():
                client = tables.get_table_client(table.name)
                for entity in client.list_entities():
                    self.observe(repr(dict(entity)), f"table {table.name}")
        queues = QueueServiceClient.from_connection_string(connection_string)
        try:
            for queue in queues.list_queues():
                queue_client = queues.get_queue_client(queue.name)
                for message in queue_client.peek_messages(max_messages=32):
                    self.observe(str(message.content), f"queue {queue.name}")
        finally:
            queues.close()

    def report(self) -> str:
        return "\n".join(f"- {s.where}: ...{s.excerpt}..." for s in self.sightings[:20])


class _RecordWatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)

    def emit(self, record: logging.LogRecord) -> None:
        detector = _active
        if detector is not None:
            detector.observe_record(record)


_active: CanaryDetector | None = None
_install_lock = threading.Lock()
_watcher: _RecordWatcher | None = None


def observe(text: str | bytes | None, where: str) -> None:
    """Report output the app produced (a response body, a queue message, CLI output)."""
    detector = _active
    if detector is not None:
        detector.observe(text, where)


def observe_exception(exc: BaseException, where: str) -> None:
    detector = _active
    if detector is not None:
        detector.observe_exception(exc, where)


def _install() -> None:
    global _watcher
    with _install_lock:
        if _watcher is not None:
            return
        _watcher = _RecordWatcher()
        logging.getLogger().addHandler(_watcher)


@contextlib.contextmanager
def detecting(detector: CanaryDetector) -> Iterator[CanaryDetector]:
    """Route every observation to ``detector`` while inside (the session's, or a test's own)."""
    global _active
    _install()
    before = _active
    _active = detector
    try:
        yield detector
    finally:
        _active = before
