"""Azure Monitor Common Alert Schema: validate a webhook payload and reduce it to an ``AlertSignal``.

Only ``data.essentials`` is validated strictly, because the rest of the app keys on it (ids,
severity, condition, times). ``data.alertContext`` differs per monitoring service and Azure keeps
adding fields and services, so it is never validated: it is classified by monitoring service (and
by shape when the service is unknown or the shape does not match) and summarised best-effort into
bounded plain text. Every model tolerates extra fields.

    payload ─ schemaId == "azureMonitorCommonAlertSchema"?      no  -> NotCommonSchemaError
            └ data.essentials valid (CommonAlertPayload)?       no  -> AlertSchemaError(path)
            └ AlertSignal + summarize_context(alertContext)     never raises on context content
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticSerializationError

from shared_code.domain.alert import AlertSignal, MonitorCondition, Severity
from shared_code.errors import AlertSchemaError, NotCommonSchemaError

COMMON_SCHEMA_ID = "azureMonitorCommonAlertSchema"
PORTAL_ALERT_URL = (
    "https://portal.azure.com/#view/Microsoft_Azure_Monitoring_Alerts/AlertDetails.ReactView/alertId~/"
)
MAX_SUMMARY_CHARS = 4_000
MAX_STORED_SIGNAL_UNITS = 30_000
"""The normalised alert is stored as one Table Storage string property, which holds at most 64 KiB
of UTF-16 (32,768 code units): serialised, it is kept below this."""
MAX_LINK_CHARS = 2_000
EARLIEST_TIME = datetime(1601, 1, 1, tzinfo=UTC)
"""Table Storage refuses an Edm.DateTime before this, so an alert time before it is refused."""
ENABLE_COMMON_SCHEMA_HINT = (
    "Enable the common alert schema in the action group: edit the webhook action and set "
    "'Enable the common alert schema' to Yes."
)

_QUERY_LIMIT = 1_000
_VALUE_LIMIT = 300
_COMMUNICATION_LIMIT = 1_200
_MAX_ITEMS = 10
_MAX_PAIRS = 20
_MAX_ERROR_PATHS = 3


# -- lenient field types ------------------------------------------------------------------------


def _text_or_none(value: object) -> object:
    """Optional text: Azure sends null, '' or now and then a number; none of that is an error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return None


def _text_list(value: object) -> list[str]:
    """Optional id/name lists: null, a lone string or mixed junk become a clean list of strings."""
    if value is None:
        return []
    items: Iterable[object] = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [item.strip() for item in items if isinstance(item, str) and item.strip()]


def _required_text(value: object) -> object:
    """Required ids and names: stripped, and a blank one is as bad as a missing one."""
    if isinstance(value, str):
        if not value.strip():
            raise PydanticCustomError("blank", "must not be empty")
        return value.strip()
    return value


def _severity(value: object) -> object:
    """'Sev3' in any case; anything else is the sender's bug and is reported at its path."""
    if isinstance(value, Severity):
        return value
    if isinstance(value, str):
        for severity in Severity:
            if value.strip().lower() == severity.value.lower():
                return severity
    raise PydanticCustomError(
        "invalid_severity", "must be one of Sev0, Sev1, Sev2, Sev3 or Sev4, not {got}", {"got": _shown(value)}
    )


def _condition(value: object) -> object:
    """'Fired' or 'Resolved' in any case."""
    if isinstance(value, MonitorCondition):
        return value
    if isinstance(value, str):
        for condition in MonitorCondition:
            if value.strip().lower() == condition.value.lower():
                return condition
    raise PydanticCustomError(
        "invalid_condition", "must be Fired or Resolved, not {got}", {"got": _shown(value)}
    )


