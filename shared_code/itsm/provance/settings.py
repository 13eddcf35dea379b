"""A Provance connection: a Dataverse environment, an Entra app (client credentials) and the tables.

Provance ITSM runs on Dynamics 365 / Dataverse. The app signs in as an Entra application that has an
application user in the environment; ``username`` holds that application's (client) id, the client
secret lives in Key Vault. Which tables hold a site's incidents and change requests is not public,
so the table and column names are settings, with the Customer Service ``incident`` table as the
default for incidents; ``connections test`` checks them against ``EntityDefinitions``.
"""

from __future__ import annotations

import re
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from shared_code.domain.connection import ConnectionBase, SecretSpec, SyncData, secret_name

DATAVERSE_HOST_SUFFIXES = (".dynamics.com", ".crm.microsoftdynamics.us", ".crm.dynamics.cn")
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
LOGICAL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
TENANT = re.compile(r"^([0-9a-fA-F-]{36}|[A-Za-z0-9][A-Za-z0-9.-]{0,252}\.[A-Za-z]{2,})$")
BIND = re.compile(r"^(?P<set>[a-z][a-z0-9_]{0,63})\((?P<id>[0-9a-fA-F-]{36})\)$")
OWNER_SETS = ("teams", "systemusers")
CUSTOMER_SETS = ("accounts", "contacts")
CALLER_SETS = ("contacts",)


def parse_bind(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, str]:
    """``teams(<guid>)`` -> (entity set, id); the form people copy from a record's URL or the API."""
    match = BIND.match(value.strip())
    if not match or not GUID.match(match["id"]) or match["set"] not in allowed:
        forms = " or ".join(f"{name}(<guid>)" for name in allowed)
        raise ValueError(f"{what} must look like {forms}")
    return match["set"], match["id"].lower()


class ProvanceConnection(ConnectionBase):
    partner_type: Literal["provance"] = "provance"
    sync_data: frozenset[SyncData] = frozenset({SyncData.INCIDENTS})
    private_instance: bool = Field(
        default=False,
        description="allow a host outside *.dynamics.com (own domain, proxy)",
        json_schema_extra={"cli": "--private-instance"},
    )
    tenant_id: str = Field(
        default="",
        description="Entra tenant (directory) id or domain of the app registration (required for provance)",
        json_schema_extra={"cli": "--tenant-id"},
    )
    authority_host: str = Field(
        default="",
        description="Entra authority host for national clouds "
        "(default: AZURE_AUTHORITY_HOST, else the public cloud)",
        json_schema_extra={"cli": "--authority-host"},
    )
    incident_table: str = Field(
        default="incident",
        description="logical name of the table that holds incidents",
        json_schema_extra={"cli": "--incident-table"},
    )
    incident_number_column: str = Field(
        default="ticketnumber",
        description="column with the incident number people read",
        json_schema_extra={"cli": "--incident-number-column"},
    )
    change_table: str = Field(
        default="",
        description="logical name of the table that holds change requests (needed to sync them)",
        json_schema_extra={"cli": "--change-table"},
    )
    change_number_column: str = Field(
        default="",
        description="column with the change number people read (default: the table's primary name column)",
        json_schema_extra={"cli": "--change-number-column"},
    )
    correlation_column: str = Field(
        default="",
        description="text column that receives the alert's correlation id (backward sync needs one)",
        json_schema_extra={"cli": "--correlation-column"},
    )
    customer: str = Field(
        default="",
        description="customer of new incidents, accounts(<guid>) or contacts(<guid>) "
        "(the Customer Service incident table requires one)",
        json_schema_extra={"cli": "--customer"},
    )
    resolution_status: int = Field(
        default=5,
        ge=0,
        le=2_147_483_647,
        description="status reason set when an alert resolves its incident (incident: 5 Problem Solved)",
        json_schema_extra={"cli": "--resolution-status"},
    )

    @field_validator("incident_table", "incident_number_column", "change_table", "change_number_column")
    @classmethod
    def _logical_name(cls, value: str) -> str:
        value = value.strip()
        if value and not LOGICAL_NAME.match(value):
            raise ValueError("must be a logical name: lower-case letters, digits and underscores")
        return value

    @field_validator("correlation_column")
    @classmethod
    def _correlation_column(cls, value: str) -> str:
        value = value.strip()
        if value and not LOGICAL_NAME.match(value):
            raise ValueError("must be a logical name: lower-case letters, digits and underscores")
        return value

    @field_validator("username")
    @classmethod
    def _client_id(cls, value: str) -> str:
        if not GUID.match(value.strip()):
            raise ValueError("must be the application (client) id of the Entra app registration, a GUID")
        return value.strip().lower()

    @field_validator("tenant_id")
    @classmethod
    def _tenant(cls, value: str) -> str:
        value = value.strip()
        if value and not TENANT.match(value):
            raise ValueError("must be a tenant id (GUID) or a domain such as contoso.onmicrosoft.com")
        return value

    @field_validator("authority_host")
    @classmethod
    def _authority(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname or parts.path or parts.query:
            raise ValueError("must be an https:// host such as https://login.microsoftonline.us")
        return value

    @field_validator("customer")
    @classmethod
    def _customer(cls, value: str) -> str:
        if not value.strip():
            return ""
        entity_set, guid = parse_bind(value, CUSTOMER_SETS, "the customer")
        return f"{entity_set}({guid})"

    @field_validator("assignment_group")
    @classmethod
    def _owner(cls, value: str) -> str:
        if not value.strip():
            return ""
        entity_set, guid = parse_bind(value, OWNER_SETS, "the assignment group (owner)")
        return f"{entity_set}({guid})"

    @field_validator("caller")
    @classmethod
    def _caller(cls, value: str) -> str:
        if not value.strip():
            return ""
        entity_set, guid = parse_bind(value, CALLER_SETS, "the caller (primary contact)")
        return f"{entity_set}({guid})"

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if not self.tenant_id:
            raise ValueError("tenant_id is required: the Entra tenant id (or domain) of the app registration")
        if not self.private_instance:
            host = urlsplit(self.server_url).hostname or ""
            if not host.endswith(DATAVERSE_HOST_SUFFIXES):
                raise ValueError(
                    f"server_url host {host[:80]!r} is not a Dataverse environment (*.crm*.dynamics.com); "
                    "mark the connection as a private instance to allow it"
                )
        if urlsplit(self.server_url).path not in ("", "/"):
            raise ValueError("server_url must be the environment URL (https://org.crm.dynamics.com), no path")
        if SyncData.CHANGE_REQUESTS in self.sync_data and not self.change_table:
            raise ValueError(
                "syncing change_requests needs change_table (--change-table, the logical name of the table "
                "that holds them); or sync incidents only (--sync incidents)"
            )
        return self

    def secret_specs(self) -> tuple[SecretSpec, ...]:
        return (SecretSpec(purpose="client-secret", label="client secret", flag="--client-secret-env"),)

    @property
    def client_id(self) -> str:
        """The Entra application (client) id the connection signs in as."""
        return self.username

    @property
    def client_secret_name(self) -> str:
        return secret_name(self.name, "client-secret")

    @property
    def scope(self) -> str:
        """Dataverse's resource is the environment URL: ``https://org.crm.dynamics.com/.default``."""
        return f"{self.server_url}/.default"
