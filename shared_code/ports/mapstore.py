"""What the map import and the map views need from storage: source definitions and stored maps.

``shared_code.state.mapsources.MapSourceRepository`` and ``shared_code.state.maps.MapRepository``
implement them over Table Storage; unit tests pass in-memory fakes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from shared_code.domain.maps import DependencySummary, MapListing, ServerMap
from shared_code.domain.mapsources import MapSourceDefinition


class MapSourceStore(Protocol):
    def get(self, name: str) -> MapSourceDefinition:
        """The definition called ``name``; NotFoundError when there is none."""
        ...

    def list(self) -> list[MapSourceDefinition]: ...


class DependencyContext(Protocol):
    """Who depends on a server and what it depends on, from its latest import (for incidents)."""

    def summary_for(self, server: str) -> DependencySummary | None:
        """The summary of ``server``'s latest stored map (computer name, any case); None when the
        server was never mapped. One cheap read: it sits on the path that creates an incident."""
        ...


class MapStore(Protocol):
    def load(self, server: str) -> ServerMap | None:
        """The latest stored map of ``server`` (computer name, any case); None when there is none."""
        ...

    def save(self, server_map: ServerMap) -> int:
        """Store ``server_map`` as the server's latest, writing only rows that differ; the number of
        graph rows written or deleted (0: the stored graph was the same)."""
        ...

    def record_failure(
        self, server: str, *, machine_id: str, source: str, source_kind: str, error: str, at: datetime
    ) -> None:
        """The server's latest import failed: say so, keep its previous map."""
        ...

    def find(self, text: str) -> MapListing | None:
        """A server by computer name (any case) or the source's machine id."""
        ...

    def listings(self) -> list[MapListing]: ...
