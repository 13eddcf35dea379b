"""Turning one alert notification into the right ITSM action, exactly once per problem.

The correlation row of a problem is both its record and its lock. Any call that writes to the ITSM
product happens only while holding the row's lease, taken with an ETag-matched replace (or the
conditional insert that creates the row). Notifications that need no write while another instance
holds the lease (a re-fire to be coalesced) are counted on the row and return at once; those that
do need a write (a resolve, a due note) wait briefly and otherwise ask for a later retry.

A slow product must not outlive the lease: right before each write, a lease of which more than a
third has passed is renewed (one ETag replace; the fast path makes none), and a step that finds it
taken over writes nothing and decides again. A create still in flight when its lease ran out (a
throttled POST) can meet a row another instance moved on: the release then does not overwrite
it, and resolves its own work item as a duplicate of the one the row kept.

Crash safety: a create stamps the work item with the row's correlation id, so an instance that
takes over an expired "creating" lease (a firing, or a resolution after a failed create) first
looks the work item up instead of creating another. A delivery id is added to the row's recent
deliveries in the same write that completes its effect, so a redelivered notification is
recognised and not counted twice.

A note (a re-fire's, a resolution's, a reopening's) carries a marker naming its delivery. A
delivery that finds its own expired lease on the row was tried before and may have written its
note without recording it (the answer lost, or the instance gone); where the product can look a
note up by marker (``ConnectorPorts.notes``), the retry asks before writing it again.

One problem may hold several Azure alerts (a metric alert split by dimension, under the
per-rule-and-CI key): the row keeps which alert ids still fire and which resolved. The work item is
resolved when the last one resolves; a 'fired' delivered late is ignored only when its own alert
resolved already. A problem its source names (``AlertSignal.problem_key``: a service health event,
a resource's health) is different: every state change arrives as a new Azure alert, so its
recovery resolves the whole problem, each update is noted at once, and a 'fired' notified before
the recovery is late. A work item the product no longer lets us write (403/404) is left behind: a
firing opens a new one, a resolution is recorded without it.
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
from shared_code.domain.alert import AlertSignal, MonitorCondition
from shared_code.domain.connection import ConnectionBase, CorrelationMode
from shared_code.domain.correlation import ALERT_ID_LIMIT, CI_LIMIT, Correlation, CorrelationState, newest
from shared_code.domain.maps import DependencySummary
from shared_code.domain.workitem import IncidentDraft, WorkItemRef, note_marker
from shared_code.errors import AlreadyExistsError, BusyError, EtagConflict, ItsmRejectedError
from shared_code.ports.itsm import ConfigurationItems, ConnectorPorts, IncidentWriter, NoteLedger
from shared_code.ports.mapstore import DependencyContext
from shared_code.ports.state import CorrelationStore

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
    correlations: CorrelationStore
    clock: Callable[[], datetime]
    lease_seconds: float = 60.0
    busy_budget_seconds: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    max_races: int = 50
    known_keys: int = 10_000
    dependencies: DependencyContext | None = None
    """The map store: a new incident's description carries its server's dependency map."""
    dependency_lookups: int = 3
    _known: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    _known_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _rows: dict[str, Correlation] = field(default_factory=dict, init=False, repr=False)

    def last_row(self, key: str) -> Correlation | None:
        """The row as this process last read or wrote it (a hint: see ``_RememberingStore``)."""
        with self._known_lock:
            return self._rows.get(key)

    def remember_row(self, key: str, row: Correlation | None) -> None:
        with self._known_lock:
            self._rows.pop(key, None)
            if row is None:
                return
            if len(self._rows) >= self.known_keys:
                del self._rows[next(iter(self._rows))]
            self._rows[key] = row

    def first_sight(self, key: str) -> bool:
        """True the first time this process handles ``key`` (a bounded memory; only a hint)."""
        with self._known_lock:
            if key in self._known:
                return False
            if len(self._known) >= self.known_keys:
                del self._known[next(iter(self._known))]
            self._known[key] = None
            return True

    def dependency_summary(self, signal: AlertSignal) -> DependencySummary | None:
        """The dependency map of the first of the alert's servers that has one (a host name's
        short form tried too), or None. Never raises: the incident matters more than its context,
        so a failed lookup is logged and the incident is created without it. Each lookup is one
        table read under the table client's timeouts, and at most ``dependency_lookups`` are made."""
        if self.dependencies is None:
            return None
        candidates: list[str] = []
        for name in render.ci_names(signal):
            candidates += [name, name.split(".", 1)[0]] if "." in name.strip(".") else [name]
        tried: set[str] = set()
        for name in candidates:
            key = name.strip().lower()
            if not key or key in tried:
                continue
            if len(tried) >= self.dependency_lookups:
                break
            tried.add(key)
            try:
                summary = self.dependencies.summary_for(name.strip())
            except Exception as exc:  # noqa: BLE001 - context is optional, the incident is not
                log.warning(
                    "reading the dependency map of %s for an incident failed (%s); creating the "
                    "incident without it",
                    name[:100],
                    type(exc).__name__,
                )
                return None
            if summary is not None:
                return summary
        return None

    def process(
        self, connection: ConnectionBase, ports: ConnectorPorts, delivery_id: str, signal: AlertSignal
    ) -> ProcessResult:
        key_text = render.correlation_key_text(connection.correlation, signal)
        key = render.correlation_key(connection.name, key_text)
        step = _Step(
            self,
            connection,
            ports.require_incidents(),
            ports.configuration_items,
            ports.notes,
            delivery_id,
            signal,
            key,
            key_text,
        )
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
                self.remember_row(key, None)
                if time.monotonic() + pause > deadline:
                    break
                self.sleep(pause)
                pause = min(pause * 2, 0.5)
        raise BusyError(f"correlation {key_text!r} is busy in another instance; delivery will be retried")


