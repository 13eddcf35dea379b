"""The secure webhook fields of a connection: validated together, optional, never required."""

from __future__ import annotations

import pytest

from shared_code.errors import InvalidInputError
from shared_code.products import parse_connection

BASE = {
    "name": "sn",
    "partner_type": "servicenow",
    "server_url": "https://x.service-now.com",
    "username": "u",
    "client_id": "c",
}
APP = "0f1e2d3c-4b5a-4697-8887-a9b8c7d6e5f4"
TENANT = "72f988bf-0000-4000-8000-0000000000aa"


def test_a_connection_needs_no_secure_webhook_app() -> None:
    assert parse_connection(dict(BASE)).secure_webhook_app_id == ""


def test_app_tenant_and_uri_are_kept() -> None:
    connection = parse_connection(
        {
            **BASE,
            "secure_webhook_app_id": APP,
            "secure_webhook_tenant_id": TENANT,
            "secure_webhook_app_id_uri": f"api://{APP}",
        }
    )
    assert (connection.secure_webhook_app_id, connection.secure_webhook_tenant_id) == (APP, TENANT)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"secure_webhook_app_id": APP}, "go together"),
        ({"secure_webhook_tenant_id": TENANT}, "go together"),
        (
            {"secure_webhook_app_id": "not-a-guid", "secure_webhook_tenant_id": TENANT},
            "secure_webhook_app_id",
        ),
        ({"secure_webhook_app_id_uri": "api://x"}, "needs secure_webhook_app_id"),
        (
            {
                "secure_webhook_app_id": APP,
                "secure_webhook_tenant_id": TENANT,
                "secure_webhook_app_id_uri": "ftp://x",
            },
            "secure_webhook_app_id_uri",
        ),
    ],
)
def test_incomplete_or_malformed_secure_webhook_settings_are_named(
    fields: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_connection({**BASE, **fields})