_LONG_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_azure_datetime(value: object) -> datetime:
    """An aware UTC datetime from Azure's ISO 8601 text (7 fractional digits, 'Z'); naive means UTC.

    Azure's .NET serialiser writes 100 ns ticks (``2023-03-21T15:36:25.0234567Z``); Python keeps
    microseconds, so the 7th digit is dropped rather than rejected.
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and value.strip():
        text = _LONG_FRACTION.sub(r"\1", value.strip())
        if text[-1] in "zZ":
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise PydanticCustomError(
                "invalid_datetime", "is not an ISO 8601 date-time: {got}", {"got": _shown(value)}
            ) from None
    else:
        raise PydanticCustomError(
            "invalid_datetime", "must be an ISO 8601 date-time, not {got}", {"got": _shown(value)}
        )
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise PydanticCustomError(
            "datetime_out_of_range", "is out of range once converted to UTC: {got}", {"got": _shown(value)}
        ) from None
    if moment < EARLIEST_TIME:
        raise PydanticCustomError(
            "datetime_too_early",
            "is before 1601-01-01T00:00:00Z, the earliest time Table Storage stores: {got}",
            {"got": _shown(value)},
        )
    return moment


def _optional_datetime(value: object) -> datetime | None:
    return (
        None
        if value is None or (isinstance(value, str) and not value.strip())
        else parse_azure_datetime(value)
    )


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


_Text = Annotated[str | None, BeforeValidator(_text_or_none)]
_TextList = Annotated[list[str], BeforeValidator(_text_list)]
_RequiredText = Annotated[str, BeforeValidator(_required_text)]
_SeverityField = Annotated[Severity, BeforeValidator(_severity)]
_ConditionField = Annotated[MonitorCondition, BeforeValidator(_condition)]
_Moment = Annotated[datetime, BeforeValidator(parse_azure_datetime)]
_OptionalMoment = Annotated[datetime | None, BeforeValidator(_optional_datetime)]


# -- models ------------------------------------------------------------------------------------


class Essentials(BaseModel):
    """``data.essentials``: the fields every alert type shares. Unknown fields are kept, not refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    alert_id: _RequiredText = Field(alias="alertId")
    alert_rule: _RequiredText = Field(alias="alertRule")
    severity: _SeverityField
    signal_type: _Text = Field(default=None, alias="signalType")
    monitor_condition: _ConditionField = Field(alias="monitorCondition")
    monitoring_service: _RequiredText = Field(alias="monitoringService")
    alert_target_ids: _TextList = Field(default_factory=list, alias="alertTargetIDs")
    configuration_items: _TextList = Field(default_factory=list, alias="configurationItems")
    origin_alert_id: _Text = Field(default=None, alias="originAlertId")
    fired_date_time: _Moment = Field(alias="firedDateTime")
    resolved_date_time: _OptionalMoment = Field(default=None, alias="resolvedDateTime")
    description: _Text = None
    # the docs spell it both ways, and it is absent from many payloads
    alert_rule_id: _Text = Field(default=None, validation_alias=AliasChoices("alertRuleID", "alertRuleId"))
    investigation_link: _Text = Field(default=None, alias="investigationLink")
    target_resource_group: _Text = Field(default=None, alias="targetResourceGroup")
    target_resource_type: _Text = Field(default=None, alias="targetResourceType")
    essentials_version: _Text = Field(default=None, alias="essentialsVersion")
    alert_context_version: _Text = Field(default=None, alias="alertContextVersion")


class AlertData(BaseModel):
    """``data``: essentials (validated), alertContext and customProperties (kept as sent)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    essentials: Essentials
    alert_context: Any = Field(default=None, alias="alertContext")
    custom_properties: Any = Field(default=None, alias="customProperties")

    @property
    def context(self) -> dict[str, Any]:
        """alertContext as a dict ({} when Azure sent null or something that is not an object)."""
        return self.alert_context if isinstance(self.alert_context, dict) else {}


class CommonAlertPayload(BaseModel):
    """The whole webhook body under the Common Alert Schema."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    schema_id: Literal["azureMonitorCommonAlertSchema"] = Field(alias="schemaId")
    data: AlertData


# -- parse_alert ---------------------------------------------------------------------------------


def parse_alert(payload: object) -> AlertSignal:
    """Validate a decoded webhook body and normalise it; errors name the offending field's path."""
    _require_common_schema(payload)
    try:
        parsed = CommonAlertPayload.model_validate(payload)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    return to_signal(parsed)


