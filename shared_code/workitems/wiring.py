"""Builds the sync engine from the composition root's collaborators (settings, tables, clients).

Kept out of ``bootstrap.py`` so the sync's wiring lives next to the sync; the container exposes the
result as ``container.sync_engine``. Nothing here runs at import time.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from shared_code.state import runs as runs_table
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import syncstate as syncstate_table
from shared_code.state import workitems as workitems_table
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.backsync import AlertsManagementClient, BackSync
from shared_code.workitems.engine import SyncEngine
from shared_code.workitems.sinks import LogAnalyticsSink, LogsUploader, SyncErrorLog, TableSink, WorkItemSink

if TYPE_CHECKING:
    from shared_code.bootstrap import Container


def build_sync_engine(container: Container) -> SyncEngine:
    """The engine over the WorkItems table, Log Analytics (when configured) and backward sync."""
    settings = container.settings
    tables = container.tables
    sinks: list[WorkItemSink] = [TableSink(WorkItemRepository(tables.table(workitems_table.TABLE)))]
    uploader: LogsUploader | None = None
    if settings.logs_ingestion_enabled:
        uploader = LogsUploader(
            settings.logs_ingestion_endpoint,
            settings.logs_ingestion_rule_id,
            container.credential,
            ca_bundle=container.ca_file,
            timeout=settings.http_timeout_seconds,
        )
        sinks.append(LogAnalyticsSink(uploader, settings.logs_ingestion_stream, container.clock))
    errors = SyncErrorLog(
        SyncErrorRepository(tables.table(syncerrors_table.TABLE)),
        uploader,
        settings.logs_ingestion_error_stream,
    )
    alerts = AlertsManagementClient(container.http, container.credential, settings.arm_endpoint)
    return SyncEngine(
        connections=container.connections,
        connector_for=container.connector_for,
        sync_state=SyncStateRepository(tables.table(syncstate_table.TABLE)),
        sinks=sinks,
        errors=errors,
        runs=RunRepository(tables.table(runs_table.TABLE)),
        clock=container.clock,
        page_size=settings.sync_page_size,
        overlap=timedelta(seconds=settings.sync_overlap_seconds),
        backsync=BackSync(container.correlations, alerts, container.clock),
    )
