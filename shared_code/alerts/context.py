"""alertContext: classify it by monitoring service (or by shape), summarise it, and read the few
facts the normalised alert needs from it.

Azure keeps adding fields and services, so a context is never validated: it is classified by its
monitoring service (and by shape when the service is unknown or the shape does not match), and
summarised best effort into bounded plain text. Some services put what the essentials lack into
the context, and ``context_facts`` reads it:

* Cost Management budget alerts (``CostAlerts``) send no rule, severity or target: the budget's
  name and id and its scope are in ``alertContext.AlertData``.
* Service Health and Resource Health are activity-log alerts: every state change is a new
  notification with monitorCondition "Fired", and the recovery is only in the context (service
  health ``stage``/``status`` "Resolved"; resource health ``currentHealthStatus`` "Available").
  Their notifications belong to one problem (the tracking id; the resource), named by a
  ``problem_key``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared_code.alerts.armid import resource_name
from shared_code.alerts.text import (
    COMMUNICATION_LIMIT,
    MAX_ITEMS,
    MAX_PAIRS,
    QUERY_LIMIT,
    VALUE_LIMIT,
    clip,
    compact,
    dimensions,
    failing_periods,
    https_link,
    join_bounded,
    labelled,
    more_line,
    one_line,
    pairs,
    plain,
    query_text,
    strip_html,
    window_line,
)

MAX_SUMMARY_CHARS = 4_000


# -- alertContext classification -------------------------------------------------------------------


class ContextKind(StrEnum):
    """Families of alertContext shapes; several monitoring services share one."""

    METRIC = "metric"
    LOG_SEARCH_V1 = "log-search-v1"
    LOG_SEARCH_V2 = "log-search-v2"
    ACTIVITY_LOG = "activity-log"
    SERVICE_HEALTH = "service-health"
    RESOURCE_HEALTH = "resource-health"
    SMART_DETECTION = "smart-detection"
    PROMETHEUS = "prometheus"
    COST = "cost"
    GENERIC = "generic"


_SERVICE_KINDS: dict[str, ContextKind] = {
    "platform": ContextKind.METRIC,
    "loganalytics": ContextKind.LOG_SEARCH_V1,
    "applicationinsights": ContextKind.LOG_SEARCH_V1,
    "logalertsv2": ContextKind.LOG_SEARCH_V2,
    "simplelogalert": ContextKind.LOG_SEARCH_V2,
    "activitylogadministrative": ContextKind.ACTIVITY_LOG,
    "activitylogsecurity": ContextKind.ACTIVITY_LOG,
    "activitylogrecommendation": ContextKind.ACTIVITY_LOG,
    "activitylogpolicy": ContextKind.ACTIVITY_LOG,
    "activitylogautoscale": ContextKind.ACTIVITY_LOG,
    "servicehealth": ContextKind.SERVICE_HEALTH,
    "activitylogservicehealth": ContextKind.SERVICE_HEALTH,
    "resourcehealth": ContextKind.RESOURCE_HEALTH,
    "activitylogresourcehealth": ContextKind.RESOURCE_HEALTH,
    "smartdetector": ContextKind.SMART_DETECTION,
    "smartdetection": ContextKind.SMART_DETECTION,
    "prometheus": ContextKind.PROMETHEUS,
    "costalerts": ContextKind.COST,
}


def _service_key(monitoring_service: str) -> str:
    return re.sub(r"[^a-z0-9]", "", monitoring_service.lower())


def _criteria(context: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    condition = context.get("condition")
    all_of = condition.get("allOf") if isinstance(condition, Mapping) else None
    return [item for item in all_of if isinstance(item, Mapping)] if isinstance(all_of, list) else []


def first_metric_name(context: object) -> str:
    """The metric a metric alert's first criterion watches ("Percentage CPU"), else ''."""
    if not isinstance(context, Mapping):
        return ""
    for item in _criteria(context):
        name = plain(item.get("metricName"), 200)
        if name:
            return name
    return ""


