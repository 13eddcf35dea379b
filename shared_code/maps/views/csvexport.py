"""The map as CSV in Azure Migrate's dependency-export columns (``?format=csv``).

One row per connection. A cell that a spreadsheet would read as a formula (it starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return) is prefixed with ``'``; the Migrate source
(``shared_code.mapsources.migrate_csv``) strips that prefix again, so export and import round-trip.
Written with a UTF-8 byte-order mark so spreadsheet programs read non-ASCII names right.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

from shared_code.domain.maps import MIGRATE_CSV_COLUMNS, EdgeKind, MapEdge, MapNode, NodeKind, ServerMap

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
TIMESLOT_FORMAT = "%Y-%m-%d %H:%M:%S"


def csv_cell(value: str) -> str:
    """``value`` made inert for spreadsheets (see the module docstring)."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def timeslot(start: datetime, end: datetime) -> str:
    def utc(moment: datetime) -> str:
        aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return aware.astimezone(UTC).strftime(TIMESLOT_FORMAT)

    return f"{utc(start)} - {utc(end)}"


def _first_ip(*nodes: MapNode | None) -> str:
    for node in nodes:
        if node is not None and node.ips:
            return node.ips[0]
    return ""


def _application(node: MapNode | None) -> str:
    if node is None:
        return ""
    props = node.properties
    return props.get("application") or props.get("product") or props.get("displayName") or ""


def migrate_rows(server_map: ServerMap) -> list[list[str]]:
    """The data rows (without header), sorted, values not yet made formula-safe."""
    by_id = {node.id: node for node in server_map.nodes}
    listener = {edge.target: edge.source for edge in server_map.edges if edge.kind is EdgeKind.LISTENS}
    slot = timeslot(server_map.window.start, server_map.window.end)

    def owner(node: MapNode) -> MapNode | None:
        if node.kind in (NodeKind.PROCESS, NodeKind.PORT) and node.machine in by_id:
            return by_id[node.machine]
        return node if node.kind is not NodeKind.PORT else None

    def endpoint(node: MapNode) -> tuple[str, str, MapNode | None]:
        machine = owner(node)
        process: MapNode | None = None
        if node.kind is NodeKind.PROCESS:
            process = node
        elif node.kind is NodeKind.PORT and node.id in listener:
            process = by_id.get(listener[node.id])
        # a machine known only by its address is written as Migrate writes it: no name, just the IP
        name = machine.name if machine is not None and machine.name not in machine.ips else ""
        ip = _first_ip(node if node.kind in (NodeKind.PORT, NodeKind.EXTERNAL) else None, machine)
        return name, ip, process

    rows: list[list[str]] = []
    edges: list[MapEdge] = sorted(
        (edge for edge in server_map.edges if edge.kind is EdgeKind.CONNECTION), key=lambda edge: edge.key
    )
    for edge in edges:
        source, target = by_id[edge.source], by_id[edge.target]
        source_name, source_ip, source_process = endpoint(source)
        target_name, target_ip, target_process = endpoint(target)
        port = edge.port if edge.port is not None else target.port
        rows.append(
            [
                slot,
                source_name,
                source_ip,
                _application(source_process),
                source_process.name if source_process else "",
                target_name,
                target_ip,
                _application(target_process),
                target_process.name if target_process else "",
                "" if port is None else str(port),
            ]
        )
    return rows


def render_migrate_csv(server_map: ServerMap) -> str:
    buffer = io.StringIO()
    buffer.write("\ufeff")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(MIGRATE_CSV_COLUMNS)
    for row in migrate_rows(server_map):
        writer.writerow([csv_cell(value) for value in row])
    return buffer.getvalue()
