"""Where synced work items (and the sync's error records) go.

A sink's ``write`` either stores every item it was given or raises: the engine moves the watermark
only after every sink returned, so a sink that fails half-way is simply written again from the
same page next run (all writes are idempotent upserts or, for Log Analytics, a re-ingested row
that queries deduplicate with ``arg_max(LastModifiedDate_t, *) by ServiceDeskSysId_s``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
from azure.monitor.ingestion import LogsIngestionClient

from shared_code.diagnose import LOGS_ROLE, describe
from shared_code.errors import ConnectorAppError
from shared_code.state.syncerrors import SyncErrorRecord, SyncErrorRepository
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.model import WorkItem

log = logging.getLogger(__name__)


class SinkError(ConnectorAppError):
    """A sink outside Table Storage (Log Analytics) refused or failed a write."""


class WorkItemSink(Protocol):
    """One destination of synced work items."""

    name: str

    def write(self, items: Sequence[WorkItem]) -> None:
        """Store all of ``items`` (idempotently) or raise a ConnectorAppError."""
        ...


class ErrorLog(Protocol):
    """Where the sync's error records go (the SyncErrors table, and Log Analytics if configured)."""

    def record(self, records: Sequence[SyncErrorRecord]) -> None: ...


class TableSink:
    """The WorkItems table: batched upserts grouped by partition, partitions in parallel."""

    name = "table"

    def __init__(self, repository: WorkItemRepository) -> None:
        self._repository = repository

    def write(self, items: Sequence[WorkItem]) -> None:
        if items:
            self._repository.upsert_many(items)


class LogsUploader:
    """One lazily made ``LogsIngestionClient`` for a data collection endpoint and rule."""

    def __init__(
        self,
        endpoint: str,
        rule_id: str,
        credential: TokenCredential,
        *,
        ca_bundle: str = "",
        timeout: float = 20.0,
        client_factory: Callable[..., LogsIngestionClient] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.rule_id = rule_id
        self._credential = credential
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._client_factory = client_factory
        self._client: LogsIngestionClient | None = None
        self._lock = threading.Lock()

    def _logs(self) -> LogsIngestionClient:
        with self._lock:
            if self._client is None:
                kwargs: dict[str, Any] = {"connection_timeout": self._timeout, "read_timeout": self._timeout}
                if self._ca_bundle:
                    kwargs["connection_verify"] = self._ca_bundle
                factory = self._client_factory or LogsIngestionClient
                self._client = factory(endpoint=self.endpoint, credential=self._credential, **kwargs)
            return self._client

    def upload(self, stream: str, records: Sequence[dict[str, Any]]) -> None:
        """Upload ``records`` to ``stream``; any failure becomes one SinkError naming the stream."""
        if not records:
            return
        try:
            self._logs().upload(rule_id=self.rule_id, stream_name=stream, logs=list(records))
        except ClientAuthenticationError as exc:
            raise SinkError(
                f"Logs Ingestion: the app's identity could not get a token ({type(exc).__name__}); "
                "check its role assignment 'Monitoring Metrics Publisher' on the data collection rule"
            ) from exc
        except HttpResponseError as exc:
            reason = exc.reason or (exc.error.code if exc.error else "") or type(exc).__name__
            raise SinkError(
                f"Logs Ingestion upload to stream {stream} failed: HTTP {exc.status_code} {reason}"
            ) from exc
        except AzureError as exc:
            reason = describe(exc, target=self.endpoint, role=LOGS_ROLE)
            raise SinkError(f"Logs Ingestion upload to stream {stream} failed: {reason}") from exc

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class LogAnalyticsSink:
    """Work items as ``ServiceDesk_CL`` rows (ITSMC column names) through the Logs Ingestion API."""

    name = "log_analytics"

    def __init__(
        self, uploader: LogsUploader, stream: str, clock: Callable[[], datetime] | None = None
    ) -> None:
        self._uploader = uploader
        self._stream = stream
        self._clock = clock or (lambda: datetime.now(UTC))

    def write(self, items: Sequence[WorkItem]) -> None:
        now = self._clock()
        self._uploader.upload(self._stream, [item.to_service_desk_record(now) for item in items])


class SyncErrorLog:
    """Error records always go to the SyncErrors table; a copy goes to Log Analytics when configured.

    The table write must succeed (the engine treats a failure like any sink failure); the Log
    Analytics copy is best effort, because a missing error-stream table must not stop the sync.
    """

    def __init__(
        self, repository: SyncErrorRepository, uploader: LogsUploader | None = None, stream: str = ""
    ) -> None:
        self._repository = repository
        self._uploader = uploader
        self._stream = stream

    def record(self, records: Sequence[SyncErrorRecord]) -> None:
        if not records:
            return
        self._repository.add_many(records)
        if self._uploader is not None and self._stream:
            try:
                self._uploader.upload(self._stream, [r.to_log_record() for r in records])
            except SinkError as exc:
                log.warning("sync errors kept in the SyncErrors table only: %s", exc)
