"""Azure Migrate dependency export (CSV) -> server maps, for estates with no workspace data at all.

Agentless dependency analysis in Azure Migrate exports one row per dependency and time slot:
Timeslot, Source server name, Source IP, Source application, Source process, Destination server
name, Destination IP, Destination application, Destination process, Destination port (TCP). A
server's map is every row it appears in: as source (its outbound dependencies) and as destination
(its clients). Connections with the same source server and process and the same destination
server, process and port are one dependency, however many time slots they were seen in.

Tolerated: a UTF-8 byte-order mark, quoted cells (commas and line breaks inside), extra columns,
header names in any case and spacing, blank lines, semicolon-separated files, the ``'`` our CSV
view puts before formula-looking cells. Refused with the line number and what is wrong: a missing
column, a row of the wrong width, a port that is not 0-65535, a row naming neither server nor IP,
an unreadable time slot, a name over 1,024 characters. The input is bounded (``max_bytes``,
``max_rows``).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared_code.domain.maps import (
    MIGRATE_CSV_COLUMNS,
    Direction,
    EdgeKind,
    MapEdge,
    MapNode,
    MapWindow,
    NodeKind,
    Protocol,
    ServerMap,
    node_id,
)
from shared_code.errors import InvalidInputError, NotFoundError, PayloadTooLargeError

SOURCE_KIND = "migrate"
DEFAULT_SOURCE = "migrate-export"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ROWS = 1_000_000
MAX_NAME = 1024
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
DEFAULT_SLOT = timedelta(hours=1)

_FIELDS = (
    "timeslot",
    "source_server",
    "source_ip",
    "source_application",
    "source_process",
    "destination_server",
    "destination_ip",
    "destination_application",
    "destination_process",
    "destination_port",
)
_COLUMN_FIELDS = dict(zip((" ".join(c.lower().split()) for c in MIGRATE_CSV_COLUMNS), _FIELDS, strict=True))
_FIELD_COLUMNS = dict(zip(_FIELDS, MIGRATE_CSV_COLUMNS, strict=True))

_RANGE_SEPARATORS = re.compile(r"\s+(?:-|\u2013|to)\s+", re.IGNORECASE)
_DATETIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y %I:%M:%S %p",
    "%m/%d/%Y %I:%M %p",
    "%d-%m-%Y %H:%M:%S",
    "%d-%m-%Y %H:%M",
)
_TIME_FORMATS = ("%H:%M:%S", "%H:%M", "%I:%M:%S %p", "%I:%M %p")


def _header_key(text: str) -> str:
    return " ".join(text.replace("\ufeff", "").replace("_", " ").strip().lower().split())


def _cell(text: str) -> str:
    value = text.strip()
    if value[:1] == "'" and value[1:2] in FORMULA_PREFIXES and len(value) > 1:
        return value[1:]
    return value


def _parse_moment(text: str) -> datetime | None:
    candidate = text.strip().replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(candidate)
    except ValueError:
        moment = None
        for pattern in _DATETIME_FORMATS:
            try:
                moment = datetime.strptime(text.strip(), pattern)
                break
            except ValueError:
                continue
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse_time_on(day: datetime, text: str) -> datetime | None:
    for pattern in _TIME_FORMATS:
        try:
            clock = datetime.strptime(text.strip(), pattern)
        except ValueError:
            continue
        return day.replace(hour=clock.hour, minute=clock.minute, second=clock.second, microsecond=0)
    return None


def parse_timeslot(text: str) -> tuple[datetime, datetime] | None:
    """``"start - end"`` (or ``start to end``, ``start/end``, or a single start for a one-hour slot).

    None for a blank slot; ``ValueError`` when it is not a time slot.
    """
    value = text.strip()
    if not value:
        return None
    parts = _RANGE_SEPARATORS.split(value, maxsplit=1)
    if len(parts) == 1 and "/" in value and "T" in value:
        parts = value.split("/", 1)
    start = _parse_moment(parts[0])
    if start is None:
        raise ValueError(
            f"{value[:60]!r} is not a time slot (like 2024-05-01 10:00:00 - 2024-05-01 11:00:00)"
        )
    if len(parts) == 1:
        return start, start + DEFAULT_SLOT
    end = _parse_moment(parts[1]) or _parse_time_on(start, parts[1])
    if end is None or end < start:
        raise ValueError(f"{value[:60]!r} does not end after it starts")
    return start, end


class MigrateDependencyRow(BaseModel):
    """One validated row of the export (cells stripped, formula guard removed)."""

    model_config = ConfigDict(frozen=True)

    line: int
    timeslot: tuple[datetime, datetime] | None = None
    source_server: str = Field(default="", max_length=MAX_NAME)
    source_ip: str = ""
    source_application: str = Field(default="", max_length=MAX_NAME)
    source_process: str = Field(default="", max_length=MAX_NAME)
    destination_server: str = Field(default="", max_length=MAX_NAME)
    destination_ip: str = ""
    destination_application: str = Field(default="", max_length=MAX_NAME)
    destination_process: str = Field(default="", max_length=MAX_NAME)
    destination_port: int = Field(ge=0, le=65535)

    @field_validator("timeslot", mode="before")
    @classmethod
    def _slot(cls, value: object) -> object:
        return parse_timeslot(value) if isinstance(value, str) else value

    @field_validator("source_ip", "destination_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        if value:
            try:
                return str(ipaddress.ip_address(value))
            except ValueError as exc:
                raise ValueError(f"{value[:60]!r} is not an IP address") from exc
        return value

    @field_validator("destination_port", mode="before")
    @classmethod
    def _port(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if not text.isdigit():
                raise ValueError(f"{text[:20]!r} is not a port number")
            return int(text)
        return value

    @property
    def source_key(self) -> str:
        return self.source_server.lower() or self.source_ip

    @property
    def destination_key(self) -> str:
        return self.destination_server.lower() or self.destination_ip


def _decode(data: bytes | str, max_bytes: int) -> str:
    if isinstance(data, str):
        if len(data) > max_bytes or len(data.encode("utf-8", "surrogatepass")) > max_bytes:
            raise PayloadTooLargeError(f"the export is over {max_bytes} bytes")
        return data.removeprefix("\ufeff")
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"the export is over {max_bytes} bytes")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"the export is not valid UTF-16 text (byte {exc.start})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the export is not UTF-8 text (byte {exc.start})") from exc


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        where = str(item["loc"][0]) if item["loc"] else "row"
        column = _FIELD_COLUMNS.get(where, where)
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{column}: {message}")
    return "; ".join(problems)


def read_migrate_rows(
    data: bytes | str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_rows: int = DEFAULT_MAX_ROWS
) -> list[MigrateDependencyRow]:
    """The export's rows, validated; ``InvalidInputError`` names the first bad line and what is wrong."""
    text = _decode(data, max_bytes)
    first_line = text.split("\n", 1)[0]
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InvalidInputError(f"line 1: the header is not CSV ({exc})") from exc
    if header is None or not any(cell.strip() for cell in header):
        raise InvalidInputError("the export is empty: no header line")
    positions: dict[str, int] = {}
    for index, name in enumerate(header):
        key = _COLUMN_FIELDS.get(_header_key(name))
        if key is not None and key not in positions:
            positions[key] = index
    missing = [_FIELD_COLUMNS[f] for f in _FIELDS if f not in positions]
    if missing:
        raise InvalidInputError(f"line 1: the header lacks the column(s) {', '.join(missing)}")
    rows: list[MigrateDependencyRow] = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InvalidInputError(f"line {reader.line_num}: not valid CSV ({exc})") from exc
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            raise InvalidInputError(f"line {line}: {len(cells)} cells where the header has {len(header)}")
        if len(rows) >= max_rows:
            raise PayloadTooLargeError(f"the export has more than {max_rows} rows")
        values = {name: _cell(cells[index]) for name, index in positions.items()}
        try:
            row = MigrateDependencyRow.model_validate({"line": line, **values})
        except ValidationError as exc:
            raise InvalidInputError(f"line {line}: {_describe(exc)}") from exc
        if not row.source_key or not row.destination_key:
            side = "source" if not row.source_key else "destination"
            raise InvalidInputError(f"line {line}: the {side} has neither a server name nor an IP")
        rows.append(row)
    return rows


