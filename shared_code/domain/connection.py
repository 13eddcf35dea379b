"""ITSM connections: what the retired connector's "ITSM Connections" form held, validated better.

``ConnectionBase`` holds what every product's connection has (name, server URL, user, sync scope,
how alerts correlate and map to work items). Each product subclasses it in its own folder
(``itsm/<product>/settings.py``) with its own fields and rules, and ``shared_code/products.py`` parses a
stored or typed-in connection by its ``partner_type``.

A connection never holds a secret value: passwords, client secrets and rotating refresh tokens live
in Key Vault under the names ``secret_names`` gives.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared_code.domain.alert import Severity
from shared_code.domain.workitem import SeverityMapping

CONNECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,49}$")
OPTIONAL_GUID = r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"


class SyncData(StrEnum):
    INCIDENTS = "incidents"
    CHANGE_REQUESTS = "change_requests"


class CorrelationMode(StrEnum):
    """How alerts map to work items: one per problem, where 'problem' is chosen per connection."""

    PER_ALERT = "per-alert"
    PER_RULE_AND_CI = "per-rule-and-ci"
    PER_RULE = "per-rule"


DEFAULT_SEVERITY_MAP: dict[Severity, SeverityMapping] = {
    Severity.SEV0: SeverityMapping(impact=1, urgency=1),
    Severity.SEV1: SeverityMapping(impact=1, urgency=2),
    Severity.SEV2: SeverityMapping(impact=2, urgency=2),
    Severity.SEV3: SeverityMapping(impact=2, urgency=3),
    Severity.SEV4: SeverityMapping(impact=3, urgency=3),
}


def secret_name(connection: str, purpose: str) -> str:
    """Key Vault secret name for one of a connection's secrets (``[0-9a-zA-Z-]`` only)."""
    return f"itsm-{connection.lower()}-{purpose}"


class SecretSpec(BaseModel):
    """One secret a product's connection needs: its Key Vault purpose and how people call it."""

    model_config = ConfigDict(frozen=True)

    purpose: str  # part of the Key Vault name: password, client-secret, refresh-token
    label: str  # "password", "client secret"
    flag: str = ""  # the CLI's --X-env option, "" for secrets the app writes itself (refresh tokens)


class ConnectionBase(BaseModel):
    """Fields every product's connection has; products add theirs in a subclass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    partner_type: str
    server_url: str
    username: str = Field(min_length=1)
    sync_data: frozenset[SyncData] = frozenset({SyncData.INCIDENTS, SyncData.CHANGE_REQUESTS})
    sync_scope_days: int = Field(default=15, ge=1, le=120)
    create_configuration_items: bool = False
    correlation: CorrelationMode = CorrelationMode.PER_RULE_AND_CI
    severity_map: dict[Severity, SeverityMapping] = Field(default_factory=lambda: dict(DEFAULT_SEVERITY_MAP))
    default_severity: Severity = Field(
        default=Severity.SEV3,
        description="the severity of alerts that carry none (Cost Management budget alerts)",
    )
    auto_resolve: bool = True
    note_interval_minutes: int = Field(default=15, ge=0, le=1440)
    reopen_window_hours: int = Field(default=24, ge=0, le=720)
    assignment_group: str = ""
    caller: str = ""
    close_azure_alerts: bool = Field(
        default=False, description="backward sync: close the Azure alert when its work item is resolved"
    )
    close_alerts_in: tuple[str, ...] = Field(
        default=(),
        description="backward sync closes alerts only in these subscriptions (GUIDs); empty: any",
    )
    # secure webhook: when set, the webhook also requires an Entra ID token for this app registration
    secure_webhook_app_id: str = Field(default="", pattern=OPTIONAL_GUID)
    secure_webhook_tenant_id: str = Field(default="", pattern=OPTIONAL_GUID)
    secure_webhook_app_id_uri: str = Field(default="", max_length=256, pattern=r"^((api|https)://\S+)?$")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not CONNECTION_NAME.match(value):
            raise ValueError("use 1-50 letters, digits and dashes, starting with a letter or digit")
        return value

    @field_validator("server_url")
    @classmethod
    def _server_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme != "https":
            raise ValueError("must be an https:// URL")
        if not parts.hostname:
            raise ValueError("has no host name")
        if parts.username or parts.password:
            raise ValueError("must not contain credentials; they go to Key Vault")
        if parts.query or parts.fragment:
            raise ValueError("must be the instance's base URL without query or fragment")
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            raise ValueError("has an invalid port (use a number from 1 to 65535, or none for 443)") from None
        return f"https://{parts.netloc}{parts.path.rstrip('/')}"

    @field_validator("close_alerts_in")
    @classmethod
    def _subscriptions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not re.fullmatch(
                r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", item
            ):
                raise ValueError("each must be a subscription id (a GUID)")
        return tuple(item.lower() for item in value)

    @model_validator(mode="after")
    def _secure_webhook(self) -> Self:
        if bool(self.secure_webhook_app_id) != bool(self.secure_webhook_tenant_id):
            raise ValueError("secure_webhook_app_id and secure_webhook_tenant_id go together")
        if self.secure_webhook_app_id_uri and not self.secure_webhook_app_id:
            raise ValueError("secure_webhook_app_id_uri needs secure_webhook_app_id")
        return self

    def secret_specs(self) -> tuple[SecretSpec, ...]:
        """The secrets this connection keeps in Key Vault; products with more override it."""
        return (SecretSpec(purpose="password", label="password", flag="--password-env"),)

    @property
    def password_secret_name(self) -> str:
        return secret_name(self.name, "password")

    @property
    def secret_names(self) -> tuple[str, ...]:
        return tuple(secret_name(self.name, spec.purpose) for spec in self.secret_specs())

    def mapping_for(self, severity: Severity) -> SeverityMapping:
        return self.severity_map.get(severity, DEFAULT_SEVERITY_MAP[severity])


def describe_validation_error(exc: ValidationError, what: str, labels: dict[str, str] | None = None) -> str:
    """A pydantic error as lines of ``field: problem`` without echoing input values.

    ``labels`` renames fields for the reader (the CLI passes its flags: ``server_url`` -> ``--url``);
    a list position is shown as "item N" of the field.
    """
    labels = labels or {}
    lines = []
    for error in exc.errors():
        loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        head = str(loc[0]) if loc else what
        name = labels.get(head, head)
        rest = "".join(f" item {part + 1}" if isinstance(part, int) else f".{part}" for part in loc[1:])
        message = "is required" if error["type"] == "missing" else error["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"- {name}{rest}: {message}")
    return f"invalid {what}:\n" + "\n".join(lines)
