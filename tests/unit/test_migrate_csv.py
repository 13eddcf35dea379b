"""The Azure Migrate dependency export: tolerant reading, clear refusals, maps per server, round trip."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared_code.domain.maps import Direction, EdgeKind, NodeKind, ServerMap
from shared_code.errors import InvalidInputError, NotFoundError, PayloadTooLargeError
from shared_code.maps.views.csvexport import render_migrate_csv
from shared_code.mapsources.migrate_csv import parse_migrate_csv, parse_timeslot, read_migrate_rows
from tests.fakes.maps import HOSTILE_NAMES

AT = datetime(2024, 5, 2, 8, 0, tzinfo=UTC)
HEADER = (
    "Timeslot,Source server name,Source IP,Source application,Source process,Destination server name,"
    "Destination IP,Destination application,Destination process,Destination port"
)
WEB_TO_SQL = "web01,10.0.0.1,IIS,w3wp.exe,sql01,10.0.0.2,SQL Server,sqlservr.exe,1433"
ROWS = [
    f"2024-05-01 10:00:00 - 2024-05-01 11:00:00,{WEB_TO_SQL}",
    f"2024-05-01 11:00:00 - 2024-05-01 12:00:00,{WEB_TO_SQL}",
    "2024-05-01 11:00:00 - 2024-05-01 12:00:00,client7,10.0.0.9,,chrome.exe,web01,10.0.0.1,IIS,w3wp.exe,443",
    "2024-05-01 09:00:00 - 2024-05-01 10:00:00,,10.0.0.77,,,web01,10.0.0.1,IIS,w3wp.exe,443",
]


def _csv(*rows: str, header: str = HEADER) -> str:
    return "\r\n".join([header, *rows]) + "\r\n"


def _map(maps: list[ServerMap], server: str) -> ServerMap:
    return next(m for m in maps if m.server.lower() == server.lower())


def _canonical(server_map: ServerMap) -> tuple[object, ...]:
    return (
        server_map.server,
        server_map.window,
        sorted(n.model_dump_json() for n in server_map.nodes),
        sorted(e.model_dump_json() for e in server_map.edges),
    )


def test_a_servers_map_is_its_outbound_and_inbound_rows_merged_over_time_slots():
    maps = parse_migrate_csv(_csv(*ROWS), imported_at=AT)
    assert [m.server for m in maps] == ["client7", "sql01", "web01"]
    web = _map(maps, "web01")
    assert web.source_kind == "migrate"
    assert web.imported_at == AT
    assert web.window.start == datetime(2024, 5, 1, 9, tzinfo=UTC)
    assert web.window.end == datetime(2024, 5, 1, 12, tzinfo=UTC)
    connections = [e for e in web.edges if e.kind is EdgeKind.CONNECTION]
    assert len(connections) == 3, "two time slots of the same dependency are one dependency"
    by_id = {n.id: n for n in web.nodes}
    outbound = [e for e in connections if e.direction is Direction.OUTBOUND]
    assert [(by_id[e.source].name, by_id[by_id[e.target].machine].name, e.port) for e in outbound] == [
        ("w3wp.exe", "sql01", 1433)
    ]
    inbound = sorted((by_id[e.source].name, e.port) for e in connections if e.direction is Direction.INBOUND)
    assert inbound == [("10.0.0.77", 443), ("chrome.exe", 443)]
    root = by_id[web.root_id]
    assert root.ips == ("10.0.0.1",)
    w3wp = next(n for n in web.nodes if n.name == "w3wp.exe")
    assert w3wp.machine == root.id
    assert w3wp.properties == {"application": "IIS"}
    listens = [e for e in web.edges if e.kind is EdgeKind.LISTENS]
    assert {by_id[e.source].name for e in listens} == {"w3wp.exe", "sqlservr.exe"}
    unnamed = next(n for n in web.nodes if n.name == "10.0.0.77")
    assert unnamed.kind is NodeKind.MACHINE
    assert not unnamed.monitored


def test_bom_header_case_spacing_extra_columns_quoting_and_blank_lines_are_tolerated():
    header = "\ufeff  timeslot ,SOURCE  SERVER NAME,Source IP,Source application,Source_process,"
    header += "Destination server name,"
    header += "Destination IP,Destination application,Destination process,Destination port,Comment"
    row = (
        '2024-05-01 10:00 - 11:00,"web, 01",10.0.0.1,"IIS ""site""","w3wp\nexe",sql01,10.0.0.2,,,1433,"x, y"'
    )
    maps = parse_migrate_csv(("\r\n".join([header, "", row, ""])).encode("utf-8"), imported_at=AT)
    web = _map(maps, "web, 01")
    names = {n.name for n in web.nodes}
    assert {"web, 01", "w3wp\nexe", "sql01"} <= names
    assert web.window.end == datetime(2024, 5, 1, 11, tzinfo=UTC)
    process = next(n for n in web.nodes if n.kind is NodeKind.PROCESS)
    assert process.properties["application"] == 'IIS "site"'


