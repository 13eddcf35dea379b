"""The port every dependency-map source implements (VM Insights, Service Map, flow logs, Migrate).

    source = build_map_source(definition, ...)     # shared_code.mapsources.registry
    servers = source.servers()                     # the group's members, resolved once per run
    for result in source.fetch(servers, window):   # one result per server, in batches
        if result.map is None: record result.error for result.server; keep its previous map
        else: store result.map (result.warnings: partial data, say so in Runs)

Why ``fetch`` yields one result per server instead of raising: a source reads many servers per
request (one query per batch), and one bad server, a batch that timed out or an answer that does
not parse must cost only the servers it concerns; the others' maps go on being imported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared_code.domain.maps import MapWindow, ServerMap


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
    warnings: tuple[str, ...] = Field(default=(), description="e.g. partial data: the map may be incomplete")

    @model_validator(mode="after")
    def _map_or_error(self) -> ServerMapResult:
        if (self.map is None) == (not self.error):
            raise ValueError("a result holds either a map or an error")
        return self

    @property
    def ok(self) -> bool:
        return self.map is not None


class MapSource(Protocol):
    """What the importer needs from a source; each source module implements it."""

    def servers(self) -> list[ServerRef]:
        """The server group's members now (raises ``MapSourceError`` when the source cannot say)."""
        ...

    def fetch(self, servers: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        """Each server's map over ``window``: exactly one result per server, in batches."""
        ...

    def check(self) -> str:
        """One cheap call that proves access (``maps sources test``); a summary line, or
        ``MapSourceError`` naming what is wrong (role, workspace, endpoint)."""
        ...

    def close(self) -> None:
        """Release the clients' connection pools."""
        ...
