"""The map as a Mermaid flowchart (``?format=mermaid``), for wikis and Markdown that render Mermaid.

Ids are ours (``n12``, ``g3``), never a source's name; every label is quoted and its quote, ``#``,
angle brackets, ampersand and backtick are written as Mermaid entity codes (``#quot;`` ...), with
line breaks folded, so a name can neither end the label nor inject a directive or markup.
"""

from __future__ import annotations

from shared_code.domain.maps import EdgeKind, NodeKind, ServerMap
from shared_code.maps.layout import Side
from shared_code.maps.views._model import MapView, view_of
from shared_code.maps.views._text import shorten

_ENTITIES = {'"': "#quot;", "#": "#35;", "<": "#lt;", ">": "#gt;", "&": "#amp;", "`": "#96;", "\\": "#92;"}
_BANDS: tuple[tuple[Side, str, str], ...] = (
    ("left", "clients", "Clients"),
    ("center", "server", "Server"),
    ("right", "dependencies", "Dependencies"),
)
LABEL_LIMIT = 80


def mermaid_label(text: str, limit: int = LABEL_LIMIT) -> str:
    """``text`` as the inside of a double-quoted Mermaid label."""
    return "".join(_ENTITIES.get(ch, ch) for ch in shorten(text, limit))


def _node_label(view: MapView, node_id: str) -> str:
    node = view.by_id[node_id]
    if node.kind is NodeKind.PORT and node.port is not None:
        return f"port {node.port}/{node.protocol.value if node.protocol else 'tcp'}"
    if node.kind is NodeKind.PROCESS:
        return f"\u2699 {node.name}"
    return node.name


def render_mermaid(server_map: ServerMap, *, view: MapView | None = None) -> str:
    view = view if view is not None else view_of(server_map)
    layout = view.layout
    ids: dict[str, str] = {}
    lines = ["flowchart LR"]
    group = 0
    for side, band_id, band_title in _BANDS:
        cards = [card for card in layout.cards if card.side == side]
        if not cards:
            continue
        lines.append(f'  subgraph {band_id}["{band_title}"]')
        lines.append("    direction TB")
        for card in cards:
            if len(card.rows) == 1:
                ids[card.key] = f"n{len(ids)}"
                header = view.by_id[card.key]
                shape = ("[(", ")]") if header.kind is NodeKind.EXTERNAL else ("[", "]")
                if header.kind is NodeKind.CLIENT_GROUP:
                    shape = ("{{", "}}")
                lines.append(
                    f'    {ids[card.key]}{shape[0]}"{mermaid_label(_node_label(view, card.key))}"{shape[1]}'
                )
                continue
            group += 1
            ids[card.key] = f"g{group}"
            lines.append(f'    subgraph g{group}["{mermaid_label(view.by_id[card.key].name)}"]')
            for node_id in card.rows[1:]:
                ids[node_id] = f"n{len(ids)}"
                lines.append(f'      {ids[node_id]}["{mermaid_label(_node_label(view, node_id))}"]')
            lines.append("    end")
        lines.append("  end")
    failed_links: list[int] = []
    link = 0
    for edge in view.server_map.edges:
        if edge.kind is not EdgeKind.CONNECTION or edge.source not in ids or edge.target not in ids:
            continue
        label = "" if edge.port is None else str(edge.port)
        if edge.failed:
            label = (label + " failed").strip()
            failed_links.append(link)
        arrow = "-.->" if edge.failed else "-->"
        text = f'|"{mermaid_label(label)}"|' if label else ""
        lines.append(f"  {ids[edge.source]} {arrow}{text} {ids[edge.target]}")
        link += 1
    if failed_links:
        lines.append(
            f"  linkStyle {','.join(map(str, failed_links))} stroke:#d32f2f,stroke-width:2px,color:#b71c1c"
        )
    lines.append("  classDef serverBand fill:#fbfbfc,stroke:#263238,stroke-width:2px")
    lines.append("  class server serverBand")
    return "\n".join(lines) + "\n"
