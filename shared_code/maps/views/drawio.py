"""The map as a draw.io (diagrams.net) file (``?format=drawio``): what users open and edit most.

An uncompressed ``mxfile`` / ``mxGraphModel``: each card is a container ("swimlane") cell titled
with the machine, its processes and ports are child cells, connections are edges labelled with the
port (failed ones red and dashed). Positions come from the same layout as the SVG view. Built with
``xml.etree`` (escaping by the serializer; characters XML cannot carry are replaced first) and every
cell is ``html=0``, so a label is plain text to draw.io, never markup.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from shared_code.domain.maps import EdgeKind, NodeKind, ServerMap
from shared_code.maps.views._model import MapView, view_of
from shared_code.maps.views._text import clean, one_line

_CARD_STYLE = {
    "left": "fillColor=#f3f8fd;strokeColor=#5b8fc7;swimlaneFillColor=#f3f8fd;",
    "center": (
        "fillColor=#263238;strokeColor=#263238;fontColor=#ffffff;swimlaneFillColor=#fbfbfc;strokeWidth=2;"
    ),
    "right": "fillColor=#dcefdc;strokeColor=#5a9e5f;swimlaneFillColor=#f3faf3;",
}
_KIND_STYLE = {
    NodeKind.CLIENT_GROUP: "fillColor=#eadcf1;strokeColor=#8e5aa8;swimlaneFillColor=#f7f1fa;",
    NodeKind.EXTERNAL: "fillColor=#fde5c8;strokeColor=#d98324;swimlaneFillColor=#fff6ec;",
}
_BASE_CARD = (
    "swimlane;startSize=28;rounded=1;arcSize=6;html=0;whiteSpace=wrap;fontStyle=1;align=left;spacingLeft=8;"
    "container=1;collapsible=0;"
)
_ROW_STYLE = "text;html=0;align=left;verticalAlign=middle;spacingLeft=4;overflow=hidden;whiteSpace=nowrap;"
_EDGE_STYLE = (
    "edgeStyle=none;curved=1;html=0;endArrow=block;endFill=1;fontSize=10;labelBackgroundColor=#ffffff;"
)


def _label(view: MapView, node_id: str) -> str:
    node = view.by_id[node_id]
    if node.kind is NodeKind.PORT and node.port is not None:
        return f"\u25b8 {node.port}/{node.protocol.value if node.protocol else 'tcp'}"
    if node.kind is NodeKind.PROCESS:
        return f"\u2699 {node.name}"
    return node.name


def _cell(root: ET.Element, **attributes: str) -> ET.Element:
    """An ``mxCell`` (attributes as a dict: ``parent`` would clash with ``SubElement``'s own argument)."""
    return ET.SubElement(root, "mxCell", attributes)


def _geometry(cell: ET.Element, **attributes: str) -> None:
    ET.SubElement(cell, "mxGeometry", {**attributes, "as": "geometry"})


def render_drawio(server_map: ServerMap, *, view: MapView | None = None) -> str:
    view = view if view is not None else view_of(server_map)
    layout = view.layout
    mxfile = ET.Element("mxfile", host="itsm-connector", type="device")
    diagram = ET.SubElement(
        mxfile, "diagram", id="dependency-map", name=one_line(server_map.server)[:100] or "map"
    )
    model = ET.SubElement(
        diagram,
        "mxGraphModel",
        dx="0",
        dy="0",
        grid="1",
        gridSize="10",
        guides="1",
        tooltips="1",
        connect="1",
        arrows="1",
        fold="1",
        page="0",
        pageScale="1",
        pageWidth=f"{layout.width:.0f}",
        pageHeight=f"{layout.height:.0f}",
        math="0",
        shadow="0",
    )
    root = ET.SubElement(model, "root")
    _cell(root, id="0")
    _cell(root, id="1", parent="0")
    cell_of: dict[str, str] = {}
    for index, card in enumerate(layout.cards):
        header = view.by_id[card.key]
        card_id = f"c{index}"
        cell_of[card.key] = card_id
        style = _BASE_CARD + _KIND_STYLE.get(header.kind, _CARD_STYLE[card.side])
        if header.kind is NodeKind.MACHINE and not header.monitored and card.side != "center":
            style += "dashed=1;"
        cell = _cell(root, id=card_id, value=clean(header.name), style=style, vertex="1", parent="1")
        r = card.rect
        _geometry(cell, x=f"{r.x:.0f}", y=f"{r.y:.0f}", width=f"{r.width:.0f}", height=f"{r.height:.0f}")
        for row_index, node_id in enumerate(card.rows[1:]):
            row = layout.rows[node_id]
            row_id = f"{card_id}r{row_index}"
            cell_of[node_id] = row_id
            row_cell = _cell(
                root,
                id=row_id,
                value=clean(_label(view, node_id)),
                style=_ROW_STYLE,
                vertex="1",
                parent=card_id,
            )
            _geometry(
                row_cell,
                x=f"{row.rect.x - r.x:.0f}",
                y=f"{row.rect.y - r.y:.0f}",
                width=f"{row.rect.width:.0f}",
                height=f"{row.rect.height:.0f}",
            )
    for index, edge in enumerate(view.server_map.edges):
        if edge.kind is not EdgeKind.CONNECTION or edge.source not in cell_of or edge.target not in cell_of:
            continue
        colour = "#4a7fb5" if edge.direction and edge.direction.value == "inbound" else "#4f8f54"
        style = _EDGE_STYLE + f"strokeColor={colour};"
        label = "" if edge.port is None else str(edge.port)
        if edge.failed:
            style = _EDGE_STYLE + "strokeColor=#d32f2f;dashed=1;strokeWidth=2;fontColor=#b71c1c;"
            label = f"{label} failed".strip()
        cell = _cell(
            root,
            id=f"e{index}",
            value=label,
            style=style,
            edge="1",
            parent="1",
            source=cell_of[edge.source],
            target=cell_of[edge.target],
        )
        _geometry(cell, relative="1")
    ET.indent(mxfile, space=" ")
    return ET.tostring(mxfile, encoding="unicode", xml_declaration=False) + "\n"
