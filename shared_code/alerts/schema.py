"""Azure Monitor Common Alert Schema: validate a webhook payload and reduce it to an ``AlertSignal``.

Only ``data.essentials`` is validated strictly, because the rest of the app keys on it (ids,
condition, times). Fields Azure documents as optional or sends as null are accepted: Cost
Management budget alerts send ``alertRule``, ``severity``, ``signalType``, ``alertTargetIDs`` and
``originAlertId`` as null. ``data.alertContext`` differs per monitoring service and is never
validated: ``shared_code.alerts.context`` summarises it and reads what the essentials lack from it
(a budget's name and scope, the recovery and the problem of a health event). Every model
tolerates extra fields.

    payload ─ schemaId == "azureMonitorCommonAlertSchema"?      no  -> NotCommonSchemaError
            └ data.essentials valid (CommonAlertPayload)?       no  -> AlertSchemaError(path)
            └ AlertSignal + context summary and facts           never raises on context content
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError, PydanticSerializationError

from shared_code.alerts.armid import is_arm_id, is_guid, is_subscription_scope, resource_name, subscription_of
from shared_code.alerts.context import ContextFacts, context_facts, first_metric_name, summarize_context
from shared_code.alerts.text import clip, shown
from shared_code.domain.alert import AlertSignal, MonitorCondition, Severity
from shared_code.errors import AlertSchemaError, NotCommonSchemaError

COMMON_SCHEMA_ID = "azureMonitorCommonAlertSchema"
PORTAL_ALERT_URL = (
    "https://portal.azure.com/#view/Microsoft_Azure_Monitoring_Alerts/AlertDetails.ReactView/alertId~/"
)
DEFAULT_SEVERITY = Severity.SEV3
"""The severity of an alert that has none (budget alerts), unless its connection says otherwise."""
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

_MAX_ITEMS = 10
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
    """'Sev3' in any case, or null / '' for none (budget alerts); anything else is the sender's bug
    and is reported at its path."""
    if value is None or isinstance(value, Severity):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
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
    return shown(value, 40)


_Text = Annotated[str | None, BeforeValidator(_text_or_none)]
_TextList = Annotated[list[str], BeforeValidator(_text_list)]
_RequiredText = Annotated[str, BeforeValidator(_required_text)]
_SeverityField = Annotated[Severity | None, BeforeValidator(_severity)]
_ConditionField = Annotated[MonitorCondition, BeforeValidator(_condition)]
_Moment = Annotated[datetime, BeforeValidator(parse_azure_datetime)]
_OptionalMoment = Annotated[datetime | None, BeforeValidator(_optional_datetime)]


# -- models ------------------------------------------------------------------------------------


class Essentials(BaseModel):
    """``data.essentials``: the fields every alert type shares. Unknown fields are kept, not refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    alert_id: _RequiredText = Field(alias="alertId")
    alert_rule: _Text = Field(default=None, alias="alertRule")
    severity: _SeverityField = None
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


def parse_alert(payload: object, *, default_severity: Severity = DEFAULT_SEVERITY) -> AlertSignal:
    """Validate a decoded webhook body and normalise it; errors name the offending field's path.

    ``default_severity``: the severity of an alert that has none (the connection's setting).
    """
    _require_common_schema(payload)
    try:
        parsed = CommonAlertPayload.model_validate(payload)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    return to_signal(parsed, default_severity=default_severity)