def to_signal(parsed: CommonAlertPayload) -> AlertSignal:
    """The normalised signal for an already validated payload."""
    essentials = parsed.data.essentials
    resolved = essentials.monitor_condition is MonitorCondition.RESOLVED
    signal = AlertSignal(
        alert_id=essentials.alert_id,
        origin_alert_id=essentials.origin_alert_id or "",
        rule=essentials.alert_rule,
        rule_id=rule_id_for(essentials),
        severity=essentials.severity,
        signal_type=essentials.signal_type or "",
        monitoring_service=essentials.monitoring_service,
        condition=essentials.monitor_condition,
        fired_at=essentials.fired_date_time,
        # a Fired notification carrying a resolvedDateTime must not look like a resolution
        resolved_at=essentials.resolved_date_time if resolved else None,
        target_ids=tuple(essentials.alert_target_ids),
        configuration_items=configuration_items_for(essentials),
        description=(essentials.description or "").strip(),
        context_summary=summarize_context(
            essentials.monitoring_service, parsed.data.alert_context, parsed.data.custom_properties
        ),
        portal_link=portal_link_for(essentials),
    )
    return bounded_signal(signal)


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def bounded_signal(signal: AlertSignal, limit: int = MAX_STORED_SIGNAL_UNITS) -> AlertSignal:
    """The signal, shortened only as far as it must be to fit ``limit`` once serialised.

    Only outsized payloads are touched (a rule description of many KiB, hundreds of targets or
    configuration items): free text is cut first, then the lists; the ids that identify the alert
    never are. One whose ids alone are that large is refused: no Azure id comes near it.
    """
    description, summary = signal.description, signal.context_summary
    targets, items = signal.target_ids, signal.configuration_items
    steps: list[dict[str, object]] = [
        {"description": _clip(description, 2_000)},
        {"target_ids": targets[:_MAX_ITEMS], "configuration_items": items[:50]},
        {"context_summary": _clip(summary, 1_000), "description": _clip(description, 300)},
        {"target_ids": targets[:1], "configuration_items": items[:5]},
        {"context_summary": "", "description": "", "target_ids": (), "configuration_items": ()},
    ]
    for changes in [{}, *steps]:
        signal = signal.model_copy(update=changes)
        try:
            serialised = signal.model_dump_json()
        except PydanticSerializationError:  # decode_json_body refuses these first; this is the backstop
            raise AlertSchemaError(
                "data", "holds text with an unpaired UTF-16 surrogate, which is not a Unicode character"
            ) from None
        if _utf16_units(serialised) <= limit:
            return signal
    raise AlertSchemaError("data.essentials", "the alert's ids and names are too long to store")


def _require_common_schema(payload: object) -> None:
    if not isinstance(payload, dict):
        raise NotCommonSchemaError(
            "schemaId",
            f"the body is a JSON {_json_kind(payload)}, not a Common Alert Schema object. "
            + ENABLE_COMMON_SCHEMA_HINT,
        )
    schema_id = payload.get("schemaId")
    if schema_id != COMMON_SCHEMA_ID:
        raise NotCommonSchemaError(
            "schemaId",
            f"{_legacy_kind(payload, schema_id)}, not the Common Alert Schema "
            f"(schemaId {COMMON_SCHEMA_ID!r}). {ENABLE_COMMON_SCHEMA_HINT}",
        )
    data = payload.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("essentials"), dict):
        raise NotCommonSchemaError(
            "data.essentials",
            "the payload says it is the Common Alert Schema but has no data.essentials object",
        )


def _legacy_kind(payload: Mapping[str, Any], schema_id: object) -> str:
    """Say which old format this looks like, so the user knows which action group to fix."""
    if schema_id == "AzureMonitorMetricAlert":
        return "this is a metric alert in the legacy (non-common) webhook format"
    if schema_id == "Microsoft.Insights/activityLogs":
        return "this is an activity log alert in the legacy (non-common) webhook format"
    if "AlertRuleName" in payload or "SearchQuery" in payload:
        return "this is a log search alert in the legacy (non-common) webhook format"
    if isinstance(payload.get("context"), dict) and "status" in payload:
        return "this is a classic alert in the legacy webhook format"
    if schema_id is None:
        return "the payload has no schemaId"
    return f"the payload's schemaId is {_shown(schema_id)}"


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else type(value).__name__


