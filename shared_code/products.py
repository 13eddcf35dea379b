"""The product registry: partner type -> connection model, connector factory and what it offers.

An explicit table, not names built into import strings. Adding a product is one folder under
``shared_code/itsm/`` (settings, auth, connector, mapping) and one entry here. This module sits above
the ports: it hands each product's connector out as the ``ConnectorPorts`` it offers. The CLI offers
the products listed here and builds each one's options from its connection model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr, ValidationError

from shared_code import netsafety
from shared_code.domain.connection import ConnectionBase, describe_validation_error
from shared_code.errors import InvalidInputError, SecretStoreError
from shared_code.itsm.cherwell.auth import CherwellAuth
from shared_code.itsm.cherwell.connector import CherwellConnector
from shared_code.itsm.cherwell.settings import CherwellConnection
from shared_code.itsm.provance.auth import DataverseAuth, client_secret_credential
from shared_code.itsm.provance.connector import ProvanceConnector
from shared_code.itsm.provance.settings import ProvanceConnection
from shared_code.itsm.scsm.auth import CiresonTokenAuth
from shared_code.itsm.scsm.connector import ScsmConnector
from shared_code.itsm.scsm.settings import ScsmConnection
from shared_code.itsm.servicenow.auth import ServiceNowBasicAuth, ServiceNowOAuth
from shared_code.itsm.servicenow.cmdb import ServiceNowDependencyCmdb
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.itsm.servicenow.events import EVENT_SEVERITY, EventWriter
from shared_code.itsm.servicenow.settings import AuthMethod, ServiceNowConnection
from shared_code.ports.itsm import ConnectorPorts
from shared_code.secrets import SecretStore, StoredRefreshToken


def lazy_secret(store: SecretStore, name: str, connection: ConnectionBase) -> Callable[[], SecretStr]:
    """A reader of one secret, so a connector can be built without touching Key Vault."""

    def read() -> SecretStr:
        value = store.get(name)
        if value is None:
            raise SecretStoreError(
                f"secret {name!r} of connection {connection.name!r} is missing from Key Vault; "
                f"store it again with 'connections reauthorise {connection.name}'"
            )
        return value

    return read


def build_servicenow(
    connection: ServiceNowConnection, secrets: SecretStore, client: httpx.Client
) -> ConnectorPorts:
    password = lazy_secret(secrets, connection.password_secret_name, connection)
    auth: httpx.Auth
    if connection.auth_method is AuthMethod.OAUTH:
        auth = ServiceNowOAuth(
            token_url=f"{connection.server_url}/oauth_token.do",
            client_id=connection.client_id,
            client_secret=lazy_secret(secrets, connection.client_secret_name, connection),
            username=connection.username,
            password=password,
            refresh_token_store=StoredRefreshToken(secrets, connection.refresh_token_secret_name),
            connection_name=connection.name,
        )
    else:
        auth = ServiceNowBasicAuth(connection.username, password, connection_name=connection.name)
    connector = ServiceNowConnector(
        connection.name, connection.server_url, client, auth, close_code=connection.close_code
    )
    if connection.work_item_type.sends_events:
        # alerts go to Event Management; the sync still reads incidents and change requests
        events = EventWriter(
            connector,
            event_class=f"Azure Monitor connector ({connection.name})",
            fallback_severity=EVENT_SEVERITY[connection.default_severity],
        )
        return ConnectorPorts(
            product="ServiceNow",
            check=events.check,
            close=connector.close,
            incidents=events,
            changes=connector,
            configuration_items=connector,
        )
    return ConnectorPorts(
        product="ServiceNow",
        check=connector.check,
        close=connector.close,
        incidents=connector,
        changes=connector,
        configuration_items=connector,
        notes=connector,
        dependencies=ServiceNowDependencyCmdb(connector, connection.cmdb_data_source),
    )


def build_provance(
    connection: ProvanceConnection, secrets: SecretStore, client: httpx.Client
) -> ConnectorPorts:
    """Dataverse with the connection's Entra app; no CMDB port (Provance's CMDB tables are site-specific)."""
    credential = client_secret_credential(
        connection.tenant_id,
        connection.client_id,
        lazy_secret(secrets, connection.client_secret_name, connection),
        authority_host=connection.authority_host,
    )
    auth = DataverseAuth(credential, connection.scope, connection_name=connection.name)
    connector = ProvanceConnector(connection, client, auth)
    return ConnectorPorts(
        product="Provance",
        check=connector.check,
        close=connector.close,
        incidents=connector,
        changes=connector,
    )


def build_cherwell(
    connection: CherwellConnection, secrets: SecretStore, client: httpx.Client
) -> ConnectorPorts:
    auth = CherwellAuth(
        connection.server_url,
        client_id=connection.client_id,
        username=connection.username,
        password=lazy_secret(secrets, connection.password_secret_name, connection),
        auth_mode=connection.auth_mode.value,
        client_secret=(
            lazy_secret(secrets, connection.client_secret_name, connection)
            if connection.native_client
            else None
        ),
        refresh_token_store=StoredRefreshToken(secrets, connection.refresh_token_secret_name),
        connection_name=connection.name,
    )
    connector = CherwellConnector(connection, client, auth)
    return ConnectorPorts(
        product="Cherwell",
        check=connector.check,
        close=connector.close,
        incidents=connector,
        changes=connector,
        configuration_items=connector,
    )


def build_scsm(connection: ScsmConnection, secrets: SecretStore, client: httpx.Client) -> ConnectorPorts:
    """SCSM through the Cireson portal: a token for the account's password, no refresh token."""
    auth = CiresonTokenAuth(
        connection.server_url,
        username=connection.username,
        password=lazy_secret(secrets, connection.password_secret_name, connection),
        language_code=connection.language_code,
        connection_name=connection.name,
    )
    connector = ScsmConnector(connection, client, auth)
    return ConnectorPorts(
        product="SCSM",
        check=connector.check,
        close=connector.close,
        incidents=connector,
        changes=connector,
        configuration_items=connector,
    )


