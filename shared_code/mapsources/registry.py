"""An explicit registry: a map source definition -> the source that reads it.

The composition root passes what every source may need (credential, HTTP client, endpoints, CA
bundle, clock); each builder takes its part. Nothing is built at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from azure.core.credentials import TokenCredential

from shared_code.domain.mapsources import MapSourceDefinition, MapSourceKind
from shared_code.errors import InvalidInputError
from shared_code.mapsources.flowlogs import FlowLogsSource
from shared_code.mapsources.logquery import (
    DEFAULT_LOGS_QUERY_AUDIENCE,
    DEFAULT_LOGS_QUERY_ENDPOINT,
    LogQueryRunner,
)
from shared_code.mapsources.servicemap import ServiceMapSource
from shared_code.mapsources.vminsights import VmInsightsSource

MapSource = VmInsightsSource | FlowLogsSource | ServiceMapSource
"""A built source; each implements ``shared_code.ports.maps.MapSource`` (structurally: adapters do
not import the ports above them)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class MapSourceDeps:
    """What the sources are built from (the container's credential and HTTP client, settings)."""

    credential: TokenCredential
    http: httpx.Client
    arm_endpoint: str = "https://management.azure.com"
    logs_query_endpoint: str = DEFAULT_LOGS_QUERY_ENDPOINT
    logs_query_audience: str = DEFAULT_LOGS_QUERY_AUDIENCE
    ca_bundle: str = ""
    clock: Callable[[], datetime] = field(default=_utc_now)
    retries: int = 3
    retry_backoff_factor: float = 0.8


def _runner(definition: MapSourceDefinition, deps: MapSourceDeps) -> LogQueryRunner:
    return LogQueryRunner(
        deps.credential,
        endpoint=deps.logs_query_endpoint,
        audience=deps.logs_query_audience,
        timeout_seconds=definition.timeout_seconds,
        retries=deps.retries,
        retry_backoff_factor=deps.retry_backoff_factor,
        connection_verify=deps.ca_bundle or True,
    )


def _vminsights(definition: MapSourceDefinition, deps: MapSourceDeps) -> MapSource:
    return VmInsightsSource(definition, _runner(definition, deps), clock=deps.clock)


def _flowlogs(definition: MapSourceDefinition, deps: MapSourceDeps) -> MapSource:
    return FlowLogsSource(definition, _runner(definition, deps), clock=deps.clock)


def _servicemap(definition: MapSourceDefinition, deps: MapSourceDeps) -> MapSource:
    return ServiceMapSource(
        definition, deps.http, deps.credential, arm_endpoint=deps.arm_endpoint, clock=deps.clock
    )


BUILDERS: dict[MapSourceKind, Callable[[MapSourceDefinition, MapSourceDeps], MapSource]] = {
    MapSourceKind.VMINSIGHTS: _vminsights,
    MapSourceKind.FLOWLOGS: _flowlogs,
    MapSourceKind.SERVICEMAP: _servicemap,
}


def build_map_source(definition: MapSourceDefinition, deps: MapSourceDeps) -> MapSource:
    """The source for ``definition`` (a migrate source has none: its CSV is imported by the CLI)."""
    builder = BUILDERS.get(definition.kind)
    if builder is None:
        raise InvalidInputError(
            f"map source {definition.name!r} is a {definition.kind.value} source: import its CSV export "
            "with the CLI instead"
        )
    return builder(definition, deps)
