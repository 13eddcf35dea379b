"""Partner type -> connector factory. An explicit table, not names built into import strings.

A factory takes the connection, the secret store and the shared HTTP client, and returns a ready
``ItsmConnector``. Adding a product is one module under ``shared_code/itsm/`` and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
from pydantic import SecretStr

from shared_code.connections import AuthMethod, Connection, PartnerType
from shared_code.errors import InvalidInputError, SecretStoreError
from shared_code.itsm.base import ItsmConnector
from shared_code.itsm.servicenow.auth import ServiceNowBasicAuth, ServiceNowOAuth
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.secrets import SecretStore, StoredRefreshToken

ConnectorFactory = Callable[[Connection, SecretStore, httpx.Client], ItsmConnector]


def _secret(store: SecretStore, name: str, connection: Connection) -> Callable[[], SecretStr]:
    """A lazy reader, so a connector can be built without touching Key Vault."""

    def read() -> SecretStr:
        value = store.get(name)
        if value is None:
            raise SecretStoreError(
                f"secret {name!r} of connection {connection.name!r} is missing from Key Vault; "
                "set it again with 'connections add' (after 'connections remove --keep-secrets')"
            )
        return value

    return read


def build_servicenow(connection: Connection, secrets: SecretStore, client: httpx.Client) -> ItsmConnector:
    password = _secret(secrets, connection.password_secret_name, connection)
    auth: httpx.Auth
    if connection.auth_method is AuthMethod.OAUTH:
        auth = ServiceNowOAuth(
            token_url=f"{connection.server_url}/oauth_token.do",
            client_id=connection.client_id,
            client_secret=_secret(secrets, connection.client_secret_name, connection),
            username=connection.username,
            password=password,
            refresh_token_store=StoredRefreshToken(secrets, connection.refresh_token_secret_name),
            connection_name=connection.name,
        )
    else:
        auth = ServiceNowBasicAuth(connection.username, password, connection_name=connection.name)
    return ServiceNowConnector(
        connection.name,
        connection.server_url,
        client,
        auth,
        close_code=connection.close_code,
    )


REGISTRY: dict[PartnerType, ConnectorFactory] = {
    PartnerType.SERVICENOW: build_servicenow,
}
SUPPORTED_PARTNERS = frozenset(REGISTRY)


def build_connector(connection: Connection, secrets: SecretStore, client: httpx.Client) -> ItsmConnector:
    factory = REGISTRY.get(connection.partner_type)
    if factory is None:
        raise InvalidInputError(
            f"connection {connection.name!r}: partner type "
            f"{connection.partner_type.value!r} is not supported yet"
        )
    return factory(connection, secrets, client)