def error_path(loc: Sequence[int | str]) -> str:
    """('data', 'essentials', 'alertTargetIDs', 0) -> 'data.essentials.alertTargetIDs[0]'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _error_message(error: ErrorDetails) -> str:
    if error["type"] == "missing":
        return "is required"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if error["type"] == "string_type":
        return f"must be a string, not {_shown(error.get('input'))}"
    if error["type"] in {"model_type", "model_attributes_type", "dict_type"}:
        return "must be an object"
    return message[:1].lower() + message[1:]


def _schema_error(exc: ValidationError) -> AlertSchemaError:
    """The first problem as (path, message), plus how many more and where: one round trip fixes all."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    path = error_path(first["loc"])
    message = _error_message(first)
    if len(errors) > 1:
        others = [error_path(error["loc"]) for error in errors[1:]]
        shown = ", ".join(others[:_MAX_ERROR_PATHS]) + (", …" if len(others) > _MAX_ERROR_PATHS else "")
        noun = "problem" if len(others) == 1 else "problems"
        message += f" (and {len(others)} more {noun}: {shown})"
    return AlertSchemaError(path, message)


# -- derived essentials ----------------------------------------------------------------------------


def resource_name(resource_id: str) -> str:
    """The last path segment of an ARM id: the resource's name."""
    return resource_id.rstrip("/").rsplit("/", 1)[-1].strip()


def configuration_items_for(essentials: Essentials) -> tuple[str, ...]:
    """configurationItems, else the target resource names; de-duplicated (ARM names ignore case)."""
    names = essentials.configuration_items or [
        resource_name(target) for target in essentials.alert_target_ids
    ]
    seen: set[str] = set()
    items: list[str] = []
    for name in names:
        if name and name.lower() not in seen:
            seen.add(name.lower())
            items.append(name)
    return tuple(items)


_SUBSCRIPTION = re.compile(r"/subscriptions/([^/]+)", re.IGNORECASE)


def rule_id_for(essentials: Essentials) -> str:
    """alertRuleID when Azure sends it; otherwise a stable stand-in built from what every payload has.

    The stand-in is ``<subscription>:<monitoringService>:<alertRule>`` (subscription from alertId,
    else the first target). It deliberately does not look like an ARM id: the rule's resource group
    is not in the payload, and the target cannot be used because a multi-resource rule fires one
    alert per target, which must still count as one rule.
    """
    if essentials.alert_rule_id and essentials.alert_rule_id.strip():
        return essentials.alert_rule_id.strip()
    subscription = ""
    for candidate in (essentials.alert_id, *essentials.alert_target_ids):
        match = _SUBSCRIPTION.search(candidate)
        if match:
            subscription = match.group(1).lower()
            break
    parts = (subscription, essentials.monitoring_service, essentials.alert_rule)
    return ":".join(part for part in parts if part)


def portal_link_for(essentials: Essentials) -> str:
    """investigationLink when it is an https link; otherwise the alert's details blade in the portal."""
    link = (essentials.investigation_link or "").strip()
    if link.lower().startswith("https://") and len(link) <= MAX_LINK_CHARS:
        return link
    return PORTAL_ALERT_URL + quote(essentials.alert_id, safe="")


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
}


def _service_key(monitoring_service: str) -> str:
    return re.sub(r"[^a-z0-9]", "", monitoring_service.lower())


