"""The dependency diagram as SVG: cards for machines, lines for connections, ports on the lines.

Used alone (``?format=svg``) and inlined in the HTML view, which filters it through the ``data-``
attributes written here: every connection ``g.edge`` carries ``data-port``, ``data-process`` (the
server-side process id), ``data-source``/``data-target``; every row ``g.node`` carries
``data-node-id``, ``data-kind`` and ``data-parent`` (the process a nested port row belongs to).
Every name goes through ``_text.esc``; nothing from the map is ever written unescaped.
"""

from __future__ import annotations

from shared_code.domain.maps import Direction, MapEdge, MapNode, NodeKind, ServerMap
from shared_code.maps.layout import MARGIN, CardPlacement, MapLayout, Side
from shared_code.maps.views._model import MapView, view_of
from shared_code.maps.views._text import esc, one_line, shorten

SVG_STYLE = """
.map{font-family:"Segoe UI",system-ui,-apple-system,"DejaVu Sans",sans-serif;font-size:12px}
.map .band-title{font-size:13px;font-weight:600;fill:#37474f;letter-spacing:.02em}
.map .card-box{stroke-width:1.2}
.map .card.left .card-box{fill:#f3f8fd;stroke:#5b8fc7}
.map .card.right .card-box{fill:#f3faf3;stroke:#5a9e5f}
.map .card.center .card-box{fill:#fbfbfc;stroke:#263238;stroke-width:2}
.map .card.kind-clientGroup .card-box{fill:#f7f1fa;stroke:#8e5aa8}
.map .card.kind-external .card-box{fill:#fff6ec;stroke:#d98324}
.map .card.unmonitored .card-box{stroke-dasharray:4 3}
.map .head-bar{fill:#dde9f6}
.map .card.right .head-bar{fill:#dcefdc}
.map .card.center .head-bar{fill:#263238}
.map .card.kind-clientGroup .head-bar{fill:#eadcf1}
.map .card.kind-external .head-bar{fill:#fde5c8}
.map .head-text{font-weight:600;fill:#1c2b33}
.map .card.center .head-text{fill:#fff}
.map .row-text{fill:#263238}
.map .node.kind-port .row-text{fill:#546e7a;font-size:11px}
.map .node:hover .row-bg{fill:#fff3c4}
.map .row-bg{fill:transparent}
.map .edge path{fill:none;stroke:#7d8f99;stroke-width:1.1;opacity:.55}
.map .edge.inbound path{stroke:#4a7fb5}
.map .edge.outbound path{stroke:#4f8f54}
.map .edge.failed path{stroke:#d32f2f;stroke-dasharray:6 4;stroke-width:1.6;opacity:.95}
.map .edge text{font-size:10px;fill:#37474f;paint-order:stroke;stroke:#fff;stroke-width:3px}
.map .edge.failed text{fill:#b71c1c}
.map .edge:hover path{stroke-width:2.6;opacity:1}
.map .hidden{display:none}
.map .legend text{font-size:11px;fill:#37474f}
"""

_BAND_TITLES: dict[Side, str] = {"left": "Clients", "center": "Server", "right": "Dependencies"}
_KIND_GLYPH = {NodeKind.PROCESS: "\u2699 ", NodeKind.PORT: "\u25b8 "}


def _chars_for(width: float, font_px: float = 12.0) -> int:
    return max(4, int(width / (font_px * 0.56)))


def _node_tooltip(node: MapNode, view: MapView) -> str:
    lines = [f"{node.kind.value}: {node.name}"]
    if node.kind in (NodeKind.PROCESS, NodeKind.PORT) and node.machine in view.by_id:
        lines.append(f"on {view.by_id[node.machine].name}")
    if node.ips:
        lines.append("ip " + ", ".join(node.ips))
    if node.port is not None:
        lines.append(f"port {node.port}/{node.protocol.value if node.protocol else 'tcp'}")
    if node.kind is NodeKind.MACHINE:
        lines.append("monitored" if node.monitored else "not monitored")
    lines.extend(f"{key}: {value}" for key, value in sorted(node.properties.items()))
    return "\n".join(lines)


def _row_label(node: MapNode) -> str:
    if node.kind is NodeKind.PORT and node.port is not None:
        protocol = node.protocol.value if node.protocol else "tcp"
        return f"{node.port}/{protocol}"
    return node.name


def _card_classes(card: CardPlacement, header: MapNode) -> str:
    classes = ["card", card.side, f"kind-{header.kind.value}"]
    if header.kind is NodeKind.MACHINE and not header.monitored and card.side != "center":
        classes.append("unmonitored")
    return " ".join(classes)