def _properties(context: Mapping[str, Any]) -> Mapping[str, Any]:
    properties = context.get("properties")
    return properties if isinstance(properties, Mapping) else {}


def _alert_data(context: Mapping[str, Any]) -> Mapping[str, Any]:
    """Cost Management's ``AlertData`` object (budget name, id, scope, amounts)."""
    data = context.get("AlertData")
    return data if isinstance(data, Mapping) else {}


def _shape_kind(context: Mapping[str, Any]) -> ContextKind:
    """Recognise a context by its fields, for unknown services and for services that send another shape."""
    criteria = _criteria(context)
    if any("searchQuery" in item for item in criteria):
        return ContextKind.LOG_SEARCH_V2
    if any("metricName" in item for item in criteria):
        return ContextKind.METRIC
    if "SearchQuery" in context or "LinkToSearchResults" in context:
        return ContextKind.LOG_SEARCH_V1
    if "expression" in context and ("labels" in context or "expressionValue" in context):
        return ContextKind.PROMETHEUS
    if any(key in context for key in ("SmartDetectorId", "SmartDetectorName", "DetectionSummary")):
        return ContextKind.SMART_DETECTION
    if "AlertCategory" in context and _alert_data(context):
        return ContextKind.COST
    properties = _properties(context)
    operation = str(context.get("operationName") or "").lower()
    if "currentHealthStatus" in properties or operation.startswith("microsoft.resourcehealth/"):
        return ContextKind.RESOURCE_HEALTH
    if operation.startswith("microsoft.servicehealth/") or (
        "trackingId" in properties and "incidentType" in properties
    ):
        return ContextKind.SERVICE_HEALTH
    if "operationName" in context:
        return ContextKind.ACTIVITY_LOG
    return ContextKind.GENERIC


def _fits(kind: ContextKind, context: Mapping[str, Any]) -> bool:
    """Whether the context has the fields its service's summariser reads."""
    if kind in {ContextKind.METRIC, ContextKind.LOG_SEARCH_V2}:
        return bool(_criteria(context)) and _shape_kind(context) in {kind, ContextKind.GENERIC}
    if kind is ContextKind.LOG_SEARCH_V1:
        return "SearchQuery" in context or "LinkToSearchResults" in context
    if kind is ContextKind.PROMETHEUS:
        return "expression" in context or "labels" in context
    if kind is ContextKind.COST:
        return bool(_alert_data(context))
    if kind is ContextKind.SMART_DETECTION:
        return any(str(key).startswith(("SmartDetector", "Detect")) for key in context)
    return "operationName" in context or bool(_properties(context))


def classify_context(monitoring_service: str, context: object) -> ContextKind:
    """The context family: by monitoring service when its shape agrees, else by shape, else generic."""
    if not isinstance(context, Mapping) or not context:
        return ContextKind.GENERIC
    kind = _SERVICE_KINDS.get(_service_key(monitoring_service))
    if kind is None and _service_key(monitoring_service).startswith("activitylog"):
        kind = ContextKind.ACTIVITY_LOG
    if kind is not None and _fits(kind, context):
        return kind
    return _shape_kind(context)


# -- alertContext summaries ------------------------------------------------------------------------


def summarize_context(
    monitoring_service: str, context: object, custom_properties: object = None, limit: int = MAX_SUMMARY_CHARS
) -> str:
    """Readable plain text for the alertContext, at most ``limit`` characters; never raises on content.

    The summary is only a convenience in the ticket: an odd context must cost its summary, never
    the alert, so any failure inside a summariser falls back to the generic one, then to ''.
    """
    kind = classify_context(monitoring_service, context)
    mapping: Mapping[str, Any] = context if isinstance(context, Mapping) else {}
    lines: list[str] = []
    for summarise in (_SUMMARISERS[kind], _generic_lines):
        try:
            lines = summarise(mapping)
        except Exception:  # noqa: BLE001 - best effort by design, see docstring
            lines = []
        if lines:
            break
    with contextlib.suppress(Exception):
        lines += _custom_property_lines(custom_properties)
    return join_bounded([line for line in lines if line.strip()], limit)


