"""Notes for firings that were counted but never written.

A re-fire that arrives while another instance holds the problem's lease is only counted on the
row ("waits for the next note"). When no further notification comes, nothing would ever write
that note: a timer asks the store for the open rows with counted firings (a filtered query, not a
read of every row) and writes each one's note once its note interval has passed, under the same
lease and ETag rules as the processor. The note carries a marker derived from the row's last note,
so a run that lost a write's answer is confirmed (``NoteLedger``) by the next run, not repeated.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared_code.alerts import render
from shared_code.alerts.processor import race_pause
from shared_code.domain.connection import ConnectionBase
from shared_code.domain.correlation import CI_LIMIT, Correlation, CorrelationState, newest
from shared_code.domain.workitem import note_marker
from shared_code.errors import EtagConflict, ItsmRejectedError
from shared_code.ports.itsm import ConnectorPorts
from shared_code.ports.state import CorrelationStore

log = logging.getLogger(__name__)

MAX_RACES = 20


@dataclass
class PendingNotes:
    correlations: CorrelationStore
    clock: Callable[[], datetime]
    lease_seconds: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def due(self, connection: ConnectionBase, limit: int) -> list[Correlation]:
        """Open rows of ``connection`` with counted firings whose note interval has passed."""
        now = self.clock()
        interval = timedelta(minutes=connection.note_interval_minutes)
        rows = self.correlations.pending(connection.name, limit)
        return [row for row in rows if row.last_note_at is None or now - row.last_note_at >= interval]

    def flush(self, connection: ConnectionBase, ports: ConnectorPorts, row: Correlation) -> bool:
        """Write ``row``'s waiting note; False when there was nothing to do or another instance is
        at it (its own release records the firings, or the next run sees them)."""
        now = self.clock()
        ref = row.ref
        if ref is None or row.state is not CorrelationState.OPEN or row.unnoted_fires <= 0:
            return False
        if row.leased_by_other("", now):
            return False
        flush_id = render.digest(f"flush|{row.key}|{row.generation}|{row.last_note_at}", 32)
        marker = note_marker(flush_id)
        in_doubt = row.lease_owner.startswith(f"{flush_id}:")
        token = f"{flush_id}:{uuid.uuid4().hex[:8]}"
        try:
            taken = self.correlations.replace(
                row.model_copy(
                    update={"lease_owner": token, "lease_until": now + timedelta(seconds=self.lease_seconds)}
                )
            )
        except EtagConflict:
            return False  # a notification of the problem got there first
        text = render.pending_note(
            taken.unnoted_fires, taken.last_note_at, taken.last_fired_at, taken.pending_cis
        )
        text = f"{text}\n\n{marker}"
        incidents = ports.require_incidents()
        try:
            if not (in_doubt and ports.notes is not None and ports.notes.has_note(ref, marker)):
                incidents.add_note(ref, text)
        except ItsmRejectedError as exc:
            if exc.status not in (403, 404):
                self._expire(taken, token)
                raise
            log.warning(
                "work item %s of %s cannot be written any more (HTTP %s): its counted firings stay on the "
                "row for the next notification",
                ref.number,
                row.key_text,
                exc.status,
            )
            self._release(taken, token, None)
            return False
        except Exception:
            self._expire(taken, token)
            raise
        self._release(taken, token, now)
        return True

    def _release(self, taken: Correlation, token: str, noted_at: datetime | None) -> None:
        """Drop the lease; with ``noted_at``, record the note (firings counted meanwhile stay)."""
        current: Correlation | None = taken
        for races in range(MAX_RACES):
            if races:
                self.sleep(race_pause(races))
            if current is None:
                current = self.correlations.get(taken.connection, taken.key)
            if current is None or current.lease_owner != token:
                log.warning("lease on %s was taken over before the pending note was recorded", taken.key_text)
                return
            update: dict[str, object] = {"lease_owner": "", "lease_until": None}
            if noted_at is not None:
                known = [*current.configuration_items, *taken.pending_cis]
                update |= {
                    "unnoted_fires": max(current.unnoted_fires - taken.unnoted_fires, 0),
                    "last_note_at": noted_at,
                    "configuration_items": newest(known, CI_LIMIT),
                    "pending_cis": tuple(ci for ci in current.pending_cis if ci not in taken.pending_cis),
                }
            try:
                self.correlations.replace(current.model_copy(update=update))
                return
            except EtagConflict:
                current = None  # a firing was counted meanwhile: read again
        log.warning("could not record the pending note of %s: too much contention", taken.key_text)

    def _expire(self, taken: Correlation, token: str) -> None:
        """After a failed write: the lease ends now (its owner id stays, so the next run asks first)."""
        try:
            current = self.correlations.get(taken.connection, taken.key)
            if current is not None and current.lease_owner == token:
                self.correlations.replace(current.model_copy(update={"lease_until": self.clock()}))
        except Exception:  # best effort: the lease expires on its own
            log.warning("could not release the lease on %s after a failure", taken.key_text, exc_info=True)
