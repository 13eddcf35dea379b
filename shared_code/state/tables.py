"""Table Storage access shared by the repositories.

``TableStore`` hands out one ``TableClient`` per table, creating the table on first use; nothing
is created or contacted at import time. Azure SDK errors are converted here into the app's own
hierarchy, so repositories and services never import ``azure.core.exceptions``.

Connection hiccups: azure-core never retries a POST or PATCH after a transport error, and a
pooled connection that the server closed after idling (Azurite closes them after 5 s) fails the
call sent on it. So pooled connections idle longer than ``POOL_IDLE_SECONDS`` are closed before
reuse, and the writes that are safe to repeat are repeated (at most ``WRITE_ATTEMPTS`` times) on a
connection error: upserts as they are; a conditional insert or an ETag-matched replace whose
repeat meets the row it wrote itself (the first attempt landed, its answer was lost) returns
that row's ETag instead of reporting a conflict.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, TypeVar

from azure.core import MatchConditions
from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.data.tables import (
    EntityProperty,
    TableClient,
    TableServiceClient,
    UpdateMode,
)
from requests import Session
from requests.adapters import HTTPAdapter
from requests.utils import get_environ_proxies
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from shared_code.diagnose import STORAGE_ROLE, describe
from shared_code.errors import AlreadyExistsError, ConfigurationError, EtagConflict, StateError
from shared_code.settings import DEVELOPMENT_STORAGE, Settings

T = TypeVar("T")

log = logging.getLogger(__name__)

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


POOL_IDLE_SECONDS = 4.0
"""A pooled connection idle longer than this is closed rather than reused: below the 5 s after
which Azurite (Node's keep-alive timeout) closes it, and far below Azure Storage's own limit."""
WRITE_ATTEMPTS = 3
"""Attempts of a write that is safe to repeat when the connection fails under it."""
_WRITE_PAUSE = 0.05
NO_SDK_TRANSPORT_RETRIES: dict[str, Any] = {"retry_connect": 0, "retry_read": 0}
"""Per-call options: the SDK's policy leaves transport errors of writes to ``repeat_safe_write``
(which knows what a repeat means) and still retries 5xx answers itself."""
CONNECTION_ERRORS = (ServiceRequestError, ServiceResponseError)
_IDLE_SINCE = "_itsm_idle_since"


class _IdleClosingHTTPPool(HTTPConnectionPool):
    """A pool that closes a connection idle longer than ``idle_seconds`` before handing it out
    (urllib3 then opens a new one), instead of sending a request the server may be closing."""

    idle_seconds = POOL_IDLE_SECONDS

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _fresh(super()._get_conn(timeout), self.idle_seconds)

    def _put_conn(self, conn: Any) -> None:
        _stamp(conn)
        super()._put_conn(conn)


class _IdleClosingHTTPSPool(HTTPSConnectionPool):
    idle_seconds = POOL_IDLE_SECONDS

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _fresh(super()._get_conn(timeout), self.idle_seconds)

    def _put_conn(self, conn: Any) -> None:
        _stamp(conn)
        super()._put_conn(conn)


def _stamp(conn: object) -> None:
    if conn is not None:
        setattr(conn, _IDLE_SINCE, time.monotonic())


def _fresh(conn: Any, idle_seconds: float) -> Any:
    since = getattr(conn, _IDLE_SINCE, None)
    if isinstance(conn, HTTPConnection) and since is not None and time.monotonic() - since > idle_seconds:
        conn.close()  # reconnects on its next request
    return conn


class _IdleClosingAdapter(HTTPAdapter):
    def __init__(self, *, idle_seconds: float | None, **kwargs: Any) -> None:
        self._idle_seconds = idle_seconds
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        if self._idle_seconds is not None:
            limit = {"idle_seconds": self._idle_seconds}
            self.poolmanager.pool_classes_by_scheme = {
                "http": type("IdleClosingHTTPPool", (_IdleClosingHTTPPool,), limit),
                "https": type("IdleClosingHTTPSPool", (_IdleClosingHTTPSPool,), limit),
            }


def transport_options(
    endpoint: str,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    idle_seconds: float | None = POOL_IDLE_SECONDS,
    ca_bundle: str | None = None,
) -> dict[str, Any]:
    """Client options: a connection pool sized for a busy host, the environment read once, bounded
    timeouts and a small retry total.

    By default ``requests`` re-reads the whole process environment on every request (proxies,
    NO_PROXY, REQUESTS_CA_BUNDLE, ~/.netrc): about 0.4 ms of CPU per table operation in a Functions
    host's environment, a quarter of each call's cost. The account endpoint is fixed, so the answer
    is the same every time: work it out here and turn the per-request lookup off.

    ``idle_seconds``: pooled connections idle longer are not reused (None: reuse any). ``ca_bundle``:
    the CA file to verify TLS with (default: the environment's, else certifi's).
    """
    verify: bool | str = (
        ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    )
    session = Session()
    session.trust_env = False
    # retries stay with the SDK's own retry policy (and repeat_safe_write), not urllib3's
    adapter = _IdleClosingAdapter(
        idle_seconds=idle_seconds,
        pool_maxsize=POOL_SIZE,
        max_retries=Retry(total=False, redirect=False, raise_on_status=False),
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
    def from_settings(
        cls, settings: Settings, credential: TokenCredential | None, *, ca_file: str = ""
    ) -> TableStore:
        """The store of the settings' account. ``ca_file``: the CA file for TLS (the default roots
        plus TLS_CA_BUNDLE, see ``tlstrust``); default: the environment's, else certifi's."""
        options: dict[str, Any] = {
            "connect_timeout": min(CONNECT_TIMEOUT, settings.http_timeout_seconds),
            "read_timeout": min(READ_TIMEOUT, settings.http_timeout_seconds),
            "ca_bundle": ca_file or None,
        }
        if settings.identity_table_endpoint:
            if credential is None:
                raise StateError("identity-based table storage needs an Azure credential")
            endpoint = settings.identity_table_endpoint
            service = TableServiceClient(
                endpoint=endpoint, credential=credential, **transport_options(endpoint, **options)
            )
        else:
            conn = settings.storage_connection
            if conn.strip() == DEVELOPMENT_STORAGE:
                conn = AZURITE_CONNECTION_STRING
            try:
                endpoint = TableServiceClient.from_connection_string(conn).url
            except ValueError as exc:  # Settings checks the shape; this is what the SDK still refuses
                raise ConfigurationError(
                    f"Invalid app settings:\n- AzureWebJobsStorage: the storage SDK refuses it ({exc})"
                ) from exc
            service = TableServiceClient.from_connection_string(
                conn, **transport_options(endpoint, **options)
            )
        return cls(service, settings.table_prefix)

    def table(self, name: str) -> TableClient:
        """The client for ``name`` (prefixed), creating the table once per process."""
        full = f"{self._prefix}{name}"
        with self._lock:
            client = self._clients.get(full)
            if client is None:
                with translate_errors(f"creating table {full}", self._service.url):
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
    """Turn Azure SDK errors into StateError / AlreadyExistsError / EtagConflict; a StateError says
    what was unreachable, why and what to do (``diagnose.describe``). ``target``: the endpoint."""

    def __init__(self, action: str, target: str = "") -> None:
        self.action = action
        self.target = target

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
            reason = describe(exc, target=self.target, role=STORAGE_ROLE)
            raise StateError(f"{self.action} failed: {reason}") from exc
        return False


def get_entity(table: TableClient, partition: str, row: str) -> Entity | None:
    try:
        with translate_errors(f"reading {table.table_name}", table.url):
            return _with_etag(table.get_entity(partition, row))
    except ResourceNotFoundError:
        return None


def _with_etag(entity: Any) -> Entity:
    """A plain dict of the row plus its ETag under ``_etag`` (the SDK keeps it in metadata)."""
    result = dict(entity)
    result["_etag"] = str((getattr(entity, "metadata", None) or {}).get("etag", ""))
    return result


def repeat_safe_write(
    action: str,
    call: Callable[[], T],
    *,
    conflict_after_repeat: Callable[[], T | None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call`` (a write that is safe to repeat), repeated on a connection error (bounded).

    A conflict met by a repeat may be this write's own first attempt, which landed while its
    answer was lost: ``conflict_after_repeat`` says so (it returns the result to use) or not
    (None: the conflict stands)."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return call()
        except CONNECTION_ERRORS as exc:
            if attempt >= WRITE_ATTEMPTS:
                raise
            log.info("%s: connection failed (%s), attempt %d; repeating", action, type(exc).__name__, attempt)
            sleep(_WRITE_PAUSE * attempt)
        except (ResourceExistsError, ResourceModifiedError):
            if attempt > 1 and conflict_after_repeat is not None:
                landed = conflict_after_repeat()
                if landed is not None:
                    log.info("%s: the attempt whose answer was lost had landed", action)
                    return landed
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _comparable(value: object) -> object:
    """A property value as it compares after a round trip (typed values, UTC datetimes, enums)."""
    if isinstance(value, EntityProperty):
        value = value.value
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _own_row(table: TableClient, entity: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"etag": ...}`` of the stored row when it holds exactly what ``entity`` wrote, else None."""
    try:
        stored = table.get_entity(entity["PartitionKey"], entity["RowKey"])
    except ResourceNotFoundError:
        return None
    for name, value in entity.items():
        if name not in ("PartitionKey", "RowKey") and _comparable(stored.get(name)) != _comparable(value):
            return None
    return {"etag": str((getattr(stored, "metadata", None) or {}).get("etag", ""))}