def test_semicolon_files_and_utf16_exports_are_read():
    semicolon = _csv(*(r.replace(",", ";") for r in ROWS), header=HEADER.replace(",", ";"))
    assert len(parse_migrate_csv(semicolon, imported_at=AT)) == 3
    utf16 = _csv(*ROWS).encode("utf-16")
    assert len(parse_migrate_csv(utf16, imported_at=AT)) == 3


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (ROWS[0].replace(",1433", ",http"), r"line 3: Destination port: 'http' is not a port number"),
        (ROWS[0].replace(",1433", ",70000"), r"line 3: Destination port"),
        (ROWS[0].replace(",1433", ","), r"line 3: Destination port"),
        (ROWS[0].replace("10.0.0.2", "10.0.0.999"), r"line 3: Destination IP: '10.0.0.999' is not an IP"),
        (ROWS[0].replace("2024-05-01 10:00:00 - ", "yesterday - "), r"line 3: Timeslot: 'yesterday"),
        (
            ROWS[0].replace(",sql01,10.0.0.2,", ",,,"),
            r"line 3: the destination has neither a server name nor an IP",
        ),
        (ROWS[0] + ",extra", r"line 3: 11 cells where the header has 10"),
        (ROWS[0].replace("w3wp.exe", "w" * 1025), r"line 3: Source process"),
    ],
)
def test_a_bad_row_is_refused_with_its_line_number_and_what_is_wrong(row, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_migrate_csv(_csv(ROWS[1], row), imported_at=AT)


def test_a_missing_column_or_an_empty_file_is_refused_by_name():
    with pytest.raises(InvalidInputError, match=r"lacks the column.*Destination port"):
        parse_migrate_csv(_csv(header=HEADER.rsplit(",", 1)[0]), imported_at=AT)
    with pytest.raises(InvalidInputError, match="empty"):
        parse_migrate_csv(b"", imported_at=AT)
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        parse_migrate_csv(_csv(*ROWS).encode("utf-8") + b"\xff\xfe\xfa", imported_at=AT)


def test_the_input_is_bounded_in_bytes_and_rows():
    with pytest.raises(PayloadTooLargeError, match="bytes"):
        parse_migrate_csv(_csv(*ROWS), imported_at=AT, max_bytes=100)
    with pytest.raises(PayloadTooLargeError, match="rows"):
        read_migrate_rows(_csv(*ROWS), max_rows=3)


def test_servers_can_be_chosen_and_an_unknown_one_is_named():
    maps = parse_migrate_csv(_csv(*ROWS), imported_at=AT, servers=["WEB01"])
    assert [m.server for m in maps] == ["web01"]
    with pytest.raises(NotFoundError, match="nope"):
        parse_migrate_csv(_csv(*ROWS), imported_at=AT, servers=["nope"])


def test_time_slots_in_the_shapes_exports_use():
    one_hour = (datetime(2024, 5, 1, 10, tzinfo=UTC), datetime(2024, 5, 1, 11, tzinfo=UTC))
    assert parse_timeslot("2024-05-01 10:00:00 - 2024-05-01 11:00:00") == one_hour
    assert parse_timeslot("2024-05-01T10:00:00Z/2024-05-01T11:00:00Z") == one_hour
    assert parse_timeslot("05/01/2024 10:00 AM to 11:00 AM") == one_hour
    assert parse_timeslot("2024-05-01 10:00") == one_hour
    assert parse_timeslot("  ") is None
    with pytest.raises(ValueError, match="does not end after"):
        parse_timeslot("2024-05-01 11:00 - 2024-05-01 10:00")


def test_export_then_import_gives_the_same_map():
    maps = parse_migrate_csv(_csv(*ROWS), imported_at=AT)
    for server_map in maps:
        again = parse_migrate_csv(render_migrate_csv(server_map), imported_at=AT, servers=[server_map.server])
        assert _canonical(again[0]) == _canonical(server_map)


def test_hostile_names_survive_the_round_trip_and_formula_guards_are_removed_on_import():
    rows = []
    for index, name in enumerate(HOSTILE_NAMES):
        cell = '"' + name.replace('"', '""') + '"'
        rows.append(
            f"2024-05-01 10:00 - 2024-05-01 11:00,web01,10.0.0.1,,{cell},dep{index},10.1.0.{index + 1},,,443"
        )
    web = parse_migrate_csv(_csv(*rows), imported_at=AT, servers=["web01"])[0]
    processes = {n.name for n in web.nodes if n.kind is NodeKind.PROCESS}
    assert processes == {name.strip() for name in HOSTILE_NAMES}
    exported = render_migrate_csv(web)
    assert "\n'=cmd" not in exported
    assert ",'=cmd" in exported
    again = parse_migrate_csv(exported, imported_at=AT, servers=["web01"])[0]
    assert _canonical(again) == _canonical(web)
