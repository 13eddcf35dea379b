"""What the map import hands a CMDB, and what it hears back: plain values, shared by the
``DependencyCmdb`` port (``shared_code/ports/itsm.py``) and the products that implement it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dependency:
    """One "Depends on::Used by" relationship between two servers, for the CMDB."""

    server: str
    depends_on: str
    port: int | None = None
    server_ip: str = ""
    depends_on_ip: str = ""
    """An address the CMDB may identify the server by when it knows it under another name."""


@dataclass(frozen=True)
class CmdbPublication:
    """What one publication changed in the CMDB, and what it refused (per CI or relationship)."""

    new_items: int = 0
    new_relations: int = 0
    errors: tuple[str, ...] = ()
