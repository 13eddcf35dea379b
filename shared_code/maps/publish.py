"""Publishing imported maps to the CMDB: servers as CIs, dependencies as "Depends on::Used by".

For every connection with ``create_configuration_items`` on whose product offers a
``DependencyCmdb`` (``ConnectorPorts.dependencies``), the servers an import stored and the
machines they talk to become configuration items, and each dependency a relationship. Only
machines become CIs: client groups and external endpoints are not configuration items anyone
owns. The product makes it idempotent (ServiceNow's IRE identifies what exists), so every import
publishes its servers whole: one that failed last hour is caught up now, and nothing is doubled.

A CMDB that refuses or cannot be reached never fails the import: the maps are stored already,
and what went wrong is returned for the ``Runs`` record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from shared_code.domain.connection import ConnectionBase
from shared_code.domain.maps import Direction, EdgeKind, NodeKind, ServerMap
from shared_code.errors import ConnectorAppError
from shared_code.ports.itsm import CmdbPublication, ConnectorPorts, Dependency, DependencyCmdb
from shared_code.ports.state import ConnectionStore

log = logging.getLogger(__name__)


def dependencies_of(server_map: ServerMap) -> list[Dependency]:
    """The map's machine-to-machine dependencies: what the server connects out to, and the
    machines that connect in (each pair once, the lowest port kept)."""
    by_id = {node.id: node for node in server_map.nodes}
    root = by_id.get(server_map.root_id)
    root_ip = root.ips[0] if root is not None and root.ips else ""
    found: dict[tuple[str, str], Dependency] = {}

    def machine_of(node_id: str) -> tuple[str, str] | None:
        node = by_id.get(node_id)
        if node is not None and node.machine:
            node = by_id.get(node.machine)
        if node is None or node.kind is not NodeKind.MACHINE:
            return None
        return node.name, (node.ips[0] if node.ips else "")

    def add(dependency: Dependency) -> None:
        key = (dependency.server.lower(), dependency.depends_on.lower())
        if key[0] == key[1]:
            return
        kept = found.get(key)
        if kept is None or (
            dependency.port is not None and (kept.port is None or dependency.port < kept.port)
        ):
            found[key] = dependency

    for edge in server_map.edges:
        if edge.kind is not EdgeKind.CONNECTION:
            continue
        if edge.direction is Direction.OUTBOUND:
            target = machine_of(edge.target)
            if target is not None:
                add(Dependency(server_map.server, target[0], edge.port, root_ip, target[1]))
        elif edge.direction is Direction.INBOUND:
            client = machine_of(edge.source)
            if client is not None:
                add(Dependency(client[0], server_map.server, edge.port, client[1], root_ip))
    return sorted(found.values(), key=lambda d: (d.server.lower(), d.depends_on.lower()))


@dataclass
class PublishOutcome:
    """One connection's publication: what it created, or why it did not."""

    connection: str
    new_items: int = 0
    new_relations: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class PublishBatch:
    """What an import collects for the CMDB while it stores maps (servers and their dependencies)."""

    servers: list[str] = field(default_factory=list)
    dependencies: list[Dependency] = field(default_factory=list)

    def add(self, server_map: ServerMap) -> None:
        self.servers.append(server_map.server)
        self.dependencies.extend(dependencies_of(server_map))


class CmdbPublisher:
    """Hands an import's servers and dependencies to each create-CI connection's CMDB port."""

    def __init__(
        self,
        connections: ConnectionStore,
        connector_for: Callable[[ConnectionBase], ConnectorPorts],
    ) -> None:
        self._connections = connections
        self._connector_for = connector_for

    def targets(self) -> list[ConnectionBase]:
        """The connections that want maps in their CMDB (create-CI on); [] when none can be read."""
        try:
            return [c for c in self._connections.list() if c.create_configuration_items]
        except ConnectorAppError as exc:
            log.warning("listing connections for the CMDB publication failed: %s", exc)
            return []

    def publish(
        self, targets: Iterable[ConnectionBase], servers: Sequence[str], dependencies: Sequence[Dependency]
    ) -> list[PublishOutcome]:
        outcomes = []
        for connection in targets:
            outcome = PublishOutcome(connection.name)
            outcomes.append(outcome)
            try:
                cmdb = self._cmdb(connection)
                if cmdb is None:
                    continue
                published: CmdbPublication = cmdb.publish_dependencies(servers, dependencies)
            except ConnectorAppError as exc:
                outcome.errors.append(str(exc)[:300])
                log.warning("publishing dependency maps to %s failed: %s", connection.name, exc)
                continue
            outcome.new_items = published.new_items
            outcome.new_relations = published.new_relations
            outcome.errors.extend(published.errors)
        return outcomes

    def _cmdb(self, connection: ConnectionBase) -> DependencyCmdb | None:
        cmdb = self._connector_for(connection).dependencies
        if cmdb is None:
            log.info("connection %s has create-CI on, but its product has no CMDB port", connection.name)
        return cmdb
