"""The app's health: can it reach what it depends on, and how did its timers last run?

Each dependency gets one cheap call (Table Storage: one point read; queues: the alert queue's
properties; Key Vault: one secret read), all at once, each bounded by ``HEALTH_TIMEOUT_SECONDS``.
A probe still running from an earlier check (a hung dependency) is not started again: that
dependency is reported degraded at once, so a flood of health requests cannot pile up threads.

The report names dependencies and timers only by role; it holds no connection name, URL, secret
or error text (the details go to the log).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from shared_code.domain.runs import RunRecord
from shared_code.errors import ConfigurationError, ConnectorAppError

log = logging.getLogger(__name__)

PROBE_SECRET = "itsm-health-probe"  # noqa: S105 - a name that no connection's secret can have
"""Secret names of connections are ``itsm-<connection>-<purpose>``; this one is read and may be absent."""
TIMER_JOBS: dict[str, str] = {
    "sync_work_items": "sync",
    "maps_import_timer": "maps",
    "prune_state": "retention",
}
"""Timer function -> the job name its runs are recorded under in the Runs table."""
ONE_INVOCATION = timedelta(minutes=10)
"""Rows of one timer invocation (one per connection and type) start within the function timeout."""
_OUTCOME_RANK = {
    "failed": 3,
    "incomplete": 2,
    "partial": 2,  # a map import where some servers failed
    "succeeded": 1,
    "ok": 1,  # a map import
    "skipped": 0,
    "busy": 0,  # a map import that found another one running
}


class Status(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"


class DependencyHealth(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    status: Status
    latency_ms: float | None = Field(default=None, serialization_alias="latencyMs")
    problem: str | None = Field(default=None, description="timeout | unavailable | misconfigured")


class TimerHealth(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    last_run_at: datetime | None = Field(default=None, serialization_alias="lastRunAt")
    outcome: str | None = Field(default=None, description="worst outcome of the last invocation")
    runs: int = Field(default=0, description="runs (connection and type) in the last invocation")
    known: bool = Field(default=True, description="false when the Runs table could not be read")


class HealthReport(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True)

    status: Status
    checked_at: datetime = Field(serialization_alias="checkedAt")
    dependencies: dict[str, DependencyHealth]
    timers: dict[str, TimerHealth]


class HealthMonitor:
    """Runs the probes concurrently on its own small pool; at most one probe per dependency in flight."""

    def __init__(
        self,
        probes: Mapping[str, Callable[[], None]],
        timers: Callable[[], dict[str, TimerHealth]],
        clock: Callable[[], datetime],
        *,
        timeout: float,
    ) -> None:
        self._probes = dict(probes)
        self._timers = timers
        self._clock = clock
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=len(self._probes) + 1, thread_name_prefix="health")
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[float]] = {}

    def check(self) -> HealthReport:
        started = time.monotonic()
        futures: dict[str, Future[float] | None] = {name: self._start(name) for name in self._probes}
        timer_future = self._pool.submit(self._timers)
        dependencies = {name: self._outcome(name, future, started) for name, future in futures.items()}
        try:
            timers = timer_future.result(timeout=max(0.0, self._timeout - (time.monotonic() - started)))
        except Exception as exc:  # noqa: BLE001 - the timers section is informative; never fails the check
            log.warning("health: the timer runs could not be read: %s", _reason(exc))
            timers = {name: TimerHealth(known=False) for name in TIMER_JOBS}
        degraded = any(d.status is Status.DEGRADED for d in dependencies.values())
        return HealthReport(
            status=Status.DEGRADED if degraded else Status.OK,
            checked_at=self._clock(),
            dependencies=dependencies,
            timers=timers,
        )

    def _start(self, name: str) -> Future[float] | None:
        with self._lock:
            running = self._in_flight.get(name)
            if running is not None and not running.done():
                return None  # still hung from an earlier check
            future = self._pool.submit(_timed, self._probes[name])
            self._in_flight[name] = future
            return future

    def _outcome(self, name: str, future: Future[float] | None, started: float) -> DependencyHealth:
        if future is None:
            log.warning("health: %s: the previous probe has not returned yet", name)
            return DependencyHealth(status=Status.DEGRADED, problem="timeout")
        try:
            seconds = future.result(timeout=max(0.0, self._timeout - (time.monotonic() - started)))
        except FutureTimeout:
            log.warning("health: %s did not answer within %.1f s", name, self._timeout)
            return DependencyHealth(status=Status.DEGRADED, problem="timeout")
        except Exception as exc:  # noqa: BLE001 - any failure of a probe is that dependency's trouble
            log.warning("health: %s failed: %s", name, _reason(exc))
            problem = "misconfigured" if isinstance(exc, ConfigurationError) else "unavailable"
            return DependencyHealth(status=Status.DEGRADED, problem=problem)
        return DependencyHealth(status=Status.OK, latency_ms=round(seconds * 1000, 1))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _timed(probe: Callable[[], None]) -> float:
    started = time.monotonic()
    probe()
    return time.monotonic() - started


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ConnectorAppError) else type(exc).__name__


def summarise_timer_runs(runs: Iterable[RunRecord]) -> TimerHealth:
    """The last timer invocation from its rows (newest first): when it ended and its worst outcome."""
    rows = [run for run in runs if run.trigger == "timer"]
    if not rows:
        return TimerHealth()
    newest = rows[0]
    last = [run for run in rows if run.started_at >= newest.started_at - ONE_INVOCATION]
    worst = max(last, key=lambda run: _OUTCOME_RANK.get(run.outcome, 3)).outcome
    return TimerHealth(last_run_at=max(run.finished_at for run in last), outcome=worst, runs=len(last))
