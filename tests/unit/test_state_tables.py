"""Table Storage client options: a stalled account fails a call within seconds, not minutes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from azure.data.tables import TableServiceClient

from shared_code.errors import StateError
from shared_code.settings import Settings
from shared_code.state.tables import RETRY_BACKOFF_MAX, RETRY_TOTAL, TableStore, get_entity, transport_options

ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a stalled storage front end)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-table-endpoint", daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)  # keep it open, read nothing, write nothing

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._listener.close()


def connection_string(table_endpoint: str) -> str:
    return (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={ACCOUNT_KEY};TableEndpoint={table_endpoint};"
    )


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def test_a_table_endpoint_that_accepts_and_never_answers_fails_within_the_bound(silent: SilentServer) -> None:
    settings = Settings.model_validate(
        {
            "AzureWebJobsStorage": connection_string(f"http://127.0.0.1:{silent.port}/devstoreaccount1"),
            "KEY_VAULT_URL": "https://unused.vault.azure.net",
            "HTTP_TIMEOUT_SECONDS": "1",  # read timeout min(10, 1) s, connect min(5, 1) s
        }
    )
    store = TableStore.from_settings(settings, None)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            store.table("Stalled")
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(20)  # the SDK defaults (300 s read timeout, 10 retries) would still be waiting here
    elapsed = time.monotonic() - started
    try:
        assert not worker.is_alive(), f"the table call was still waiting after {elapsed:.0f} s"
        [error] = outcome
        assert isinstance(error, StateError), repr(error)
        assert "creating table Stalled failed" in str(error)
        # 3 attempts (retry_total 2) of a 1 s read timeout, plus the retry policy's short backoff
        assert elapsed < 10, f"took {elapsed:.1f} s"
        assert 1 <= silent.accepted <= 3
    finally:
        if not worker.is_alive():  # a stuck call holds the store's lock: close would wait for it
            store.close()


def test_a_stalled_read_is_retried_at_most_retry_total_times(silent: SilentServer) -> None:
    endpoint = f"http://127.0.0.1:{silent.port}/devstoreaccount1"
    conn = connection_string(endpoint)
    service = TableServiceClient.from_connection_string(
        conn, **transport_options(endpoint, connect_timeout=1, read_timeout=0.5)
    )
    table = service.get_table_client("Stalled")
    started = time.monotonic()
    try:
        with pytest.raises(StateError, match="reading Stalled failed"):
            get_entity(table, "p", "r")
        elapsed = time.monotonic() - started
        assert silent.accepted == 1 + RETRY_TOTAL
        assert elapsed < (1 + RETRY_TOTAL) * 0.5 + 2 * RETRY_BACKOFF_MAX, f"took {elapsed:.1f} s"
    finally:
        service.close()
