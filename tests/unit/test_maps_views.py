"""The renderers: structure of each format, and every hostile name escaped for its format."""

from __future__ import annotations

import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest

from shared_code.domain.maps import (
    Direction,
    EdgeKind,
    MapNode,
    MapStatus,
    MapWindow,
    NodeKind,
    ServerMap,
    listing_of,
    node_id,
)
from shared_code.errors import InvalidInputError
from shared_code.maps.views import ViewFormat, render_index_html, render_index_json, render_json, render_view
from shared_code.maps.views._model import view_of
from shared_code.maps.views.csvexport import FORMULA_PREFIXES, render_migrate_csv
from shared_code.maps.views.drawio import render_drawio
from shared_code.maps.views.html import CONTENT_SECURITY_POLICY, render_html
from shared_code.maps.views.mermaid import mermaid_label, render_mermaid
from shared_code.maps.views.svg import render_svg
from tests.fakes.maps import HOSTILE_NAMES, synthetic_map

HOSTILE = synthetic_map(90, hostile=True)


def _get(element: ET.Element | None, name: str) -> str:
    assert element is not None
    value = element.get(name)
    assert value is not None, name
    return value


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.script_bodies: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        (self.script_bodies if self._in_script else self.text).append(data)


def _hostile_names_present() -> list[str]:
    names = [node.name for node in HOSTILE.nodes if any(h.split()[0] in node.name for h in HOSTILE_NAMES)]
    assert len(names) >= len(HOSTILE_NAMES), "the fixture must carry every hostile name"
    return names


