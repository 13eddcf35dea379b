"""A leased, watermarked job target: one state row per (scope, subject), e.g. (connection, type).

* ``acquire`` takes the row's lease by conditional insert or ETag-matched replace, so two runs of
  the same target never work at once; a run that dies leaves a lease that simply expires.
* ``advance`` moves the watermark (never backwards) and renews the lease in the same ETag-matched
  write, after each committed unit of work; a run whose lease was taken over stops there.
* ``renew`` extends the lease without moving the watermark (a long unit of work).
* ``release`` records the run's outcome and counts on the row and drops the lease (best effort:
  the lease expires anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared_code.domain.runs import SyncStateRow
from shared_code.domain.sync import SyncCursor
from shared_code.errors import BusyError, ConnectorAppError, EtagConflict, StateError
from shared_code.jobs.conflicts import retry_on_conflict
from shared_code.ports.state import SyncStateStore

log = logging.getLogger(__name__)


def later(a: SyncCursor | None, b: SyncCursor | None) -> SyncCursor | None:
    """The further of two keyset positions (a watermark never moves backwards)."""
    if b is None:
        return a
    if a is None or (b.updated_at, b.last_id) > (a.updated_at, a.last_id):
        return b
    return a


@dataclass(frozen=True)
class RunTally:
    """What a run did, for the state row: items done and items rejected."""

    succeeded: bool
    outcome: str
    error: str = ""
    done: int = 0
    rejected: int = 0


class JobLease:
    """Lease and watermark of job targets kept in one state table."""

    def __init__(
        self,
        store: SyncStateStore,
        clock: Callable[[], datetime],
        *,
        lease: timedelta = timedelta(minutes=5),
        what: str = "sync",
    ) -> None:
        self._store = store
        self._clock = clock
        self._lease = lease
        self._what = what

    def acquire(self, scope: str, subject: str, owner: str, attempts: int = 10) -> SyncStateRow:
        """The target's row with this owner's lease; BusyError while another run holds it."""

        def attempt() -> SyncStateRow:
            now = self._clock()
            row = self._store.get(scope, subject)
            if row is None:
                fresh = SyncStateRow(connection=scope, item_type=subject)
                return self._store.insert(fresh.leased(owner, now + self._lease))
            if row.leased_by_other(owner, now):
                until = row.lease_until.isoformat(timespec="seconds") if row.lease_until else "?"
                raise BusyError(
                    f"another {self._what} of {scope} {subject} is running (its lease lasts until {until})"
                )
            return self._store.replace(row.leased(owner, now + self._lease))

        return retry_on_conflict(
            attempt,
            attempts=attempts,
            give_up=lambda: BusyError(f"could not take the {self._what} lease of {scope} {subject}"),
        )

    def advance(
        self, state: SyncStateRow, watermark: SyncCursor | None, *, cap: datetime | None = None
    ) -> SyncStateRow:
        """Store ``watermark`` (unless it is behind the stored one) and renew the lease.

        A stored watermark later than ``cap`` (in the future: written before watermarks were capped)
        does not hold the new one back. Raises StateError when another run took the row over (this
        run's lease expired)."""
        current = state.watermark
        if current is not None and cap is not None and current.updated_at > cap:
            current = None
        moved = later(current, watermark)
        try:
            return self._store.replace(state.advanced(moved, self._clock() + self._lease))
        except EtagConflict as exc:
            raise StateError(
                f"another {self._what} of {state.connection} {state.item_type} took over (this run's lease "
                "expired); stopping here, the other run goes on"
            ) from exc

    def renew(self, state: SyncStateRow) -> SyncStateRow:
        return self.advance(state, None)

    def release(self, state: SyncStateRow, owner: str, started: datetime, tally: RunTally) -> None:
        """Record the run on the row and drop the lease; never raises (the lease expires anyway)."""

        def attempt() -> None:
            row = self._store.get(state.connection, state.item_type)
            if row is None or row.lease_owner != owner:
                return  # taken over: the other run owns the row now
            released = row.released(
                started=started,
                outcome=tally.outcome,
                error=tally.error,
                done=tally.done,
                rejected=tally.rejected,
                succeeded=tally.succeeded,
            )
            self._store.replace(released)

        try:
            retry_on_conflict(attempt, attempts=5)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must not turn a result into a crash
            reason = str(exc) if isinstance(exc, ConnectorAppError) else type(exc).__name__
            log.warning("releasing the %s lease failed: %s", self._what, reason)


class FairBudget:
    """A time budget shared by several targets: each may use what is left divided by those left.

    What one target leaves unused goes to the next, so a large first run of one cannot starve the
    others of their share."""

    def __init__(self, clock: Callable[[], datetime], budget: timedelta | None, targets: int) -> None:
        self._clock = clock
        self._deadline = clock() + budget if budget is not None else None
        self._left = max(targets, 1)

    def next_share(self) -> datetime | None:
        """The deadline of the next target (None: no budget)."""
        if self._deadline is None:
            self._left = max(self._left - 1, 1)
            return None
        now = self._clock()
        share = now + max(self._deadline - now, timedelta(0)) / self._left
        self._left = max(self._left - 1, 1)
        return share