def _criteria(context: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    condition = context.get("condition")
    all_of = condition.get("allOf") if isinstance(condition, Mapping) else None
    return [item for item in all_of if isinstance(item, Mapping)] if isinstance(all_of, list) else []


def _properties(context: Mapping[str, Any]) -> Mapping[str, Any]:
    properties = context.get("properties")
    return properties if isinstance(properties, Mapping) else {}


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
    return _join_bounded([line for line in lines if line.strip()], limit)


def _custom_property_lines(custom_properties: object) -> list[str]:
    if not isinstance(custom_properties, Mapping) or not custom_properties:
        return []
    return [f"Custom properties: {_pairs(custom_properties)}"]


def _metric_lines(context: Mapping[str, Any]) -> list[str]:
    condition = context.get("condition")
    condition = condition if isinstance(condition, Mapping) else {}
    window = _text(condition.get("windowSize"))
    condition_type = _text(context.get("conditionType"))
    criteria = _criteria(context)
    lines = [f"Metric condition{f' ({condition_type})' if condition_type else ''}:"]
    for item in criteria[:_MAX_ITEMS]:
        name = _text(item.get("metricName")) or "(metric)"
        parts = [
            name,
            _text(item.get("timeAggregation")),
            _text(item.get("operator")),
            _text(item.get("threshold")),
        ]
        line = "- " + " ".join(part for part in parts if part)
        value = _text(item.get("metricValue"))
        if value:
            line += f" (value: {value})"
        if window:
            line += f" over {window}"
        dimensions = _dimensions(item.get("dimensions"))
        if dimensions:
            line += f", dimensions {dimensions}"
        extras = [
            _labelled("namespace", item.get("metricNamespace"), sep=" "),
            _labelled("sensitivity", item.get("alertSensitivity"), sep=" "),
            _failing_periods(item.get("failingPeriods")),
            _labelled("web test", item.get("webTestName"), sep=" "),
        ]
        extras = [extra for extra in extras if extra]
        if extras:
            line += f" [{'; '.join(extras)}]"
        lines.append(line)
    lines.append(_more(len(criteria), "criteria"))
    lines.append(_window_line(condition.get("windowStartTime"), condition.get("windowEndTime")))
    return lines if criteria else []


def _log_v1_lines(context: Mapping[str, Any]) -> list[str]:
    lines = [f"Log search query: {_query(context.get('SearchQuery'))}"]
    start, end = context.get("SearchIntervalStartTimeUtc"), context.get("SearchIntervalEndtimeUtc")
    minutes = _text(context.get("SearchIntervalInMinutes") or context.get("SearchIntervalDurationMin"))
    window = _window_line(start, end)
    if window and minutes:
        window += f" ({minutes} min)"
    lines.append(window)
    result = [
        _labelled("result count", context.get("ResultCount"), sep=" "),
        _labelled(
            "threshold", " ".join(_text(context.get(key)) for key in ("Operator", "Threshold")), sep=" "
        ),
        _labelled("alert type", context.get("AlertType"), sep=" "),
    ]
    lines.append("Result: " + ", ".join(part for part in result if part) if any(result) else "")
    dimensions = _dimensions(context.get("Dimensions"))
    lines.append(f"Dimensions: {dimensions}" if dimensions else "")
    link = _link(context.get("LinkToFilteredSearchResultsUI")) or _link(context.get("LinkToSearchResults"))
    lines.append(f"Results: {link}" if link else "")
    return lines


def _log_v2_lines(context: Mapping[str, Any]) -> list[str]:
    condition = context.get("condition")
    condition = condition if isinstance(condition, Mapping) else {}
    criteria = _criteria(context)
    window = _text(condition.get("windowSize"))
    lines: list[str] = []
    for item in criteria[:_MAX_ITEMS]:
        lines.append(f"Log search query: {_query(item.get('searchQuery'))}")
        aggregation = _text(item.get("timeAggregation"))
        column = _text(item.get("metricMeasureColumn"))
        measure = f"{aggregation}({column})" if aggregation and column else aggregation or column
        parts = [measure, _text(item.get("operator")), _text(item.get("threshold"))]
        rule = " ".join(part for part in parts if part)
        value = _text(item.get("metricValue"))
        if rule or value:
            line = f"Condition: {rule}" if rule else "Condition:"
            line += f" (value: {value})" if value else ""
            line += f" over {window}" if window else ""
            failing = _failing_periods(item.get("failingPeriods"))
            lines.append(line + (f", {failing}" if failing else ""))
        dimensions = _dimensions(item.get("dimensions"))
        lines.append(f"Dimensions: {dimensions}" if dimensions else "")
        targets = _text(item.get("targetResourceTypes"))
        lines.append(f"Target resource types: {targets}" if targets else "")
        link = _link(item.get("linkToFilteredSearchResultsUI")) or _link(item.get("linkToSearchResultsUI"))
        lines.append(f"Results: {link}" if link else "")
    lines.append(_more(len(criteria), "criteria"))
    lines.append(_window_line(condition.get("windowStartTime"), condition.get("windowEndTime")))
    return lines if criteria else []


def _activity_log_lines(context: Mapping[str, Any]) -> list[str]:
    properties = _properties(context)
    authorization = context.get("authorization")
    scope = _text(authorization.get("scope")) if isinstance(authorization, Mapping) else ""
    resource = scope or _text(properties.get("entity")) or _text(context.get("resourceId"))
    status = _text(context.get("status"))
    sub_status = _text(context.get("subStatus"))
    lines = [
        _labelled("Operation", context.get("operationName")),
        f"Status: {status}{f' ({sub_status})' if sub_status else ''}" if status else "",
        _labelled("Caller", context.get("caller")),
        _labelled("Level", context.get("level")),
        f"Resource: {resource}" if resource else "",
        _labelled("Event source", context.get("eventSource")),
        _labelled("Event time", context.get("eventTimestamp")),
        _labelled("Correlation id", context.get("correlationId")),
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
                f"{label} {_text(properties.get(key))}"
                for label, key in (
                    ("name", "recommendationName"),
                    ("category", "recommendationCategory"),
                    ("impact", "recommendationImpact"),
                    ("type", "recommendationType"),
                )
                if _text(properties.get(key))
            )
        )
        link = _link(properties.get("recommendationResourceLink"))
        lines.append(f"Recommendation link: {link}" if link else "")
    if "policies" in properties:
        lines.extend(_policy_lines(properties.get("policies")))
    if "newInstancesCount" in properties or "oldInstancesCount" in properties:
        lines.append(
            f"Autoscale: {_text(properties.get('oldInstancesCount')) or '?'} -> "
            f"{_text(properties.get('newInstancesCount')) or '?'} instances"
        )
    security = [
        f"{label} {_text(properties.get(key))}"
        for label, key in (
            ("threat", "threatName"),
            ("category", "category"),
            ("severity", "severity"),
            ("entity", "compromisedEntity"),
            ("status", "threatStatus"),
            ("action", "actionTaken"),
            ("file", "filePath"),
        )
        if _text(properties.get(key))
    ]
    if "compromisedEntity" in properties or "threatStatus" in properties or "threatID" in properties:
        lines.append("Security finding: " + ", ".join(security))
    description = _text(properties.get("description")) or _text(properties.get("message"))
    if description and description != _text(operation):
        lines.append(f"Details: {_one_line(description, _VALUE_LIMIT * 2)}")
    return lines


