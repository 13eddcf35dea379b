"""A ServiceNow connection: the common fields plus ServiceNow's host rule, auth method and close code."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Self

from pydantic import Field, model_validator

from shared_code import netsafety
from shared_code.domain.connection import ConnectionBase, SecretSpec, secret_name

SERVICENOW_HOST_SUFFIXES = netsafety.SAAS_HOST_SUFFIXES


class AuthMethod(StrEnum):
    OAUTH = "oauth"
    BASIC = "basic"


class ServiceNowWorkItemType(StrEnum):
    """What an alert becomes in ServiceNow: an incident (Table API) or an Event Management event.

    ``event`` and ``alert`` send the same events (``/api/global/em/jsonv2``); ``alert`` names what
    Event Management makes of them (an ``em_alert``), as the retired connector's choice did."""

    INCIDENT = "incident"
    EVENT = "event"
    ALERT = "alert"

    @property
    def sends_events(self) -> bool:
        return self is not ServiceNowWorkItemType.INCIDENT


class ServiceNowConnection(ConnectionBase):
    partner_type: Literal["servicenow"] = "servicenow"
    private_instance: bool = Field(
        default=False,
        description="allow a host outside *.service-now.com (own domain, proxy)",
        json_schema_extra={"cli": "--private-instance"},
    )
    auth_method: AuthMethod = Field(
        default=AuthMethod.OAUTH,
        description="oauth (password grant) or basic",
        json_schema_extra={"cli": "--auth"},
    )
    client_id: str = Field(
        default="",
        description="OAuth client id from the instance's Application Registry (required for oauth)",
        json_schema_extra={"cli": "--client-id"},
    )
    close_code: str = Field(
        default="Solved (Permanently)",
        min_length=1,
        max_length=80,
        description="resolution code set when an alert resolves its incident",
        json_schema_extra={"cli": "--close-code"},
    )
    cmdb_data_source: str = Field(
        default="AzureMonitorITSM",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,39}$",
        description="the discovery_source choice registered for this app: dependency maps go to the "
        "CMDB through the Identification and Reconciliation API under this data source",
        json_schema_extra={"cli": "--cmdb-data-source"},
    )

    work_item_type: ServiceNowWorkItemType = Field(
        default=ServiceNowWorkItemType.INCIDENT,
        description="what an alert becomes: incident, or event / alert (Event Management events)",
        json_schema_extra={"cli": "--work-item-type"},
    )

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.auth_method is AuthMethod.OAUTH and not self.client_id:
            raise ValueError("client_id is required for OAuth connections")
        problem = netsafety.url_problem(self.server_url, private_instance=self.private_instance)
        if problem is not None:
            raise ValueError(f"server_url: {problem}")
        return self

    def secret_specs(self) -> tuple[SecretSpec, ...]:
        password = SecretSpec(purpose="password", label="password", flag="--password-env")
        if self.auth_method is not AuthMethod.OAUTH:
            return (password,)
        return (
            SecretSpec(purpose="client-secret", label="client secret", flag="--client-secret-env"),
            password,
            SecretSpec(purpose="refresh-token", label="refresh token"),
        )

    @property
    def client_secret_name(self) -> str:
        return secret_name(self.name, "client-secret")

    @property
    def refresh_token_secret_name(self) -> str:
        return secret_name(self.name, "refresh-token")
