"""Settings and connection validation: every problem named, secrets never echoed."""

from __future__ import annotations

import pytest

from shared_code.connections import Connection
from shared_code.errors import ConfigurationError, InvalidInputError
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
            {"AzureWebJobsStorage": "x", "ALERT_MAX_ATTEMPTS": "zero", "HTTP_TIMEOUT_SECONDS": "-1"}
        )
    text = str(info.value)
    assert "KEY_VAULT_URL: is required" in text
    assert "ALERT_MAX_ATTEMPTS" in text
    assert "HTTP_TIMEOUT_SECONDS" in text


def test_settings_need_https_vault_and_paired_ingestion_settings():
    with pytest.raises(ConfigurationError, match=r"KEY_VAULT_URL: .*https"):
        Settings.from_environ({"AzureWebJobsStorage": "x", "KEY_VAULT_URL": "http://vault"})
    with pytest.raises(ConfigurationError, match="LOGS_INGESTION_RULE_ID"):
        Settings.from_environ(
            {
                "AzureWebJobsStorage": "x",
                "KEY_VAULT_URL": "https://v",
                "LOGS_INGESTION_ENDPOINT": "https://dce",
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
    connection = Connection.parse(BASE)
    assert connection.server_url == "https://contoso.service-now.com"
    assert connection.create_configuration_items is False
    assert connection.auto_resolve is True
    assert {s.value for s in connection.sync_data} == {"incidents", "change_requests"}
    assert connection.secret_names == (
        "itsm-sn-prod-password",
        "itsm-sn-prod-client-secret",
        "itsm-sn-prod-refresh-token",
    )


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
        ({"partner_type": "jira"}, "partner_type"),
    ],
)
def test_connection_validation_names_the_field(change, message):
    with pytest.raises(InvalidInputError) as info:
        Connection.parse(BASE | change)
    assert message in str(info.value)


def test_private_instance_allows_an_own_domain_and_basic_auth_needs_no_client_id():
    connection = Connection.parse(
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
        Connection.parse(BASE | {"server_url": "https://svc:Sup3rS3cret@contoso.service-now.com"})
    assert "Sup3rS3cret" not in str(info.value)