def _policy_lines(policies: object) -> list[str]:
    if isinstance(policies, str):
        text = policies
        try:
            policies = json.loads(text)
        except ValueError:
            return [f"Policies: {_one_line(text)}"]
    if not isinstance(policies, list):
        return []
    lines: list[str] = []
    for policy in policies[:_MAX_ITEMS]:
        if isinstance(policy, Mapping):
            name = _text(policy.get("policyDefinitionName")) or _text(
                policy.get("policyDefinitionReferenceId")
            )
            effect = _text(policy.get("policyDefinitionEffect"))
            assignment = _text(policy.get("policyAssignmentName"))
            parts = [f"definition {name}" if name else "", f"effect {effect}" if effect else ""]
            parts.append(f"assignment {assignment}" if assignment else "")
            lines.append("Policy: " + ", ".join(part for part in parts if part))
    lines.append(_more(len(policies), "policies"))
    return lines


_TAG = re.compile(r"<[^>]*>")
_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/tr|/h\d)\s*/?\s*>", re.IGNORECASE)


def strip_html(text: str) -> str:
    """Service Health communications are HTML; tickets want plain text with the paragraphs kept."""
    plain = html.unescape(_TAG.sub("", _BREAK.sub("\n", text))).replace("\xa0", " ")
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in plain.split("\n")]
    return "\n".join(line for line in lines if line)


