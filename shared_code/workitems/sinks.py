"""Where synced work items (and the sync's error records) go.

A sink's ``write`` either stores every item it was given or raises: the engine moves the watermark
only after every sink returned, so a sink that fails half-way is simply written again from the
same page next run (all writes are idempotent upserts or, for Log Analytics, a re-ingested row
that queries deduplicate with ``arg_max(LastModifiedDate_t, *) by ServiceDeskSysId_s``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from shared_code.domain.sync import SyncErrorRecord
from shared_code.domain.workitem import WorkItem
from shared_code.errors import SinkError
from shared_code.ports.monitor import LogsUpload
from shared_code.ports.state import SyncErrorStore, WorkItemStore

log = logging.getLogger(__name__)


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

    def __init__(self, repository: WorkItemStore) -> None:
        self._repository = repository

    def write(self, items: Sequence[WorkItem]) -> None:
        if items:
            self._repository.upsert_many(items)


class LogAnalyticsSink:
    """Work items as ``ServiceDesk_CL`` rows (ITSMC column names) through the Logs Ingestion API."""

    name = "log_analytics"

    def __init__(
        self, uploader: LogsUpload, stream: str, clock: Callable[[], datetime] | None = None
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
        self, repository: SyncErrorStore, uploader: LogsUpload | None = None, stream: str = ""
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
