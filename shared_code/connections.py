"""ITSM connections: what the retired connector's "ITSM Connections" form held, validated better.

A connection never holds a secret value. Client secret, password and the rotating refresh token
live in Key Vault under the names recorded here.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared_code import netsafety
from shared_code.alerts.signal import Severity
from shared_code.errors import InvalidInputError
from shared_code.itsm.base import SeverityMapping

CONNECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,49}$")
SERVICENOW_HOST_SUFFIXES = netsafety.SAAS_HOST_SUFFIXES


class PartnerType(StrEnum):
    SERVICENOW = "servicenow"
    SCSM = "scsm"
    PROVANCE = "provance"
    CHERWELL = "cherwell"


class AuthMethod(StrEnum):
    OAUTH = "oauth"
    BASIC = "basic"


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


class Connection(BaseModel):
    """One ITSM connection. Mandatory fields as in the ITSMC form; everything else has a safe default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    partner_type: PartnerType
    server_url: str
    private_instance: bool = Field(
        default=False, description="allow a ServiceNow host outside *.service-now.com (own domain / proxy)"
    )
    auth_method: AuthMethod = AuthMethod.OAUTH
    client_id: str = ""
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
    close_code: str = Field(default="Solved (Permanently)", min_length=1, max_length=80)
    assignment_group: str = ""
    caller: str = ""
    close_azure_alerts: bool = Field(
        default=False, description="backward sync: close the Azure alert when its work item is resolved"
    )

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

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.auth_method is AuthMethod.OAUTH and not self.client_id:
            raise ValueError("client_id is required for OAuth connections")
        if self.partner_type is PartnerType.SERVICENOW or self.private_instance:
            problem = netsafety.url_problem(self.server_url, private_instance=self.private_instance)
            if problem is not None:
                raise ValueError(f"server_url: {problem}")
        return self

    @property
    def client_secret_name(self) -> str:
        return secret_name(self.name, "client-secret")

    @property
    def password_secret_name(self) -> str:
        return secret_name(self.name, "password")

    @property
    def refresh_token_secret_name(self) -> str:
        return secret_name(self.name, "refresh-token")

    @property
    def secret_names(self) -> tuple[str, ...]:
        names = [self.password_secret_name]
        if self.auth_method is AuthMethod.OAUTH:
            names += [self.client_secret_name, self.refresh_token_secret_name]
        return tuple(names)

    def mapping_for(self, severity: Severity) -> SeverityMapping:
        return self.severity_map.get(severity, DEFAULT_SEVERITY_MAP[severity])

    @classmethod
    def parse(cls, data: dict[str, object]) -> Connection:
        """Validate operator input; every problem named by field in one InvalidInputError."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInputError(describe_validation_error(exc, "connection")) from None


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """A pydantic error as lines of ``field: problem`` without echoing input values."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or what
        message = "is required" if error["type"] == "missing" else error["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"- {path}: {message}")
    return f"invalid {what}:\n" + "\n".join(lines)
