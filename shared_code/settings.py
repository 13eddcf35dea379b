"""App settings: every environment variable the app reads, validated once into one model.

A missing or invalid setting fails with a single ``ConfigurationError`` that lists every problem
by the setting's name, so an operator fixes them all in one deployment instead of one per restart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from shared_code.errors import ConfigurationError

DEVELOPMENT_STORAGE = "UseDevelopmentStorage=true"
MAX_DEQUEUE_COUNT = 5
"""host.json's ``extensions.queues.maxDequeueCount``: after that many deliveries of a queue message the
Functions host moves it to the poison queue, so ALERT_MAX_ATTEMPTS above it would never be reached (the
delivery would stay 'pending' until the redrive timer). Change both together."""
DEFAULT_SYNC_SCHEDULE = "0 */15 * * * *"
DEFAULT_REDRIVE_SCHEDULE = "0 */10 * * * *"
DEFAULT_RETENTION_SCHEDULE = "0 30 3 * * *"
"""The timer schedules' defaults. The trigger decorators in ``functions/`` read the variables
themselves at import (before any settings are validated); ``Settings`` checks the same values."""


def _https_url(value: str) -> str:
    if value and not value.lower().startswith("https://"):
        raise ValueError("must be an https:// URL")
    return value.rstrip("/")


_NCRONTAB_FIELD = re.compile(r"^[0-9A-Za-z*/,-]+$")


def _ncrontab(value: str) -> str:
    """The shape of an Azure Functions timer schedule: six fields, seconds first (a shape check only)."""
    fields = value.split()
    if len(fields) != 6 or not all(_NCRONTAB_FIELD.match(field) for field in fields):
        raise ValueError(
            "must be an NCRONTAB expression of six fields separated by spaces "
            "({second} {minute} {hour} {day} {month} {day-of-week}), e.g. '0 */15 * * * *'"
        )
    return value


_STORAGE_KEYS = frozenset(
    {
        "defaultendpointsprotocol",
        "accountname",
        "accountkey",
        "endpointsuffix",
        "blobendpoint",
        "queueendpoint",
        "tableendpoint",
        "fileendpoint",
        "sharedaccesssignature",
        "usedevelopmentstorage",
        "developmentstorageproxyuri",
    }
)


def _storage_connection(value: str) -> str:
    """The shape of a storage connection string (checked here, so a typo is a settings error that
    names the setting, not a traceback from the SDK on the first alert)."""
    text = value.strip()
    if not text or text.lower() == DEVELOPMENT_STORAGE.lower():
        return value
    pairs: dict[str, str] = {}
    for part in (part.strip() for part in text.split(";")):
        if not part:
            continue
        key, sep, item = part.partition("=")
        if not sep or not key.strip() or not item.strip():
            raise ValueError(
                "is not a storage connection string: expected Key=Value pairs separated by ';' "
                "(copy it from the storage account's Access keys blade), or UseDevelopmentStorage=true"
            )
        pairs[key.strip().lower()] = item.strip()
    unknown = sorted(set(pairs) - _STORAGE_KEYS)
    if unknown:
        raise ValueError(f"has unknown keys ({', '.join(unknown)[:80]}): is it a storage connection string?")
    if "usedevelopmentstorage" in pairs:
        return value
    if "accountname" not in pairs and "tableendpoint" not in pairs:
        raise ValueError("names no account: AccountName (or TableEndpoint) is missing")
    if "accountkey" not in pairs and "sharedaccesssignature" not in pairs:
        raise ValueError("has no credential: AccountKey (or SharedAccessSignature) is missing")
    for name in ("tableendpoint", "queueendpoint", "blobendpoint"):
        if name in pairs and not pairs[name].lower().startswith(("https://", "http://")):
            raise ValueError(f"{name}: must be an http(s):// URL")
    return value


def _max_attempts(value: int) -> int:
    if not 1 <= value <= MAX_DEQUEUE_COUNT:
        raise ValueError(
            f"must be 1 to {MAX_DEQUEUE_COUNT}: host.json moves a queue message to the poison queue after "
            f"maxDequeueCount ({MAX_DEQUEUE_COUNT}) deliveries, so more attempts would never happen "
            "(raise both together)"
        )
    return value


HttpsUrl = Annotated[str, AfterValidator(_https_url)]
IDENTITY_STORAGE = (
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__tableServiceUri",
)
"""The host's identity-based storage settings (no keys) that name the tables' account."""
Schedule = Annotated[str, AfterValidator(_ncrontab)]


class Settings(BaseModel):
    """The app settings (Function App configuration / local.settings.json ``Values``)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    storage_connection: Annotated[str, AfterValidator(_storage_connection)] = Field(
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
    alert_max_attempts: Annotated[int, AfterValidator(_max_attempts)] = Field(
        default=MAX_DEQUEUE_COUNT, alias="ALERT_MAX_ATTEMPTS"
    )
    alert_lease_seconds: int = Field(default=60, alias="ALERT_LEASE_SECONDS", ge=5, le=600)
    http_timeout_seconds: float = Field(default=20.0, alias="HTTP_TIMEOUT_SECONDS", gt=0, le=230)
    tls_ca_bundle: str = Field(
        default="", alias="TLS_CA_BUNDLE", description="extra CA bundle for outbound TLS (private CAs)"
    )
    allow_loopback_instances: bool = Field(
        default=False,
        alias="ALLOW_LOOPBACK_INSTANCES",
        description="let connections reach loopback addresses: local testing only (see netsafety)",
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
    logs_query_endpoint: HttpsUrl = Field(
        default="https://api.loganalytics.azure.com",
        alias="LOGS_QUERY_ENDPOINT",
        description="the Log Analytics query API the table map sources read (VM Insights, flow logs)",
    )
    logs_query_audience: HttpsUrl = Field(
        default="https://api.loganalytics.io",
        alias="LOGS_QUERY_AUDIENCE",
        description="token audience of the query API (national clouds have their own)",
    )
    authority_host: HttpsUrl = Field(
        default="https://login.microsoftonline.com",
        alias="AZURE_AUTHORITY_HOST",
        description="Entra ID authority: OpenID metadata and signing keys for secure webhook tokens",
    )
    health_timeout_seconds: float = Field(default=3.0, alias="HEALTH_TIMEOUT_SECONDS", ge=0.2, le=10)
    storage_account_name: str = Field(
        default="", alias="AzureWebJobsStorage__accountName", pattern=r"^([a-z0-9]{3,24})?$"
    )
    queue_service_uri: HttpsUrl = Field(default="", alias="AzureWebJobsStorage__queueServiceUri")
    table_service_uri: HttpsUrl = Field(default="", alias="AzureWebJobsStorage__tableServiceUri")
    sync_schedule: Schedule = Field(default=DEFAULT_SYNC_SCHEDULE, alias="SYNC_SCHEDULE")
    alert_redrive_schedule: Schedule = Field(default=DEFAULT_REDRIVE_SCHEDULE, alias="ALERT_REDRIVE_SCHEDULE")
    retention_schedule: Schedule = Field(default=DEFAULT_RETENTION_SCHEDULE, alias="RETENTION_SCHEDULE")
    retention_deliveries_days: int = Field(
        default=30,
        alias="RETENTION_DELIVERIES_DAYS",
        ge=1,
        le=3650,
        description="delivered and failed alert deliveries older than this are deleted (pending: never)",
    )
    retention_runs_days: int = Field(default=90, alias="RETENTION_RUNS_DAYS", ge=1, le=3650)
    retention_sync_errors_days: int = Field(default=30, alias="RETENTION_SYNC_ERRORS_DAYS", ge=1, le=3650)
    retention_max_rows: int = Field(
        default=5000,
        alias="RETENTION_MAX_ROWS",
        ge=100,
        le=100_000,
        description="rows deleted per table per run at most (the next run continues)",
    )

    @property
    def identity_table_endpoint(self) -> str:
        """The state tables' endpoint reached with the app's identity; "" when a connection string is used.

        ``STATE_TABLE_ENDPOINT`` wins; else, with no ``AzureWebJobsStorage`` connection string, the
        host's own identity-based storage settings name the account (as the host reads them).
        """
        if self.state_table_endpoint:
            return self.state_table_endpoint
        if self.storage_connection:
            return ""
        if self.table_service_uri:
            return self.table_service_uri
        if self.storage_account_name:
            return f"https://{self.storage_account_name}.table.core.windows.net"
        return ""

    @property
    def logs_ingestion_enabled(self) -> bool:
        return bool(self.logs_ingestion_endpoint and self.logs_ingestion_rule_id)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Validate the environment; every problem, field and cross-field, is named in one
        ConfigurationError."""
        known = {field.alias for field in cls.model_fields.values() if field.alias}
        values = {name: value for name, value in environ.items() if name in known}
        problems: list[str] = []
        settings: Settings | None = None
        try:
            settings = cls.model_validate(values)
        except ValidationError as exc:
            for error in exc.errors():
                name = str(error["loc"][0]) if error["loc"] else "?"
                message = "is required" if error["type"] == "missing" else error["msg"]
                problems.append(f"- {name}: {message.removeprefix('Value error, ')}")
        # the cross-field rules read the raw values, so they are checked even when a field failed
        storage = ("AzureWebJobsStorage", "STATE_TABLE_ENDPOINT", *IDENTITY_STORAGE)
        if not any(values.get(name) for name in storage):
            problems.append(
                "- AzureWebJobsStorage: is required (or, without keys, set AzureWebJobsStorage__accountName "
                "or STATE_TABLE_ENDPOINT)"
            )
        if bool(values.get("LOGS_INGESTION_ENDPOINT")) != bool(values.get("LOGS_INGESTION_RULE_ID")):
            problems.append(
                "- LOGS_INGESTION_ENDPOINT and LOGS_INGESTION_RULE_ID: "
                "set both to send work items to Log Analytics, or neither"
            )
        problems += _lease_problems(cls, values, failed=" ".join(problems))
        if problems or settings is None:
            raise ConfigurationError("Invalid app settings:\n" + "\n".join(problems))
        return settings


def _lease_problems(cls: type[Settings], values: Mapping[str, str], failed: str) -> list[str]:
    """A problem's lease must outlast an ITSM call and its retry: when it runs out while the call is
    still in flight, another instance takes the problem over and creates a second incident.
    Checked on the raw values (with the defaults), unless one of them is itself invalid."""
    names = ("ALERT_LEASE_SECONDS", "HTTP_TIMEOUT_SECONDS")
    if any(f"- {name}:" in failed for name in names):
        return []
    fields = cls.model_fields
    try:
        lease = float(values.get(names[0], fields["alert_lease_seconds"].default))
        timeout = float(values.get(names[1], fields["http_timeout_seconds"].default))
    except (TypeError, ValueError):
        return []
    if lease > 2 * timeout:
        return []
    return [
        "- ALERT_LEASE_SECONDS: must be more than twice HTTP_TIMEOUT_SECONDS "
        f"({lease:g} <= 2 * {timeout:g}): the lease must outlast an ITSM call and its retry, "
        "or a second instance takes a problem over while its incident is being created"
    ]
