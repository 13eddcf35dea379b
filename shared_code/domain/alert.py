"""The normalised alert: what the rest of the app needs from any Common Alert Schema payload.

``shared_code.alerts.schema.parse_alert`` turns a raw payload into an ``AlertSignal``; nothing
downstream looks at the raw payload again, so every monitoring service's quirks end here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field


class MonitorCondition(StrEnum):
    FIRED = "Fired"
    RESOLVED = "Resolved"


class Severity(StrEnum):
    SEV0 = "Sev0"
    SEV1 = "Sev1"
    SEV2 = "Sev2"
    SEV3 = "Sev3"
    SEV4 = "Sev4"


class AlertSignal(BaseModel):
    """One alert notification, reduced to the facts the ITSM side uses."""

    model_config = ConfigDict(frozen=True)

    alert_id: str = Field(min_length=1, description="essentials.alertId: stable for one fire/resolve cycle")
    origin_alert_id: str = ""
    rule: str = Field(
        min_length=1, description="essentials.alertRule (the rule's name); a budget alert's budget name"
    )
    rule_id: str = Field(default="", description="essentials.alertRuleID where sent, else derived")
    severity: Severity
    severity_assumed: bool = Field(
        default=False, description="the alert has no severity: this is the connection's default"
    )
    signal_type: str = ""
    monitoring_service: str = Field(min_length=1)
    condition: MonitorCondition
    fired_at: datetime
    resolved_at: datetime | None = None
    target_ids: tuple[str, ...] = ()
    configuration_items: tuple[str, ...] = Field(
        default=(),
        description="essentials.configurationItems, else the target resource names; never a subscription",
    )
    problem_key: str = Field(
        default="",
        description="the source's stable key of the underlying problem where it has one (a service health "
        "tracking id, a resource's health): every notification with it is one problem",
    )
    description: str = ""
    context_summary: str = Field(
        default="",
        description="readable multi-line summary of alertContext: condition, metric values, "
        "log query and window, activity-log operation, health event...",
    )
    portal_link: str = ""
    metric_name: str = Field(
        default="", max_length=200, description="the first metric criterion's metricName (metric alerts)"
    )

    @property
    def primary_ci(self) -> str:
        """The first configuration item, or '' when the alert names none."""
        return self.configuration_items[0] if self.configuration_items else ""

    @property
    def event_time(self) -> datetime:
        """When this notification's condition happened (resolution time for a resolved alert)."""
        return self.resolved_at if self.resolved_at is not None else self.fired_at


ALERT_ID = re.compile(
    r"^/subscriptions/(?P<subscription>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"(?:/resourceGroups/(?P<group>[-\w._()]{1,90}))?"
    r"/providers/Microsoft\.AlertsManagement/alerts/(?P<alert>[0-9A-Za-z][0-9A-Za-z-]{0,127})$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class AlertRef:
    """An Azure Monitor alert id taken apart; ``path`` is rebuilt from the parts."""

    subscription: str
    resource_group: str
    alert: str

    @property
    def path(self) -> str:
        group = f"/resourceGroups/{quote(self.resource_group, safe='')}" if self.resource_group else ""
        return (
            f"/subscriptions/{self.subscription}{group}"
            f"/providers/Microsoft.AlertsManagement/alerts/{quote(self.alert, safe='')}"
        )


def parse_alert_id(alert_id: str) -> AlertRef | None:
    """The parts of an Alerts Management alert id of the exact form, or None."""
    match = ALERT_ID.match(alert_id)
    if match is None or match["group"] in (".", ".."):
        return None
    return AlertRef(match["subscription"].lower(), match["group"] or "", match["alert"])


class CloseOutcome(StrEnum):
    """What closing an Azure alert came to (backward sync)."""

    CLOSED = "closed"
    NOT_FOUND = "not_found"  # deleted or past its 30-day retention: nothing left to close
