"""A Cherwell connection: the common fields plus the REST API client, business objects and statuses.

Cherwell sites rename and extend their business objects, so the names this app works with are
settings with the stock defaults (``Incident``, ``ChangeRequest``, ``JournalNote``, the
``Incident Owns Journals`` relationship). Field *ids* are never configured: the connector looks
them up from the schema by name.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal, Self
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from shared_code.domain.connection import ConnectionBase, SecretSpec, secret_name

API_PATH = "/CherwellAPI"
"""Where the REST API lives on a stock server; a URL without a path gets it appended."""

_OBJECT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,99}$")
_FIELD_NAME = _OBJECT_NAME
_LABEL = re.compile(r"^[^\x00-\x1f\x7f]{1,120}$")


class AuthMode(StrEnum):
    """The ``auth_mode`` of the token request: it must be the mode the CSM Browser Client uses."""

    INTERNAL = "Internal"
    LDAP = "LDAP"
    SAML = "SAML"
    WINDOWS = "Windows"


class CherwellConnection(ConnectionBase):
    partner_type: Literal["cherwell"] = "cherwell"
    client_id: str = Field(
        min_length=1,
        max_length=100,
        description="OAuth client id (REST API client key from CSM Administrator > Security)",
        json_schema_extra={"cli": "--client-id"},
    )
    auth_mode: AuthMode = Field(
        default=AuthMode.INTERNAL,
        description="Cherwell sign-in mode of the integration user",
        json_schema_extra={"cli": "--auth-mode"},
    )
    native_client: bool = Field(
        default=False,
        description="the REST API client is a native client that needs its client secret",
        json_schema_extra={"cli": "--native-client"},
    )
    incident_object: str = Field(
        default="Incident",
        description="business object of incidents",
        json_schema_extra={"cli": "--incident-object"},
    )
    change_object: str = Field(
        default="ChangeRequest",
        description="business object of change requests",
        json_schema_extra={"cli": "--change-object"},
    )
    note_object: str = Field(
        default="JournalNote",
        description="business object of work notes (a Journal - Note)",
        json_schema_extra={"cli": "--note-object"},
    )
    note_relationship: str = Field(
        default="Incident Owns Journals",
        description="relationship from an incident to its journal notes",
        json_schema_extra={"cli": "--note-relationship"},
    )
    ci_object: str = Field(
        default="ConfigServer",
        description="business object searched (and, with --create-ci, created) for an alert's CI",
        json_schema_extra={"cli": "--ci-object"},
    )
    correlation_field: str = Field(
        default="",
        description="incident text field for the alert's correlation id (empty: kept in Description)",
        json_schema_extra={"cli": "--correlation-field"},
    )
    resolved_status: str = Field(
        default="Resolved",
        description="Status set when an alert resolves its incident",
        json_schema_extra={"cli": "--resolved-status"},
    )
    reopen_status: str = Field(
        default="Reopened",
        description="Status set when a resolved incident's alert fires again",
        json_schema_extra={"cli": "--reopen-status"},
    )
    service: str = Field(
        default="",
        max_length=200,
        description="Service of new incidents",
        json_schema_extra={"cli": "--service"},
    )
    category: str = Field(
        default="",
        max_length=200,
        description="Category of new incidents",
        json_schema_extra={"cli": "--category"},
    )
    subcategory: str = Field(
        default="",
        max_length=200,
        description="Subcategory of new incidents",
        json_schema_extra={"cli": "--subcategory"},
    )
    time_zone: str = Field(
        default="UTC",
        description="time zone of the date-times the API shows to the integration user (IANA name)",
        json_schema_extra={"cli": "--time-zone"},
    )

    @field_validator("server_url")
    @classmethod
    def _api_path(cls, value: str) -> str:
        """``https://host`` means the stock ``https://host/CherwellAPI``."""
        parts = urlsplit(value)
        return value if parts.path not in ("", "/") else f"https://{parts.netloc}{API_PATH}"

    @field_validator("incident_object", "change_object", "note_object", "ci_object")
    @classmethod
    def _object_name(cls, value: str) -> str:
        if not _OBJECT_NAME.match(value):
            raise ValueError("must be a business object name: a letter, then letters, digits or _")
        return value

    @field_validator("correlation_field")
    @classmethod
    def _field_name(cls, value: str) -> str:
        if value and not _FIELD_NAME.match(value):
            raise ValueError("must be a field name: a letter, then letters, digits or _")
        return value

    @field_validator("note_relationship", "resolved_status", "reopen_status")
    @classmethod
    def _label(cls, value: str) -> str:
        value = value.strip()
        if not _LABEL.match(value):
            raise ValueError("must be 1-120 printable characters")
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        value = value.strip()
        if value.upper() == "UTC":
            return "UTC"
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
        return value

    @model_validator(mode="after")
    def _distinct_statuses(self) -> Self:
        if self.resolved_status.lower() == self.reopen_status.lower():
            raise ValueError("resolved_status and reopen_status must differ")
        return self

    def secret_specs(self) -> tuple[SecretSpec, ...]:
        password = SecretSpec(purpose="password", label="password", flag="--password-env")
        refresh = SecretSpec(purpose="refresh-token", label="refresh token")
        if not self.native_client:
            return (password, refresh)
        client_secret = SecretSpec(purpose="client-secret", label="client secret", flag="--client-secret-env")
        return (client_secret, password, refresh)

    @property
    def client_secret_name(self) -> str:
        return secret_name(self.name, "client-secret")

    @property
    def refresh_token_secret_name(self) -> str:
        return secret_name(self.name, "refresh-token")