def _custom_property_lines(custom_properties: object) -> list[str]:
    if not isinstance(custom_properties, Mapping) or not custom_properties:
        return []
    return [f"Custom properties: {pairs(custom_properties)}"]


def _metric_lines(context: Mapping[str, Any]) -> list[str]:
    condition = context.get("condition")
    condition = condition if isinstance(condition, Mapping) else {}
    window = plain(condition.get("windowSize"))
    condition_type = plain(context.get("conditionType"))
    criteria = _criteria(context)
    lines = [f"Metric condition{f' ({condition_type})' if condition_type else ''}:"]
    for item in criteria[:MAX_ITEMS]:
        name = plain(item.get("metricName")) or "(metric)"
        parts = [
            name,
            plain(item.get("timeAggregation")),
            plain(item.get("operator")),
            plain(item.get("threshold")),
        ]
        line = "- " + " ".join(part for part in parts if part)
        value = plain(item.get("metricValue"))
        if value:
            line += f" (value: {value})"
        if window:
            line += f" over {window}"
        split = dimensions(item.get("dimensions"))
        if split:
            line += f", dimensions {split}"
        extras = [
            labelled("namespace", item.get("metricNamespace"), sep=" "),
            labelled("sensitivity", item.get("alertSensitivity"), sep=" "),
            failing_periods(item.get("failingPeriods")),
            labelled("web test", item.get("webTestName"), sep=" "),
        ]
        extras = [extra for extra in extras if extra]
        if extras:
            line += f" [{'; '.join(extras)}]"
        lines.append(line)
    lines.append(more_line(len(criteria), "criteria"))
    lines.append(window_line(condition.get("windowStartTime"), condition.get("windowEndTime")))
    return lines if criteria else []


def _log_v1_lines(context: Mapping[str, Any]) -> list[str]:
    lines = [f"Log search query: {query_text(context.get('SearchQuery'))}"]
    start, end = context.get("SearchIntervalStartTimeUtc"), context.get("SearchIntervalEndtimeUtc")
    minutes = plain(context.get("SearchIntervalInMinutes") or context.get("SearchIntervalDurationMin"))
    window = window_line(start, end)
    if window and minutes:
        window += f" ({minutes} min)"
    lines.append(window)
    result = [
        labelled("result count", context.get("ResultCount"), sep=" "),
        labelled(
            "threshold", " ".join(plain(context.get(key)) for key in ("Operator", "Threshold")), sep=" "
        ),
        labelled("alert type", context.get("AlertType"), sep=" "),
    ]
    lines.append("Result: " + ", ".join(part for part in result if part) if any(result) else "")
    split = dimensions(context.get("Dimensions"))
    lines.append(f"Dimensions: {split}" if split else "")
    link = https_link(context.get("LinkToFilteredSearchResultsUI")) or https_link(
        context.get("LinkToSearchResults")
    )
    lines.append(f"Results: {link}" if link else "")
    return lines


def _log_v2_lines(context: Mapping[str, Any]) -> list[str]:
    condition = context.get("condition")
    condition = condition if isinstance(condition, Mapping) else {}
    criteria = _criteria(context)
    window = plain(condition.get("windowSize"))
    lines: list[str] = []
    for item in criteria[:MAX_ITEMS]:
        lines.append(f"Log search query: {query_text(item.get('searchQuery'))}")
        aggregation = plain(item.get("timeAggregation"))
        column = plain(item.get("metricMeasureColumn"))
        measure = f"{aggregation}({column})" if aggregation and column else aggregation or column
        parts = [measure, plain(item.get("operator")), plain(item.get("threshold"))]
        rule = " ".join(part for part in parts if part)
        value = plain(item.get("metricValue"))
        if rule or value:
            line = f"Condition: {rule}" if rule else "Condition:"
            line += f" (value: {value})" if value else ""
            line += f" over {window}" if window else ""
            failing = failing_periods(item.get("failingPeriods"))
            lines.append(line + (f", {failing}" if failing else ""))
        split = dimensions(item.get("dimensions"))
        lines.append(f"Dimensions: {split}" if split else "")
        targets = plain(item.get("targetResourceTypes"))
        lines.append(f"Target resource types: {targets}" if targets else "")
        link = https_link(item.get("linkToFilteredSearchResultsUI")) or https_link(
            item.get("linkToSearchResultsUI")
        )
        lines.append(f"Results: {link}" if link else "")
    lines.append(more_line(len(criteria), "criteria"))
    lines.append(window_line(condition.get("windowStartTime"), condition.get("windowEndTime")))
    return lines if criteria else []


