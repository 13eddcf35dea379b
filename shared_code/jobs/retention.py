"""Retention: the state tables pruned by age on a timer, so they stop growing without bound.

Each table has its own age limit (settings ``RETENTION_*_DAYS``) and the job deletes at most
``RETENTION_MAX_ROWS`` rows of each table per run, so a first run over a large backlog stays well
inside the function timeout; the next run continues. A table that fails does not stop the others.
Every run is recorded in the Runs table (job ``retention``), where ``/api/health`` reads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared_code.domain.runs import RunRecord
from shared_code.errors import ConnectorAppError
from shared_code.ports.state import ExpiringRows, RunLog

log = logging.getLogger(__name__)

JOB = "retention"


@dataclass(frozen=True)
class RetentionRule:
    rows: ExpiringRows
    max_age: timedelta


@dataclass(frozen=True)
class RetentionResult:
    deleted: dict[str, int]
    outcome: str  # succeeded | incomplete (a table had more than the per-run limit) | failed
    error: str = ""


@dataclass
class RetentionJob:
    rules: Mapping[str, RetentionRule]
    runs: RunLog
    clock: Callable[[], datetime]
    max_rows_per_table: int = 5000

    def run(self, *, trigger: str = "timer") -> RetentionResult:
        started = self.clock()
        began = time.monotonic()
        deleted: dict[str, int] = {}
        errors: list[str] = []
        for name, rule in self.rules.items():
            try:
                deleted[name] = rule.rows.delete_older_than(
                    started - rule.max_age, limit=self.max_rows_per_table
                )
            except ConnectorAppError as exc:
                deleted[name] = 0
                errors.append(f"{name}: {exc}")
                log.error("retention: pruning %s failed: %s", name, exc)
        if errors:
            outcome = "failed"
        elif any(count >= self.max_rows_per_table for count in deleted.values()):
            outcome = "incomplete"
        else:
            outcome = "succeeded"
        result = RetentionResult(deleted=deleted, outcome=outcome, error="; ".join(errors))
        self._record(result, started, time.monotonic() - began, trigger)
        log.info("retention %s: deleted %s", outcome, deleted)
        return result

    def _record(self, result: RetentionResult, started: datetime, seconds: float, trigger: str) -> None:
        run = RunRecord(
            job=JOB,
            trigger=trigger,
            started_at=started,
            finished_at=self.clock(),
            duration_seconds=seconds,
            outcome=result.outcome,
            counts=result.deleted,
            error=result.error,
        )
        try:
            self.runs.record(run)
        except ConnectorAppError as exc:  # the pruning is done; only its record is missing
            log.error("retention: the run could not be recorded: %s", exc)
