"""Backward sync: a work item the alert path created was resolved or closed in the ITSM product.

The alert path stamps its incidents with ``azmon-<key>-g<generation>``. When such an item comes
through the sync resolved or closed, and the problem's correlation row still says this generation
is OPEN, the row learns the new state (ETag-matched replace, so a concurrent alert wins and we
decide again), and, where the connection enables it, every Azure alert id on the row is closed
through the Alerts Management API first. Alerts are closed before the row changes: if we crash in
between, the next run sees the row still OPEN and closes again (idempotent at ARM); once the row
has changed, later runs see it is no longer OPEN and close nothing a second time.

"Resolved or closed" is read from the raw state value (``WorkItem.state_code``), not its label. An
item resolved before the alert last fired (``Correlation.last_fired_at``) is a stale snapshot: the
problem is active again, so neither the row nor the Azure alerts change.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from shared_code.domain.alert import parse_alert_id
from shared_code.domain.connection import ConnectionBase
from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.domain.workitem import Lifecycle, WorkItem
from shared_code.errors import AlertsApiError, BusyError
from shared_code.jobs.conflicts import retry_on_conflict
from shared_code.ports.monitor import AlertCloser, CloseOutcome

log = logging.getLogger(__name__)

CORRELATION_ID = re.compile(r"^azmon-(?P<key>[0-9A-Za-z]{8,64})-g(?P<generation>[1-9][0-9]{0,8})$")


class CorrelationUpdates(Protocol):
    """The part of the correlation store back sync uses (it never creates a row)."""

    def get(self, connection: str, key: str) -> Correlation | None: ...

    def replace(self, row: Correlation) -> Correlation: ...


def parse_correlation_id(value: str) -> tuple[str, int] | None:
    """``(key, generation)`` of an alert-path correlation id, or None for anything else."""
    match = CORRELATION_ID.match(value.strip())
    if not match:
        return None
    return match["key"], int(match["generation"])


FINISHED: dict[Lifecycle, CorrelationState] = {
    Lifecycle.RESOLVED: CorrelationState.RESOLVED,
    Lifecycle.CLOSED: CorrelationState.CLOSED,
    Lifecycle.CANCELLED: CorrelationState.CLOSED,
}


def finished_state(item: WorkItem) -> CorrelationState | None:
    """RESOLVED or CLOSED when the product says the item is done; None while it is open.

    Decided on the lifecycle the product's own mapping derived (from its raw state value, not a
    label in the integration user's language); an item without one counts as open.
    """
    return FINISHED.get(item.lifecycle) if item.lifecycle is not None else None


@dataclass
class BackSyncReport:
    correlations_updated: int = 0
    alerts_closed: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (source id, message)


class BackSync:
    """Applies resolved/closed alert-path work items to their correlation rows and Azure alerts."""

    def __init__(
        self,
        correlations: CorrelationUpdates,
        alerts: AlertCloser | None,
        clock: Callable[[], datetime],
        *,
        max_races: int = 20,
    ) -> None:
        self._correlations = correlations
        self._alerts = alerts
        self._clock = clock
        self._max_races = max_races

    @staticmethod
    def _refusal(connection: ConnectionBase, alert_id: str) -> str:
        """Why this connection must not close ``alert_id`` ('' when it may)."""
        ref = parse_alert_id(alert_id)
        if ref is None:
            return f"not closed: {alert_id[:200]!r} is not an Alerts Management alert id of the exact form"
        allowed = {s.lower() for s in connection.close_alerts_in}
        if allowed and ref.subscription not in allowed:
            return (
                f"not closed: alert {ref.path} is in subscription {ref.subscription}, outside this "
                "connection's --close-alerts-in list"
            )
        return ""

    def apply(self, connection: ConnectionBase, items: Sequence[WorkItem]) -> BackSyncReport:
        """Handle one committed page. Transient failures raise (the page is retried next run)."""
        report = BackSyncReport()
        for item, key, generation, state in self._candidates(items):
            self._apply_one(connection, item, (key, generation), state, report)
        return report

    @staticmethod
    def _candidates(items: Sequence[WorkItem]) -> Iterator[tuple[WorkItem, str, int, CorrelationState]]:
        for item in items:
            if not item.correlation_id:
                continue
            parsed = parse_correlation_id(item.correlation_id)
            state = finished_state(item)
            if parsed is None or state is None:
                continue
            yield item, parsed[0], parsed[1], state

    def _apply_one(
        self,
        connection: ConnectionBase,
        item: WorkItem,
        identity: tuple[str, int],
        state: CorrelationState,
        report: BackSyncReport,
    ) -> None:
        key, generation = identity
        closed: set[str] = set()

        def attempt() -> None:
            row = self._correlations.get(connection.name, key)
            if row is None or row.generation != generation or row.state is not CorrelationState.OPEN:
                return  # not ours any more: a new generation, or the alert path resolved it already
            if row.work_item_id and row.work_item_id != item.source_id:
                # the same key and generation on another work item (another connection to this instance,
                # with a row keyed before keys included the connection): it says nothing of this problem
                return
            finished_at = item.resolved_at or item.closed_at or item.updated_at
            if row.last_fired_at is not None and row.last_fired_at > finished_at:
                # a stale snapshot: the alert fired again after the item was resolved, so the problem is
                # active again; the alert path owns it now (its resolution comes from Azure Monitor)
                log.info(
                    "backward sync: %s %s is %s since %s, but its alert fired again at %s; "
                    "correlation %s and its Azure alerts are left open",
                    connection.name,
                    item.number,
                    state.value,
                    finished_at.isoformat(),
                    row.last_fired_at.isoformat(),
                    row.key_text,
                )
                return
            if connection.close_azure_alerts and self._alerts is not None:
                for alert_id in dict.fromkeys(row.alert_ids):
                    if alert_id in closed:
                        continue
                    refusal = self._refusal(connection, alert_id)
                    if refusal:
                        report.problems.append((item.source_id, refusal))
                        closed.add(alert_id)
                        continue
                    try:
                        outcome = self._alerts.close_alert(alert_id)
                    except AlertsApiError as exc:
                        if not exc.permanent:
                            raise
                        report.problems.append((item.source_id, str(exc)))
                        outcome = CloseOutcome.NOT_FOUND
                    closed.add(alert_id)
                    if outcome is CloseOutcome.CLOSED:
                        report.alerts_closed += 1
            # EtagConflict: the alert path wrote in between; retry_on_conflict reads again and decides again
            self._correlations.replace(row.finished(state, finished_at))
            report.correlations_updated += 1
            log.info(
                "backward sync: %s %s is %s; correlation %s updated, %d alert(s) closed",
                connection.name,
                item.number,
                state.value,
                row.key_text,
                len(closed),
            )

        retry_on_conflict(
            attempt,
            attempts=self._max_races,
            give_up=lambda: BusyError(
                f"correlation {key} of {item.number} kept changing; the page is retried next run"
            ),
        )
