"""Table Storage access shared by the repositories.

``TableStore`` hands out one ``TableClient`` per table, creating the table on first use; nothing
is created or contacted at import time. Azure SDK errors are converted here into the app's own
hierarchy, so repositories and services never import ``azure.core.exceptions``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import TableClient, TableServiceClient, TransactionOperation, UpdateMode
from requests import Session
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies
from urllib3.util.retry import Retry

from shared_code.errors import AlreadyExistsError, EtagConflict, StateError
from shared_code.settings import DEVELOPMENT_STORAGE, Settings

T = TypeVar("T")

Entity = dict[str, Any]

AZURITE_CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


def bucket_of(value: str, buckets: int) -> int:
    """Stable hash bucket (0..buckets-1) used to spread hot keys over partitions."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=4).digest(), "big") % buckets


POOL_SIZE = 64
"""Connections kept open to the account: as many as the host runs invocations at once (the
``requests`` default of 10 makes a busier host open and drop a connection per call)."""
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
RETRY_TOTAL = 2
RETRY_BACKOFF_MAX = 4
"""Table calls are short: a stalled account must fail a call within seconds (the webhook answers
within 10 s and alert leases last a minute), not after azure-core's 300 s timeouts and ten retries.
A call waits at most ``(RETRY_TOTAL + 1) * (connect + read timeout)`` plus a few seconds of backoff."""


