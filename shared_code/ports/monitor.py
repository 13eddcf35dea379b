"""What the work-item sync needs from Azure Monitor: uploading log rows and closing alerts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from shared_code.domain.alert import CloseOutcome

__all__ = ["AlertCloser", "CloseOutcome", "LogsUpload"]


class AlertCloser(Protocol):
    def close_alert(self, alert_id: str) -> CloseOutcome:
        """Close one Azure Monitor alert; ``AlertsApiError`` (``permanent`` or not) when it cannot."""
        ...


class LogsUpload(Protocol):
    def upload(self, stream: str, records: Sequence[dict[str, Any]]) -> None:
        """Send ``records`` to a data collection rule's ``stream``; ``SinkError`` when it fails."""
        ...
