"""Turning one alert notification into the right ITSM action, exactly once per problem.

The correlation row of a problem is both its record and its lock. Any call that writes to the ITSM
product happens only while holding the row's lease, taken with an ETag-matched replace (or the
conditional insert that creates the row). Notifications that need no write while another instance
holds the lease (a re-fire to be coalesced) are counted on the row and return at once; those that
do need a write (a resolve, a due note) wait briefly and otherwise ask for a later retry.

Crash safety: a create stamps the work item with the row's correlation id, so an instance that
takes over an expired "creating" lease first looks the work item up instead of creating another.
A delivery id is added to the row's recent deliveries in the same write that completes its
effect, so a redelivered notification is recognised and not counted twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from shared_code.alerts import render
from shared_code.alerts.signal import AlertSignal, MonitorCondition
from shared_code.connections import Connection
from shared_code.errors import AlreadyExistsError, BusyError, ItsmRejectedError
from shared_code.itsm.base import ItsmConnector, WorkItemRef
from shared_code.state.correlations import Correlation, CorrelationRepository, CorrelationState
from shared_code.state.tables import EtagConflict

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    CREATED = "created"
    NOTED = "noted"
    COALESCED = "coalesced"
    RESOLVED = "resolved"
    REOPENED = "reopened"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


@dataclass(frozen=True)
class ProcessResult:
    outcome: Outcome
    work_item: WorkItemRef | None
    correlation_key: str
    detail: str = ""
    repeat: bool = False
    """This very notification was handled before (a redelivered message), so it changed nothing."""


class _LeaseHeld(Exception):
    """Internal: another instance holds the lease and this notification needs a write."""


@dataclass
class AlertProcessor:
    correlations: CorrelationRepository
    clock: Callable[[], datetime]
    lease_seconds: float = 60.0
    busy_budget_seconds: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    max_races: int = 50
    known_keys: int = 10_000
    _known: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    _known_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def first_sight(self, key: str) -> bool:
        """True the first time this process handles ``key`` (a bounded memory; only a hint)."""
        with self._known_lock:
            if key in self._known:
                return False
            if len(self._known) >= self.known_keys:
                del self._known[next(iter(self._known))]
            self._known[key] = None
            return True

    def process(
        self, connection: Connection, connector: ItsmConnector, delivery_id: str, signal: AlertSignal
    ) -> ProcessResult:
        key_text = render.correlation_key_text(connection.correlation, signal)
        key = render.correlation_key(connection.name, key_text)
        step = _Step(self, connection, connector, delivery_id, signal, key, key_text)
        deadline = time.monotonic() + self.busy_budget_seconds
        pause = 0.02
        races = 0
        while True:
            try:
                return step.run()
            except (EtagConflict, AlreadyExistsError):
                # lost a race with another instance: read again and decide again. Under a storm on
                # one problem every instance races for the same row; a short random pause spreads
                # them out, and the race is only given up after max_races AND the busy budget
                races += 1
                if races >= self.max_races and time.monotonic() >= deadline:
                    break
                self.sleep(race_pause(races))
            except _LeaseHeld:
                if time.monotonic() + pause > deadline:
                    break
                self.sleep(pause)
                pause = min(pause * 2, 0.5)
        raise BusyError(f"correlation {key_text!r} is busy in another instance; delivery will be retried")


def race_pause(races: int) -> float:
    """Seconds to wait after losing ``races`` ETag races in a row: full jitter, 4 ms doubling to 100 ms."""
    return random.uniform(0.0, min(0.002 * 2 ** min(races, 6), 0.1))  # noqa: S311 - not cryptographic


class _Step:
    """One read-decide-write pass over a correlation row."""

    def __init__(
        self,
        owner: AlertProcessor,
        connection: Connection,
        connector: ItsmConnector,
        delivery_id: str,
        signal: AlertSignal,
        key: str,
        key_text: str,
    ) -> None:
        self.owner = owner
        self.repo = owner.correlations
        self.clock = owner.clock
        self.sleep = owner.sleep
        self.lease = timedelta(seconds=owner.lease_seconds)
        self.connection = connection
        self.connector = connector
        self.delivery_id = delivery_id
        self.token = f"{delivery_id}:{uuid.uuid4().hex[:8]}"
        self.signal = signal
        self.key = key
        self.key_text = key_text

    def result(self, outcome: Outcome, row: Correlation | None, detail: str = "") -> ProcessResult:
        return ProcessResult(outcome, row.ref if row else None, self.key_text, detail)

    # -- entry ---------------------------------------------------------------------------------

    def run(self) -> ProcessResult:
        now = self.clock()
        fired = self.signal.condition is MonitorCondition.FIRED
        if fired and self.owner.first_sight(self.key):
            # likely a new problem: the conditional insert asks and answers at once, one table call
            # less on the way to the incident; when the row exists it fails and the read follows
            try:
                created = self.insert_new(now)
            except AlreadyExistsError:
                pass
            else:
                return self.create(created, now, recover=False)
        row = self.repo.get(self.connection.name, self.key)
        if row is None:
            if not fired:
                return self.remember_resolution()
            return self.create_first(now)
        if row.seen(self.delivery_id):
            detail = "this notification was handled already"
            return ProcessResult(Outcome.DUPLICATE, row.ref, self.key_text, detail, repeat=True)
        if row.leased_by_other(self.token, now):
            if row.lease_owner.startswith(f"{self.delivery_id}:"):
                raise _LeaseHeld  # this very notification is in flight elsewhere: never count it twice
            if fired and row.state in (CorrelationState.OPEN, CorrelationState.CREATING):
                # counted, never waited for: new configuration items wait on the row for the next note
                return self.count_firing(row, now, pending=self.new_cis(row))
            raise _LeaseHeld
        if row.state is CorrelationState.CREATING:
            return self.take_over_create(row, now)
        if fired:
            if row.state is CorrelationState.OPEN:
                return self.refire(row, now)
            return self.fire_after_close(row, now)
        if row.state is CorrelationState.OPEN:
            return self.resolve(row, now)
        return self.record_only(row, Outcome.DUPLICATE, "already resolved")

    # -- helpers -------------------------------------------------------------------------------

    def new_cis(self, row: Correlation) -> tuple[str, ...]:
        known = {ci.lower() for ci in (*row.configuration_items, *row.pending_cis)}
        return tuple(ci for ci in self.signal.configuration_items if ci.lower() not in known)

    def take_lease(self, row: Correlation, now: datetime, **changes: object) -> Correlation:
        return self.repo.replace(
            row.model_copy(update={"lease_owner": self.token, "lease_until": now + self.lease, **changes})
        )

    def release(
        self, change: Callable[[Correlation], dict[str, object]], held: Correlation | None = None
    ) -> Correlation | None:
        """Apply ``change`` and drop the lease, re-reading as often as others' counts interleave.

        ``held`` is the row as this step last wrote it: unless someone counted a firing since, it is
        current, and the release needs no read.
        """
        row = held
        for races in range(50):
            if races:
                self.sleep(race_pause(races))
            if row is None:
                row = self.repo.get(self.connection.name, self.key)
            if row is None:
                return None
            if row.lease_owner != self.token:
                log.warning("lease on %s was taken over before release", self.key_text)
            update = change(row) | {
                "lease_owner": "",
                "lease_until": None,
                "recent_deliveries": row.with_delivery(self.delivery_id),
            }
            try:
                return self.repo.replace(row.model_copy(update=update))
            except EtagConflict:
                row = None
        raise BusyError(f"could not record the result for {self.key_text!r}: too much contention")

    def abandon(self) -> None:
        """After a failed ITSM call: expire our lease so a retry need not wait for it."""
        try:
            row = self.repo.get(self.connection.name, self.key)
            if row is not None and row.lease_owner == self.token:
                self.repo.replace(row.model_copy(update={"lease_until": self.clock()}))
        except Exception:  # best effort; the lease expires on its own anyway
            log.warning("could not release the lease on %s after a failure", self.key_text, exc_info=True)

    def record_only(self, row: Correlation, outcome: Outcome, detail: str) -> ProcessResult:
        row = self.repo.replace(
            row.model_copy(update={"recent_deliveries": row.with_delivery(self.delivery_id)})
        )
        return self.result(outcome, row, detail)

    def count_firing(self, row: Correlation, now: datetime, pending: tuple[str, ...] = ()) -> ProcessResult:
        row = self.repo.replace(
            row.model_copy(
                update={
                    "fire_count": row.fire_count + 1,
                    "unnoted_fires": row.unnoted_fires + 1,
                    "last_fired_at": max(row.last_fired_at or self.signal.fired_at, self.signal.fired_at),
                    "recent_deliveries": row.with_delivery(self.delivery_id),
                    "pending_cis": (*row.pending_cis, *pending),
                }
            )
        )
        waiting = f" and {len(row.pending_cis)} new configuration item(s)" if row.pending_cis else ""
        return self.result(
            Outcome.COALESCED, row, f"counted; {row.unnoted_fires} firing(s){waiting} wait for the next note"
        )

    # -- actions -------------------------------------------------------------------------------

    def remember_resolution(self) -> ProcessResult:
        """A resolution that overtook its firing (the firing's delivery is being retried): no work
        item to touch, but the row remembers it, so that late firing does not open an incident
        that nothing would ever resolve. A firing of a later time still opens one."""
        row = self.repo.insert(
            Correlation(
                connection=self.connection.name,
                key=self.key,
                key_text=self.key_text,
                state=CorrelationState.RESOLVED,
                generation=0,
                first_fired_at=self.signal.fired_at,
                last_fired_at=self.signal.fired_at,
                resolved_alert_fired_at=self.signal.fired_at,
                configuration_items=self.signal.configuration_items,
                alert_ids=(self.signal.alert_id,),
                recent_deliveries=(self.delivery_id,),
            )
        )
        return self.result(
            Outcome.IGNORED, row, "resolved before any work item was opened for this problem; nothing to do"
        )

    def create_first(self, now: datetime) -> ProcessResult:
        return self.create(self.insert_new(now), now, recover=False)

    def insert_new(self, now: datetime) -> Correlation:
        """The problem's row, leased to this step for the create (AlreadyExistsError if it exists)."""
        return self.repo.insert(
            Correlation(
                connection=self.connection.name,
                key=self.key,
                key_text=self.key_text,
                state=CorrelationState.CREATING,
                lease_owner=self.token,
                lease_until=now + self.lease,
                first_fired_at=self.signal.fired_at,
                last_fired_at=self.signal.fired_at,
                configuration_items=self.signal.configuration_items,
                alert_ids=(self.signal.alert_id,),
            )
        )

    def take_over_create(self, row: Correlation, now: datetime) -> ProcessResult:
        if self.signal.condition is MonitorCondition.RESOLVED:
            raise _LeaseHeld  # let the create finish (or be recovered by a firing) first
        row = self.take_lease(row, now)
        return self.create(row, now, recover=True)

    def create(self, row: Correlation, now: datetime, *, recover: bool) -> ProcessResult:
        correlation = render.correlation_id(self.key, row.generation)
        try:
            ref = self.connector.find_by_correlation(correlation) if recover else None
            if ref is None:
                draft = render.incident_draft(self.connection, self.signal, self.key_text, correlation)
                ref = self.connector.create_incident(draft)
        except Exception:
            self.abandon()
            raise

        def opened(current: Correlation) -> dict[str, object]:
            return {
                "state": CorrelationState.OPEN,
                "work_item_id": ref.id,
                "work_item_number": ref.number,
                "work_item_url": ref.url or "",
                "fire_count": current.fire_count + 1,
                "last_note_at": now,
                "resolved_at": None,
            }

        done = self.release(opened, row)
        return self.result(Outcome.CREATED, done, "recovered the work item" if recover and done else "")

    def refire(self, row: Correlation, now: datetime) -> ProcessResult:
        new_cis = (*row.pending_cis, *self.new_cis(row))
        interval = timedelta(minutes=self.connection.note_interval_minutes)
        due = bool(new_cis) or row.last_note_at is None or now - row.last_note_at >= interval
        if not due:
            return self.count_firing(row, now)
        ref = row.ref
        assert ref is not None
        taken = self.take_lease(row, now)
        firings = taken.unnoted_fires + 1
        text = render.refire_note(self.signal, firings, taken.last_note_at, new_cis)
        try:
            self.connector.add_note(ref, text)
        except Exception:
            self.abandon()
            raise

        def noted(current: Correlation) -> dict[str, object]:
            return {
                "fire_count": current.fire_count + 1,
                "unnoted_fires": max(current.unnoted_fires - taken.unnoted_fires, 0),
                "last_note_at": now,
                "last_fired_at": max(current.last_fired_at or self.signal.fired_at, self.signal.fired_at),
                "configuration_items": (
                    *current.configuration_items,
                    *(ci for ci in new_cis if ci not in current.configuration_items),
                ),
                "pending_cis": tuple(ci for ci in current.pending_cis if ci not in new_cis),
                "alert_ids": (*current.alert_ids, self.signal.alert_id)[-20:],
            }

        return self.result(Outcome.NOTED, self.release(noted, taken), f"note for {firings} firing(s)")

    def fire_after_close(self, row: Correlation, now: datetime) -> ProcessResult:
        if row.resolved_alert_fired_at is not None and self.signal.fired_at <= row.resolved_alert_fired_at:
            return self.record_only(row, Outcome.IGNORED, "a late 'fired' for an alert already resolved")
        window = timedelta(hours=self.connection.reopen_window_hours)
        ref = row.ref
        if ref is not None and row.resolved_at is not None and now - row.resolved_at <= window:
            taken = self.take_lease(row, now)
            try:
                self.connector.reopen(ref, render.reopen_note(self.signal, row.resolved_at))
            except ItsmRejectedError:
                log.info("work item %s cannot be reopened; opening a new one", ref.number)
                return self.start_new_generation(taken, now)
            except Exception:
                self.abandon()
                raise

            def reopened(current: Correlation) -> dict[str, object]:
                return {
                    "state": CorrelationState.OPEN,
                    "fire_count": current.fire_count + 1,
                    "unnoted_fires": 0,
                    "last_note_at": now,
                    "resolved_at": None,
                    "alert_ids": (*current.alert_ids, self.signal.alert_id)[-20:],
                }

            return self.result(Outcome.REOPENED, self.release(reopened, taken))
        taken = self.take_lease(row, now)
        return self.start_new_generation(taken, now)

    def start_new_generation(self, row: Correlation, now: datetime) -> ProcessResult:
        fresh = self.repo.replace(
            row.model_copy(
                update={
                    "state": CorrelationState.CREATING,
                    "generation": row.generation + 1,
                    "work_item_id": "",
                    "work_item_number": "",
                    "work_item_url": "",
                    "fire_count": 0,
                    "unnoted_fires": 0,
                    "last_note_at": None,
                    "first_fired_at": self.signal.fired_at,
                    "last_fired_at": self.signal.fired_at,
                    "resolved_at": None,
                    "resolved_alert_fired_at": None,
                    "configuration_items": self.signal.configuration_items,
                    "pending_cis": (),
                    "alert_ids": (self.signal.alert_id,),
                    "lease_until": now + self.lease,
                }
            )
        )
        return self.create(fresh, now, recover=False)

    def resolve(self, row: Correlation, now: datetime) -> ProcessResult:
        ref = row.ref
        assert ref is not None
        taken = self.take_lease(row, now)
        auto = self.connection.auto_resolve
        text = render.resolved_note(self.signal, taken.fire_count, taken.unnoted_fires, auto)
        try:
            if auto:
                self.connector.resolve(ref, text)
            else:
                self.connector.add_note(ref, text)
        except Exception:
            self.abandon()
            raise

        def resolved(current: Correlation) -> dict[str, object]:
            change: dict[str, object] = {
                "unnoted_fires": max(current.unnoted_fires - taken.unnoted_fires, 0),
                "last_note_at": now,
                "resolved_alert_fired_at": self.signal.fired_at,
            }
            if auto:
                change |= {"state": CorrelationState.RESOLVED, "resolved_at": now}
            return change

        done = self.release(resolved, taken)
        return self.result(Outcome.RESOLVED if auto else Outcome.NOTED, done)