def race_pause(races: int) -> float:
    """Seconds to wait after losing ``races`` ETag races in a row: full jitter, 4 ms doubling to 100 ms."""
    return random.uniform(0.0, min(0.002 * 2 ** min(races, 6), 0.1))  # noqa: S311 - not cryptographic


class _RememberingStore:
    """The correlation store as a step sees it: every row read or written is remembered by the
    processor, so the next notification of the problem in this process can start from it.

    Safe because every effect is an ETag-matched write: a remembered row whose ETag is still the
    table's IS the current row, and one that is not makes the first write fail (EtagConflict),
    after which the step reads the row again. A failed write forgets the row.
    """

    def __init__(self, owner: AlertProcessor, key: str) -> None:
        self._owner = owner
        self._store = owner.correlations
        self._key = key

    def get(self, connection: str, key: str) -> Correlation | None:
        row = self._store.get(connection, key)
        self._owner.remember_row(key, row)
        return row

    def insert(self, row: Correlation) -> Correlation:
        return self._written(lambda: self._store.insert(row))

    def replace(self, row: Correlation) -> Correlation:
        return self._written(lambda: self._store.replace(row))

    def _written(self, write: Callable[[], Correlation]) -> Correlation:
        try:
            done = write()
        except BaseException:
            self._owner.remember_row(self._key, None)
            raise
        self._owner.remember_row(self._key, done)
        return done


class _LeaseLost(EtagConflict):
    """Internal: the lease ran out and another instance took it before this step wrote to the ITSM
    product. Nothing was written; the step runs again and decides on the row as it is now."""


GONE_STATUSES = frozenset({403, 404})
"""What the product answers for a work item that was deleted (404) or that the integration user may
no longer write (403, e.g. closed and read-only): the problem carries on without it."""

LATE_FIRING = "a late 'fired' for an alert already resolved"


def _gone(exc: ItsmRejectedError) -> bool:
    return exc.status in GONE_STATUSES


