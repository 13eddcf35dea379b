"""Timed jobs' bookkeeping: the leased, watermarked state of one job target, and a run's record."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import Field

from shared_code.domain.record import Record
from shared_code.domain.sync import SyncCursor


class SyncStateRow(Record):
    """Where the sync of one connection and work-item type stands."""

    connection: str
    item_type: str  # WorkItemType.sync_name: incidents | change_requests
    watermark_updated_at: datetime | None = None
    watermark_last_id: str = ""
    last_run_at: datetime | None = None
    last_success_at: datetime | None = None
    last_outcome: str = ""
    last_error: str = ""
    last_run_synced: int = 0
    last_run_rejected: int = 0
    synced_total: int = 0
    rejected_total: int = 0
    lease_owner: str = ""
    lease_until: datetime | None = None
    etag: str = ""

    @property
    def watermark(self) -> SyncCursor | None:
        if self.watermark_updated_at is None:
            return None
        return SyncCursor(updated_at=self.watermark_updated_at, last_id=self.watermark_last_id)

    def leased(self, owner: str, until: datetime) -> SyncStateRow:
        return self.evolve(lease_owner=owner, lease_until=until)

    def advanced(self, watermark: SyncCursor | None, lease_until: datetime) -> SyncStateRow:
        """The watermark stored (``None`` keeps none) and the lease renewed."""
        return self.evolve(
            watermark_updated_at=watermark.updated_at if watermark else None,
            watermark_last_id=watermark.last_id if watermark else "",
            lease_until=lease_until,
        )

    def released(
        self, *, started: datetime, outcome: str, error: str, done: int, rejected: int, succeeded: bool
    ) -> SyncStateRow:
        """The lease dropped and the run recorded (totals grow by what this run did)."""
        return self.evolve(
            lease_owner="",
            lease_until=None,
            last_run_at=started,
            last_outcome=outcome,
            last_error=error,
            last_run_synced=done,
            last_run_rejected=rejected,
            synced_total=self.synced_total + done,
            rejected_total=self.rejected_total + rejected,
            last_success_at=started if succeeded else self.last_success_at,
        )

    def leased_by_other(self, owner: str, now: datetime) -> bool:
        return bool(self.lease_owner) and self.lease_owner != owner and (self.lease_until or now) > now


class RunRecord(Record):
    """What one run did: counts, duration and outcome, and the error when it failed."""

    job: str = "sync"
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    trigger: str = ""
    connection: str = ""
    item_type: str = ""
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    outcome: str
    counts: dict[str, int] = Field(default_factory=dict)
    error: str = ""
    detail: str = ""