def _activity_log_lines(context: Mapping[str, Any]) -> list[str]:
    properties = _properties(context)
    authorization = context.get("authorization")
    scope = plain(authorization.get("scope")) if isinstance(authorization, Mapping) else ""
    resource = scope or plain(properties.get("entity")) or plain(context.get("resourceId"))
    status = plain(context.get("status"))
    sub_status = plain(context.get("subStatus"))
    lines = [
        labelled("Operation", context.get("operationName")),
        f"Status: {status}{f' ({sub_status})' if sub_status else ''}" if status else "",
        labelled("Caller", context.get("caller")),
        labelled("Level", context.get("level")),
        f"Resource: {resource}" if resource else "",
        labelled("Event source", context.get("eventSource")),
        labelled("Event time", context.get("eventTimestamp")),
        labelled("Correlation id", context.get("correlationId")),
    ]
    lines += _activity_detail_lines(properties, context.get("operationName"))
    return lines if any(lines) else []


def _activity_detail_lines(properties: Mapping[str, Any], operation: object = None) -> list[str]:
    """The category-specific facts: security finding, policy, autoscale, Advisor recommendation."""
    lines: list[str] = []
    if "recommendationCategory" in properties or "recommendationName" in properties:
        lines.append(
            "Recommendation: "
            + ", ".join(
                f"{label} {plain(properties.get(key))}"
                for label, key in (
                    ("name", "recommendationName"),
                    ("category", "recommendationCategory"),
                    ("impact", "recommendationImpact"),
                    ("type", "recommendationType"),
                )
                if plain(properties.get(key))
            )
        )
        link = https_link(properties.get("recommendationResourceLink"))
        lines.append(f"Recommendation link: {link}" if link else "")
    if "policies" in properties:
        lines.extend(_policy_lines(properties.get("policies")))
    if "newInstancesCount" in properties or "oldInstancesCount" in properties:
        lines.append(
            f"Autoscale: {plain(properties.get('oldInstancesCount')) or '?'} -> "
            f"{plain(properties.get('newInstancesCount')) or '?'} instances"
        )
    security = [
        f"{label} {plain(properties.get(key))}"
        for label, key in (
            ("threat", "threatName"),
            ("category", "category"),
            ("severity", "severity"),
            ("entity", "compromisedEntity"),
            ("status", "threatStatus"),
            ("action", "actionTaken"),
            ("file", "filePath"),
        )
        if plain(properties.get(key))
    ]
    if "compromisedEntity" in properties or "threatStatus" in properties or "threatID" in properties:
        lines.append("Security finding: " + ", ".join(security))
    description = plain(properties.get("description")) or plain(properties.get("message"))
    if description and description != plain(operation):
        lines.append(f"Details: {one_line(description, VALUE_LIMIT * 2)}")
    return lines


def _policy_lines(policies: object) -> list[str]:
    if isinstance(policies, str):
        text = policies
        try:
            policies = json.loads(text)
        except ValueError:
            return [f"Policies: {one_line(text)}"]
    if not isinstance(policies, list):
        return []
    lines: list[str] = []
    for policy in policies[:MAX_ITEMS]:
        if isinstance(policy, Mapping):
            name = plain(policy.get("policyDefinitionName")) or plain(
                policy.get("policyDefinitionReferenceId")
            )
            effect = plain(policy.get("policyDefinitionEffect"))
            assignment = plain(policy.get("policyAssignmentName"))
            parts = [f"definition {name}" if name else "", f"effect {effect}" if effect else ""]
            parts.append(f"assignment {assignment}" if assignment else "")
            lines.append("Policy: " + ", ".join(part for part in parts if part))
    lines.append(more_line(len(policies), "policies"))
    return lines