def test_html_view_escapes_every_name_and_runs_only_its_own_script():
    page = render_html(HOSTILE)
    parsed = _Collector()
    parsed.feed(page)
    tags = {tag for tag, _ in parsed.tags}
    assert "img" not in tags
    assert "b" not in tags
    assert "x" not in tags
    assert [tag for tag, _ in parsed.tags].count("script") == 1
    assert all(not name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    text = "\n".join(parsed.text)
    for name in _hostile_names_present():
        assert name in text, f"{name[:40]!r} must appear as text (its tooltip)"
    assert "__pwned" not in "".join(parsed.script_bodies)


def test_html_view_has_a_policy_that_admits_only_its_inline_script():
    page = render_html(synthetic_map(20))
    assert "script-src 'sha256-" in CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


def test_html_header_shows_server_source_window_counts_and_changes():
    server_map = synthetic_map(40)
    page = render_html(server_map)
    parsed = _Collector()
    parsed.feed(page)
    text = " ".join(parsed.text)
    view = view_of(server_map)
    assert server_map.server in text
    assert server_map.source in text
    assert "2025-06-02T08:30Z" in text
    assert "2025-06-02T09:30Z" in text
    assert f"Nodes {len(server_map.nodes)}" in re.sub(r"\s+", " ", text)
    assert f"Dependencies added ({len(server_map.changes.added)})" in text
    assert f"Dependencies removed ({len(server_map.changes.removed)})" in text
    for key in server_map.changes.added:
        assert view.describe_change(key) in text
    assert "web-01 \u2192 gone-01 :1433/tcp" in text  # a removed dependency whose node is gone
    port_options = [a["value"] for t, a in parsed.tags if t == "option" and a.get("value")]
    assert {str(p) for p in view.ports()} <= set(port_options)


def test_svg_is_well_formed_with_a_group_per_connection_and_failed_ones_marked():
    server_map = HOSTILE
    root = ET.fromstring(render_svg(server_map))
    ns = "{http://www.w3.org/2000/svg}"
    allowed = {f"{ns}{t}" for t in ("svg", "title", "style", "defs", "marker", "path", "g", "rect", "text")}
    assert {element.tag for element in root.iter()} <= allowed
    edges = [g for g in root.iter(f"{ns}g") if "edge" in (g.get("class") or "").split()]
    connections = [e for e in server_map.edges if e.kind is EdgeKind.CONNECTION]
    assert len(edges) == len(connections)
    failed = [g for g in edges if "failed" in g.get("class", "").split()]
    assert len(failed) == sum(e.failed for e in connections) > 0
    assert all(_get(g.find(f"{ns}path"), "marker-end") == "url(#arrow-failed)" for g in failed)
    nodes = {g.get("data-node-id") for g in root.iter(f"{ns}g") if g.get("data-node-id") is not None}
    assert nodes == {node.id for node in server_map.nodes}
    titles = "\n".join(t.text or "" for t in root.iter(f"{ns}title"))
    for name in _hostile_names_present():
        assert name in titles


def test_mermaid_quotes_every_label_and_uses_only_its_own_ids():
    text = render_mermaid(HOSTILE)
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    for line in lines[1:]:
        assert line.count('"') % 2 == 0, line
        stripped = line.strip()
        assert not stripped.startswith(("%%", "click", "style ")), line
        inside = re.findall(r'"([^"]*)"', line)
        for label in inside:
            assert "<" not in label
            assert ">" not in label
            assert "`" not in label
            assert not re.search(r"#(?![a-z0-9]+;)", label), label
        outside = re.sub(r'"[^"]*"', "", stripped)
        assert re.fullmatch(r"[A-Za-z0-9_ \-\.>|\[\]\(\){}:,#;%]*", outside), line
    connections = [e for e in HOSTILE.edges if e.kind is EdgeKind.CONNECTION]
    assert sum(1 for line in lines if "-->" in line or "-.->" in line) == len(connections)
    failed_indices = re.search(r"linkStyle ([\d,]+) stroke:#d32f2f", text)
    assert failed_indices is not None
    assert len(failed_indices.group(1).split(",")) == sum(e.failed for e in connections)


def test_mermaid_label_encodes_what_could_end_or_inject():
    assert mermaid_label('a"b#c<d>&`e\nf') == "a#quot;b#35;c#lt;d#gt;#amp;#96;e f"
    assert mermaid_label("x" * 1000).endswith("\u2026")
    assert len(mermaid_label("x" * 1000)) == 80


def test_drawio_is_an_mxfile_draw_io_opens_with_every_node_and_connection():
    server_map = HOSTILE
    root = ET.fromstring(render_drawio(server_map))
    assert root.tag == "mxfile"
    model = root.find("diagram/mxGraphModel")
    assert model is not None
    cells = model.findall("root/mxCell")
    ids = {cell.get("id") for cell in cells}
    assert {"0", "1"} <= ids
    assert len(ids) == len(cells)
    vertices = [c for c in cells if c.get("vertex") == "1"]
    edges = [c for c in cells if c.get("edge") == "1"]
    assert len(vertices) == len(server_map.nodes)
    assert len(edges) == sum(1 for e in server_map.edges if e.kind is EdgeKind.CONNECTION)
    for edge in edges:
        assert edge.get("source") in ids
        assert edge.get("target") in ids
        assert _get(edge.find("mxGeometry"), "relative") == "1"
        if "dashed=1" in edge.get("style", ""):
            assert "strokeColor=#d32f2f" in _get(edge, "style")
    for vertex in vertices:
        assert "html=0" in _get(vertex, "style")
        geometry = vertex.find("mxGeometry")
        assert _get(geometry, "as") == "geometry"
        assert float(_get(geometry, "width")) > 0
        assert vertex.get("parent") in ids
    values = {vertex.get("value") for vertex in vertices}
    for node in server_map.nodes:
        if node.kind is NodeKind.MACHINE:
            assert node.name in values


def test_csv_has_the_migrate_columns_and_no_cell_a_spreadsheet_would_run():
    body = render_migrate_csv(HOSTILE)
    assert body.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(body.removeprefix("\ufeff"))))
    assert rows[0] == [
        "Timeslot",
        "Source server name",
        "Source IP",
        "Source application",
        "Source process",
        "Destination server name",
        "Destination IP",
        "Destination application",
        "Destination process",
        "Destination port",
    ]
    assert len(rows) - 1 == sum(1 for e in HOSTILE.edges if e.kind is EdgeKind.CONNECTION)
    cells = [cell for row in rows[1:] for cell in row]
    assert not [cell for cell in cells if cell.startswith(FORMULA_PREFIXES)]
    assert any(cell.startswith("'=cmd") for cell in cells)
    assert any("\n" in cell for cell in cells), "a name with a line break stays one quoted cell"


