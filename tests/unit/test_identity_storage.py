"""Identity-based storage (no keys): the state tables follow the host's ``AzureWebJobsStorage__*``
settings and are reached with the app's credential; nothing is contacted to build the clients."""

from __future__ import annotations

from typing import Any

import pytest
from azure.core.credentials import AccessToken

from shared_code.errors import ConfigurationError
from shared_code.settings import Settings
from shared_code.state.tables import TableStore

VAULT = {"KEY_VAULT_URL": "https://kv.vault.azure.net"}


class StaticCredential:
    """A TokenCredential that is never asked here (building clients contacts nothing)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        raise AssertionError("no token should be needed to build the clients")


def test_the_account_name_alone_points_the_state_tables_at_the_account_with_the_identity() -> None:
    settings = Settings.from_environ(
        {
            **VAULT,
            "AzureWebJobsStorage__accountName": "itsmstore",
            "AzureWebJobsStorage__credential": "managedidentity",
        }
    )
    assert settings.identity_table_endpoint == "https://itsmstore.table.core.windows.net"

    store = TableStore.from_settings(settings, StaticCredential())
    try:
        assert store._service.url.startswith("https://itsmstore.table.core.windows.net")
        assert store._service.credential is not None
    finally:
        store.close()


def test_a_table_service_uri_wins_over_the_account_name_and_state_table_endpoint_over_both() -> None:
    both = {
        **VAULT,
        "AzureWebJobsStorage__accountName": "itsmstore",
        "AzureWebJobsStorage__tableServiceUri": "https://itsmstore.table.core.usgovcloudapi.net",
    }
    assert (
        Settings.from_environ(both).identity_table_endpoint
        == "https://itsmstore.table.core.usgovcloudapi.net"
    )
    explicit = {**both, "STATE_TABLE_ENDPOINT": "https://other.table.core.windows.net"}
    assert Settings.from_environ(explicit).identity_table_endpoint == "https://other.table.core.windows.net"


def test_a_connection_string_keeps_the_tables_on_it() -> None:
    settings = Settings.from_environ(
        {
            **VAULT,
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "AzureWebJobsStorage__accountName": "x1y2z3",
        }
    )
    assert settings.identity_table_endpoint == ""


def test_no_storage_setting_at_all_names_every_way_to_give_one() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_environ(VAULT)
    assert "AzureWebJobsStorage__accountName" in str(raised.value)
    assert "STATE_TABLE_ENDPOINT" in str(raised.value)


def test_an_invalid_account_name_is_named() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_environ({**VAULT, "AzureWebJobsStorage__accountName": "Not_An_Account"})
    assert "AzureWebJobsStorage__accountName" in str(raised.value)