def _service_health_lines(context: Mapping[str, Any]) -> list[str]:
    properties = _properties(context)
    title = plain(properties.get("title")) or plain(properties.get("defaultLanguageTitle"))
    services = _impacted_services(properties.get("impactedServices"))
    if not services:
        place = ", ".join(
            part for part in (plain(properties.get("service")), plain(properties.get("region"))) if part
        )
        services = [place] if place else []
    impact = window_line(properties.get("impactStartTime"), properties.get("impactMitigationTime"))
    communication = properties.get("communication") or properties.get("defaultLanguageContent")
    text = strip_html(communication[: COMMUNICATION_LIMIT * 20]) if isinstance(communication, str) else ""
    lines = [
        f"Service health: {one_line(title)}" if title else "",
        f"Impacted: {'; '.join(services)}" if services else "",
        labelled("Tracking id", properties.get("trackingId")),
        labelled("Incident type", properties.get("incidentType")),
        labelled("Stage", properties.get("stage")),
        impact.replace("Window:", "Impact:", 1) if impact else "",
        labelled("Status", context.get("status")),
    ]
    if text:
        lines += ["Communication:", clip(text, COMMUNICATION_LIMIT)]
    return lines if any(lines) else _activity_log_lines(context)


def _impacted_services(value: object) -> list[str]:
    """'[{"ServiceName": "...", "ImpactedRegions": [{"RegionName": "..."}]}]' (a JSON string) -> text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    services: list[str] = []
    for service in value[:MAX_ITEMS]:
        if not isinstance(service, Mapping):
            continue
        regions = service.get("ImpactedRegions")
        names = [
            plain(region.get("RegionName"))
            for region in (regions if isinstance(regions, list) else [])[:MAX_PAIRS]
            if isinstance(region, Mapping)
        ]
        name = plain(service.get("ServiceName"))
        regions_text = ", ".join(region for region in names if region)
        if name:
            services.append(f"{name} ({regions_text})" if regions_text else name)
    return services


def _resource_health_lines(context: Mapping[str, Any]) -> list[str]:
    properties = _properties(context)
    current = plain(properties.get("currentHealthStatus"))
    previous = plain(properties.get("previousHealthStatus"))
    lines = [
        labelled("Resource health", properties.get("title")),
        f"Health: {previous or '?'} -> {current or '?'}" if current or previous else "",
        labelled("Cause", properties.get("cause")),
        labelled("Type", properties.get("type")),
        labelled("Details", properties.get("details")),
        labelled("Status", context.get("status")),
        labelled("Operation", context.get("operationName")),
        labelled("Event time", context.get("eventTimestamp")),
    ]
    return lines if any(lines) else _activity_log_lines(context)


def _smart_detection_lines(context: Mapping[str, Any]) -> list[str]:
    detector = plain(context.get("SmartDetectorName"))
    detector_id = plain(context.get("SmartDetectorId"))
    name = f"{detector} ({detector_id})" if detector and detector_id else detector or detector_id
    lines = [
        f"Smart detector: {name}" if name else "",
        labelled("Detection", context.get("DetectionSummary")),
        labelled("Detected value", context.get("DetectedValue")),
        labelled("Normal value", context.get("NormalValue")),
        labelled("Occurred", context.get("FormattedOccurrenceTime")),
        labelled("Analysed", context.get("AnalysisTimestamp")),
    ]
    return lines if any(lines) else []


def _prometheus_lines(context: Mapping[str, Any]) -> list[str]:
    labels = context.get("labels")
    annotations = context.get("annotations")
    annotations = annotations if isinstance(annotations, Mapping) else {}
    rule_group = plain(context.get("ruleGroup"))
    timing = [
        labelled("for", context.get("for"), sep=" "),
        labelled("evaluated every", context.get("interval"), sep=" "),
    ]
    lines = [
        labelled("Prometheus expression", context.get("expression"), limit=QUERY_LIMIT),
        labelled("Value", context.get("expressionValue")),
        f"Timing: {', '.join(part for part in timing if part)}" if any(timing) else "",
        f"Labels: {pairs(labels)}" if isinstance(labels, Mapping) and labels else "",
        *(
            f"{str(key).capitalize()}: {one_line(plain(annotations.get(key)), VALUE_LIMIT * 2)}"
            for key in ("summary", "description")
            if plain(annotations.get(key))
        ),
        f"Rule group: {resource_name(rule_group)}" if rule_group else "",
    ]
    return lines if any(lines) else []


def _cost_lines(context: Mapping[str, Any]) -> list[str]:
    data = _alert_data(context)
    name = plain(data.get("BudgetName"))
    kinds = [
        f"{plain(data.get('BudgetType'))} budget" if plain(data.get("BudgetType")) else "",
        f"{plain(data.get('ThresholdType')).lower()} spend" if plain(data.get("ThresholdType")) else "",
    ]
    kind_text = ", ".join(part for part in kinds if part)
    spent, budget = plain(data.get("SpentAmount")), plain(data.get("BudgetThreshold"))
    threshold = plain(data.get("NotificationThresholdAmount"))
    amounts = [
        f"spent {spent}" if spent else "",
        f"budget {budget}" if budget else "",
        f"notification threshold {threshold}" if threshold else "",
        f"unit {plain(data.get('Unit'))}" if plain(data.get("Unit")) else "",
    ]
    lines = [
        f"Budget: {name}{f' ({kind_text})' if kind_text else ''}" if name else "",
        "Amounts: " + ", ".join(part for part in amounts if part) if any(amounts) else "",
        labelled("Forecast for the period", data.get("ForecastedTotalForPeriod")),
        labelled("Scope", data.get("Scope")),
        labelled("Budget period start", data.get("BudgetStartDate")),
        labelled("Budget id", data.get("BudgetId")),
        labelled("Alert category", context.get("AlertCategory")),
    ]
    return lines if any(lines) else []


def _generic_lines(context: Mapping[str, Any]) -> list[str]:
    """Unknown services: the top-level keys, one short line each."""
    lines: list[str] = []
    for key, value in list(context.items())[:MAX_PAIRS]:
        if value is None or value in ("", [], {}):
            continue
        lines.append(f"{one_line(str(key), 60)}: {compact(value, 150)}")
    lines.append(more_line(len(context), "fields", MAX_PAIRS))
    return lines


_SUMMARISERS: dict[ContextKind, Callable[[Mapping[str, Any]], list[str]]] = {
    ContextKind.METRIC: _metric_lines,
    ContextKind.LOG_SEARCH_V1: _log_v1_lines,
    ContextKind.LOG_SEARCH_V2: _log_v2_lines,
    ContextKind.ACTIVITY_LOG: _activity_log_lines,
    ContextKind.SERVICE_HEALTH: _service_health_lines,
    ContextKind.RESOURCE_HEALTH: _resource_health_lines,
    ContextKind.SMART_DETECTION: _smart_detection_lines,
    ContextKind.PROMETHEUS: _prometheus_lines,
    ContextKind.COST: _cost_lines,
    ContextKind.GENERIC: _generic_lines,
}


# -- text helpers ----------------------------------------------------------------------------------


# -- facts for the essentials ------------------------------------------------------------------------

RESOLVED_STAGES = frozenset({"resolved", "complete", "completed", "canceled", "cancelled", "rca"})
"""Service Health stages after which the event is over: an incident resolved (its RCA follows
later as another notification), a maintenance completed or cancelled."""
RECOVERED_HEALTH = frozenset({"available"})
"""Resource Health states that end an outage (from Unavailable, Degraded or Unknown)."""


@dataclass(frozen=True)
class ContextFacts:
    """What the essentials lack and the context of some services carries."""

    kind: ContextKind
    rule_name: str = ""
    """A name for the alert when ``alertRule`` is null (the budget's name)."""
    rule_id: str = ""
    """A stable id of what raised it when ``alertRuleID`` is absent (the budget's ARM id)."""
    scope: str = ""
    """The ARM scope the alert is about when ``alertTargetIDs`` is null (the budget's scope)."""
    listed_items_are_categories: bool = False
    """``configurationItems`` names the alert's category ("budgets"), not configuration items."""
    recovered: bool = False
    """This "Fired" notification reports the recovery of its problem."""
    problem_key: str = ""
    """The source's stable identity of the problem (a service health tracking id, a resource)."""
    subscription_name: str = ""


def context_facts(monitoring_service: str, context: object, target_ids: Sequence[str]) -> ContextFacts:
    """The facts of one context; never raises on content (an odd context costs its facts, not the alert)."""
    kind = classify_context(monitoring_service, context)
    if not isinstance(context, Mapping):
        return ContextFacts(kind)
    with contextlib.suppress(Exception):
        return _FACT_READERS.get(kind, _no_facts)(kind, context, target_ids)
    return ContextFacts(kind)


def _no_facts(kind: ContextKind, context: Mapping[str, Any], target_ids: Sequence[str]) -> ContextFacts:
    return ContextFacts(kind, subscription_name=_subscription_name(context))


def _cost_facts(kind: ContextKind, context: Mapping[str, Any], target_ids: Sequence[str]) -> ContextFacts:
    data = _alert_data(context)
    scope = plain(data.get("Scope"), 2_000).rstrip("/")
    return ContextFacts(
        kind,
        rule_name=plain(data.get("BudgetName"), 256),
        rule_id=plain(data.get("BudgetId"), 2_000),
        scope=scope if scope.startswith("/") else "",
        listed_items_are_categories=True,
        subscription_name=_subscription_name(context),
    )


def _service_health_facts(
    kind: ContextKind, context: Mapping[str, Any], target_ids: Sequence[str]
) -> ContextFacts:
    properties = _properties(context)
    stage = plain(properties.get("stage")).lower()
    status = plain(context.get("status")).lower()
    tracking_id = plain(properties.get("trackingId"), 128)
    return ContextFacts(
        kind,
        recovered=stage in RESOLVED_STAGES or status == "resolved",
        problem_key=f"service-health:{tracking_id}" if tracking_id else "",
        subscription_name=_subscription_name(context),
    )


def _resource_health_facts(
    kind: ContextKind, context: Mapping[str, Any], target_ids: Sequence[str]
) -> ContextFacts:
    properties = _properties(context)
    current = plain(properties.get("currentHealthStatus")).lower()
    operation = plain(context.get("operationName")).lower()
    recovered = current in RECOVERED_HEALTH if current else "/resolved/" in operation
    resource = next((target.strip().rstrip("/") for target in target_ids if target.strip()), "")
    return ContextFacts(
        kind,
        recovered=recovered,
        problem_key=f"resource-health:{resource.lower()}" if resource else "",
        subscription_name=_subscription_name(context),
    )


_FACT_READERS: dict[ContextKind, Callable[[ContextKind, Mapping[str, Any], Sequence[str]], ContextFacts]] = {
    ContextKind.COST: _cost_facts,
    ContextKind.SERVICE_HEALTH: _service_health_facts,
    ContextKind.RESOURCE_HEALTH: _resource_health_facts,
}


def _subscription_name(context: Mapping[str, Any]) -> str:
    """The subscription's display name where a context carries one (top level, ``properties`` or
    ``AlertData``): the name people know a subscription-scoped alert by."""
    for where in (context, _properties(context), _alert_data(context)):
        for key in ("subscriptionName", "SubscriptionName", "subscriptionDisplayName"):
            name = plain(where.get(key), 128)
            if name:
                return name
    return ""