def test_json_view_is_the_public_contract():
    body = json.loads(render_json(HOSTILE))
    assert body == json.loads(json.dumps(HOSTILE.to_json()))
    assert {"server", "source", "window", "importedAt", "nodes", "edges", "changes"} <= set(body)


def test_render_view_answers_every_format_and_refuses_unknown_ones():
    server_map = synthetic_map(20)
    for view_format in ViewFormat:
        rendered = render_view(server_map, view_format.value)
        assert rendered.body
        assert rendered.media_type
        assert rendered.filename.startswith("web-01.")
    assert render_view(server_map, None).media_type.startswith("text/html")
    with pytest.raises(InvalidInputError, match="drawio"):
        render_view(server_map, "pdf")
    hostile_name = render_view(HOSTILE.model_copy(update={"server": '../"evil"\r\n<x>'}), "csv").filename
    assert re.fullmatch(r"[A-Za-z0-9._-]+", hostile_name)


def test_index_lists_servers_with_links_status_and_counts():
    maps = [synthetic_map(30, server=name) for name in ("web-01", "db 02/#?", '<script>x</script>"')]
    listings = [
        listing_of(maps[0]),
        listing_of(maps[1], status=MapStatus.FAILED, last_error="timeout <b>x</b>"),
        listing_of(maps[2]),
    ]
    page = render_index_html(listings)
    parsed = _Collector()
    parsed.feed(page)
    assert "script" not in {tag for tag, _ in parsed.tags}
    assert "b" not in {tag for tag, _ in parsed.tags}
    hrefs = [str(a["href"]) for tag, a in parsed.tags if tag == "a" and a.get("href")]
    for server_map in maps:
        assert f"/api/maps/{server_map.server}" in {unquote(h) for h in hrefs}
        assert f"/api/maps/{server_map.server}?format=json" in {unquote(h) for h in hrefs}
    assert all(re.fullmatch(r"[A-Za-z0-9/%._?=-]+", h) for h in hrefs)
    text = " ".join(parsed.text)
    assert "failed" in text
    assert "timeout <b>x</b>" in text
    body = json.loads(render_index_json(listings))
    assert [s["server"] for s in body["servers"]] == sorted((m.server for m in maps), key=str.lower)
    first = body["servers"][0]
    assert first["links"]["json"].endswith("?format=json")
    assert first["dependencies"] == listings[2].dependencies or first["dependencies"] >= 0


def test_listing_counts_clients_by_machine_and_outbound_dependencies():
    server_map = synthetic_map(60)
    listing = listing_of(server_map)
    inbound_owners = set()
    by_id = {n.id: n for n in server_map.nodes}
    for edge in server_map.edges:
        if edge.kind is EdgeKind.CONNECTION and edge.direction and edge.direction.value == "inbound":
            node = by_id[edge.source]
            inbound_owners.add(node.machine if node.kind is NodeKind.PROCESS else node.id)
    assert listing.clients == len(inbound_owners)
    outbound = [
        e for e in server_map.edges if e.kind is EdgeKind.CONNECTION and e.direction is Direction.OUTBOUND
    ]
    assert listing.dependencies == len(outbound)
    assert listing.failed == sum(e.failed for e in outbound)
    assert listing.nodes == 60
    assert listing.added == 3
    assert listing.removed == 1


@pytest.mark.parametrize("with_machine", [False, True])
def test_an_empty_map_and_a_lone_server_render_in_every_format(with_machine):
    start = datetime(2025, 1, 1, tzinfo=UTC)
    nodes = (MapNode(id=node_id(NodeKind.MACHINE, "lonely"), kind=NodeKind.MACHINE, name="lonely"),)
    server_map = ServerMap(
        server="lonely",
        source="s",
        window=MapWindow(start=start, end=start),
        imported_at=start,
        nodes=nodes if with_machine else (),
    )
    for view_format in ViewFormat:
        body = render_view(server_map, view_format).body
        if view_format in (ViewFormat.SVG, ViewFormat.DRAWIO, ViewFormat.SCOM_MP):
            ET.fromstring(body)
        elif view_format is ViewFormat.JSON:
            assert len(json.loads(body)["nodes"]) == len(server_map.nodes)