@dataclass
class _MapBuilder:
    server: str
    nodes: dict[str, MapNode] = field(default_factory=dict)
    edges: dict[str, MapEdge] = field(default_factory=dict)
    ips: dict[str, set[str]] = field(default_factory=dict)
    start: datetime | None = None
    end: datetime | None = None

    def machine(self, key: str, name: str, ip: str, *, monitored: bool) -> str:
        machine_id = node_id(NodeKind.MACHINE, key)
        if ip:
            self.ips.setdefault(machine_id, set()).add(ip)
        if machine_id not in self.nodes:
            self.nodes[machine_id] = MapNode(
                id=machine_id, kind=NodeKind.MACHINE, name=name, monitored=monitored
            )
        return machine_id

    def process(self, machine_id: str, machine_key: str, name: str, application: str) -> str:
        process_id = node_id(NodeKind.PROCESS, machine_key, name)
        if process_id not in self.nodes:
            properties = {"application": application} if application else {}
            self.nodes[process_id] = MapNode(
                id=process_id, kind=NodeKind.PROCESS, name=name, machine=machine_id, properties=properties
            )
            self.edge(MapEdge(source=machine_id, target=process_id, kind=EdgeKind.OWNS))
        return process_id

    def port(self, machine_id: str, machine_key: str, ip: str, port: int) -> str:
        port_id = node_id(NodeKind.PORT, machine_key, ip, str(port), Protocol.TCP.value)
        if port_id not in self.nodes:
            self.nodes[port_id] = MapNode(
                id=port_id,
                kind=NodeKind.PORT,
                name=str(port),
                machine=machine_id,
                ips=(ip,) if ip else (),
                port=port,
                protocol=Protocol.TCP,
            )
        return port_id

    def edge(self, edge: MapEdge) -> None:
        self.edges.setdefault(edge.key, edge)

    def add(self, row: MigrateDependencyRow, direction: Direction) -> None:
        if row.timeslot is not None:
            self.start = row.timeslot[0] if self.start is None else min(self.start, row.timeslot[0])
            self.end = row.timeslot[1] if self.end is None else max(self.end, row.timeslot[1])
        source_key, target_key = row.source_key, row.destination_key
        source_machine = self.machine(
            source_key, row.source_server or row.source_ip, row.source_ip, monitored=bool(row.source_server)
        )
        target_machine = self.machine(
            target_key,
            row.destination_server or row.destination_ip,
            row.destination_ip,
            monitored=bool(row.destination_server),
        )
        source = source_machine
        if row.source_process:
            source = self.process(source_machine, source_key, row.source_process, row.source_application)
        port = self.port(target_machine, target_key, row.destination_ip, row.destination_port)
        if row.destination_process:
            listener = self.process(
                target_machine, target_key, row.destination_process, row.destination_application
            )
            self.edge(
                MapEdge(
                    source=listener,
                    target=port,
                    kind=EdgeKind.LISTENS,
                    port=row.destination_port,
                    protocol=Protocol.TCP,
                )
            )
        self.edge(
            MapEdge(
                source=source,
                target=port,
                kind=EdgeKind.CONNECTION,
                port=row.destination_port,
                protocol=Protocol.TCP,
                direction=direction,
            )
        )

    def build(self, *, source: str, imported_at: datetime) -> ServerMap:
        nodes = []
        for node in self.nodes.values():
            ips = self.ips.get(node.id)
            nodes.append(node.model_copy(update={"ips": tuple(sorted(ips))}) if ips else node)
        start = self.start or imported_at
        return ServerMap(
            server=self.server,
            source=source,
            source_kind=SOURCE_KIND,
            window=MapWindow(start=start, end=self.end or start),
            imported_at=imported_at,
            nodes=tuple(nodes),
            edges=tuple(self.edges.values()),
        )