def transport_options(
    endpoint: str, *, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT
) -> dict[str, Any]:
    """Client options: a connection pool sized for a busy host, the environment read once, bounded
    timeouts and a small retry total.

    By default ``requests`` re-reads the whole process environment on every request (proxies,
    NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc): about 0.4 ms of CPU per table operation in a Functions
    host's environment, a quarter of each call's cost. The account endpoint is fixed, so the answer
    is the same every time: work it out here and turn the per-request lookup off.
    """
    verify: bool | str = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    session = Session()
    session.trust_env = False
    # retries stay with the SDK's own retry policy, as in the transport's default session
    adapter = HTTPAdapter(
        pool_maxsize=POOL_SIZE, max_retries=Retry(total=False, redirect=False, raise_on_status=False)
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    transport = RequestsTransport(
        session=session,
        session_owner=True,
        connection_verify=verify,
        # a transport given to the client keeps its own defaults (300 s): set them here, where
        # RequestsTransport.send reads them for every request
        connection_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return {
        "transport": transport,
        "proxies": get_environ_proxies(endpoint) or None,  # {} when NO_PROXY covers the endpoint
        "retry_total": RETRY_TOTAL,
        "retry_backoff_max": RETRY_BACKOFF_MAX,
    }


class TableStore:
    """Lazily created table clients over one storage account."""

    def __init__(self, service: TableServiceClient, prefix: str = "") -> None:
        self._service = service
        self._prefix = prefix
        self._clients: dict[str, TableClient] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, credential: TokenCredential | None) -> TableStore:
        timeouts = {
            "connect_timeout": min(CONNECT_TIMEOUT, settings.http_timeout_seconds),
            "read_timeout": min(READ_TIMEOUT, settings.http_timeout_seconds),
        }
        if settings.identity_table_endpoint:
            if credential is None:
                raise StateError("identity-based table storage needs an Azure credential")
            endpoint = settings.identity_table_endpoint
            service = TableServiceClient(
                endpoint=endpoint, credential=credential, **transport_options(endpoint, **timeouts)
            )
        else:
            conn = settings.storage_connection
            if conn.strip() == DEVELOPMENT_STORAGE:
                conn = AZURITE_CONNECTION_STRING
            endpoint = TableServiceClient.from_connection_string(conn).url
            service = TableServiceClient.from_connection_string(
                conn, **transport_options(endpoint, **timeouts)
            )
        return cls(service, settings.table_prefix)

    def table(self, name: str) -> TableClient:
        """The client for ``name`` (prefixed), creating the table once per process."""
        full = f"{self._prefix}{name}"
        with self._lock:
            client = self._clients.get(full)
            if client is None:
                with translate_errors(f"creating table {full}"):
                    self._service.create_table_if_not_exists(full)
                client = self._service.get_table_client(full)
                self._clients[full] = client
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            self._service.close()


class translate_errors:
    """Turn Azure SDK errors into StateError / AlreadyExistsError / EtagConflict."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> Literal[False]:
        if exc is None:
            return False
        if isinstance(exc, ResourceExistsError):
            raise AlreadyExistsError(f"{self.action}: the row exists already") from exc
        if isinstance(exc, ResourceModifiedError):
            raise EtagConflict(f"{self.action}: changed by another instance") from exc
        if isinstance(exc, ResourceNotFoundError):
            return False  # callers decide what a missing row means
        if isinstance(exc, AzureError):
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise StateError(f"{self.action} failed: {reason}") from exc
        return False


def get_entity(table: TableClient, partition: str, row: str) -> Entity | None:
    try:
        with translate_errors(f"reading {table.table_name}"):
            return _with_etag(table.get_entity(partition, row))
    except ResourceNotFoundError:
        return None


def _with_etag(entity: Any) -> Entity:
    """A plain dict of the row plus its ETag under ``_etag`` (the SDK keeps it in metadata)."""
    result = dict(entity)
    result["_etag"] = str((getattr(entity, "metadata", None) or {}).get("etag", ""))
    return result


def insert_entity(table: TableClient, entity: Entity) -> str:
    """Conditional insert: AlreadyExistsError when the row is there. Returns the new ETag."""
    with translate_errors(f"inserting into {table.table_name}"):
        result = table.create_entity(entity)
    return str(result.get("etag", ""))


def replace_if_match(table: TableClient, entity: Entity, etag: str) -> str:
    """Replace only if nobody wrote since ``etag`` was read; EtagConflict otherwise."""
    try:
        with translate_errors(f"updating {table.table_name}"):
            result = table.update_entity(
                entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
            )
    except ResourceNotFoundError as exc:
        raise EtagConflict(f"updating {table.table_name}: the row was deleted") from exc
    return str(result.get("etag", ""))


def merge_entity(table: TableClient, entity: Entity) -> None:
    """Upsert-merge: the columns given win, others stay."""
    with translate_errors(f"updating {table.table_name}"):
        table.upsert_entity(entity, mode=UpdateMode.MERGE)


def delete_entity(table: TableClient, partition: str, row: str) -> None:
    try:
        with translate_errors(f"deleting from {table.table_name}"):
            table.delete_entity(partition, row)
    except ResourceNotFoundError:
        return


def query_entities(
    table: TableClient,
    query: str,
    parameters: dict[str, Any] | None = None,
    *,
    select: list[str] | None = None,
    page_size: int | None = None,
) -> Iterator[Entity]:
    """Rows matching ``query``; ``select`` names the only columns wanted (keys and ETag come too)."""
    extra: dict[str, Any] = {}
    if select is not None:
        extra["select"] = select
    if page_size is not None:
        extra["results_per_page"] = page_size
    with translate_errors(f"querying {table.table_name}"):
        for entity in table.query_entities(query, parameters=parameters or {}, **extra):
            yield _with_etag(entity)


def upsert_batch(table: TableClient, entities: list[Entity]) -> None:
    """Upsert rows of ONE partition in transactions of at most 100 (the service's limit)."""
    for start in range(0, len(entities), 100):
        chunk = entities[start : start + 100]
        operations: list[tuple[TransactionOperation, Entity, dict[str, Any]]] = [
            (TransactionOperation.UPSERT, e, {"mode": UpdateMode.REPLACE}) for e in chunk
        ]
        with translate_errors(f"writing a batch to {table.table_name}"):
            table.submit_transaction(operations)


def retry_on_conflict(action: Callable[[], T], attempts: int = 20) -> T:
    """Run a read-modify-write ``action`` until it wins its ETag race (bounded)."""
    for _ in range(attempts - 1):
        try:
            return action()
        except (EtagConflict, AlreadyExistsError):
            continue
    return action()