def to_signal(parsed: CommonAlertPayload, *, default_severity: Severity = DEFAULT_SEVERITY) -> AlertSignal:
    """The normalised signal for an already validated payload."""
    essentials = parsed.data.essentials
    context = parsed.data.alert_context
    facts = context_facts(essentials.monitoring_service, context, essentials.alert_target_ids)
    targets = tuple(essentials.alert_target_ids) or ((facts.scope,) if facts.scope else ())
    recovered = essentials.monitor_condition is MonitorCondition.FIRED and facts.recovered
    condition = MonitorCondition.RESOLVED if recovered else essentials.monitor_condition
    if recovered:  # the recovery of a health event: notified (fired) when it recovered
        resolved_at: datetime | None = essentials.resolved_date_time or essentials.fired_date_time
    else:  # a Fired notification carrying a resolvedDateTime must not look like a resolution
        resolved_at = essentials.resolved_date_time if condition is MonitorCondition.RESOLVED else None
    rule = essentials.alert_rule or facts.rule_name or f"{essentials.monitoring_service} alert"
    signal = AlertSignal(
        alert_id=essentials.alert_id,
        origin_alert_id=essentials.origin_alert_id or "",
        rule=rule,
        rule_id=rule_id_for(essentials, facts, rule),
        severity=essentials.severity or default_severity,
        severity_assumed=essentials.severity is None,
        signal_type=essentials.signal_type or "",
        monitoring_service=essentials.monitoring_service,
        condition=condition,
        fired_at=essentials.fired_date_time,
        resolved_at=resolved_at,
        target_ids=targets,
        configuration_items=configuration_items_for(essentials, facts, targets),
        problem_key=facts.problem_key,
        description=(essentials.description or "").strip(),
        context_summary=summarize_context(
            essentials.monitoring_service, context, parsed.data.custom_properties
        ),
        portal_link=portal_link_for(essentials),
        metric_name=first_metric_name(context),
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
        {"description": clip(description, 2_000)},
        {"target_ids": targets[:_MAX_ITEMS], "configuration_items": items[:50]},
        {"context_summary": clip(summary, 1_000), "description": clip(description, 300)},
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
    if schema_id == "AIP Budget Notification":
        return "this is a budget alert in the legacy (non-common) format"
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


def configuration_items_for(
    essentials: Essentials, facts: ContextFacts, targets: Sequence[str]
) -> tuple[str, ...]:
    """configurationItems, else the target resource names; de-duplicated (ARM names ignore case).

    A subscription is not a configuration item: a subscription-scoped target (``/subscriptions/{id}``,
    the target of service health and subscription budgets) names none, nor does a listed item that
    is that subscription's id; the subscription's display name stands in where the payload has it.
    Budget alerts list their category ("budgets") there, which is not an item either.
    """
    listed = [] if facts.listed_items_are_categories else essentials.configuration_items
    subscriptions = {subscription_of(value) for value in (essentials.alert_id, *targets)} - {""}
    names = listed or [resource_name(target) for target in targets]
    seen: set[str] = set()
    items: list[str] = []
    for name in names:
        if not name or is_subscription_scope(name) or (is_guid(name) and name.lower() in subscriptions):
            continue
        if is_arm_id(name) and not resource_name(name):
            continue
        if name.lower() not in seen:
            seen.add(name.lower())
            items.append(name)
    if not items and facts.subscription_name and any(is_subscription_scope(t) for t in targets):
        items.append(facts.subscription_name)
    return tuple(items)


def rule_id_for(essentials: Essentials, facts: ContextFacts | None = None, rule: str = "") -> str:
    """alertRuleID when Azure sends it, else the id of what raised it from the context (a budget's
    ARM id); otherwise a stable stand-in built from what every payload has.

    The stand-in is ``<subscription>:<monitoringService>:<rule>`` (subscription from alertId,
    else the first target). It deliberately does not look like an ARM id: the rule's resource group
    is not in the payload, and the target cannot be used because a multi-resource rule fires one
    alert per target, which must still count as one rule.
    """
    if essentials.alert_rule_id and essentials.alert_rule_id.strip():
        return essentials.alert_rule_id.strip()
    if facts is not None and facts.rule_id:
        return facts.rule_id
    subscription = next(
        (
            found
            for found in map(subscription_of, (essentials.alert_id, *essentials.alert_target_ids))
            if found
        ),
        "",
    )
    parts = (subscription, essentials.monitoring_service, rule or essentials.alert_rule or "")
    return ":".join(part for part in parts if part)


def portal_link_for(essentials: Essentials) -> str:
    """investigationLink when it is an https link; otherwise the alert's details blade in the portal."""
    link = (essentials.investigation_link or "").strip()
    if link.lower().startswith("https://") and len(link) <= MAX_LINK_CHARS:
        return link
    return PORTAL_ALERT_URL + quote(essentials.alert_id, safe="")
