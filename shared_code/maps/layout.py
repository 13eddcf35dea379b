"""Where every node of a server map is drawn: clients left, the server in the middle, dependencies right.

The picture people know from Service Map and SCOM's server dependency view: the mapped server is
one card in the middle listing its processes (each with the ports it listens on); every remote
machine is a card listing its processes and ports; client groups and external endpoints are cards
of their own. A card goes to the left band when the map mostly sees it connecting in, to the right
band when the server connects out to it. A band taller than the column height wraps into further
columns, away from the middle, so 3,000 nodes make a wide picture rather than a 60,000-pixel one.

Pure and deterministic (same map, same coordinates); O(n log n) in the number of nodes and edges.
The renderers (SVG/HTML, draw.io) take their geometry from here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from shared_code.domain.maps import Direction, EdgeKind, MapNode, NodeKind, ServerMap

Side = Literal["left", "center", "right"]

MARGIN = 24.0
TITLE_HEIGHT = 34.0
CARD_WIDTH = 232.0
CENTER_WIDTH = 264.0
HEADER_HEIGHT = 28.0
ROW_HEIGHT = 22.0
CARD_PADDING = 6.0
CARD_GAP = 12.0
COLUMN_GAP = 72.0  # between wrapped columns of one band: room for port labels
BAND_GAP = 190.0  # between a band and the server: room for the fan of edges
MIN_COLUMN_HEIGHT = 640.0
NESTED_INDENT = 16.0


@dataclass(frozen=True, slots=True)
class Rect:
    x: float
    y: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.x + self.width

    @property
    def middle_y(self) -> float:
        return self.y + self.height / 2

    @property
    def center_x(self) -> float:
        return self.x + self.width / 2


@dataclass(frozen=True, slots=True)
class RowPlacement:
    """One node's line inside its card; ``parent`` is the process a nested port row belongs to."""

    node_id: str
    card: str
    rect: Rect
    header: bool
    parent: str = ""


@dataclass(frozen=True, slots=True)
class CardPlacement:
    """A machine (with its processes and ports), a client group or an external endpoint."""

    key: str
    side: Side
    rect: Rect
    rows: tuple[str, ...]  # node ids, header first


@dataclass(frozen=True, slots=True)
class BandTitle:
    side: Side
    x: float
    width: float
    count: int


@dataclass(frozen=True, slots=True)
class MapLayout:
    width: float
    height: float
    cards: tuple[CardPlacement, ...]
    rows: dict[str, RowPlacement]
    bands: tuple[BandTitle, ...]
    root: str
    card_sides: dict[str, Side]

    def side_of(self, node_id: str) -> Side | None:
        row = self.rows.get(node_id)
        return None if row is None else self.card_sides[row.card]


def _sort_key(node: MapNode) -> tuple[str, int, str]:
    return (node.name.lower(), node.port if node.port is not None else -1, node.id)


def card_key_of(node: MapNode, by_id: dict[str, MapNode]) -> str:
    """The card a node is drawn in: its machine's, or its own (machines, client groups, externals)."""
    if node.kind in (NodeKind.MACHINE, NodeKind.CLIENT_GROUP, NodeKind.EXTERNAL):
        return node.id
    owner = by_id.get(node.machine) if node.machine else None
    if owner is not None and owner.kind is NodeKind.MACHINE:
        return owner.id
    return node.id


def _root_id(server_map: ServerMap) -> str:
    root = server_map.root_id
    if root:
        return root
    for node in server_map.nodes:
        if (
            node.kind is NodeKind.MACHINE
            and server_map.machine_id
            and node.id.endswith(server_map.machine_id.lower())
        ):
            return node.id
    for node in server_map.nodes:
        if node.kind is NodeKind.MACHINE:
            return node.id
    return ""


def _card_rows(
    header: MapNode, members: list[MapNode], listens: dict[str, list[str]]
) -> list[tuple[MapNode, str]]:
    """Rows of a card under its header: processes (each followed by its ports), then the rest."""
    processes = sorted((n for n in members if n.kind is NodeKind.PROCESS), key=_sort_key)
    member_ids = {n.id for n in members}
    by_id = {n.id: n for n in members}
    rows: list[tuple[MapNode, str]] = []
    nested: set[str] = set()
    for process in processes:
        rows.append((process, ""))
        ports = sorted(
            (by_id[p] for p in listens.get(process.id, ()) if p in member_ids and p not in nested),
            key=_sort_key,
        )
        for port in ports:
            nested.add(port.id)
            rows.append((port, process.id))
    others = sorted(
        (n for n in members if n.kind is not NodeKind.PROCESS and n.id not in nested and n.id != header.id),
        key=lambda n: (n.kind.value, *_sort_key(n)),
    )
    rows.extend((n, "") for n in others)
    return rows


