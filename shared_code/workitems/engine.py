"""The work-item sync engine: ITSM change feed -> sinks, with a watermark that never runs ahead.

For each connection and work-item type:

1. Take the SyncState row's lease (conditional insert / ETag replace), so two runs of the same
   connection and type never page at once; a run that dies leaves a lease that simply expires.
2. Start at ``watermark - overlap`` (first run: ``now - sync_scope_days``). The overlap re-reads the
   last seconds of the feed, so a row committed late with an update time we had already passed
   (ServiceNow keeps whole seconds) is not missed; rows read twice are idempotent upserts.
3. Page through the connector's keyset feed (update time, then id). While page N is written, page
   N+1 is already being fetched on one background thread, so throughput approaches plain paging;
   at most two pages are in memory at any time. A connector may hand back a page whose rows are
   mapped on first use (``SyncPage.deferred``, as ServiceNow does): the engine reads the rows only
   after it asked for the next page, so the mapping runs while that request is in flight.
4. A page is committed when every sink stored its good rows, backward sync handled them, and its
   rejected rows are in the error log. Only then does the watermark move to the page's cursor
   (never backwards). A failure anywhere leaves the watermark at the last committed page: the next
   run reads from there again, so there is no gap, and upserts mean no duplicate.
5. The stored watermark never passes the run's start plus ``clock_skew``: one row stamped in the
   future (an import without system fields, a skewed clock) would otherwise pin it there and every
   real update before that date would be skipped. When a page's cursor goes past that cap, the
   watermark stops at the newest row of the page that is not after the run's start (not at the
   cap itself: with an overlap shorter than the skew, updates made just after this run would fall
   behind the next run's start). Paging within the run still follows the page cursors; rows with
   future times are simply read again by later runs (idempotent upserts).

A run with a time budget shares it fairly: each connection and type gets the time left divided by
the number of targets left (what one leaves unused goes to the next), so a large first sync of one
connection does not leave the others a page per run. Each stops after a committed page.

Failures are per connection and type: they are recorded in Runs, SyncState and the error log, and
the engine goes on with the next one. Nothing here raises for a single connection's trouble.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from shared_code.domain.connection import ConnectionBase
from shared_code.domain.runs import RunRecord, SyncStateRow
from shared_code.domain.sync import SyncCursor, SyncErrorKind, SyncErrorRecord, SyncPage
from shared_code.domain.workitem import WorkItemType
from shared_code.errors import (
    AlertsApiError,
    BusyError,
    ConnectorAppError,
    ItsmAuthError,
    ItsmError,
)
from shared_code.jobs.lease import FairBudget, JobLease, RunTally
from shared_code.ports.itsm import ChangeFeed, ConnectorPorts
from shared_code.ports.state import ConnectionStore, RunLog, SyncStateStore
from shared_code.telemetry import metrics
from shared_code.workitems.backsync import BackSync
from shared_code.workitems.sinks import ErrorLog, WorkItemSink

log = logging.getLogger(__name__)

JOB = "sync"


class SyncOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    INCOMPLETE = "incomplete"  # stopped at the time budget with more to read; the next run goes on
    FAILED = "failed"
    SKIPPED = "skipped"  # another run holds the lease, or the type is not synced for the connection


@dataclass(frozen=True)
class SyncResult:
    connection: str
    item_type: WorkItemType
    outcome: SyncOutcome
    run_id: str
    synced: int = 0
    rejected: int = 0
    pages: int = 0
    correlations_updated: int = 0
    alerts_closed: int = 0
    duration_seconds: float = 0.0
    error: str = ""
    watermark: SyncCursor | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {
            "synced": self.synced,
            "rejected": self.rejected,
            "pages": self.pages,
            "correlations_updated": self.correlations_updated,
            "alerts_closed": self.alerts_closed,
        }


@dataclass(frozen=True)
class SyncProgress:
    """Reported after every committed page (and once when a connection and type is done)."""

    connection: str
    item_type: WorkItemType
    pages: int
    synced: int
    rejected: int
    watermark: SyncCursor | None
    done: bool = False


ProgressCallback = Callable[[SyncProgress], None]


@dataclass
class _Run:
    """One sync of one connection and type: what it is about and what it has done so far."""

    connection: ConnectionBase
    item_type: WorkItemType
    run_id: str
    progress: ProgressCallback | None
    deadline: datetime | None
    started: datetime
    watermark_cap: datetime  # a page cursor past this is in the future: see _advance
    synced: int = 0
    rejected: int = 0
    pages: int = 0
    correlations_updated: int = 0
    alerts_closed: int = 0
    watermark: SyncCursor | None = None
    complete: bool = False
    capped: bool = False  # the future-watermark warning was logged
    errors: list[SyncErrorRecord] = field(default_factory=list)


class SyncEngine:
    """Syncs work items of every (or one) connection; collaborators are injected, none is global."""

    def __init__(
        self,
        *,
        connections: ConnectionStore,
        connector_for: Callable[[ConnectionBase], ConnectorPorts],
        sync_state: SyncStateStore,
        sinks: Sequence[WorkItemSink],
        errors: ErrorLog,
        runs: RunLog,
        clock: Callable[[], datetime],
        page_size: int = 1000,
        overlap: timedelta = timedelta(seconds=120),
        backsync: BackSync | None = None,
        lease: timedelta = timedelta(minutes=5),
        clock_skew: timedelta = timedelta(minutes=5),
    ) -> None:
        if not sinks:
            raise ValueError("the sync engine needs at least one sink")
        self._connections = connections
        self._connector_for = connector_for
        self._sinks = list(sinks)
        self._errors = errors
        self._runs = runs
        self._clock = clock
        self._page_size = page_size
        self._overlap = overlap
        self._backsync = backsync
        self._leases = JobLease(sync_state, clock, lease=lease, what="sync")
        self._clock_skew = clock_skew

    # -- public --------------------------------------------------------------------------------

    def run(
        self,
        connection: str | None = None,
        item_types: Collection[WorkItemType] | None = None,
        progress: ProgressCallback | None = None,
        *,
        trigger: str = "manual",
        time_budget: timedelta | None = None,
    ) -> list[SyncResult]:
        """Sync ``connection`` (default: every connection that syncs anything) and return one result
        per connection and type. Raises only when the connection list itself cannot be read or a
        named connection does not exist.

        ``time_budget`` is shared: each connection and type may use the time still left divided by
        the number of them still to run, so one large sync cannot starve the others."""
        if connection is not None:
            targets = [self._connections.get(connection)]
        else:
            targets = [c for c in self._connections.list() if c.sync_data]
        plan: list[tuple[ConnectionBase, WorkItemType, bool]] = []
        for target in targets:
            enabled = {WorkItemType.from_sync_name(s.value) for s in target.sync_data}
            wanted = list(item_types) if item_types is not None else sorted(enabled)
            plan += [(target, item_type, item_type in enabled) for item_type in wanted]
        budget = FairBudget(self._clock, time_budget, sum(1 for *_, synced in plan if synced))
        results: list[SyncResult] = []
        for target, item_type, synced in plan:
            if not synced:
                results.append(self._not_enabled(target, item_type))
                continue
            results.append(self._sync_one(target, item_type, progress, trigger, budget.next_share()))
        return results

    # -- one connection and type ---------------------------------------------------------------

    def _sync_one(
        self,
        connection: ConnectionBase,
        item_type: WorkItemType,
        progress: ProgressCallback | None,
        trigger: str,
        deadline: datetime | None,
    ) -> SyncResult:
        run_id = uuid.uuid4().hex[:12]
        owner = f"{JOB}:{run_id}"
        started = self._clock()
        run = _Run(connection, item_type, run_id, progress, deadline, started, started + self._clock_skew)
        outcome = SyncOutcome.FAILED
        error = ""
        kind: SyncErrorKind | None = None
        state: SyncStateRow | None = None
        try:
            state = self._leases.acquire(connection.name, item_type.sync_name, owner)
            run.watermark = state.watermark
            state = self._page_through(run, state)
            outcome = SyncOutcome.SUCCEEDED if run.complete else SyncOutcome.INCOMPLETE
        except BusyError as exc:
            outcome, error = SyncOutcome.SKIPPED, str(exc)
        except ItsmAuthError as exc:
            kind = SyncErrorKind.REAUTHORISE
            error = (
                f"re-authorise this connection: {connection.name!r} was refused by the ITSM product ({exc}). "
                "Store fresh credentials with 'python -m shared_code connections reauthorise "
                f"{connection.name}', then run the sync again"
            )
        except ItsmError as exc:
            kind, error = SyncErrorKind.ITSM, f"the ITSM product failed: {exc}"
        except AlertsApiError as exc:
            kind, error = SyncErrorKind.BACKSYNC, f"backward sync failed: {exc}"
        except ConnectorAppError as exc:
            kind, error = SyncErrorKind.SINK, str(exc)
        except Exception as exc:  # one connection's bug must not stop the others
            log.exception("sync of %s %s failed unexpectedly", connection.name, item_type.sync_name)
            kind, error = SyncErrorKind.INTERNAL, f"unexpected {type(exc).__name__}; see the app's logs"
        finally:
            finished = self._clock()
            if state is not None:
                tally = RunTally(
                    succeeded=outcome in (SyncOutcome.SUCCEEDED, SyncOutcome.INCOMPLETE),
                    outcome=outcome.value,
                    error=error,
                    done=run.synced,
                    rejected=run.rejected,
                )
                self._leases.release(state, owner, started, tally)
        if kind is not None:
            log.error("sync of %s %s failed: %s", connection.name, item_type.sync_name, error)
            run.errors.append(self._error(run, kind, error))
        result = SyncResult(
            connection=connection.name,
            item_type=item_type,
            outcome=outcome,
            run_id=run_id,
            synced=run.synced,
            rejected=run.rejected,
            pages=run.pages,
            correlations_updated=run.correlations_updated,
            alerts_closed=run.alerts_closed,
            duration_seconds=(finished - started).total_seconds(),
            error=error,
            watermark=run.watermark,
        )
        if run.errors:
            self._best_effort("recording sync errors", lambda: self._errors.record(run.errors))
        self._record_run(result, started, finished, trigger)
        self._report(run, done=True)
        return result

    def _page_through(self, run: _Run, state: SyncStateRow) -> SyncStateRow:
        connection, item_type, deadline = run.connection, run.item_type, run.deadline
        connector = self._connector_for(connection).require_changes()
        cursor = self._start_cursor(run, state)
        pool = ThreadPoolExecutor(1 + len(self._sinks), thread_name_prefix=f"sync-{connection.name}")
        pending: Future[SyncPage] | None = None
        try:
            pending = self._fetch_ahead(pool, connector, item_type, cursor)
            while pending is not None:
                page = pending.result()
                pending = None
                self._check_progress(cursor, page)
                out_of_time = deadline is not None and self._clock() >= deadline
                if not page.is_last and not out_of_time:
                    # fetch the next page while this one is written: the feed's order makes that safe
                    pending = self._fetch_ahead(pool, connector, item_type, page.next_cursor)
                self._commit(run, pool, page)
                state = self._advance(run, state, page)
                run.watermark = state.watermark
                run.pages += 1
                cursor = page.next_cursor
                self._report(run)
                if page.is_last:
                    run.complete = True
                elif deadline is not None and self._clock() >= deadline:
                    break
        finally:
            if pending is not None:
                pending.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
        return state

    def _fetch_ahead(
        self, pool: ThreadPoolExecutor, feed: ChangeFeed, item_type: WorkItemType, cursor: SyncCursor
    ) -> Future[SyncPage]:
        """Fetch a page on the pool, and return once its thread has started: it then holds the GIL
        and usually has its request on the wire before this thread takes the GIL back to map and
        write the page in hand. Without the wait, the woken fetch thread queued for the GIL behind
        that work (up to a switch interval at every step), which put each page's request behind
        the previous page's mapping."""
        running = threading.Event()

        def fetch() -> SyncPage:
            running.set()
            return feed.fetch_changes(item_type, cursor, self._page_size)

        future = pool.submit(fetch)
        running.wait(timeout=1.0)  # bounded: a busy pool only costs the overlap, never the result
        return future

    def _start_cursor(self, run: _Run, state: SyncStateRow) -> SyncCursor:
        connection = run.connection
        watermark = state.watermark
        if watermark is not None and watermark.updated_at > run.watermark_cap:
            # stored before watermarks were capped: rows updated since may have been skipped, so
            # read back the whole sync scope once (upserts); _advance stores a capped one
            log.warning(
                "the stored watermark of %s %s is in the future (%s): reading back the sync scope",
                connection.name,
                run.item_type.sync_name,
                watermark.updated_at.isoformat(),
            )
            watermark = None
        if watermark is None:
            return SyncCursor(updated_at=self._clock() - timedelta(days=connection.sync_scope_days))
        if not self._overlap:
            return watermark
        return SyncCursor(updated_at=watermark.updated_at - self._overlap, last_id="")

    @staticmethod
    def _check_progress(cursor: SyncCursor, page: SyncPage) -> None:
        """A page with more to come must move the keyset position forward: a connector that answers
        the same (or an earlier) position would loop for ever, and a CLI run has no time budget."""
        if page.is_last:
            return
        moved = (page.next_cursor.updated_at, page.next_cursor.last_id) > (cursor.updated_at, cursor.last_id)
        if not moved:
            raise ItsmError(
                "the ITSM connector returned a page that does not move its cursor forward "
                f"({page.next_cursor.updated_at.isoformat()} {page.next_cursor.last_id[:40]!r} after "
                f"{cursor.updated_at.isoformat()} {cursor.last_id[:40]!r}); stopping instead of looping"
            )

    def _commit(self, run: _Run, pool: ThreadPoolExecutor, page: SyncPage) -> None:
        """Store one page everywhere; raises if any part fails (the watermark then stays put)."""
        connection, item_type = run.connection, run.item_type
        items = page.items
        if items:
            if len(self._sinks) == 1:
                self._sinks[0].write(items)
            else:
                futures = [pool.submit(sink.write, items) for sink in self._sinks]
                failures = [f.exception() for f in futures]
                for failure in failures:
                    if failure is not None:
                        raise failure
        records = [
            self._error(run, SyncErrorKind.REJECTED_ROW, row.error, row.source_id) for row in page.rejected
        ]
        for row in page.rejected:
            log.warning(
                "skipped %s %s row %s: %s", connection.name, item_type.sync_name, row.source_id, row.error
            )
        if self._backsync is not None and items:
            report = self._backsync.apply(connection, items)
            run.correlations_updated += report.correlations_updated
            run.alerts_closed += report.alerts_closed
            records += [
                self._error(run, SyncErrorKind.BACKSYNC, message, source_id)
                for source_id, message in report.problems
            ]
        self._errors.record(records)
        run.synced += len(items)
        run.rejected += len(page.rejected)
        if items:
            metrics().sync_rows.add(len(items), {"type": item_type.sync_name})

    # -- SyncState lease and watermark -----------------------------------------------------------

    def _advance(self, run: _Run, state: SyncStateRow, page: SyncPage) -> SyncStateRow:
        target: SyncCursor | None = page.next_cursor
        if page.next_cursor.updated_at > run.watermark_cap:
            # a row stamped in the future: the page is committed, but only its rows that are not
            # after this run's start may count as passed; rows updated from now on get times
            # around now, and the next run must still start before them
            if not run.capped:
                run.capped = True
                log.warning(
                    "sync of %s %s read a row updated at %s, after this run started (%s); the "
                    "watermark stays before it and later runs read it again",
                    run.connection.name,
                    run.item_type.sync_name,
                    page.next_cursor.updated_at.isoformat(),
                    run.started.isoformat(),
                )
            passed = [(i.updated_at, i.source_id) for i in page.items if i.updated_at <= run.started]
            target = None
            if passed:
                updated_at, last_id = max(passed)
                target = SyncCursor(updated_at=updated_at, last_id=last_id)
        return self._leases.advance(state, target, cap=run.watermark_cap)

    # -- records -------------------------------------------------------------------------------

    def _error(self, run: _Run, kind: SyncErrorKind, message: str, source_id: str = "") -> SyncErrorRecord:
        return SyncErrorRecord(
            connection=run.connection.name,
            item_type=run.item_type.sync_name,
            kind=kind,
            message=message,
            source_id=source_id,
            run_id=run.run_id,
            occurred_at=self._clock(),
        )

    @staticmethod
    def _report(run: _Run, *, done: bool = False) -> None:
        if run.progress is not None:
            run.progress(
                SyncProgress(
                    connection=run.connection.name,
                    item_type=run.item_type,
                    pages=run.pages,
                    synced=run.synced,
                    rejected=run.rejected,
                    watermark=run.watermark,
                    done=done,
                )
            )

    def _not_enabled(self, connection: ConnectionBase, item_type: WorkItemType) -> SyncResult:
        return SyncResult(
            connection=connection.name,
            item_type=item_type,
            outcome=SyncOutcome.SKIPPED,
            run_id="",
            error=f"connection {connection.name!r} does not sync {item_type.sync_name}",
        )

    def _record_run(self, result: SyncResult, started: datetime, finished: datetime, trigger: str) -> None:
        run = RunRecord(
            job=JOB,
            run_id=result.run_id,
            trigger=trigger,
            connection=result.connection,
            item_type=result.item_type.sync_name,
            started_at=started,
            finished_at=finished,
            duration_seconds=result.duration_seconds,
            outcome=result.outcome.value,
            counts=result.counts,
            error=result.error,
            detail=f"watermark {result.watermark.updated_at.isoformat()} {result.watermark.last_id}"
            if result.watermark
            else "",
        )
        self._best_effort("recording the run", lambda: self._runs.record(run))

    @staticmethod
    def _best_effort(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not turn a result into a crash
            reason = str(exc) if isinstance(exc, ConnectorAppError) else type(exc).__name__
            log.warning("%s failed: %s", what, reason)
