"""One problem's correlation: the open work item and the bookkeeping that coalesces its alerts.

The row changes only by conditional insert and ETag-matched replace (see ``state/correlations.py``),
which is what makes "one work item per problem" hold across instances.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum

from shared_code.domain.record import Record
from shared_code.domain.workitem import WorkItemRef

RECENT_DELIVERIES = 64
CI_LIMIT = 100
"""Configuration items a row remembers (the newest), and those waiting for the next note."""
ALERT_ID_LIMIT = 100
"""Azure alert ids a row remembers per list (alert_ids, firing_alerts, resolved_alerts), the newest.

Every list on the row is bounded: Table Storage refuses a string property over 64 KiB (and an
entity over 1 MiB), so an unbounded list would one day make every write of the problem fail."""


def newest(items: Iterable[str], limit: int) -> tuple[str, ...]:
    """``items`` without repeats (a repeated item counts where it last occurs), the last ``limit``."""
    ordered = list(dict.fromkeys(reversed(list(items))))
    ordered.reverse()
    return tuple(ordered[-limit:]) if limit > 0 else ()


class CorrelationState(StrEnum):
    CREATING = "creating"
    OPEN = "open"
    RESOLVED = "resolved"
    CLOSED = "closed"


class Correlation(Record):
    """One problem's work item and the bookkeeping that coalesces its notifications."""

    connection: str
    key: str
    key_text: str
    state: CorrelationState
    work_item_id: str = ""
    work_item_number: str = ""
    work_item_url: str = ""
    generation: int = 1
    fire_count: int = 0
    unnoted_fires: int = 0
    last_note_at: datetime | None = None
    first_fired_at: datetime | None = None
    last_fired_at: datetime | None = None
    resolved_at: datetime | None = None
    resolved_alert_fired_at: datetime | None = None
    lease_owner: str = ""
    lease_until: datetime | None = None
    recent_deliveries: tuple[str, ...] = ()
    configuration_items: tuple[str, ...] = ()
    pending_cis: tuple[str, ...] = ()
    alert_ids: tuple[str, ...] = ()
    """Every Azure alert id of the problem seen lately (backward sync closes them), the newest 100."""
    firing_alerts: tuple[str, ...] = ()
    """Alert ids of the current work item that fired and did not resolve yet."""
    resolved_alerts: tuple[str, ...] = ()
    """Alert ids that resolved (kept across generations): a late 'fired' of one of them is ignored."""
    etag: str = ""

    @property
    def ref(self) -> WorkItemRef | None:
        if not self.work_item_id:
            return None
        return WorkItemRef(id=self.work_item_id, number=self.work_item_number, url=self.work_item_url or None)

    def leased_by_other(self, owner: str, now: datetime) -> bool:
        return bool(self.lease_owner) and self.lease_owner != owner and (self.lease_until or now) > now

    def seen(self, delivery_id: str) -> bool:
        return delivery_id in self.recent_deliveries

    def with_delivery(self, delivery_id: str) -> tuple[str, ...]:
        return (*self.recent_deliveries, delivery_id)[-RECENT_DELIVERIES:]

    def is_resolved_alert(self, alert_id: str) -> bool:
        return alert_id in self.resolved_alerts

    def is_late_firing(self, alert_id: str, fired_at: datetime) -> bool:
        """A 'fired' that belongs to an alert already resolved (delivered after its resolution).

        Decided by the alert's own id: another alert of the problem that fired earlier but is still
        active is not late. Rows written before the id sets existed fall back to the firing time.
        """
        if self.resolved_alerts:
            return alert_id in self.resolved_alerts
        return self.resolved_alert_fired_at is not None and fired_at <= self.resolved_alert_fired_at

    def firing_change(self, alert_id: str) -> dict[str, object]:
        """The lists after ``alert_id`` fired: it is active (unless it resolved already) and known.

        A dict of field changes, to combine with others in one ``evolve``."""
        change: dict[str, object] = {"alert_ids": newest((*self.alert_ids, alert_id), ALERT_ID_LIMIT)}
        if alert_id not in self.resolved_alerts:
            change["firing_alerts"] = newest((*self.firing_alerts, alert_id), ALERT_ID_LIMIT)
        return change

    def still_firing_without(self, alert_id: str) -> tuple[str, ...]:
        """The alert ids still active once ``alert_id`` resolved."""
        return tuple(other for other in self.firing_alerts if other != alert_id)

    def resolution_change(self, alert_id: str) -> dict[str, object]:
        """The lists after ``alert_id`` resolved: no longer active, remembered as resolved."""
        return {
            "firing_alerts": self.still_firing_without(alert_id),
            "resolved_alerts": newest((*self.resolved_alerts, alert_id), ALERT_ID_LIMIT),
            "alert_ids": newest((*self.alert_ids, alert_id), ALERT_ID_LIMIT),
        }

    def leased(self, owner: str, until: datetime) -> Correlation:
        return self.evolve(lease_owner=owner, lease_until=until)

    def lease_extended(self, until: datetime) -> Correlation:
        return self.evolve(lease_until=until)

    def finished(self, state: CorrelationState, at: datetime | None) -> Correlation:
        """The work item was resolved or closed in the product (backward sync)."""
        return self.evolve(state=state, resolved_at=at)