def _edge_tooltip(edge: MapEdge, view: MapView) -> str:
    source, target = view.by_id[edge.source], view.by_id[edge.target]
    text = f"{view.owner_name(source.id)} / {source.name} \u2192 {view.owner_name(target.id)} / {target.name}"
    if edge.port is not None:
        text += f" :{edge.port}/{edge.protocol.value if edge.protocol else 'tcp'}"
    text += f"\n{edge.direction.value if edge.direction else 'connection'}"
    if edge.failed:
        text += " \u2014 FAILED (every link failed in the window)"
    text += (
        f"\nlinks established {edge.links_established}, failed {edge.links_failed}, live {edge.links_live}"
        f"\nbytes sent {edge.bytes_sent}, received {edge.bytes_received}"
    )
    return text


def _edge_path(edge: MapEdge, layout: MapLayout) -> tuple[str, float, float, str] | None:
    source_row, target_row = layout.rows.get(edge.source), layout.rows.get(edge.target)
    if source_row is None or target_row is None:
        return None
    # lines start and end on the cards' sides, at the height of the rows they join
    s, t = layout.rows[source_row.card].rect, layout.rows[target_row.card].rect
    x1, x2 = (s.right, t.x) if s.center_x <= t.center_x else (s.x, t.right)
    y1, y2 = source_row.rect.middle_y, target_row.rect.middle_y
    bend = max(30.0, abs(x2 - x1) * 0.45)
    sign = 1 if x2 >= x1 else -1
    path = (
        f"M{x1:.1f},{y1:.1f} C{x1 + sign * bend:.1f},{y1:.1f} "
        f"{x2 - sign * bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
    )
    # the port is written at the remote end: lines into the server converge, their far ends do not
    if target_row.card == layout.root:
        return path, x1 + sign * 6, y1 - 4, "start" if sign > 0 else "end"
    return path, x2 - sign * 6, y2 - 4, "end" if sign > 0 else "start"


def render_svg_body(view: MapView) -> list[str]:
    """The SVG's inner elements (titles, edges, cards), as a list of strings to join."""
    layout = view.layout
    out: list[str] = []
    for band in layout.bands:
        if band.side != "center" and band.count == 0:
            continue
        title = _BAND_TITLES[band.side]
        if band.side != "center":
            title += f" ({band.count})"
        x = band.x + band.width / 2
        out.append(
            f'<text class="band-title" x="{x:.1f}" y="{MARGIN + 14:.1f}" text-anchor="middle">'
            f"{esc(title)}</text>"
        )

    out.append('<g class="edges">')
    for edge in view.connections:
        geometry = _edge_path(edge, layout)
        if geometry is None:
            continue
        path, label_x, label_y, anchor = geometry
        classes = ["edge", edge.direction.value if edge.direction else "undirected"]
        if edge.failed:
            classes.append("failed")
        port = "" if edge.port is None else str(edge.port)
        marker = "url(#arrow-failed)" if edge.failed else "url(#arrow)"
        out.append(
            f'<g class="{" ".join(classes)}" data-port="{port}"'
            f' data-process="{esc(view.server_process(edge))}"'
            f' data-source="{esc(edge.source)}" data-target="{esc(edge.target)}"'
            f' data-failed="{"true" if edge.failed else "false"}">'
            f"<title>{esc(_edge_tooltip(edge, view))}</title>"
            f'<path d="{path}" marker-end="{marker}"/>'
        )
        if port:
            text = f"{port} \u2716" if edge.failed else port
            out.append(f'<text x="{label_x:.1f}" y="{label_y:.1f}" text-anchor="{anchor}">{esc(text)}</text>')
        out.append("</g>")
    out.append("</g>")

    out.append('<g class="cards">')
    for card in layout.cards:
        header = view.by_id[card.key]
        r = card.rect
        out.append(
            f'<g class="{_card_classes(card, header)}" data-card="{esc(card.key)}" data-side="{card.side}">'
            f'<rect class="card-box" x="{r.x:.1f}" y="{r.y:.1f}" width="{r.width:.1f}"'
            f' height="{r.height:.1f}"'
            ' rx="6"/>'
        )
        for node_id in card.rows:
            node = view.by_id[node_id]
            row = layout.rows[node_id]
            rr = row.rect
            if row.header:
                glyph = {"left": "\u21e2 ", "right": "\u21e2 ", "center": "\u25a3 "}[card.side]
                if header.kind is NodeKind.CLIENT_GROUP:
                    glyph = "\u2637 "
                elif header.kind is NodeKind.EXTERNAL:
                    glyph = "\u2601 "
                label = shorten(glyph + _row_label(node), _chars_for(rr.width - 12, 12.5))
                out.append(
                    f'<g class="node head kind-{node.kind.value}" data-node-id="{esc(node.id)}"'
                    f' data-kind="{node.kind.value}" data-parent="">'
                    f"<title>{esc(_node_tooltip(node, view))}</title>"
                    f'<path class="head-bar" d="M{rr.x:.1f},{rr.y + 6:.1f} a6,6 0 0 1 6,-6'
                    f" h{rr.width - 12:.1f}"
                    f' a6,6 0 0 1 6,6 v{rr.height - 6:.1f} h{-rr.width:.1f} z"/>'
                    f'<text class="head-text" x="{rr.x + 8:.1f}" y="{rr.y + 18.5:.1f}">'
                    f"{esc(label)}</text></g>"
                )
                continue
            glyph = _KIND_GLYPH.get(node.kind, "")
            font = 11.0 if node.kind is NodeKind.PORT else 12.0
            label = shorten(glyph + _row_label(node), _chars_for(rr.width - 8, font))
            out.append(
                f'<g class="node kind-{node.kind.value}" data-node-id="{esc(node.id)}"'
                f' data-kind="{node.kind.value}" data-parent="{esc(row.parent)}">'
                f"<title>{esc(_node_tooltip(node, view))}</title>"
                f'<rect class="row-bg" x="{rr.x:.1f}" y="{rr.y:.1f}" width="{rr.width:.1f}"'
                f' height="{rr.height:.1f}"'
                ' rx="3"/>'
                f'<text class="row-text" x="{rr.x + 4:.1f}" y="{rr.y + 15:.1f}">{esc(label)}</text></g>'
            )
        out.append("</g>")
    out.append("</g>")
    return out