class _Step:
    """One read-decide-write pass over a correlation row."""

    def __init__(
        self,
        owner: AlertProcessor,
        connection: ConnectionBase,
        connector: IncidentWriter,
        cmdb: ConfigurationItems | None,
        notes: NoteLedger | None,
        delivery_id: str,
        signal: AlertSignal,
        key: str,
        key_text: str,
    ) -> None:
        self.owner = owner
        self.repo = _RememberingStore(owner, key)
        self.clock = owner.clock
        self.sleep = owner.sleep
        self.lease = timedelta(seconds=owner.lease_seconds)
        self.connection = connection
        self.connector = connector
        self.cmdb = cmdb
        self.notes = notes
        self.delivery_id = delivery_id
        self.marker = note_marker(delivery_id)
        self.in_doubt = False
        """An earlier attempt of this delivery held the lease and did not finish: its note may be
        written already (decided per row read, in ``run``)."""
        self.token = f"{delivery_id}:{uuid.uuid4().hex[:8]}"
        self.signal = signal
        self.alert_id = signal.alert_id
        self.whole_problem = bool(signal.problem_key)
        """Its recovery resolves the problem, whatever other alert ids of it fired."""
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
        # the row as this process last wrote it, when it has it: one table read less per
        # notification of a problem this process handles again (a stale one fails its first write)
        row = self.owner.last_row(self.key) or self.repo.get(self.connection.name, self.key)
        if row is None:
            if not fired:
                return self.remember_resolution()
            return self.create_first(now)
        if row.seen(self.delivery_id):
            detail = "this notification was handled already"
            return ProcessResult(Outcome.DUPLICATE, row.ref, self.key_text, detail, repeat=True)
        self.in_doubt = row.lease_owner.startswith(f"{self.delivery_id}:") and row.lease_owner != self.token
        if row.leased_by_other(self.token, now):
            if row.lease_owner.startswith(f"{self.delivery_id}:"):
                raise _LeaseHeld  # this very notification is in flight elsewhere: never count it twice
            if fired and row.state in (CorrelationState.OPEN, CorrelationState.CREATING):
                if row.is_resolved_alert(self.alert_id):
                    return self.record_only(row, Outcome.IGNORED, LATE_FIRING)
                # counted, never waited for: new configuration items wait on the row for the next note
                return self.count_firing(row, now, pending=self.new_cis(row))
            raise _LeaseHeld
        if row.state is CorrelationState.CREATING:
            return self.take_over_create(row, now)
        if fired:
            if row.state is CorrelationState.OPEN:
                if row.is_resolved_alert(self.alert_id):
                    return self.record_only(row, Outcome.IGNORED, LATE_FIRING)
                return self.refire(row, now)
            return self.fire_after_close(row, now)
        if row.state is CorrelationState.OPEN:
            return self.resolve(row, now)
        return self.record_only(
            row, Outcome.DUPLICATE, "already resolved", **row.resolution_change(self.alert_id)
        )

    # -- helpers -------------------------------------------------------------------------------

    def new_cis(self, row: Correlation) -> tuple[str, ...]:
        if self.connection.correlation is CorrelationMode.PER_RULE_AND_CI:
            return ()  # the key is made of the CI set: every notification of the problem names the same
        known = {ci.lower() for ci in (*row.configuration_items, *row.pending_cis)}
        return tuple(ci for ci in self.signal.configuration_items if ci.lower() not in known)

    def first_cis(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.signal.configuration_items))[:CI_LIMIT]

    def is_late(self, row: Correlation) -> bool:
        """A 'fired' that belongs to a resolution already recorded: its own alert resolved, or, for a
        problem its source names, it was notified before the recovery was."""
        if row.is_late_firing(self.alert_id, self.signal.fired_at):
            return True
        recovered = row.resolved_alert_fired_at
        return self.whole_problem and recovered is not None and self.signal.fired_at <= recovered

    def latest_resolution(self, row: Correlation) -> datetime:
        before = row.resolved_alert_fired_at
        return self.signal.fired_at if before is None else max(before, self.signal.fired_at)

    def resolution_change(self, row: Correlation) -> dict[str, object]:
        """The row's alert lists and resolution time once this notification resolved; a named
        problem's recovery leaves none of its alerts firing."""
        change = row.resolution_change(self.alert_id) | {
            "resolved_alert_fired_at": self.latest_resolution(row)
        }
        if self.whole_problem:
            change["firing_alerts"] = ()
        return change

    def marked(self, text: str) -> str:
        """A note with this delivery's marker, so that a write whose answer was lost can be found."""
        return f"{text}\n\n{self.marker}"

    def written_before(self, ref: WorkItemRef) -> bool:
        """This delivery's note is on the work item already: an earlier attempt wrote it and lost
        the answer (or died before recording it). Asked only on such a retry."""
        if not self.in_doubt or self.notes is None:
            return False
        if self.notes.has_note(ref, self.marker):
            log.warning(
                "the note of delivery %s on %s was written by an earlier attempt: not writing it again",
                self.delivery_id,
                ref.number,
            )
            return True
        return False

    def take_lease(self, row: Correlation, now: datetime, **changes: object) -> Correlation:
        return self.repo.replace(
            row.model_copy(update={"lease_owner": self.token, "lease_until": now + self.lease, **changes})
        )

    def keep_lease(self, held: Correlation) -> Correlation:
        """Right before an ITSM write: the lease, still ours and renewed if a third of it has passed.

        A lookup (configuration item, recovery) or a throttled answer can take a good part of the
        lease; renewing only then keeps the fast path free of table calls. ``held`` is the row as
        this step last wrote it. Raises _LeaseLost, before anything is written, when another
        instance took the lease over in the meantime.
        """
        now = self.clock()
        taken_at = (held.lease_until or now) - self.lease
        if held.lease_owner == self.token and now - taken_at <= self.lease / 3:
            return held
        row: Correlation | None = held
        for races in range(50):
            if races:
                self.sleep(race_pause(races))
            if row is None or row.lease_owner != self.token:
                log.warning(
                    "lease on %s was taken over while this instance waited for %s; not writing to it",
                    self.key_text,
                    self.connection.partner_type,
                )
                raise _LeaseLost(f"lease on {self.key_text!r} was taken over")
            try:
                return self.repo.replace(row.model_copy(update={"lease_until": self.clock() + self.lease}))
            except EtagConflict:
                row = self.repo.get(self.connection.name, self.key)  # a firing counted, or a takeover
        raise BusyError(f"could not renew the lease on {self.key_text!r}: too much contention")

    def itsm_write(
        self, held: Correlation, ref: WorkItemRef, write: Callable[[], None]
    ) -> tuple[Correlation, ItsmRejectedError | None]:
        """One ITSM write under the lease: the held row (renewed if it had to be), and the product's
        refusal when it says the work item is gone (403/404), for the caller to carry on without it.
        A retry whose note an earlier attempt wrote already writes nothing."""
        try:
            held = self.keep_lease(held)
            if not self.written_before(ref):
                write()
        except _LeaseLost:
            raise
        except ItsmRejectedError as exc:
            if _gone(exc):
                return held, exc
            self.abandon()
            raise
        except Exception:
            self.abandon()
            raise
        return held, None

    def release(
        self,
        change: Callable[[Correlation], dict[str, object]],
        held: Correlation | None = None,
        *,
        created: WorkItemRef | None = None,
    ) -> Correlation | None:
        """Apply ``change`` and drop the lease, re-reading as often as others' counts interleave.

        ``held`` is the row as this step last wrote it: unless someone counted a firing since, it is
        current, and the release needs no read. ``created``: the work item this step just created
        (or recovered); if the lease was taken over meanwhile and the row moved on without it, the
        row is not overwritten (see ``overtaken``).
        """
        row = held
        settled: str | None = None
        for races in range(50):
            if races:
                self.sleep(race_pause(races))
            if row is None:
                row = self.repo.get(self.connection.name, self.key)
            if row is None:
                return None
            deliveries = row.with_delivery(self.delivery_id)
            if row.lease_owner != self.token:
                kind = settled or (self.overtaken(row, created) if created is not None else None)
                if kind is not None and created is not None:
                    if settled is None:
                        self.settle_overtaken(kind, row, created)
                        settled = kind
                    update = self.overtaken_change(kind, row, created) | {"recent_deliveries": deliveries}
                    try:
                        return self.repo.replace(row.model_copy(update=update))
                    except EtagConflict:
                        row = None
                        continue
                log.warning("lease on %s was taken over before release", self.key_text)
            update = change(row) | {"lease_owner": "", "lease_until": None, "recent_deliveries": deliveries}
            try:
                return self.repo.replace(row.model_copy(update=update))
            except EtagConflict:
                row = None
        raise BusyError(f"could not record the result for {self.key_text!r}: too much contention")

    def overtaken(self, row: Correlation, created: WorkItemRef) -> str | None:
        """How the row moved on while this step created ``created`` without the lease, if it did:
        "duplicate" (another instance created the problem's work item too), "resolved" (the
        problem's alerts resolved before any work item was recorded)."""
        if row.work_item_id and row.work_item_id != created.id:
            return "duplicate"
        if not row.work_item_id and row.state in (CorrelationState.RESOLVED, CorrelationState.CLOSED):
            return "resolved"
        return None

    def settle_overtaken(self, kind: str, row: Correlation, created: WorkItemRef) -> None:
        """Best effort: the work item this step created must not stay open with nothing to close it."""
        try:
            if kind == "duplicate":
                log.error(
                    "two instances created a work item for %s while %s was slow: keeping %s, "
                    "resolving %s as its duplicate",
                    self.key_text,
                    self.connection.partner_type,
                    row.work_item_number,
                    created.number,
                )
                self.connector.resolve(created, render.duplicate_note(row.work_item_number))
            else:
                log.warning(
                    "the alerts of %s resolved while %s was being created", self.key_text, created.number
                )
                text = render.resolved_while_created_note(self.connection.auto_resolve)
                if self.connection.auto_resolve:
                    self.connector.resolve(created, text)
                else:
                    self.connector.add_note(created, text)
        except Exception:  # the row must still be recorded; the error names the item
            log.error(
                "could not update %s of %s after the lease was taken over: resolve it by hand",
                created.number,
                self.key_text,
                exc_info=True,
            )

    def overtaken_change(self, kind: str, row: Correlation, created: WorkItemRef) -> dict[str, object]:
        """The row's update after ``settle_overtaken``: the lease is someone else's, so left alone."""
        if kind == "duplicate":
            # this firing is one of the problem's: counted on the work item that was kept
            change: dict[str, object] = {"fire_count": row.fire_count + 1}
            if row.state in (CorrelationState.OPEN, CorrelationState.CREATING):
                change |= {"unnoted_fires": row.unnoted_fires + 1, **row.firing_change(self.alert_id)}
            return change
        auto = self.connection.auto_resolve
        return {
            "state": CorrelationState.RESOLVED if auto else CorrelationState.OPEN,
            "work_item_id": created.id,
            "work_item_number": created.number,
            "work_item_url": created.url or "",
            "fire_count": row.fire_count + 1,
            "last_note_at": self.clock(),
            "resolved_at": self.clock() if auto else None,
        }

    def abandon(self) -> None:
        """After a failed ITSM call: expire our lease so a retry need not wait for it."""
        try:
            row = self.repo.get(self.connection.name, self.key)
            if row is not None and row.lease_owner == self.token:
                self.repo.replace(row.model_copy(update={"lease_until": self.clock()}))
        except Exception:  # best effort; the lease expires on its own anyway
            log.warning("could not release the lease on %s after a failure", self.key_text, exc_info=True)

    def record_only(
        self, row: Correlation, outcome: Outcome, detail: str, **changes: object
    ) -> ProcessResult:
        row = self.repo.replace(
            row.model_copy(update={"recent_deliveries": row.with_delivery(self.delivery_id), **changes})
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
                    "pending_cis": newest((*row.pending_cis, *pending), CI_LIMIT),
                    **row.firing_change(self.alert_id),
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
        that nothing would ever resolve. Another alert's firing still opens one."""
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
                configuration_items=self.first_cis(),
                alert_ids=(self.alert_id,),
                resolved_alerts=(self.alert_id,),
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
                configuration_items=self.first_cis(),
                alert_ids=(self.alert_id,),
                firing_alerts=(self.alert_id,),
            )
        )

    def take_over_create(self, row: Correlation, now: datetime) -> ProcessResult:
        """A "creating" row whose lease expired (the create failed, or its instance died)."""
        if self.signal.condition is MonitorCondition.RESOLVED:
            return self.resolve_creating(self.take_lease(row, now), now)
        if row.is_resolved_alert(self.alert_id) and not row.still_firing_without(self.alert_id):
            return self.record_only(row, Outcome.IGNORED, LATE_FIRING)
        # the alert is on the row before the create starts: a resolution that takes the lease over
        # while the create is slow must know that it still fires
        row = self.take_lease(row, now, **row.firing_change(self.alert_id))
        return self.create(row, now, recover=True)

    def with_known_ci(self, draft: IncidentDraft) -> IncidentDraft:
        """The configuration item looked up now, under the lease and before the create's own
        deadline starts: when there is none to link, the create need not look again."""
        if not draft.configuration_item:
            return draft
        if self.cmdb is None:  # the product has no CMDB to link: the CI stays in the text only
            return draft.without_configuration_item()
        found = self.cmdb.ensure_configuration_item(
            draft.configuration_item, create=draft.create_configuration_item
        )
        return draft if found else draft.without_configuration_item()

    def create(self, row: Correlation, now: datetime, *, recover: bool) -> ProcessResult:
        correlation = render.correlation_id(self.key, row.generation)
        try:
            ref = self.connector.find_by_correlation(correlation) if recover else None
            if ref is None:
                draft = render.incident_draft(
                    self.connection,
                    self.signal,
                    self.key_text,
                    correlation,
                    self.owner.dependency_summary(self.signal),
                )
                draft = self.with_known_ci(draft)
                row = self.keep_lease(row)
                ref = self.connector.create_incident(draft)
        except _LeaseLost:
            raise
        except Exception:
            self.abandon()
            raise
        created = ref

        def opened(current: Correlation) -> dict[str, object]:
            return {
                "state": CorrelationState.OPEN,
                "work_item_id": created.id,
                "work_item_number": created.number,
                "work_item_url": created.url or "",
                "fire_count": current.fire_count + 1,
                "last_note_at": now,
                "resolved_at": None,
                **current.firing_change(self.alert_id),
            }

        done = self.release(opened, row, created=created)
        if done is not None and done.work_item_id != created.id:
            return self.result(
                Outcome.DUPLICATE,
                done,
                f"{created.number} was resolved as a duplicate of {done.work_item_number}, "
                "created meanwhile by another instance",
            )
        if done is not None and done.state is CorrelationState.RESOLVED:
            return self.result(Outcome.CREATED, done, "its alerts resolved meanwhile: resolved at once")
        return self.result(Outcome.CREATED, done, "recovered the work item" if recover and done else "")

    def refire(self, row: Correlation, now: datetime) -> ProcessResult:
        arrived = self.new_cis(row)
        new_cis = (*row.pending_cis, *arrived)
        interval = timedelta(minutes=self.connection.note_interval_minutes)
        # a new CI is noted at once, unless the row's list is full (then it waits for the interval:
        # a CI the row no longer remembers must not bring a note with every firing)
        at_once = bool(new_cis) and len(row.configuration_items) < CI_LIMIT
        # a named problem's notification is an update (its next communication), not a repeat
        due = at_once or self.whole_problem or row.last_note_at is None or now - row.last_note_at >= interval
        if not due:
            return self.count_firing(row, now, pending=arrived)
        ref = row.ref
        assert ref is not None
        taken = self.take_lease(row, now)
        firings = taken.unnoted_fires + 1
        text = self.marked(
            render.update_note(self.signal)
            if self.whole_problem
            else render.refire_note(self.signal, firings, taken.last_note_at, new_cis)
        )
        held, gone = self.itsm_write(taken, ref, lambda: self.connector.add_note(ref, text))
        if gone is not None:
            log.warning(
                "work item %s of %s cannot be written any more (HTTP %s: deleted, or read-only to the "
                "integration user); opening a new one",
                ref.number,
                self.key_text,
                gone.status,
            )
            return self.start_new_generation(held, now)

        def noted(current: Correlation) -> dict[str, object]:
            known = [
                *current.configuration_items,
                *(ci for ci in new_cis if ci not in current.configuration_items),
            ]
            return {
                "fire_count": current.fire_count + 1,
                "unnoted_fires": max(current.unnoted_fires - taken.unnoted_fires, 0),
                "last_note_at": now,
                "last_fired_at": max(current.last_fired_at or self.signal.fired_at, self.signal.fired_at),
                "configuration_items": newest(known, CI_LIMIT),
                "pending_cis": tuple(ci for ci in current.pending_cis if ci not in new_cis),
                **current.firing_change(self.alert_id),
            }

        return self.result(Outcome.NOTED, self.release(noted, held), f"note for {firings} firing(s)")

    def fire_after_close(self, row: Correlation, now: datetime) -> ProcessResult:
        if self.is_late(row):
            return self.record_only(row, Outcome.IGNORED, LATE_FIRING)
        window = timedelta(hours=self.connection.reopen_window_hours)
        ref = row.ref
        if ref is not None and row.resolved_at is not None and now - row.resolved_at <= window:
            held = self.take_lease(row, now)
            note = self.marked(render.reopen_note(self.signal, row.resolved_at))
            try:
                held = self.keep_lease(held)
                if not self.written_before(ref):
                    self.connector.reopen(ref, note)
            except _LeaseLost:
                raise
            except ItsmRejectedError as exc:
                level = logging.WARNING if _gone(exc) else logging.INFO
                log.log(
                    level,
                    "work item %s of %s cannot be reopened (HTTP %s); opening a new one",
                    ref.number,
                    self.key_text,
                    exc.status,
                )
                return self.start_new_generation(held, now)
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
                    "alert_ids": newest((*current.alert_ids, self.alert_id), ALERT_ID_LIMIT),
                    "firing_alerts": (self.alert_id,),
                }

            return self.result(Outcome.REOPENED, self.release(reopened, held))
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
                    "configuration_items": self.first_cis(),
                    "pending_cis": (),
                    "alert_ids": (self.alert_id,),
                    "firing_alerts": (self.alert_id,),
                    "lease_owner": self.token,
                    "lease_until": now + self.lease,
                }
            )
        )
        return self.create(fresh, now, recover=False)

    def resolve(self, row: Correlation, now: datetime) -> ProcessResult:
        ref = row.ref
        assert ref is not None
        return self.apply_resolution(self.take_lease(row, now), ref, now, recovered=False)

    def resolve_creating(self, taken: Correlation, now: datetime) -> ProcessResult:
        """A resolution for a problem whose create failed (its lease expired, taken now): the work
        item is looked up by its correlation id; if the create never happened, the resolution is
        only recorded, so the late firing (its delivery being retried) is ignored."""
        try:
            ref = self.connector.find_by_correlation(render.correlation_id(self.key, taken.generation))
        except Exception:
            self.abandon()
            raise
        if ref is not None:
            return self.apply_resolution(taken, ref, now, recovered=True)
        single = self.connection.correlation is CorrelationMode.PER_ALERT or self.whole_problem

        def recorded(current: Correlation) -> dict[str, object]:
            change = self.resolution_change(current)
            if single or not current.still_firing_without(self.alert_id):
                change["state"] = CorrelationState.RESOLVED
            return change

        done = self.release(recorded, taken)
        if done is not None and done.state is CorrelationState.CREATING:
            return self.result(
                Outcome.IGNORED,
                done,
                f"resolved before its work item was created; {len(done.firing_alerts)} other alert(s) of the "
                "problem still fire, so the next firing creates it",
            )
        return self.result(
            Outcome.IGNORED, done, "resolved before any work item was opened for this problem; nothing to do"
        )

    def apply_resolution(
        self, taken: Correlation, ref: WorkItemRef, now: datetime, *, recovered: bool
    ) -> ProcessResult:
        """Resolve the work item (or note the resolution), unless other alerts of the problem still
        fire: then a note says so and the work item stays open. ``recovered``: the row was still
        "creating" and ``ref`` was found by its correlation id; the row records it now."""
        single = self.connection.correlation is CorrelationMode.PER_ALERT or self.whole_problem
        still = () if single else taken.still_firing_without(self.alert_id)
        auto = self.connection.auto_resolve
        closes = auto and not still
        firings = taken.fire_count + (1 if recovered else 0)
        if still:
            text = self.marked(render.partial_resolution_note(self.signal, still))
        else:
            text = self.marked(render.resolved_note(self.signal, firings, taken.unnoted_fires, auto))

        def write() -> None:
            if closes:
                self.connector.resolve(ref, text)
            else:
                self.connector.add_note(ref, text)

        held, gone = self.itsm_write(taken, ref, write)
        if gone is not None:
            log.warning(
                "work item %s of %s cannot be written any more (HTTP %s: deleted, or read-only to the "
                "integration user); the resolution is recorded without it",
                ref.number,
                self.key_text,
                gone.status,
            )

        def resolved(current: Correlation) -> dict[str, object]:
            change = self.resolution_change(current)
            if recovered:
                change |= {
                    "state": CorrelationState.OPEN,
                    "work_item_id": ref.id,
                    "work_item_number": ref.number,
                    "work_item_url": ref.url or "",
                    "fire_count": current.fire_count + 1,
                    "resolved_at": None,
                }
            if not still:
                change |= {
                    "unnoted_fires": max(current.unnoted_fires - taken.unnoted_fires, 0),
                    "last_note_at": now,
                }
            if closes:
                change |= {"state": CorrelationState.RESOLVED, "resolved_at": now}
            return change

        done = self.release(resolved, held)
        details = []
        if recovered:
            details.append("recovered the work item")
        if still:
            details.append(
                f"{len(still)} other alert(s) of the problem still firing: the work item stays open"
            )
        if gone is not None:
            details.append(f"{ref.number} cannot be written (HTTP {gone.status}): recorded without it")
        return self.result(Outcome.RESOLVED if closes else Outcome.NOTED, done, "; ".join(details))