def _service_health_lines(context: Mapping[str, Any]) -> list[str]:
    properties = _properties(context)
    title = _text(properties.get("title")) or _text(properties.get("defaultLanguageTitle"))
    services = _impacted_services(properties.get("impactedServices"))
    if not services:
        place = ", ".join(
            part for part in (_text(properties.get("service")), _text(properties.get("region"))) if part
        )
        services = [place] if place else []
    impact = _window_line(properties.get("impactStartTime"), properties.get("impactMitigationTime"))
    communication = properties.get("communication") or properties.get("defaultLanguageContent")
    text = strip_html(communication[: _COMMUNICATION_LIMIT * 20]) if isinstance(communication, str) else ""
    lines = [
        f"Service health: {_one_line(title)}" if title else "",
        f"Impacted: {'; '.join(services)}" if services else "",
        _labelled("Tracking id", properties.get("trackingId")),
        _labelled("Incident type", properties.get("incidentType")),
        _labelled("Stage", properties.get("stage")),
        impact.replace("Window:", "Impact:", 1) if impact else "",
        _labelled("Status", context.get("status")),
    ]
    if text:
        lines += ["Communication:", _clip(text, _COMMUNICATION_LIMIT)]
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
    for service in value[:_MAX_ITEMS]:
        if not isinstance(service, Mapping):
            continue
        regions = service.get("ImpactedRegions")
        names = [
            _text(region.get("RegionName"))
            for region in (regions if isinstance(regions, list) else [])[:_MAX_PAIRS]
            if isinstance(region, Mapping)
        ]
        name = _text(service.get("ServiceName"))
        regions_text = ", ".join(region for region in names if region)
        if name:
            services.append(f"{name} ({regions_text})" if regions_text else name)
    return services


def _resource_health_lines(context: Mapping[str, Any]) -> list[str]:
    properties = _properties(context)
    current = _text(properties.get("currentHealthStatus"))
    previous = _text(properties.get("previousHealthStatus"))
    lines = [
        _labelled("Resource health", properties.get("title")),
        f"Health: {previous or '?'} -> {current or '?'}" if current or previous else "",
        _labelled("Cause", properties.get("cause")),
        _labelled("Type", properties.get("type")),
        _labelled("Details", properties.get("details")),
        _labelled("Status", context.get("status")),
        _labelled("Operation", context.get("operationName")),
        _labelled("Event time", context.get("eventTimestamp")),
    ]
    return lines if any(lines) else _activity_log_lines(context)


def _smart_detection_lines(context: Mapping[str, Any]) -> list[str]:
    detector = _text(context.get("SmartDetectorName"))
    detector_id = _text(context.get("SmartDetectorId"))
    name = f"{detector} ({detector_id})" if detector and detector_id else detector or detector_id
    lines = [
        f"Smart detector: {name}" if name else "",
        _labelled("Detection", context.get("DetectionSummary")),
        _labelled("Detected value", context.get("DetectedValue")),
        _labelled("Normal value", context.get("NormalValue")),
        _labelled("Occurred", context.get("FormattedOccurrenceTime")),
        _labelled("Analysed", context.get("AnalysisTimestamp")),
    ]
    return lines if any(lines) else []


def _prometheus_lines(context: Mapping[str, Any]) -> list[str]:
    labels = context.get("labels")
    annotations = context.get("annotations")
    annotations = annotations if isinstance(annotations, Mapping) else {}
    rule_group = _text(context.get("ruleGroup"))
    timing = [
        _labelled("for", context.get("for"), sep=" "),
        _labelled("evaluated every", context.get("interval"), sep=" "),
    ]
    lines = [
        _labelled("Prometheus expression", context.get("expression"), limit=_QUERY_LIMIT),
        _labelled("Value", context.get("expressionValue")),
        f"Timing: {', '.join(part for part in timing if part)}" if any(timing) else "",
        f"Labels: {_pairs(labels)}" if isinstance(labels, Mapping) and labels else "",
        *(
            f"{str(key).capitalize()}: {_one_line(_text(annotations.get(key)), _VALUE_LIMIT * 2)}"
            for key in ("summary", "description")
            if _text(annotations.get(key))
        ),
        f"Rule group: {resource_name(rule_group)}" if rule_group else "",
    ]
    return lines if any(lines) else []