def _defs() -> str:
    return (
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7"'
        ' orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6b7f8a"/></marker>'
        '<marker id="arrow-failed" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7"'
        ' orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#d32f2f"/></marker>'
        "</defs>"
    )


def _legend(x: float, y: float) -> str:
    """A small legend for the standalone SVG (the HTML view has its own in the header)."""
    return (
        f'<g class="legend" transform="translate({x:.1f},{y:.1f})">'
        '<path d="M0,0 h28" stroke="#4f8f54" stroke-width="1.4"/>'
        '<text x="34" y="4">connection (port on the line)</text>'
        '<path d="M200,0 h28" stroke="#d32f2f" stroke-width="1.6" stroke-dasharray="6 4"/>'
        '<text x="234" y="4">failed connection</text>'
        "</g>"
    )


def render_svg(server_map: ServerMap, *, view: MapView | None = None) -> str:
    """A standalone SVG document of the map (``?format=svg``)."""
    view = view if view is not None else view_of(server_map)
    layout = view.layout
    height = layout.height + 24
    title = f"Dependency map of {one_line(server_map.server)}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="map" width="{layout.width:.0f}"'
        f' height="{height:.0f}"'
        f' viewBox="0 0 {layout.width:.0f} {height:.0f}" role="img" aria-label="{esc(title)}">',
        f"<title>{esc(title)}</title>",
        f"<style>{SVG_STYLE}</style>",
        _defs(),
        f'<rect width="{layout.width:.0f}" height="{height:.0f}" fill="#fff"/>',
        *render_svg_body(view),
        _legend(MARGIN, layout.height + 4),
        "</svg>",
    ]
    return "\n".join(parts)


def render_svg_inline(view: MapView) -> str:
    """The same drawing for the HTML view: no standalone title or legend, styles in the page."""
    layout = view.layout
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="map" width="{layout.width:.0f}"'
            f' height="{layout.height:.0f}" viewBox="0 0 {layout.width:.0f} {layout.height:.0f}"'
            f' role="img" aria-label="{esc("Dependency map of " + one_line(view.server_map.server))}">',
            _defs(),
            *render_svg_body(view),
            "</svg>",
        ]
    )


def edge_direction_counts(view: MapView) -> tuple[int, int, int]:
    """(inbound, outbound, failed) connection counts, for headers."""
    inbound = sum(1 for e in view.connections if e.direction is Direction.INBOUND)
    outbound = sum(1 for e in view.connections if e.direction is Direction.OUTBOUND)
    failed = sum(1 for e in view.connections if e.failed)
    return inbound, outbound, failed
