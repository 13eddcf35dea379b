"""What every drawing renderer derives from a map once: the layout, owners, and per-edge facts."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from shared_code.domain.maps import Direction, EdgeKind, MapEdge, MapNode, NodeKind, ServerMap
from shared_code.maps.layout import MapLayout, layout_map

_KIND_PREFIXES = tuple(f"{kind.value}|" for kind in NodeKind)


@dataclass(frozen=True)
class MapView:
    """A map plus its layout and lookups; built by ``view_of`` and shared by the renderers."""

    server_map: ServerMap
    layout: MapLayout

    @cached_property
    def by_id(self) -> dict[str, MapNode]:
        return {node.id: node for node in self.server_map.nodes}

    @cached_property
    def listener_of(self) -> dict[str, str]:
        """Port node id -> the process node id that listens on it."""
        return {edge.target: edge.source for edge in self.server_map.edges if edge.kind is EdgeKind.LISTENS}

    @cached_property
    def connections(self) -> tuple[MapEdge, ...]:
        return tuple(edge for edge in self.server_map.edges if edge.kind is EdgeKind.CONNECTION)

    def owner_name(self, node_id: str) -> str:
        """The machine's name for a process or port, the node's own name otherwise."""
        node = self.by_id[node_id]
        owner = self.by_id.get(node.machine) if node.machine else None
        if owner is not None and node.kind in (NodeKind.PROCESS, NodeKind.PORT):
            return owner.name
        return node.name

    def server_process(self, edge: MapEdge) -> str:
        """Id of the mapped server's process this connection involves ("" when the source has none)."""
        if edge.direction is Direction.INBOUND:
            ends: tuple[str, ...] = (edge.target,)
        elif edge.direction is Direction.OUTBOUND:
            ends = (edge.source,)
        else:
            ends = (edge.source, edge.target)
        for end in ends:
            row = self.layout.rows.get(end)
            if row is None or row.card != self.layout.root:
                continue
            node = self.by_id[end]
            if node.kind is NodeKind.PROCESS:
                return node.id
            if node.kind is NodeKind.PORT:
                return self.listener_of.get(node.id, "")
        return ""

    def server_processes(self) -> list[MapNode]:
        """The mapped server's processes, sorted by name (the process filter's choices)."""
        root = self.layout.root
        found = [n for n in self.server_map.nodes if n.kind is NodeKind.PROCESS and n.machine == root]
        return sorted(found, key=lambda n: (n.name.lower(), n.id))

    def ports(self) -> list[int]:
        return sorted({edge.port for edge in self.connections if edge.port is not None})

    def describe_change(self, key: str) -> str:
        """A dependency key (``connection|source|target|port|protocol``) as "source → target :port"."""
        parts = key.split("|")
        if len(parts) < 5:
            return key
        port, protocol = parts[-2], parts[-1]
        middle = "|".join(parts[1:-2])
        source, target = _split_ids(middle, self.by_id)
        label = f"{self._name(source)} \u2192 {self._name(target)}"
        if port:
            label += f" :{port}"
        if protocol:
            label += f"/{protocol}"
        return label

    def _name(self, node_id: str) -> str:
        if node_id in self.by_id:
            node = self.by_id[node_id]
            owner = self.owner_name(node_id)
            return node.name if owner == node.name else f"{owner}/{node.name}"
        for prefix in _KIND_PREFIXES:
            if node_id.startswith(prefix):
                return node_id[len(prefix) :]
        return node_id


def _split_ids(middle: str, known: dict[str, MapNode]) -> tuple[str, str]:
    """Split "source|target" where both ids may contain "|": prefer a split into known ids."""
    candidates = [
        index
        for index in range(1, len(middle))
        if middle[index - 1] == "|" and middle.startswith(_KIND_PREFIXES, index)
    ]
    for index in candidates:
        if middle[: index - 1] in known and middle[index:] in known:
            return middle[: index - 1], middle[index:]
    for index in candidates:
        if middle[: index - 1] in known or middle[index:] in known:
            return middle[: index - 1], middle[index:]
    if candidates:
        index = candidates[-1]
        return middle[: index - 1], middle[index:]
    return middle, ""


def view_of(server_map: ServerMap, layout: MapLayout | None = None) -> MapView:
    return MapView(server_map, layout if layout is not None else layout_map(server_map))
