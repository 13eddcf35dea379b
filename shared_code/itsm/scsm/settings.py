"""An SCSM connection: the common fields plus what the Cireson Portal API needs to make incidents.

System Center Service Manager has no REST API of its own; the connection's ``server_url`` is the
Cireson Portal in front of it and ``username`` an SCSM account (``DOMAIN\\user``) the portal signs in.
Everything SCSM identifies by GUID (templates, type projections, enumeration values, users) is
given as a GUID here and checked as one, so a typo is a clear error when the connection is added
instead of a failed delivery later.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from shared_code.domain.connection import ConnectionBase

GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

DEFAULT_INCIDENT_TEMPLATE = "a77bb0c9-e201-dd93-230c-799a66d9e8fa"
"""SCSM's stock "Default Incident Template" (DefaultIncidentTemplate)."""
INCIDENT_PROJECTION = "285cb0a2-f276-bccb-563e-bb721df7cdec"
"""System.WorkItem.Incident.ProjectionType: the incident with its users, affected items and action log."""
CHANGE_REQUEST_PROJECTION = "674194d8-0246-7b90-d871-e1ea015b2ea7"
"""System.WorkItem.ChangeRequestProjection."""


def _guid(value: str, *, what: str, required: bool) -> str:
    value = value.strip()
    if not value:
        if required:
            raise ValueError(f"{what} is required")
        return ""
    value = value.strip("{}")
    if not GUID.match(value):
        raise ValueError(f"must be the GUID of {what} (8-4-4-4-12 hexadecimal digits)")
    return value.lower()


class ScsmConnection(ConnectionBase):
    partner_type: Literal["scsm"] = "scsm"
    incident_template_id: str = Field(
        default=DEFAULT_INCIDENT_TEMPLATE,
        description="GUID of the SCSM incident template new incidents start from",
        json_schema_extra={"cli": "--incident-template"},
    )
    created_by_id: str = Field(
        default="",
        description="GUID of the integration account's SCSM user object (looked up by user name when empty)",
        json_schema_extra={"cli": "--created-by-id"},
    )
    language_code: str = Field(
        default="ENU",
        description="Cireson portal language code for the sign-in (display names of enumerations)",
        json_schema_extra={"cli": "--language"},
    )
    resolution_category_id: str = Field(
        default="",
        description="GUID of the IncidentResolutionCategoryEnum value set when an alert resolves an incident",
        json_schema_extra={"cli": "--resolution-category"},
    )
    incident_projection_id: str = Field(
        default=INCIDENT_PROJECTION,
        description="GUID of the incident type projection the connector reads and writes",
        json_schema_extra={"cli": "--incident-projection"},
    )
    change_projection_id: str = Field(
        default=CHANGE_REQUEST_PROJECTION,
        description="GUID of the change request type projection the sync reads",
        json_schema_extra={"cli": "--change-projection"},
    )

    @field_validator("incident_template_id")
    @classmethod
    def _template(cls, value: str) -> str:
        return _guid(value, what="an incident template", required=True)

    @field_validator("created_by_id")
    @classmethod
    def _creator(cls, value: str) -> str:
        return _guid(value, what="an SCSM user object", required=False)

    @field_validator("resolution_category_id")
    @classmethod
    def _resolution(cls, value: str) -> str:
        return _guid(value, what="an IncidentResolutionCategoryEnum value", required=False)

    @field_validator("incident_projection_id", "change_projection_id")
    @classmethod
    def _projection(cls, value: str) -> str:
        return _guid(value, what="a type projection", required=True)

    @field_validator("assignment_group")
    @classmethod
    def _support_group(cls, value: str) -> str:
        """SCSM's support group is an enumeration (IncidentTierQueuesEnum): only its GUID names it."""
        return _guid(value, what="an IncidentTierQueuesEnum value (the support group)", required=False)

    @field_validator("caller")
    @classmethod
    def _affected_user(cls, value: str) -> str:
        return _guid(value, what="an SCSM user object (the affected user)", required=False)

    @field_validator("language_code")
    @classmethod
    def _language(cls, value: str) -> str:
        value = value.strip().upper()
        if not re.fullmatch(r"[A-Z]{3}", value):
            raise ValueError("must be a three-letter portal language code such as ENU or DEU")
        return value

    @field_validator("create_configuration_items")
    @classmethod
    def _no_ci_creation(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "SCSM connections do not create configuration items (SCSM's own connectors bring them "
                "in from Active Directory, Configuration Manager or Operations Manager); leave it off"
            )
        return value
