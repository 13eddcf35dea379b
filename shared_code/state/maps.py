"""The Maps table: each server's latest dependency map, one row per node and per edge.

* ``PartitionKey = "map|{server}"`` holds the graph: ``n|{node id}`` and ``e|{edge key}`` rows, each
  with the node or edge as JSON (split over ``Data``, ``Data1``... when longer than a table string
  may be), so a 3,000-node map is never one oversized entity.
* ``PartitionKey = "index"``, ``RowKey = {server}`` is the server's summary: source, window, import
  time, status, counts, the changes of the latest import and the last error. ``GET /api/maps``
  reads only this partition.

``{server}`` is the computer name, lower-cased and escaped for a table key. Saving compares the
new rows with the stored ones and writes only what differs (upserts, then deletes: edges after the
nodes they join are written, before the nodes they joined are deleted, so a map read at any moment
validates). A failed import touches only the summary row: the previous graph stays.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

from azure.data.tables import TableClient
from pydantic import ValidationError

from shared_code.domain.maps import (
    DependencySummary,
    MapChanges,
    MapEdge,
    MapListing,
    MapNode,
    MapStatus,
    MapWindow,
    ServerMap,
    listing_of,
    summarise,
)
from shared_code.errors import StateError
from shared_code.state.tablebatch import Delete, Operation, write_all
from shared_code.state.tables import Entity, get_entity, merge_entity, query_entities

TABLE = "Maps"
INDEX = "index"
STRING_CHARS = 30_000
"""A table string holds at most 64 KiB of UTF-16, i.e. 32 Ki characters; keep below that."""
MAX_DATA_COLUMNS = 30
"""30 x 30,000 characters x 2 bytes stays under the 1 MiB entity limit."""
ERROR_LIMIT = 2000
CHANGES_LIMIT = 28_000
SUMMARY_LIMITS = (20, 5)
"""Entries per list kept in the index row's summary: fewer when long names would not fit."""
_KEY_UNSAFE_RE = re.compile(r"[/\\#?%\x00-\x1f\x7f-\x9f]")


def table_key(text: str) -> str:
    """``text`` usable as a PartitionKey / RowKey: the characters the service refuses escaped as
    ``%XX``, and longer keys cut with a hash (keys hold at most 1 KiB)."""
    out = _KEY_UNSAFE_RE.sub(lambda match: f"%{ord(match.group()):02X}", text)
    if len(out) > 400:
        out = f"{out[:300]}~{hashlib.sha256(out.encode()).hexdigest()}"
    return out


def server_key(server: str) -> str:
    return table_key(server.strip().lower())


def _split(text: str) -> dict[str, str]:
    chunks = [text[i : i + STRING_CHARS] for i in range(0, len(text), STRING_CHARS)] or [""]
    if len(chunks) > MAX_DATA_COLUMNS:
        raise StateError(f"a map row is over {MAX_DATA_COLUMNS * STRING_CHARS} characters; not stored")
    return {("Data" if i == 0 else f"Data{i}"): chunk for i, chunk in enumerate(chunks)}


def _joined(entity: Entity) -> str:
    parts = [str(entity.get("Data", ""))]
    for i in range(1, MAX_DATA_COLUMNS):
        chunk = entity.get(f"Data{i}")
        if chunk is None:
            break
        parts.append(str(chunk))
    return "".join(parts)


def _canonical(model: MapNode | MapEdge) -> str:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)


def graph_rows(server_map: ServerMap) -> dict[str, str]:
    """RowKey -> canonical JSON of every node and edge of ``server_map``."""
    rows = {f"n|{table_key(node.id)}": _canonical(node) for node in server_map.nodes}
    rows |= {f"e|{table_key(edge.key)}": _canonical(edge) for edge in server_map.edges}
    return rows


