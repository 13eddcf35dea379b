"""Common Alert Schema parsing: every monitoring service's fixture, the refusals, and the edge cases."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared_code.alerts.context import MAX_SUMMARY_CHARS, ContextKind, classify_context, summarize_context
from shared_code.alerts.schema import error_path, parse_alert, parse_azure_datetime
from shared_code.alerts.text import strip_html
from shared_code.domain.alert import MonitorCondition, Severity
from shared_code.errors import AlertSchemaError, NotCommonSchemaError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "alerts"
VM_WEB_01 = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg-web-prod"
    "/providers/microsoft.compute/virtualmachines/vm-web-01"
)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def minimal(**essentials: object) -> dict[str, Any]:
    """The smallest valid common-schema payload, with essentials overridden."""
    base: dict[str, Any] = {
        "alertId": "/subscriptions/00000000-0000-0000-0000-000000000000/providers/"
        "Microsoft.AlertsManagement/alerts/aaaaaaaa-0000-0000-0000-000000000001",
        "alertRule": "rule-1",
        "severity": "Sev3",
        "signalType": "Metric",
        "monitorCondition": "Fired",
        "monitoringService": "Platform",
        "alertTargetIDs": [VM_WEB_01],
        "configurationItems": ["vm-web-01"],
        "firedDateTime": "2023-03-21T15:36:25.0234567Z",
    }
    base.update(essentials)
    return {"schemaId": "azureMonitorCommonAlertSchema", "data": {"essentials": base, "alertContext": {}}}


# fixture, monitoringService, severity, condition, configuration items, facts the summary must show
CASES: list[tuple[str, str, Severity, MonitorCondition, tuple[str, ...], tuple[str, ...]]] = [
    (
        "metric_fired",
        "Platform",
        Severity.SEV2,
        MonitorCondition.FIRED,
        ("vm-web-01",),
        (
            "Percentage CPU Average GreaterThan 80 (value: 93.4171) over PT5M",
            "ResourceId=",
            "team=web-platform",
        ),
    ),
    (
        "metric_resolved",
        "Platform",
        Severity.SEV2,
        MonitorCondition.RESOLVED,
        ("vm-web-01",),
        ("Percentage CPU", "GreaterThan 80", "(value: 41.2)"),
    ),
    (
        "metric_dynamic_fired",
        "Platform",
        Severity.SEV3,
        MonitorCondition.FIRED,
        ("stshopdata01",),
        (
            "DynamicThresholdCriteria",
            "Egress Total GreaterThan 734003.2",
            "sensitivity Medium",
            "failing 3 of 4",
        ),
    ),
    (
        "metric_multi_resource_fired",
        "Platform",
        Severity.SEV1,
        MonitorCondition.FIRED,
        ("vm-web-02",),
        ("MultipleResourceMultipleMetricCriteria", "Available Memory Bytes Average LessThan 536870912"),
    ),
    (
        "log_analytics_fired",
        "Log Analytics",
        Severity.SEV2,
        MonitorCondition.FIRED,
        ("vm-web-01", "vm-web-02"),
        (
            "SecurityEvent | where EventID == 4625",
            "2023-05-10T08:59:40Z - 2023-05-10T09:14:40Z",
            "result count 2",
            "Results: https://portal.azure.com",
        ),
    ),
    (
        "application_insights_fired",
        "Application Insights",
        Severity.SEV1,
        MonitorCondition.FIRED,
        ("appi-shop-prod",),
        ('requests | where name == "POST /checkout"', "result count 1", "threshold Greater Than 10"),
    ),
    (
        "log_alerts_v2_fired",
        "Log Alerts V2",
        Severity.SEV1,
        MonitorCondition.FIRED,
        (VM_WEB_01,),
        (
            "Heartbeat | summarize",
            "Total(AggregatedValue) LessThan 1 (value: 0)",
            "2023-06-01T02:09:30Z",
            "Results: https://portal.azure.com",
        ),
    ),
    (
        "log_alerts_v2_resolved",
        "Log Alerts V2",
        Severity.SEV1,
        MonitorCondition.RESOLVED,
        (VM_WEB_01,),
        ("Heartbeat | summarize", "(value: 12)"),
    ),
    (
        "activity_log_administrative_fired",
        "Activity Log - Administrative",
        Severity.SEV2,
        MonitorCondition.FIRED,
        ("vm-web-02",),
        (
            "Operation: Microsoft.Compute/virtualMachines/delete",
            "Status: Succeeded",
            "Caller: alex@example.com",
            "Level: Informational",
            "virtualmachines/vm-web-02",
        ),
    ),
    (
        "activity_log_security_fired",
        "Activity Log - Security",
        Severity.SEV1,
        MonitorCondition.FIRED,
        ("vm-web-01",),
        ("Operation: Microsoft.Security/locations/alerts/activate/action", "entity vm-web-01", "Quarantined"),
    ),
    (
        "activity_log_recommendation_fired",
        "Activity Log - Recommendation",
        Severity.SEV4,
        MonitorCondition.FIRED,
        ("vm-web-02",),
        ("Operation: Microsoft.Advisor/recommendations/available/action", "category Cost", "impact High"),
    ),
    (
        "activity_log_policy_fired",
        "Activity Log - Policy",
        Severity.SEV3,
        MonitorCondition.FIRED,
        ("stshopdata01",),
        (
            "Operation: Microsoft.Authorization/policies/audit/action",
            "effect Audit",
            "require-tag-costcenter",
        ),
    ),
    (
        "activity_log_autoscale_fired",
        "Activity Log - Autoscale",
        Severity.SEV4,
        MonitorCondition.FIRED,
        ("vmss-api-01",),
        ("Operation: Microsoft.Insights/AutoscaleSettings/Scaleup/Action", "Autoscale: 3 -> 5 instances"),
    ),
    (
        "service_health_fired",
        "ServiceHealth",
        Severity.SEV2,
        MonitorCondition.FIRED,
        (),
        (
            "Service health: Azure SQL Database - Connection failures in West Europe",
            "SQL Database (West Europe)",
            "Tracking id: ZX9Q-4KT",
            "Incident type: Incident",
            "Summary of impact: Between 08:10",
        ),
    ),
    (
        "service_health_update",
        "ServiceHealth",
        Severity.SEV2,
        MonitorCondition.FIRED,
        (),
        ("Azure SQL Database - Connection failures", "Stage: Active", "rollback of the gateway"),
    ),
    (
        "service_health_resolved",
        "ServiceHealth",
        Severity.SEV2,
        MonitorCondition.RESOLVED,
        (),
        ("Azure SQL Database - Connection failures", "Stage: Resolved", "now mitigated"),
    ),
    (
        "service_health_test_action",
        "ServiceHealth",
        Severity.SEV4,
        MonitorCondition.RESOLVED,
        (),
        ("Service health: TestActionGroup-TestServiceHealthAlert", "AzureServiceName (Global)", "TEST-TTT"),
    ),
    (
        "resource_health_fired",
        "Resource Health",
        Severity.SEV2,
        MonitorCondition.FIRED,
        ("vm-web-01",),
        ("Health: Available -> Unavailable", "Cause: PlatformInitiated"),
    ),
    (
        "resource_health_update",
        "Resource Health",
        Severity.SEV2,
        MonitorCondition.FIRED,
        ("vm-web-01",),
        ("Health: Unavailable -> Degraded", "Cause: PlatformInitiated"),
    ),
    (
        "resource_health_resolved",
        "Resource Health",
        Severity.SEV2,
        MonitorCondition.RESOLVED,
        ("vm-web-01",),
        ("Health: Degraded -> Available", "Cause: PlatformInitiated"),
    ),
    (
        "resource_health_test_action",
        "Resource Health",
        Severity.SEV4,
        MonitorCondition.FIRED,
        ("test-VM",),
        ("Resource health: Rebooted by user", "Health: Available -> Unavailable"),
    ),
    (
        "cost_budget_test_action",
        "CostAlerts",
        Severity.SEV3,
        MonitorCondition.FIRED,
        (),
        (
            "Budget: Test_forcasted_budget (Cost budget, forecasted spend)",
            "Forecast for the period: $1111.11",
        ),
    ),
    (
        "cost_budget_actual_test_action",
        "CostAlerts",
        Severity.SEV3,
        MonitorCondition.FIRED,
        (),
        ("Budget: Test_actual_cost_budget (Cost budget, actual spend)", "spent $11,111.00, budget $50.00"),
    ),
    (
        "cost_budget_forecasted_test_action",
        "CostAlerts",
        Severity.SEV3,
        MonitorCondition.FIRED,
        (),
        ("Budget: Test_forcasted_budget", "notification threshold $50.00", "Scope: /subscriptions/"),
    ),
    (
        "smart_detector_fired",
        "SmartDetector",
        Severity.SEV3,
        MonitorCondition.FIRED,
        ("appi-shop-prod",),
        (
            "Smart detector: Failure Anomalies",
            "abnormal rise in failed request rate",
            "Detected value: 18.4%",
        ),
    ),
    (
        "smart_detector_resolved",
        "SmartDetector",
        Severity.SEV3,
        MonitorCondition.RESOLVED,
        ("appi-shop-prod",),
        ("Smart detector: Failure Anomalies", "Detected value: 0.7%"),
    ),
    (
        "prometheus_fired",
        "Prometheus",
        Severity.SEV2,
        MonitorCondition.FIRED,
        ("aks-shop-prod",),
        (
            "kube_pod_container_status_waiting_reason",
            "Value: 1",
            "namespace=shop",
            "pod=checkout-7d9f8b6c5-x2k4q",
        ),
    ),
    (
        "prometheus_resolved",
        "Prometheus",
        Severity.SEV2,
        MonitorCondition.RESOLVED,
        ("aks-shop-prod",),
        ("kube_pod_container_status_waiting_reason", "Value: 0"),
    ),
]


@pytest.mark.parametrize(
    ("name", "service", "severity", "condition", "cis", "facts"), CASES, ids=[case[0] for case in CASES]
)
def test_every_fixture_parses_to_its_service_and_facts(name, service, severity, condition, cis, facts):
    signal = parse_alert(load(name))

    assert signal.monitoring_service == service
    assert signal.severity is severity
    assert signal.condition is condition
    assert signal.configuration_items == cis
    assert signal.fired_at.tzinfo is UTC
    assert signal.portal_link.startswith("https://portal.azure.com/")
    assert signal.rule_id
    assert 0 < len(signal.context_summary) <= MAX_SUMMARY_CHARS
    for fact in facts:
        assert fact in signal.context_summary, f"{fact!r} missing from:\n{signal.context_summary}"


@pytest.mark.parametrize(
    "name",
    # health events are not resolved by Azure: their recovery is a new alert (test_alert_payloads)
    sorted({c[0].rsplit("_", 1)[0] for c in CASES if "resolved" in c[0] and "health" not in c[0]}),
)
def test_resolved_fixtures_share_the_alert_id_and_carry_the_resolution_time(name):
    fired, resolved = parse_alert(load(f"{name}_fired")), parse_alert(load(f"{name}_resolved"))

    assert resolved.alert_id == fired.alert_id
    assert fired.resolved_at is None
    assert resolved.resolved_at is not None
    assert resolved.resolved_at > fired.fired_at
    assert resolved.event_time == resolved.resolved_at


def test_every_fixture_file_is_covered():
    covered = {case[0] for case in CASES} | {"legacy_metric_alert", "legacy_log_alert"}
    assert {path.stem for path in FIXTURES.glob("*.json")} == covered


def test_contexts_are_classified_by_service():
    kinds = {
        name: classify_context(
            load(name)["data"]["essentials"]["monitoringService"], load(name)["data"]["alertContext"]
        )
        for name in (case[0] for case in CASES)
    }
    assert kinds["metric_fired"] is ContextKind.METRIC
    assert kinds["log_analytics_fired"] is ContextKind.LOG_SEARCH_V1
    assert kinds["log_alerts_v2_fired"] is ContextKind.LOG_SEARCH_V2
    assert kinds["activity_log_policy_fired"] is ContextKind.ACTIVITY_LOG
    assert kinds["service_health_fired"] is ContextKind.SERVICE_HEALTH
    assert kinds["resource_health_fired"] is ContextKind.RESOURCE_HEALTH
    assert kinds["smart_detector_fired"] is ContextKind.SMART_DETECTION
    assert kinds["prometheus_fired"] is ContextKind.PROMETHEUS


def test_metric_fixture_maps_the_essentials():
    signal = parse_alert(load("metric_fired"))

    assert signal.alert_id.endswith("/alerts/6f1c2a4e-8d3b-4b7a-9c0e-1a2b3c4d5e6f")
    assert signal.rule == "vm-web-01 high CPU"
    assert signal.rule_id.endswith("/metricAlerts/vm-web-01 high CPU")  # essentials.alertRuleID
    assert signal.signal_type == "Metric"
    assert signal.target_ids == (VM_WEB_01,)
    assert signal.origin_alert_id.startswith("00000000-0000-0000-0000-000000000000_rg-web-prod_")
    assert signal.description.startswith("CPU on the web front end")
    assert signal.fired_at == datetime(2023, 3, 21, 15, 36, 25, 23456, tzinfo=UTC)
    assert signal.portal_link == (
        "https://portal.azure.com/#view/Microsoft_Azure_Monitoring_Alerts/AlertDetails.ReactView/alertId~/"
        "%2Fsubscriptions%2F00000000-0000-0000-0000-000000000000%2Fproviders%2FMicrosoft.AlertsManagement"
        "%2Falerts%2F6f1c2a4e-8d3b-4b7a-9c0e-1a2b3c4d5e6f"
    )


def test_investigation_link_is_preferred_for_the_portal_link():
    signal = parse_alert(load("log_alerts_v2_fired"))
    assert signal.portal_link.startswith(
        "https://portal.azure.com/#view/Microsoft_Azure_Monitoring_Alerts/Investigate"
    )


def test_rule_id_is_derived_from_subscription_service_and_rule_when_azure_sends_none():
    signal = parse_alert(load("prometheus_fired"))
    assert signal.rule_id == "00000000-0000-0000-0000-000000000000:Prometheus:KubePodCrashLooping"


def test_alert_rule_id_is_accepted_in_either_spelling():
    signal = parse_alert(
        minimal(alertRuleId="/subscriptions/x/resourceGroups/rg/providers/microsoft.insights/metricAlerts/r")
    )
    assert signal.rule_id.endswith("/metricAlerts/r")


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hint"), [("legacy_metric_alert", "metric alert"), ("legacy_log_alert", "log search")]
)
def test_legacy_payloads_are_not_the_common_schema(name, hint):
    with pytest.raises(NotCommonSchemaError) as caught:
        parse_alert(load(name))

    assert caught.value.path == "schemaId"
    assert hint in str(caught.value)
    assert "Enable the common alert schema" in str(caught.value)


@pytest.mark.parametrize(
    "payload", [None, [], "text", 42, {}, {"schemaId": "Microsoft.Insights/activityLogs"}]
)
def test_anything_else_is_not_the_common_schema(payload):
    with pytest.raises(NotCommonSchemaError) as caught:
        parse_alert(payload)
    assert caught.value.path == "schemaId"


def test_the_common_schema_id_without_essentials_is_refused():
    with pytest.raises(NotCommonSchemaError) as caught:
        parse_alert({"schemaId": "azureMonitorCommonAlertSchema", "data": {"alertContext": {}}})
    assert caught.value.path == "data.essentials"


def test_a_bad_severity_names_its_path():  # a severity that is not one is refused; none is accepted
    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(minimal(severity="Critical"))

    assert not isinstance(caught.value, NotCommonSchemaError)
    assert caught.value.path == "data.essentials.severity"
    assert "Sev0" in caught.value.detail
    assert "'Critical'" in caught.value.detail


def test_a_missing_alert_id_names_its_path():
    payload = minimal()
    del payload["data"]["essentials"]["alertId"]

    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(payload)

    assert caught.value.path == "data.essentials.alertId"
    assert caught.value.detail == "is required"


def test_several_problems_report_the_first_and_count_the_rest():
    payload = minimal(severity="High", monitorCondition="Open", firedDateTime="yesterday")
    del payload["data"]["essentials"]["alertId"]

    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(payload)

    assert caught.value.path == "data.essentials.alertId"
    assert "and 3 more problems" in caught.value.detail
    assert "data.essentials.severity" in caught.value.detail
    assert "data.essentials.firedDateTime" in caught.value.detail


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("monitorCondition", "Open", "data.essentials.monitorCondition"),
        ("firedDateTime", "not a date", "data.essentials.firedDateTime"),
        ("alertId", "   ", "data.essentials.alertId"),
        ("monitoringService", 7, "data.essentials.monitoringService"),
        ("resolvedDateTime", "32/13/2023", "data.essentials.resolvedDateTime"),
    ],
)
def test_invalid_required_values_name_their_paths(field, value, path):
    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(minimal(**{field: value}))
    assert caught.value.path == path


def test_a_blank_alert_id_is_as_bad_as_a_missing_one():
    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(minimal(alertId="   "))
    assert str(caught.value) == "data.essentials.alertId: must not be empty"


def test_error_paths_show_list_indexes():
    assert error_path(("data", "essentials", "alertTargetIDs", 0)) == "data.essentials.alertTargetIDs[0]"


# -- tolerance --------------------------------------------------------------------------------------


def test_extra_unknown_fields_are_accepted_everywhere():
    payload = load("metric_fired")
    payload["newTopLevel"] = {"x": 1}
    payload["data"]["newDataField"] = [1, 2]
    payload["data"]["essentials"]["someFutureField"] = "value"
    payload["data"]["alertContext"]["condition"]["allOf"][0]["brandNewCriterionField"] = {"deep": True}

    signal = parse_alert(payload)

    assert signal.severity is Severity.SEV2
    assert "Percentage CPU" in signal.context_summary


def test_an_unknown_monitoring_service_still_parses_with_a_generic_summary():
    payload = minimal(monitoringService="Azure Widget Insights", signalType="Widget")
    payload["data"]["alertContext"] = {
        "widgetName": "w-1",
        "reading": 42.5,
        "nested": {"a": [1, 2, 3]},
        "empty": None,
    }

    signal = parse_alert(payload)

    assert signal.monitoring_service == "Azure Widget Insights"
    assert "widgetName: w-1" in signal.context_summary
    assert "reading: 42.5" in signal.context_summary
    assert "nested:" in signal.context_summary
    assert "empty" not in signal.context_summary


def test_an_unknown_service_with_a_known_shape_gets_that_summary():
    payload = load("log_alerts_v2_fired")
    payload["data"]["essentials"]["monitoringService"] = "Simple Log Alert 2"
    assert "Log search query: Heartbeat" in parse_alert(payload).context_summary


def test_a_seven_digit_fractional_timestamp_parses_as_utc():
    signal = parse_alert(minimal(firedDateTime="2023-03-21T15:36:25.0234567Z"))
    assert signal.fired_at == datetime(2023, 3, 21, 15, 36, 25, 23456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-03-21T15:36:25Z", datetime(2023, 3, 21, 15, 36, 25, tzinfo=UTC)),
        ("2023-03-21T15:36:25.1Z", datetime(2023, 3, 21, 15, 36, 25, 100000, tzinfo=UTC)),
        ("2019-03-22T13:56:31.2917159+00:00", datetime(2019, 3, 22, 13, 56, 31, 291715, tzinfo=UTC)),
        ("2023-03-21T17:36:25.123456789+02:00", datetime(2023, 3, 21, 15, 36, 25, 123456, tzinfo=UTC)),
        ("2023-03-21T15:36:25", datetime(2023, 3, 21, 15, 36, 25, tzinfo=UTC)),
    ],
)
def test_azure_timestamps_become_aware_utc(text, expected):
    moment = parse_azure_datetime(text)
    assert moment == expected
    assert moment.tzinfo is UTC


@pytest.mark.parametrize(
    ("field", "text", "problem"),
    [
        ("firedDateTime", "0001-01-01T00:00:00+14:00", "out of range"),  # before year 1 in UTC
        ("firedDateTime", "9999-12-31T23:59:59-14:00", "out of range"),  # after year 9999 in UTC
        ("firedDateTime", "1600-12-31T23:59:59Z", "before 1601"),
        ("firedDateTime", "0001-01-01T00:00:00", "before 1601"),
        ("resolvedDateTime", "1601-01-01T00:30:00+01:00", "before 1601"),  # 1600-12-31 23:30 UTC
        ("resolvedDateTime", "0001-01-01T00:00:00+14:00", "out of range"),
    ],
)
def test_times_out_of_range_or_before_1601_name_their_path(field, text, problem):
    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(minimal(monitorCondition="Resolved", **{field: text}))
    assert caught.value.path == f"data.essentials.{field}"
    assert problem in caught.value.detail
    assert text in caught.value.detail


def test_the_earliest_storable_time_is_accepted():
    signal = parse_alert(minimal(firedDateTime="1601-01-01T00:00:00Z"))
    assert signal.fired_at == datetime(1601, 1, 1, tzinfo=UTC)
    assert parse_azure_datetime("9999-12-31T23:59:59Z") == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_a_lone_surrogate_that_bypassed_the_decoder_is_a_schema_error_not_a_crash():
    # decode_json_body refuses these first; parse_alert must not crash on a payload built otherwise
    payload = minimal(description="cpu \ud800 high")
    with pytest.raises(AlertSchemaError) as caught:
        parse_alert(payload)
    assert "surrogate" in caught.value.detail


def test_configuration_items_fall_back_to_target_resource_names():
    vm2 = VM_WEB_01.replace("vm-web-01", "vm-web-02")
    payload = minimal(configurationItems=[], alertTargetIDs=[VM_WEB_01, vm2 + "/", VM_WEB_01.upper()])
    assert parse_alert(payload).configuration_items == ("vm-web-01", "vm-web-02")


def test_missing_or_null_configuration_items_fall_back_too():
    payload = minimal(configurationItems=None)
    assert parse_alert(payload).configuration_items == ("vm-web-01",)
    del payload["data"]["essentials"]["configurationItems"]
    assert parse_alert(payload).configuration_items == ("vm-web-01",)


def test_configuration_items_are_deduplicated_in_order():
    payload = minimal(configurationItems=["vm-b", "vm-a", "vm-b", " ", "VM-A", "vm-c"])
    assert parse_alert(payload).configuration_items == ("vm-b", "vm-a", "vm-c")


def test_severity_and_condition_ignore_case():
    signal = parse_alert(
        minimal(severity="sev0", monitorCondition="RESOLVED", resolvedDateTime="2023-03-21T16:00:00Z")
    )
    assert signal.severity is Severity.SEV0
    assert signal.condition is MonitorCondition.RESOLVED


def test_a_fired_notification_ignores_a_stray_resolved_time():
    signal = parse_alert(minimal(resolvedDateTime="2023-03-21T16:00:00Z"))
    assert signal.resolved_at is None


def test_optional_essentials_tolerate_nulls_and_odd_types():
    payload = minimal(signalType=None, description=None, originAlertId=12345, alertTargetIDs=None)
    payload["data"]["alertContext"] = None
    payload["data"]["customProperties"] = None

    signal = parse_alert(payload)

    assert signal.signal_type == ""
    assert signal.description == ""
    assert signal.origin_alert_id == "12345"
    assert signal.target_ids == ()
    assert signal.context_summary == ""


# -- summaries stay bounded and never raise ---------------------------------------------------------


def test_huge_context_content_stays_bounded():
    payload = load("log_alerts_v2_fired")
    criterion = payload["data"]["alertContext"]["condition"]["allOf"][0]
    criterion["searchQuery"] = (
        "Heartbeat | where Computer in (" + ", ".join(f"'vm-{i}'" for i in range(20_000)) + ")"
    )
    criterion["dimensions"] = [{"name": f"dim{i}", "value": "x" * 5_000} for i in range(500)]
    payload["data"]["alertContext"]["condition"]["allOf"] = [criterion] * 200

    summary = parse_alert(payload).context_summary

    assert len(summary) <= MAX_SUMMARY_CHARS
    assert "Log search query: Heartbeat" in summary


def test_huge_unknown_context_stays_bounded():
    context = {f"key{i}": {"blob": "y" * 10_000, "list": list(range(1_000))} for i in range(1_000)}
    summary = summarize_context("Something New", context)
    assert 0 < len(summary) <= MAX_SUMMARY_CHARS
    assert "more fields" in summary


def test_long_service_health_communication_is_trimmed():
    payload = load("service_health_fired")
    payload["data"]["alertContext"]["properties"]["communication"] = "<p>" + "word " * 50_000 + "</p>"
    summary = parse_alert(payload).context_summary
    assert len(summary) <= MAX_SUMMARY_CHARS
    assert "<p>" not in summary


@pytest.mark.parametrize(
    "context",
    [
        {"condition": {"allOf": [None, 3, "x", {"metricName": None, "dimensions": "oops"}]}},
        {"condition": "not an object", "conditionType": ["list"]},
        {"SearchQuery": None, "Dimensions": {"a": 1}, "ResultCount": {"nested": True}},
        {"operationName": 5, "properties": ["not", "a", "dict"], "authorization": "scope"},
        {"properties": {"policies": "{not json", "impactedServices": 7}},
        {"properties": {"communication": 123, "impactedServices": '[{"ServiceName": null}]'}},
        {"expression": {"odd": 1}, "labels": ["a"], "annotations": "text"},
        {"SmartDetectorName": ["x"], "DetectionSummary": None},
        [],
        "plain text",
        42,
    ],
)
@pytest.mark.parametrize(
    "service",
    [
        "Platform",
        "Log Analytics",
        "Log Alerts V2",
        "Activity Log - Policy",
        "ServiceHealth",
        "Resource Health",
        "SmartDetector",
        "Prometheus",
        "Unknown",
    ],
)
def test_odd_context_content_never_raises(service, context):
    payload = minimal(monitoringService=service)
    payload["data"]["alertContext"] = copy.deepcopy(context)
    summary = parse_alert(payload).context_summary
    assert len(summary) <= MAX_SUMMARY_CHARS


def test_strip_html_keeps_paragraphs_and_decodes_entities():
    text = strip_html("<p><strong>Impact</strong>:&nbsp;a &amp; b</p>\n<p><br></p><p>Next</p>")
    assert text == "Impact: a & b\nNext"
