"""Pure text and field mapping: alert -> incident draft, work-note texts, correlation keys."""

from __future__ import annotations

import hashlib
from datetime import datetime

from shared_code.alerts.armid import is_guid, is_subscription_scope, resource_name, subscription_of
from shared_code.domain.alert import AlertSignal
from shared_code.domain.connection import ConnectionBase, CorrelationMode
from shared_code.domain.maps import DependencySummary
from shared_code.domain.workitem import AlertFacts, IncidentDraft

SHORT_DESCRIPTION_LIMIT = 160
DESCRIPTION_LIMIT = 30_000
NOTE_CONTEXT_LIMIT = 1_500
NOTE_CI_LIMIT = 100
NOTE_ALERT_LIMIT = 10
DEPENDENCY_LIST_LIMIT = 20


def correlation_key_text(mode: CorrelationMode, signal: AlertSignal) -> str:
    """The human-readable identity of 'one problem' under the connection's correlation mode.

    A source that names its problems (a service health event's tracking id, a resource's health)
    decides under every mode: each of its notifications is a new Azure alert of the same problem.
    """
    if signal.problem_key:
        return f"problem|{signal.problem_key}".lower()
    rule = signal.rule_id or signal.rule
    if mode is CorrelationMode.PER_ALERT:
        return f"alert|{signal.origin_alert_id or signal.alert_id}"
    if mode is CorrelationMode.PER_RULE:
        return f"rule|{rule}".lower()
    cis = ",".join(sorted({ci.lower() for ci in signal.configuration_items}))
    return f"rule|{rule}|ci|{cis}".lower()


def digest(text: str, length: int = 40) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def correlation_key(connection: str, key_text: str) -> str:
    """The problem's row key, and the heart of the correlation id stamped on its work item.

    The connection is part of it: connections on one instance (one per team, say) must never
    find each other's work items when they recover a create by correlation id, nor resolve each
    other's problems when they sync the instance back.
    """
    return digest(f"{connection}|{key_text}")


def correlation_id(key: str, generation: int) -> str:
    """Stamped on the work item so a crashed create can be found again instead of repeated."""
    return f"azmon-{key}-g{generation}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def ci_name(ci: str) -> str:
    """What people call a configuration item: an ARM resource id (as log search alerts V2 send
    it) becomes its resource name, which is also what a CMDB server record is named."""
    return resource_name(ci)


def ci_names(signal: AlertSignal) -> list[str]:
    return list(dict.fromkeys(ci_name(ci) for ci in signal.configuration_items))


def listed(names: list[str], limit: int) -> str:
    """``a, b, c`` for at most ``limit`` names, then "and N more" for the rest."""
    shown = ", ".join(names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest} more" if rest > 0 else shown


def alert_name(alert_id: str) -> str:
    """The part of an Azure alert id people can search for: its last segment (the alert's guid)."""
    return alert_id.rstrip("/").rsplit("/", 1)[-1] or alert_id


def target_label(signal: AlertSignal) -> str:
    """What the alert is about, for people: its configuration items, else its targets' names (a
    subscription-scoped target as "subscription <id>", since no CI names it)."""
    names = [name for name in ci_names(signal) if name]
    if names:
        return ", ".join(names)
    labels = [
        f"subscription {subscription_of(target)}" if is_subscription_scope(target) else resource_name(target)
        for target in signal.target_ids
    ]
    return ", ".join(dict.fromkeys(label for label in labels if label)) or "(no target)"


def short_description(signal: AlertSignal) -> str:
    """Rule, severity and target, whole where they fit (the old connector cut at 40 characters)."""
    target = target_label(signal)
    return _clip(f"[{signal.severity.value}] {signal.rule} on {target}", SHORT_DESCRIPTION_LIMIT)