def maps_from_rows(
    rows: Sequence[MigrateDependencyRow],
    *,
    imported_at: datetime,
    source: str = DEFAULT_SOURCE,
    servers: Iterable[str] | None = None,
) -> list[ServerMap]:
    """One map per server the rows name (or per server in ``servers``), sorted by server name."""
    spelled: dict[str, str] = {}
    for row in rows:
        for name in (row.source_server, row.destination_server):
            if name:
                spelled.setdefault(name.lower(), name)
    if servers is not None:
        wanted: dict[str, str] = {}
        for name in servers:
            key = name.strip().lower()
            if key not in spelled:
                raise NotFoundError(f"server {name[:80]!r} is not named in the export")
            wanted[key] = spelled[key]
        spelled = wanted
    builders = {key: _MapBuilder(server=name) for key, name in spelled.items()}
    for row in rows:
        outbound = builders.get(row.source_server.lower()) if row.source_server else None
        inbound = builders.get(row.destination_server.lower()) if row.destination_server else None
        if outbound is not None:
            outbound.add(row, Direction.OUTBOUND)
        if inbound is not None and inbound is not outbound:
            inbound.add(row, Direction.INBOUND)
    built = [builder.build(source=source, imported_at=imported_at) for builder in builders.values()]
    return sorted(built, key=lambda m: (m.server.lower(), m.server))


def parse_migrate_csv(
    data: bytes | str,
    *,
    imported_at: datetime,
    source: str = DEFAULT_SOURCE,
    servers: Iterable[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> list[ServerMap]:
    """The export as server maps (see the module docstring).

    Raises ``InvalidInputError`` (``PayloadTooLargeError`` when over the bounds) for a bad export and
    ``NotFoundError`` when ``servers`` names a server the export does not.
    """
    rows = read_migrate_rows(data, max_bytes=max_bytes, max_rows=max_rows)
    return maps_from_rows(rows, imported_at=imported_at, source=source, servers=servers)