def _when(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _summary_json(server_map: ServerMap) -> str:
    """The map's dependency summary for the index row ("" when even the short one is too long:
    ``summary_for`` then reads the graph)."""
    for limit in SUMMARY_LIMITS:
        text = summarise(server_map, limit=limit).model_dump_json()
        if len(text) <= STRING_CHARS:
            return text
    return ""


def _changes_json(changes: MapChanges) -> str:
    """The changes as JSON, cut to fit one table string (the counts keep the full numbers)."""
    added, removed = list(changes.added), list(changes.removed)
    text = json.dumps({"added": added, "removed": removed}, ensure_ascii=False)
    while len(text) > CHANGES_LIMIT and (added or removed):
        if len(added) >= len(removed):
            added = added[: len(added) // 2]
        else:
            removed = removed[: len(removed) // 2]
        text = json.dumps({"added": added, "removed": removed}, ensure_ascii=False)
    return text


JUST_READ_SECONDS = 10.0
"""How long the rows a load read stand in for the save that follows it (an import's own load)."""


class MapRepository:
    """Latest map and summary per server (implements ``shared_code.ports.mapstore.MapStore``)."""

    def __init__(self, table: TableClient) -> None:
        self._table = table
        # the graph rows ``load`` just read, for the ``save`` of the same server that follows it in
        # an import (saves one partition query per server); consumed by that save, never reused
        self._just_read: dict[str, tuple[float, dict[str, Entity]]] = {}
        self._lock = threading.Lock()

    # -- reads ----------------------------------------------------------------------------------

    def _index_row(self, server: str) -> Entity | None:
        return get_entity(self._table, INDEX, server_key(server))

    def _stored_rows(self, server: str) -> dict[str, Entity]:
        partition = f"map|{server_key(server)}"
        rows = query_entities(self._table, "PartitionKey eq @p", {"p": partition})
        return {str(e["RowKey"]): e for e in rows}

    def load(self, server: str) -> ServerMap | None:
        """The stored map of ``server`` (computer name, any case); None when none was imported."""
        index = self._index_row(server)
        if index is None or _when(index.get("WindowStart")) is None:
            # graph rows are written only by a save, which also writes the index row's window:
            # without it the partition is empty (a save that died in between left rows the next
            # save after a successful one deletes)
            self._remember(server, {})
            return None
        rows = self._stored_rows(server)
        self._remember(server, rows)
        return self._compose(index, rows)

    def _remember(self, server: str, rows: dict[str, Entity]) -> None:
        with self._lock:
            if len(self._just_read) > 64:  # a load without its save (a reader): keep it bounded
                self._just_read.clear()
            self._just_read[server_key(server)] = (time.monotonic(), rows)

    def _rows_for_save(self, server: str) -> dict[str, Entity]:
        """The rows ``load`` read moments ago (an import's load-diff-save), else a fresh read."""
        with self._lock:
            remembered = self._just_read.pop(server_key(server), None)
        if remembered is not None and time.monotonic() - remembered[0] < JUST_READ_SECONDS:
            return remembered[1]
        return self._stored_rows(server)

    def _compose(self, index: Entity, rows: dict[str, Entity]) -> ServerMap:
        nodes: list[MapNode] = []
        edges: list[MapEdge] = []
        try:
            for key in sorted(rows):
                data = json.loads(_joined(rows[key]))
                if key.startswith("n|"):
                    nodes.append(MapNode.model_validate(data))
                else:
                    edges.append(MapEdge.model_validate(data))
            changes = json.loads(str(index.get("Changes") or "{}"))
            return ServerMap(
                server=str(index["Server"]),
                machine_id=str(index.get("MachineId", "")),
                source=str(index.get("Source", "")),
                source_kind=str(index.get("SourceKind", "")),
                window=MapWindow(start=_when(index["WindowStart"]), end=_when(index["WindowEnd"])),
                imported_at=_when(index["ImportedAt"]),
                nodes=tuple(nodes),
                edges=tuple(edges),
                changes=MapChanges(
                    added=tuple(changes.get("added", ())), removed=tuple(changes.get("removed", ()))
                ),
            )
        except (ValidationError, ValueError, KeyError) as exc:
            name = str(index.get("Server", "?"))[:100]
            raise StateError(f"the stored map of {name} does not read back") from exc

    def summary_for(self, server: str) -> DependencySummary | None:
        """The dependency summary of ``server``'s latest map: one point read of its index row
        (implements ``shared_code.ports.mapstore.DependencyContext``)."""
        index = self._index_row(server)
        if index is None or _when(index.get("WindowStart")) is None:
            return None
        text = str(index.get("Summary") or "")
        if text:
            try:
                return DependencySummary.model_validate_json(text)
            except ValidationError:
                pass  # written by an older version, or damaged: read the graph instead
        return summarise(self._compose(index, self._stored_rows(server)))

    def find(self, text: str) -> MapListing | None:
        """The listing of a server named by computer name (any case) or by the source's machine id."""
        needle = text.strip()
        if not needle:
            return None
        index = self._index_row(needle)
        if index is None:
            rows = query_entities(
                self._table, "PartitionKey eq @p and MachineIdLower eq @m", {"p": INDEX, "m": needle.lower()}
            )
            index = next(iter(rows), None)
        return None if index is None else _listing(index)

    def listings(self) -> list[MapListing]:
        return [_listing(e) for e in query_entities(self._table, "PartitionKey eq @p", {"p": INDEX})]

    # -- writes ---------------------------------------------------------------------------------

    def save(self, server_map: ServerMap) -> int:
        """Store ``server_map`` as the server's latest; returns the graph rows written or deleted
        (0 when the graph is the one stored). The summary row is updated either way."""
        partition = f"map|{server_key(server_map.server)}"
        stored = {key: _joined(entity) for key, entity in self._rows_for_save(server_map.server).items()}
        wanted = graph_rows(server_map)
        upserts = [key for key, text in wanted.items() if stored.get(key) != text]
        deletes = [key for key in stored if key not in wanted]
        # nodes before edges on the way in; edges before nodes on the way out
        upserts.sort(key=lambda key: key[0] != "n")
        deletes.sort(key=lambda key: key[0] != "e")
        operations: list[Operation] = [
            {"PartitionKey": partition, "RowKey": key, **_split(wanted[key])} for key in upserts
        ]
        operations += [Delete(partition, key) for key in deletes]
        write_all(self._table, operations)
        listing = listing_of(server_map)
        merge_entity(
            self._table,
            {
                "PartitionKey": INDEX,
                "RowKey": server_key(server_map.server),
                "Server": server_map.server,
                "MachineId": server_map.machine_id,
                "MachineIdLower": server_map.machine_id.lower(),
                "Source": server_map.source,
                "SourceKind": server_map.source_kind,
                "WindowStart": server_map.window.start,
                "WindowEnd": server_map.window.end,
                "ImportedAt": server_map.imported_at,
                "Status": MapStatus.OK.value,
                "LastError": "",
                "Nodes": listing.nodes,
                "Edges": len(server_map.edges),
                "Clients": listing.clients,
                "Dependencies": listing.dependencies,
                "Failed": listing.failed,
                "Added": listing.added,
                "Removed": listing.removed,
                "Changes": _changes_json(server_map.changes),
                "Summary": _summary_json(server_map),
            },
        )
        return len(operations)

    def record_failure(
        self, server: str, *, machine_id: str, source: str, source_kind: str, error: str, at: datetime
    ) -> None:
        """Mark the server's latest import failed; its stored graph and counts stay as they were."""
        entity: Entity = {
            "PartitionKey": INDEX,
            "RowKey": server_key(server),
            "Status": MapStatus.FAILED.value,
            "LastError": error[:ERROR_LIMIT],
            "FailedAt": at,
        }
        if self._index_row(server) is None:
            entity |= {
                "Server": server,
                "MachineId": machine_id,
                "MachineIdLower": machine_id.lower(),
                "Source": source,
                "SourceKind": source_kind,
            }
        merge_entity(self._table, entity)


def _listing(entity: Entity) -> MapListing:
    return MapListing(
        server=str(entity.get("Server") or entity["RowKey"]),
        machine_id=str(entity.get("MachineId", "")),
        source=str(entity.get("Source", "")),
        source_kind=str(entity.get("SourceKind", "")),
        status=MapStatus(str(entity.get("Status") or MapStatus.OK.value)),
        last_error=str(entity.get("LastError", "")),
        imported_at=_when(entity.get("ImportedAt")),
        nodes=int(entity.get("Nodes", 0) or 0),
        clients=int(entity.get("Clients", 0) or 0),
        dependencies=int(entity.get("Dependencies", 0) or 0),
        failed=int(entity.get("Failed", 0) or 0),
        added=int(entity.get("Added", 0) or 0),
        removed=int(entity.get("Removed", 0) or 0),
    )