def dependency_section(summary: DependencySummary) -> list[str]:
    """The affected server's dependency map as description lines: who depends on it, what it
    depends on, what failed, and when the map was imported (so nobody takes it for live data)."""

    def names(values: tuple[str, ...], total: int) -> str:
        shown = list(values[:DEPENDENCY_LIST_LIMIT])
        rest = max(total, len(values)) - len(shown)
        return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "") if shown else "(none seen)"

    source = f" from map source {summary.source}" if summary.source else ""
    lines = [
        f"Dependency map of {summary.server} (imported {_when(summary.imported_at)}{source}):",
        f"Used by (clients): {names(summary.clients, summary.total_clients)}",
        f"Depends on: {names(summary.dependencies, summary.total_dependencies)}",
    ]
    if summary.failed:
        lines.append(f"Failed dependencies: {names(summary.failed, summary.total_failed)}")
    return lines


def incident_description(
    signal: AlertSignal, impact: int, urgency: int, dependencies: DependencySummary | None = None
) -> str:
    lines = [
        f"Azure Monitor alert {signal.condition.value.lower()}: {signal.rule}",
        "",
        f"Severity: {signal.severity.value} (impact {impact}, urgency {urgency})"
        + (" - the alert has no severity: the connection's default" if signal.severity_assumed else ""),
        f"Monitoring service: {signal.monitoring_service}"
        + (f" / signal type: {signal.signal_type}" if signal.signal_type else ""),
        f"Affected: {', '.join(ci_names(signal)) or '(none named)'}",
        f"Fired: {_when(signal.fired_at)}",
    ]
    if signal.description:
        lines += ["", f"Rule description: {signal.description}"]
    if signal.context_summary:
        lines += ["", "Alert context:", signal.context_summary]
    if dependencies is not None:
        lines += ["", *dependency_section(dependencies)]
    if signal.target_ids:
        lines += ["", "Target resources:", *signal.target_ids]
    if signal.portal_link:
        lines += ["", f"Open in the Azure portal: {signal.portal_link}"]
    lines += [f"Alert id: {signal.alert_id}"]
    return _clip("\n".join(lines), DESCRIPTION_LIMIT)


def alert_facts(signal: AlertSignal) -> AlertFacts:
    """What an event-based product (ServiceNow Event Management) needs besides the incident text."""
    target = signal.target_ids[0] if signal.target_ids else ""
    resource = ci_name(signal.primary_ci) or (resource_name(target) if target else "")
    return AlertFacts(
        severity=signal.severity,
        rule=signal.rule,
        monitoring_service=signal.monitoring_service,
        signal_type=signal.signal_type,
        resource=resource,
        resource_id=target if target.startswith("/subscriptions/") else "",
        metric_name=signal.metric_name,
        alert_id=signal.alert_id,
        fired_at=signal.fired_at,
        portal_link=signal.portal_link,
    )


def incident_draft(
    connection: ConnectionBase,
    signal: AlertSignal,
    key_text: str,
    correlation: str,
    dependencies: DependencySummary | None = None,
) -> IncidentDraft:
    """The incident for a new problem; ``dependencies`` is the affected server's map summary."""
    mapping = connection.mapping_for(signal.severity)
    ci = ci_name(signal.primary_ci)
    return IncidentDraft(
        short_description=short_description(signal),
        description=incident_description(signal, mapping.impact, mapping.urgency, dependencies),
        impact=mapping.impact,
        urgency=mapping.urgency,
        correlation_id=correlation,
        correlation_display=_clip(key_text, 100),
        configuration_item=ci or None,
        # a GUID names no CMDB item anyone would recognise: look it up, never create one
        create_configuration_item=connection.create_configuration_items and not is_guid(ci),
        assignment_group=connection.assignment_group or None,
        caller=connection.caller or None,
        alert=alert_facts(signal),
    )


def refire_note(signal: AlertSignal, firings: int, since: datetime | None, new_cis: tuple[str, ...]) -> str:
    count = f"{firings} firing{'s' if firings != 1 else ''}"
    since_text = f" since the last update at {_when(since)}" if since else ""
    lines = [
        f"Azure Monitor: the alert fired again ({count}{since_text}); "
        f"latest fired at {_when(signal.fired_at)}."
    ]
    if new_cis:
        names = list(dict.fromkeys(ci_name(ci) for ci in new_cis))
        lines.append(f"Also affecting: {listed(names, NOTE_CI_LIMIT)}")
    if signal.context_summary:
        lines += ["", _clip(signal.context_summary, NOTE_CONTEXT_LIMIT)]
    if signal.portal_link:
        lines.append(f"Latest alert: {signal.portal_link}")
    return "\n".join(lines)