@dataclass(frozen=True)
class Product:
    """One ITSM product the app can connect to."""

    partner_type: str
    title: str
    settings: type[ConnectionBase]
    build: Callable[[Any, SecretStore, httpx.Client], ConnectorPorts]
    rotating_refresh_token: Callable[[ConnectionBase], str | None] = lambda _connection: None
    """The Key Vault name of the refresh token to forget when credentials change, if it keeps one."""


def _servicenow_refresh_token(connection: ConnectionBase) -> str | None:
    if isinstance(connection, ServiceNowConnection) and connection.auth_method is AuthMethod.OAUTH:
        return connection.refresh_token_secret_name
    return None


def _cherwell_refresh_token(connection: ConnectionBase) -> str | None:
    return connection.refresh_token_secret_name if isinstance(connection, CherwellConnection) else None


PRODUCTS: dict[str, Product] = {
    "servicenow": Product(
        "servicenow",
        "ServiceNow",
        ServiceNowConnection,
        build_servicenow,
        rotating_refresh_token=_servicenow_refresh_token,
    ),
    "provance": Product("provance", "Provance", ProvanceConnection, build_provance),
    "cherwell": Product(
        "cherwell",
        "Cherwell",
        CherwellConnection,
        build_cherwell,
        rotating_refresh_token=_cherwell_refresh_token,
    ),
    "scsm": Product("scsm", "System Center Service Manager (Cireson portal)", ScsmConnection, build_scsm),
}


def product_of(partner_type: str) -> Product:
    product = PRODUCTS.get(partner_type)
    if product is None:
        supported = ", ".join(sorted(PRODUCTS))
        raise InvalidInputError(
            f"partner type {partner_type[:40]!r} is not supported (use one of: {supported})"
        )
    return product


def parse_connection(data: dict[str, object], labels: dict[str, str] | None = None) -> ConnectionBase:
    """Validate a connection definition with its product's model; every problem in one error.

    The product is chosen by ``partner_type`` (a tagged union kept as a table, so an unknown type
    is named as such instead of as a mismatch with every product's model)."""
    product = product_of(str(data.get("partner_type", "")))
    try:
        connection = product.settings.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation_error(exc, "connection", labels)) from None
    if not isinstance(connection, ServiceNowConnection):  # ServiceNow judges its own (cloud hosts)
        # on-premises products: any host, but never a metadata, link-local or disguised address
        problem = netsafety.url_problem(connection.server_url, private_instance=True)
        if problem is not None:
            label = (labels or {}).get("server_url", "server_url")
            raise InvalidInputError(f"invalid connection:\n- {label}: {problem}")
    return connection


def build_connector(connection: ConnectionBase, secrets: SecretStore, client: httpx.Client) -> ConnectorPorts:
    product = product_of(connection.partner_type)
    if not isinstance(connection, product.settings):
        raise InvalidInputError(f"connection {connection.name!r} is not a {product.title} connection")
    return product.build(connection, secrets, client)
