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

from shared_code.domain.maps import MapWindow
from shared_code.domain.mapsources import ServerMapResult, ServerRef

__all__ = ["MapSource", "ServerMapResult", "ServerRef"]


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