def layout_map(server_map: ServerMap) -> MapLayout:
    """Coordinates for every node of ``server_map`` (see the module docstring)."""
    by_id = {node.id: node for node in server_map.nodes}
    root = _root_id(server_map)
    card_of = {node.id: card_key_of(node, by_id) for node in server_map.nodes}
    root_card = card_of.get(root, "")

    members: dict[str, list[MapNode]] = defaultdict(list)
    for node in server_map.nodes:
        if card_of[node.id] != node.id:
            members[card_of[node.id]].append(node)

    listens: dict[str, list[str]] = defaultdict(list)
    left_votes: dict[str, int] = defaultdict(int)
    right_votes: dict[str, int] = defaultdict(int)
    for edge in server_map.edges:
        if edge.kind is EdgeKind.LISTENS:
            listens[edge.source].append(edge.target)
            continue
        if edge.kind is not EdgeKind.CONNECTION:
            continue
        source_card, target_card = card_of[edge.source], card_of[edge.target]
        if edge.direction is Direction.INBOUND:
            left_votes[source_card] += 1
        elif edge.direction is Direction.OUTBOUND:
            right_votes[target_card] += 1
        elif target_card == root_card:
            left_votes[source_card] += 1
        else:
            right_votes[target_card] += 1

    def side_of(card: str) -> Side:
        if card == root_card:
            return "center"
        left, right = left_votes.get(card, 0), right_votes.get(card, 0)
        if left > right or (left == right == 0 and by_id[card].kind is NodeKind.CLIENT_GROUP):
            return "left"
        return "right"

    headers = sorted((by_id[key] for key in set(card_of.values())), key=_sort_key)
    band_cards: dict[Side, list[tuple[MapNode, list[tuple[MapNode, str]], float]]] = {
        "left": [],
        "center": [],
        "right": [],
    }
    for header in headers:
        rows = _card_rows(header, members.get(header.id, []), listens)
        height = HEADER_HEIGHT + len(rows) * ROW_HEIGHT + CARD_PADDING * (2 if rows else 1)
        band_cards[side_of(header.id)].append((header, rows, height))

    center_height = sum(height for _, _, height in band_cards["center"]) + CARD_GAP * max(
        0, len(band_cards["center"]) - 1
    )
    column_height = _column_height(band_cards, center_height)
    left_columns = _columns(band_cards["left"], column_height)
    right_columns = _columns(band_cards["right"], column_height)

    def band_width(columns: list[list[tuple[MapNode, list[tuple[MapNode, str]], float]]]) -> float:
        return len(columns) * CARD_WIDTH + max(0, len(columns) - 1) * COLUMN_GAP

    top = MARGIN + TITLE_HEIGHT
    tallest = max(
        [center_height]
        + [
            sum(h for _, _, h in column) + CARD_GAP * (len(column) - 1)
            for column in left_columns + right_columns
        ]
    )
    left_width = band_width(left_columns)
    center_x = MARGIN + left_width + (BAND_GAP if left_columns else 0)
    right_x = center_x + CENTER_WIDTH + BAND_GAP

    cards: list[CardPlacement] = []
    rows_out: dict[str, RowPlacement] = {}

    def place(
        header: MapNode,
        rows: list[tuple[MapNode, str]],
        side: Side,
        x: float,
        y: float,
        width: float,
        height: float,
    ) -> None:
        rect = Rect(x, y, width, height)
        ids = [header.id]
        rows_out[header.id] = RowPlacement(header.id, header.id, Rect(x, y, width, HEADER_HEIGHT), True)
        row_y = y + HEADER_HEIGHT + CARD_PADDING
        for node, parent in rows:
            indent = NESTED_INDENT if parent else 0.0
            rows_out[node.id] = RowPlacement(
                node.id,
                header.id,
                Rect(x + CARD_PADDING + indent, row_y, width - 2 * CARD_PADDING - indent, ROW_HEIGHT),
                False,
                parent,
            )
            ids.append(node.id)
            row_y += ROW_HEIGHT
        cards.append(CardPlacement(header.id, side, rect, tuple(ids)))

    y = top + max(0.0, (tallest - center_height) / 2)
    for header, rows, height in band_cards["center"]:
        place(header, rows, "center", center_x, y, CENTER_WIDTH, height)
        y += height + CARD_GAP
    for index, column in enumerate(left_columns):
        x = MARGIN + left_width - CARD_WIDTH - index * (CARD_WIDTH + COLUMN_GAP)
        y = top
        for header, rows, height in column:
            place(header, rows, "left", x, y, CARD_WIDTH, height)
            y += height + CARD_GAP
    for index, column in enumerate(right_columns):
        x = right_x + index * (CARD_WIDTH + COLUMN_GAP)
        y = top
        for header, rows, height in column:
            place(header, rows, "right", x, y, CARD_WIDTH, height)
            y += height + CARD_GAP

    width = right_x + (band_width(right_columns) if right_columns else 0) + MARGIN
    bands = (
        BandTitle("left", MARGIN, left_width, len(band_cards["left"])),
        BandTitle("center", center_x, CENTER_WIDTH, len(band_cards["center"])),
        BandTitle("right", right_x, band_width(right_columns), len(band_cards["right"])),
    )
    return MapLayout(
        width=max(width, center_x + CENTER_WIDTH + MARGIN),
        height=top + tallest + MARGIN,
        cards=tuple(cards),
        rows=rows_out,
        bands=bands,
        root=root,
        card_sides={card.key: card.side for card in cards},
    )


def _column_height(
    band_cards: dict[Side, list[tuple[MapNode, list[tuple[MapNode, str]], float]]], center_height: float
) -> float:
    """Tall enough for the server card, and about as tall as the picture is wide once bands wrap."""
    biggest = max(sum(h + CARD_GAP for _, _, h in band_cards[side]) for side in ("left", "right"))
    balanced = math.sqrt(biggest * (CARD_WIDTH + COLUMN_GAP) * 1.4)
    tallest_card = max((h for side in ("left", "right") for _, _, h in band_cards[side]), default=0.0)
    return max(MIN_COLUMN_HEIGHT, center_height, balanced, tallest_card)


def _columns(
    cards: list[tuple[MapNode, list[tuple[MapNode, str]], float]], column_height: float
) -> list[list[tuple[MapNode, list[tuple[MapNode, str]], float]]]:
    columns: list[list[tuple[MapNode, list[tuple[MapNode, str]], float]]] = []
    used = column_height + 1
    for card in cards:
        if used + card[2] > column_height and (not columns or columns[-1]):
            columns.append([])
            used = 0.0
        columns[-1].append(card)
        used += card[2] + CARD_GAP
    return columns