def insert_entity(table: TableClient, entity: Entity) -> str:
    """Conditional insert: AlreadyExistsError when the row is there. Returns the new ETag."""
    action = f"inserting into {table.table_name}"
    with translate_errors(action, table.url):
        result = repeat_safe_write(
            action,
            lambda: table.create_entity(entity, **NO_SDK_TRANSPORT_RETRIES),
            conflict_after_repeat=lambda: _own_row(table, entity),
        )
    return str(result.get("etag", ""))


def replace_if_match(table: TableClient, entity: Entity, etag: str) -> str:
    """Replace only if nobody wrote since ``etag`` was read; EtagConflict otherwise."""
    action = f"updating {table.table_name}"
    try:
        with translate_errors(action, table.url):
            result = repeat_safe_write(
                action,
                lambda: table.update_entity(
                    entity,
                    mode=UpdateMode.REPLACE,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                    **NO_SDK_TRANSPORT_RETRIES,
                ),
                conflict_after_repeat=lambda: _own_row(table, entity),
            )
    except ResourceNotFoundError as exc:
        raise EtagConflict(f"updating {table.table_name}: the row was deleted") from exc
    return str(result.get("etag", ""))


def merge_entity(table: TableClient, entity: Entity) -> None:
    """Upsert-merge: the columns given win, others stay (repeated on a connection error)."""
    action = f"updating {table.table_name}"
    with translate_errors(action, table.url):
        repeat_safe_write(
            action, lambda: table.upsert_entity(entity, mode=UpdateMode.MERGE, **NO_SDK_TRANSPORT_RETRIES)
        )


def delete_entity(table: TableClient, partition: str, row: str) -> None:
    action = f"deleting from {table.table_name}"
    try:
        with translate_errors(action, table.url):
            repeat_safe_write(action, lambda: table.delete_entity(partition, row, **NO_SDK_TRANSPORT_RETRIES))
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
    with translate_errors(f"querying {table.table_name}", table.url):
        for entity in table.query_entities(query, parameters=parameters or {}, **extra):
            yield _with_etag(entity)
