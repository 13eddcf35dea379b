"""Settings and connection validation: every problem named, secrets never echoed."""

from __future__ import annotations

import pytest

from shared_code.errors import ConfigurationError, InvalidInputError
from shared_code.products import parse_connection
from shared_code.settings import Settings

BASE: dict[str, object] = {
    "name": "sn-prod",
    "partner_type": "servicenow",
    "server_url": "https://contoso.service-now.com/",
    "username": "svc-azmon",
    "client_id": "abc",
}


def test_settings_list_every_problem_by_name():
    with pytest.raises(ConfigurationError) as info:
        Settings.from_environ(
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "ALERT_MAX_ATTEMPTS": "zero",
                "HTTP_TIMEOUT_SECONDS": "-1",
            }
        )
    text = str(info.value)
    assert "KEY_VAULT_URL: is required" in text
    assert "ALERT_MAX_ATTEMPTS" in text
    assert "HTTP_TIMEOUT_SECONDS" in text


def test_settings_need_https_vault_and_paired_ingestion_settings():
    with pytest.raises(ConfigurationError, match=r"KEY_VAULT_URL: .*https"):
        Settings.from_environ(
            {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "KEY_VAULT_URL": "http://vault"}
        )
    with pytest.raises(ConfigurationError, match="LOGS_INGESTION_RULE_ID"):
        Settings.from_environ(
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "KEY_VAULT_URL": "https://v",
                "LOGS_INGESTION_ENDPOINT": "https://dce",
            }
        )


def test_field_and_cross_field_problems_are_listed_together_in_one_message():
    with pytest.raises(ConfigurationError) as info:
        Settings.from_environ(
            {
                "ALERT_MAX_ATTEMPTS": "zero",
                "LOGS_INGESTION_ENDPOINT": "https://dce",
                "SYNC_SCHEDULE": "*/5 * * * *",
                "ALERT_REDRIVE_SCHEDULE": "every ten minutes",
            }
        )
    lines = str(info.value).splitlines()
    assert lines[0] == "Invalid app settings:"
    problems = "\n".join(lines[1:])
    for name in (
        "KEY_VAULT_URL: is required",
        "ALERT_MAX_ATTEMPTS",
        "AzureWebJobsStorage: is required (or, without keys, set AzureWebJobsStorage__accountName",
        "LOGS_INGESTION_ENDPOINT and LOGS_INGESTION_RULE_ID",
        "SYNC_SCHEDULE: must be an NCRONTAB expression of six fields",
        "ALERT_REDRIVE_SCHEDULE: must be an NCRONTAB expression of six fields",
    ):
        assert name in problems
    assert all(line.startswith("- ") for line in lines[1:])


@pytest.mark.parametrize(
    "schedule",
    ["0 */15 * * * *", "30 0 9 * * Mon-Fri", "0 0,30 8-18 1-31/2 Jan,Jul *", "0  */5  *  *  *  *"],
)
def test_six_field_schedules_are_accepted(schedule):
    settings = Settings.from_environ(
        {
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "KEY_VAULT_URL": "https://v",
            "SYNC_SCHEDULE": schedule,
        }
    )
    assert settings.sync_schedule == schedule


@pytest.mark.parametrize("schedule", ["", "*/5 * * * *", "0 */5 * * * * *", "0 */5 * * * %", "00:05:00"])
def test_other_schedules_are_refused(schedule):
    with pytest.raises(ConfigurationError, match="ALERT_REDRIVE_SCHEDULE: must be an NCRONTAB"):
        Settings.from_environ(
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "KEY_VAULT_URL": "https://v",
                "ALERT_REDRIVE_SCHEDULE": schedule,
            }
        )


def test_settings_defaults():
    settings = Settings.from_environ(
        {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "KEY_VAULT_URL": "https://v/"}
    )
    assert settings.key_vault_url == "https://v"
    assert settings.alert_max_attempts == 5
    assert not settings.logs_ingestion_enabled


def test_connection_defaults_follow_the_itsmc_form_and_do_better():
    connection = parse_connection(BASE)
    assert connection.server_url == "https://contoso.service-now.com"
    assert connection.create_configuration_items is False
    assert connection.auto_resolve is True
    assert {s.value for s in connection.sync_data} == {"incidents", "change_requests"}
    assert sorted(connection.secret_names) == [
        "itsm-sn-prod-client-secret",
        "itsm-sn-prod-password",
        "itsm-sn-prod-refresh-token",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"server_url": "http://contoso.service-now.com"}, "server_url: must be an https:// URL"),
        ({"server_url": "https://servicedesk.contoso.com"}, "private instance"),
        ({"server_url": "https://user:pw@contoso.service-now.com"}, "must not contain credentials"),
        ({"sync_scope_days": 121}, "sync_scope_days"),
        ({"sync_scope_days": 0}, "sync_scope_days"),
        ({"sync_data": ["incidents", "problems"]}, "sync_data"),
        ({"name": "bad name!"}, "name: use 1-50 letters"),
        ({"client_id": ""}, "client_id is required"),
        ({"username": ""}, "username"),
        ({"partner_type": "jira"}, "partner type"),
    ],
)
def test_connection_validation_names_the_field(change, message):
    with pytest.raises(InvalidInputError) as info:
        parse_connection(BASE | change)
    assert message in str(info.value)


def test_private_instance_allows_an_own_domain_and_basic_auth_needs_no_client_id():
    connection = parse_connection(
        BASE
        | {
            "server_url": "https://itsm.contoso.com",
            "private_instance": True,
            "auth_method": "basic",
            "client_id": "",
        }
    )
    assert connection.secret_names == ("itsm-sn-prod-password",)


def test_validation_messages_do_not_echo_values():
    with pytest.raises(InvalidInputError) as info:
        parse_connection(BASE | {"server_url": "https://svc:Sup3rS3cret@contoso.service-now.com"})
    assert "Sup3rS3cret" not in str(info.value)
