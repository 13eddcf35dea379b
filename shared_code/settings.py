"""App settings: every environment variable the app reads, validated once into one model.

A missing or invalid setting fails with a single ``ConfigurationError`` that lists every problem
by the setting's name, so an operator fixes them all in one deployment instead of one per restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from shared_code.errors import ConfigurationError

DEVELOPMENT_STORAGE = "UseDevelopmentStorage=true"


def _https_url(value: str) -> str:
    if value and not value.lower().startswith("https://"):
        raise ValueError("must be an https:// URL")
    return value.rstrip("/")


HttpsUrl = Annotated[str, AfterValidator(_https_url)]


class Settings(BaseModel):
    """The app settings (Function App configuration / local.settings.json ``Values``)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    storage_connection: str = Field(
        default="",
        alias="AzureWebJobsStorage",
        description="Functions host storage; also the state tables unless STATE_TABLE_ENDPOINT is set",
    )
    state_table_endpoint: HttpsUrl = Field(
        default="",
        alias="STATE_TABLE_ENDPOINT",
        description="https://<account>.table.core.windows.net, reached with the app's managed identity",
    )
    table_prefix: str = Field(default="", alias="TABLE_PREFIX", pattern=r"^([A-Za-z][A-Za-z0-9]{0,19})?$")
    key_vault_url: HttpsUrl = Field(alias="KEY_VAULT_URL", min_length=1)
    alert_max_attempts: int = Field(default=5, alias="ALERT_MAX_ATTEMPTS", ge=1, le=50)
    alert_lease_seconds: int = Field(default=60, alias="ALERT_LEASE_SECONDS", ge=5, le=600)
    http_timeout_seconds: float = Field(default=20.0, alias="HTTP_TIMEOUT_SECONDS", gt=0, le=230)
    tls_ca_bundle: str = Field(
        default="", alias="TLS_CA_BUNDLE", description="extra CA bundle for outbound TLS (private CAs)"
    )
    sync_page_size: int = Field(default=1000, alias="SYNC_PAGE_SIZE", ge=10, le=10000)
    sync_overlap_seconds: int = Field(default=120, alias="SYNC_OVERLAP_SECONDS", ge=0, le=3600)
    logs_ingestion_endpoint: HttpsUrl = Field(default="", alias="LOGS_INGESTION_ENDPOINT")
    logs_ingestion_rule_id: str = Field(default="", alias="LOGS_INGESTION_RULE_ID")
    logs_ingestion_stream: str = Field(default="Custom-ServiceDesk_CL", alias="LOGS_INGESTION_STREAM")
    logs_ingestion_error_stream: str = Field(
        default="Custom-ServiceDeskLog_CL", alias="LOGS_INGESTION_ERROR_STREAM"
    )
    arm_endpoint: HttpsUrl = Field(default="https://management.azure.com", alias="ARM_ENDPOINT")

    @property
    def logs_ingestion_enabled(self) -> bool:
        return bool(self.logs_ingestion_endpoint and self.logs_ingestion_rule_id)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Validate the environment; every problem is named in one ConfigurationError."""
        known = {field.alias for field in cls.model_fields.values() if field.alias}
        values = {name: value for name, value in environ.items() if name in known}
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else "?"
                message = "is required" if error["type"] == "missing" else error["msg"]
                problems.append(f"- {name}: {message}")
            raise ConfigurationError("Invalid app settings:\n" + "\n".join(problems)) from None
        if not settings.storage_connection and not settings.state_table_endpoint:
            raise ConfigurationError(
                "Invalid app settings:\n- AzureWebJobsStorage: is required (or set STATE_TABLE_ENDPOINT)"
            )
        if bool(settings.logs_ingestion_endpoint) != bool(settings.logs_ingestion_rule_id):
            raise ConfigurationError(
                "Invalid app settings:\n- LOGS_INGESTION_ENDPOINT and LOGS_INGESTION_RULE_ID: "
                "set both to send work items to Log Analytics, or neither"
            )
        return settings