def _generic_lines(context: Mapping[str, Any]) -> list[str]:
    """Unknown services: the top-level keys, one short line each."""
    lines: list[str] = []
    for key, value in list(context.items())[:_MAX_PAIRS]:
        if value is None or value in ("", [], {}):
            continue
        lines.append(f"{_one_line(str(key), 60)}: {_compact(value, 150)}")
    lines.append(_more(len(context), "fields", _MAX_PAIRS))
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
    ContextKind.GENERIC: _generic_lines,
}


# -- text helpers ----------------------------------------------------------------------------------


_TRUNCATED = "… (summary truncated)"


def _join_bounded(lines: list[str], limit: int) -> str:
    """Whole lines up to ``limit`` characters, then a marker, so a cut never lands mid-fact."""
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    size = len(_TRUNCATED)
    for line in lines:
        if size + len(line) + 1 > limit:
            break
        kept.append(line)
        size += len(line) + 1
    if not kept:  # one giant first line: cut it instead of dropping everything
        return _clip(text, limit)
    return "\n".join([*kept, _TRUNCATED])


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)].rstrip() + "…"


def _one_line(text: str, limit: int = _VALUE_LIMIT) -> str:
    return _clip(" ".join(text[: limit * 4].split()), limit)


def _text(value: object, limit: int = _VALUE_LIMIT) -> str:
    """A scalar as short single-line text; containers and null give '' (they are summarised elsewhere)."""
    if value is None or isinstance(value, Mapping | list | tuple):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return _one_line(str(value), limit)


def _labelled(label: str, value: object, sep: str = ": ", limit: int = _VALUE_LIMIT) -> str:
    """'Label: value', or '' when the value is empty, so absent facts leave no empty lines."""
    text = _text(value, limit)
    return f"{label}{sep}{text}" if text else ""


def _query(value: object) -> str:
    """A query keeps its line breaks' meaning as spaces and is cut at a readable length."""
    return _text(value, _QUERY_LIMIT) or "(none)"


def _link(value: object) -> str:
    text = value.strip() if isinstance(value, str) else ""
    return text if text.lower().startswith("https://") and len(text) <= 4_000 else ""


def _window_line(start: object, end: object) -> str:
    start_text, end_text = _text(start), _text(end)
    if not start_text and not end_text:
        return ""
    return f"Window: {start_text or '?'} - {end_text or '?'}"


def _pairs(mapping: Mapping[Any, Any]) -> str:
    pairs = [
        f"{_text(key, 60)}={_text(value, 256) or _compact(value, 256)}"
        for key, value in list(mapping.items())[:_MAX_PAIRS]
    ]
    more = len(mapping) - _MAX_PAIRS
    return ", ".join(pairs) + (f", … (+{more} more)" if more > 0 else "")


def _dimensions(value: object) -> str:
    """[{"name": "Computer", "value": "vm-web-01"}] -> 'Computer=vm-web-01'."""
    if isinstance(value, Mapping):
        return _pairs(value)
    if not isinstance(value, list):
        return ""
    pairs = {
        _text(item.get("name"), 60): item.get("value")
        for item in value[: _MAX_PAIRS * 2]
        if isinstance(item, Mapping) and _text(item.get("name"))
    }
    return _pairs(pairs)


def _failing_periods(value: object) -> str:
    if not isinstance(value, Mapping):
        return ""
    failing, total = (
        _text(value.get("minFailingPeriodsToAlert")),
        _text(value.get("numberOfEvaluationPeriods")),
    )
    return f"failing {failing} of {total} periods" if failing and total else ""


def _more(count: int, noun: str, shown: int = _MAX_ITEMS) -> str:
    return f"… and {count - shown} more {noun}" if count > shown else ""


def _compact(value: object, limit: int = _VALUE_LIMIT) -> str:
    """Short text for any JSON value; big containers are cut before they are serialised whole."""
    head: object
    if isinstance(value, Mapping):
        head = dict(list(value.items())[:_MAX_PAIRS])
    elif isinstance(value, list | tuple):
        head = list(value[:_MAX_PAIRS])
    else:
        return _text(value, limit)
    suffix = " …" if len(value) > _MAX_PAIRS else ""
    try:
        text = json.dumps(head, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(head)
    return _one_line(text[: limit * 2] + suffix, limit)