def pending_note(
    firings: int, since: datetime | None, last_fired_at: datetime | None, new_cis: tuple[str, ...]
) -> str:
    """Firings counted while another instance was writing, noted by the timer: no notification
    followed them, so nothing else would."""
    count = f"{firings} firing{'s' if firings != 1 else ''}"
    since_text = f" since the last update at {_when(since)}" if since else ""
    latest = f"; latest fired at {_when(last_fired_at)}" if last_fired_at else ""
    lines = [f"Azure Monitor: the alert fired again ({count}{since_text}){latest}."]
    if new_cis:
        names = list(dict.fromkeys(ci_name(ci) for ci in new_cis))
        lines.append(f"Also affecting: {listed(names, NOTE_CI_LIMIT)}")
    return "\n".join(lines)


def update_note(signal: AlertSignal) -> str:
    """A new notification of a problem its source names (a health event's next communication)."""
    lines = [f"Azure Monitor: update on this problem, notified at {_when(signal.fired_at)}."]
    if signal.context_summary:
        lines += ["", _clip(signal.context_summary, NOTE_CONTEXT_LIMIT)]
    if signal.portal_link:
        lines.append(f"Latest alert: {signal.portal_link}")
    return "\n".join(lines)


def resolved_note(signal: AlertSignal, total_firings: int, unnoted: int, auto_resolve: bool) -> str:
    when = _when(signal.resolved_at or signal.fired_at)
    what = "the problem recovered" if signal.problem_key else "the alert resolved"
    lines = [f"Azure Monitor: {what} at {when}. It fired {total_firings} time(s) in all."]
    if unnoted:
        lines.append(f"{unnoted} firing(s) since the last note were not noted separately.")
    lines.append(
        "Resolved automatically by the connection's auto-resolve setting."
        if auto_resolve
        else "Auto-resolve is off for this connection: resolve the incident when the work is done."
    )
    if signal.problem_key and signal.context_summary:  # the recovery's own words (a mitigation summary)
        lines += ["", _clip(signal.context_summary, NOTE_CONTEXT_LIMIT)]
    return "\n".join(lines)


def reopen_note(signal: AlertSignal, resolved_at: datetime | None) -> str:
    since = f" (resolved at {_when(resolved_at)})" if resolved_at else ""
    lines = [f"Azure Monitor: the alert fired again at {_when(signal.fired_at)}{since}; incident reopened."]
    if signal.context_summary:
        lines += ["", _clip(signal.context_summary, NOTE_CONTEXT_LIMIT)]
    return "\n".join(lines)


def partial_resolution_note(signal: AlertSignal, still_firing: tuple[str, ...]) -> str:
    """One alert of a problem resolved while others still fire: the work item stays open."""
    when = _when(signal.resolved_at or signal.fired_at)
    others = listed([alert_name(alert_id) for alert_id in still_firing], NOTE_ALERT_LIMIT)
    return (
        f"Azure Monitor: alert {alert_name(signal.alert_id)} resolved at {when}; still firing: {others}. "
        "The incident stays open until every alert of this problem has resolved."
    )


def duplicate_note(winner_number: str) -> str:
    """On an incident two instances created for one problem: the one the problem did not keep."""
    return (
        f"Duplicate of {winner_number}: two instances created it while ServiceNow was slow. "
        f"The alert's updates go to {winner_number}."
    )


def resolved_while_created_note(auto_resolve: bool) -> str:
    """On an incident whose create took so long that every alert of the problem resolved meanwhile."""
    return "Azure Monitor: the alert resolved while this incident was being created. " + (
        "Resolved automatically by the connection's auto-resolve setting."
        if auto_resolve
        else "Auto-resolve is off for this connection: resolve the incident when the work is done."
    )
