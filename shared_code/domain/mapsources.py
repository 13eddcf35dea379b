"""Map source definitions: where a dependency map comes from and which servers it covers.

What the SCOM integration's rule overrides held (one workspace, a "Service Map Servers Group",
Interval, TimeoutSeconds, TimeWindowMinutes at most 60), validated and generalised: several
workspaces, four kinds of source, three ways to name the servers, a longer window for the
table sources. A definition never holds a secret; the app reaches every source with its own
Azure identity.

Workspaces are stored with both their ARM resource id (what an operator copies from the portal,
and what the Service Map API's paths are built from) and their *customer id*, the workspace GUID
the Log Analytics query API addresses. The customer id is stored rather than looked up on every
run: a run then needs only *Log Analytics Reader* and makes no ARM call; ``maps sources add`` may
look it up once (``shared_code.mapsources.arm.workspace_customer_id``) when the operator did not
give it.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared_code.domain.maps import MapWindow, ServerMap
from shared_code.errors import InvalidInputError

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,49}$")
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
WORKSPACE_RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<subscription>[0-9a-fA-F-]{36})"
    r"/resourceGroups/(?P<group>[-\w.()]{1,90})"
    r"/providers/Microsoft\.OperationalInsights/workspaces/(?P<name>[A-Za-z0-9][A-Za-z0-9-]{2,61}[A-Za-z0-9])$",
    re.IGNORECASE,
)
RESOURCE_GROUP_SCOPE = re.compile(
    r"^/subscriptions/(?P<subscription>[0-9a-fA-F-]{36})/resourceGroups/(?P<group>[-\w.()]{1,90})$",
    re.IGNORECASE,
)
SUBSCRIPTION_SCOPE = re.compile(r"^/subscriptions/(?P<subscription>[0-9a-fA-F-]{36})$", re.IGNORECASE)
MACHINE_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
COMPUTER_NAME = re.compile(r"^[^\x00-\x1f\x7f\"'\\]{1,253}$")

MAX_COMPUTERS = 5000
SERVICE_MAP_MAX_WINDOW_MINUTES = 60
"""The Service Map API serves at most one hour per request (the SCOM rule's TimeWindowMinutes limit)."""
TABLE_MAX_WINDOW_MINUTES = 1440
MAX_TIMEOUT_SECONDS = 600
"""The Log Analytics query API waits at most 10 minutes (``Prefer: wait=600``)."""


class MapSourceKind(StrEnum):
    VMINSIGHTS = "vminsights"  # VMConnection / VMComputer / VMProcess / VMBoundPort in Log Analytics
    SERVICEMAP = "servicemap"  # the Service Map REST API through ARM
    FLOWLOGS = "flowlogs"  # VNet flow logs through Traffic Analytics (NTANetAnalytics)
    MIGRATE = "migrate"  # an Azure Migrate dependency export (CSV, imported with the CLI)


TABLE_SOURCES = frozenset({MapSourceKind.VMINSIGHTS, MapSourceKind.FLOWLOGS})


class ServerGroupKind(StrEnum):
    COMPUTERS = "computers"  # explicit computer names
    MACHINE_GROUP = "machineGroup"  # a Service Map machine group (by its name, a GUID)
    RESOURCE_GROUP = "resourceGroup"  # every mapped machine in an Azure resource group
    SUBSCRIPTION = "subscription"  # every mapped machine in an Azure subscription


class Workspace(BaseModel):
    """A Log Analytics workspace: its ARM resource id and its customer id (the query API's GUID)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resource_id: str
    customer_id: str = Field(default="", description="the workspace ID (GUID) on the Overview page")

    @field_validator("resource_id")
    @classmethod
    def _resource_id(cls, value: str) -> str:
        text = value.strip().rstrip("/")
        match = WORKSPACE_RESOURCE_ID.match(text)
        if not match or not GUID.match(match["subscription"]):
            raise ValueError(
                "must be a workspace resource id: /subscriptions/{subscription id}/resourceGroups/{group}"
                "/providers/Microsoft.OperationalInsights/workspaces/{name}"
            )
        return (
            f"/subscriptions/{match['subscription'].lower()}/resourceGroups/{match['group']}"
            f"/providers/Microsoft.OperationalInsights/workspaces/{match['name']}"
        )

    @field_validator("customer_id")
    @classmethod
    def _customer_id(cls, value: str) -> str:
        text = value.strip()
        if text and not GUID.match(text):
            raise ValueError("must be the workspace ID, a GUID like 00000000-0000-0000-0000-000000000000")
        return text.lower()

    def _part(self, name: str) -> str:
        match = WORKSPACE_RESOURCE_ID.match(self.resource_id)
        assert match is not None  # validated on construction
        return match[name]

    @property
    def subscription_id(self) -> str:
        return self._part("subscription")

    @property
    def resource_group(self) -> str:
        return self._part("group")

    @property
    def name(self) -> str:
        return self._part("name")


class ServerGroup(BaseModel):
    """Which servers a source maps: names, a Service Map machine group, or an Azure scope."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ServerGroupKind = ServerGroupKind.COMPUTERS
    computers: tuple[str, ...] = Field(default=(), max_length=MAX_COMPUTERS)
    machine_group: str = ""
    scope: str = Field(default="", description="resource group or subscription id for those kinds")

    @field_validator("computers")
    @classmethod
    def _computers(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        seen: dict[str, str] = {}
        for index, raw in enumerate(values):
            name = raw.strip()
            if not COMPUTER_NAME.match(name):
                raise ValueError(
                    f"entry {index + 1} is not a computer name (1-253 characters, no quotes, "
                    "backslashes or control characters)"
                )
            seen.setdefault(name.lower(), name)
        return tuple(seen.values())

    @model_validator(mode="after")
    def _matches_kind(self) -> Self:
        kind = self.kind
        if kind is ServerGroupKind.COMPUTERS:
            if self.machine_group or self.scope:
                raise ValueError("a computers group takes only computer names")
        elif kind is ServerGroupKind.MACHINE_GROUP:
            if not MACHINE_GROUP_NAME.match(self.machine_group):
                raise ValueError("machine_group must be the Service Map machine group's name (its GUID)")
            if self.computers or self.scope:
                raise ValueError("a machineGroup group takes only the machine group name")
        else:
            pattern = RESOURCE_GROUP_SCOPE if kind is ServerGroupKind.RESOURCE_GROUP else SUBSCRIPTION_SCOPE
            match = pattern.match(self.scope.strip().rstrip("/"))
            if not match or not GUID.match(match["subscription"]):
                example = (
                    "/subscriptions/{subscription id}/resourceGroups/{group}"
                    if kind is ServerGroupKind.RESOURCE_GROUP
                    else "/subscriptions/{subscription id}"
                )
                raise ValueError(f"scope must be {example} for a {kind.value} group")
            if self.computers or self.machine_group:
                raise ValueError(f"a {kind.value} group takes only its scope")
        return self

    @property
    def scope_id(self) -> str:
        """The scope, normalised (lower-case subscription id, no trailing slash)."""
        text = self.scope.strip().rstrip("/")
        if not text:
            return ""
        parts = text.split("/")
        parts[2] = parts[2].lower()
        return "/".join(parts)


class MapSourceDefinition(BaseModel):
    """One map source, managed with ``maps sources add/list/show/remove/test``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: MapSourceKind
    workspaces: tuple[Workspace, ...] = Field(default=(), max_length=20)
    group: ServerGroup = ServerGroup()
    enabled: bool = True
    timeout_seconds: int = Field(default=120, ge=5, le=MAX_TIMEOUT_SECONDS, description="per request")
    window_minutes: int = Field(default=60, ge=5, le=TABLE_MAX_WINDOW_MINUTES)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SOURCE_NAME.match(value):
            raise ValueError("use 1-50 letters, digits and dashes, starting with a letter or digit")
        return value

    @field_validator("workspaces")
    @classmethod
    def _distinct_workspaces(cls, values: tuple[Workspace, ...]) -> tuple[Workspace, ...]:
        ids = [workspace.resource_id.lower() for workspace in values]
        if len(set(ids)) != len(ids):
            raise ValueError("a workspace is listed twice")
        return values

    @model_validator(mode="after")
    def _rules(self) -> Self:
        kind = self.kind
        if kind is MapSourceKind.MIGRATE:
            if self.workspaces:
                raise ValueError("a migrate source reads an exported CSV and takes no workspace")
            return self
        if not self.workspaces:
            raise ValueError(f"a {kind.value} source needs at least one workspace")
        if kind in TABLE_SOURCES:
            missing = [str(i) for i, ws in enumerate(self.workspaces) if not ws.customer_id]
            if missing:
                raise ValueError(
                    f"workspaces {', '.join(missing)}: customer_id (the workspace ID) is required for a "
                    f"{kind.value} source; the Log Analytics query API addresses workspaces by it"
                )
        if self.group.kind is ServerGroupKind.MACHINE_GROUP and kind is not MapSourceKind.SERVICEMAP:
            raise ValueError("machine groups exist only in Service Map; name computers or an Azure scope")
        if self.group.kind is ServerGroupKind.COMPUTERS and not self.group.computers:
            raise ValueError("the server group is empty: name computers, a machine group or an Azure scope")
        if kind is MapSourceKind.SERVICEMAP and self.window_minutes > SERVICE_MAP_MAX_WINDOW_MINUTES:
            raise ValueError(
                f"window_minutes is at most {SERVICE_MAP_MAX_WINDOW_MINUTES} for a servicemap source "
                "(the Service Map API serves at most one hour per request)"
            )
        return self

    @property
    def max_window_minutes(self) -> int:
        if self.kind is MapSourceKind.SERVICEMAP:
            return SERVICE_MAP_MAX_WINDOW_MINUTES
        return TABLE_MAX_WINDOW_MINUTES

    def window_ending(self, end: datetime) -> MapWindow:
        """The window an import at ``end`` covers: the last ``window_minutes`` minutes."""
        return MapWindow(start=end - timedelta(minutes=self.window_minutes), end=end)

    @classmethod
    def parse(cls, data: dict[str, object]) -> MapSourceDefinition:
        """Validate operator input; every problem named by field in one InvalidInputError."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInputError(describe_validation_error(exc, "map source")) from None


def describe_validation_error(exc: ValidationError, what: str) -> str:
    """A pydantic error as lines of ``field: problem`` without echoing input values.

    The same rendering as ``shared_code.connections.describe_validation_error``; repeated here
    because the domain layer imports nothing above it.
    """
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or what
        message = "is required" if error["type"] == "missing" else error["msg"]
        message = message.removeprefix("Value error, ")
        lines.append(f"- {path}: {message}")
    return f"invalid {what}:\n" + "\n".join(lines)


class ServerRef(BaseModel):
    """A member of a source's server group, as the source knows it."""

    model_config = ConfigDict(frozen=True)

    computer: str = Field(min_length=1, description="the computer name people know it by")
    machine_id: str = Field(default="", description="the source's id (VM Insights / Service Map machine id)")
    workspace: str = Field(default="", description="the workspace the source found it in")
    ips: tuple[str, ...] = ()
    resource_id: str = Field(default="", description="its Azure resource id, where known")

    @property
    def key(self) -> str:
        """What identifies the server across runs: the machine id, else the computer name."""
        return (self.machine_id or self.computer).lower()


class ServerMapResult(BaseModel):
    """One server's outcome: its map, or why there is none this time."""

    model_config = ConfigDict(frozen=True)

    server: ServerRef
    map: ServerMap | None = None
    error: str = Field(default="", description="why this server has no map this run (never a secret)")
    warnings: tuple[str, ...] = Field(default=(), description="e.g. partial data: the map may be partial")

    @model_validator(mode="after")
    def _map_or_error(self) -> ServerMapResult:
        if (self.map is None) == (not self.error):
            raise ValueError("a result holds either a map or an error")
        return self

    @property
    def ok(self) -> bool:
        return self.map is not None
