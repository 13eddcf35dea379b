"""The layout: clients left, the server in the middle, dependencies right; deterministic; wraps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared_code.domain.maps import (
    Direction,
    EdgeKind,
    MapEdge,
    MapNode,
    MapWindow,
    NodeKind,
    ServerMap,
    node_id,
)
from shared_code.maps.layout import CARD_WIDTH, Rect, layout_map
from tests.fakes.maps import synthetic_map


def _overlap(a: Rect, b: Rect) -> bool:
    return a.x < b.right and b.x < a.right and a.y < b.y + b.height and b.y < a.y + a.height


@pytest.mark.parametrize("size", [5, 40, 300])
def test_every_node_has_one_row_inside_its_card_and_cards_never_overlap(size):
    server_map = synthetic_map(size)
    layout = layout_map(server_map)
    assert set(layout.rows) == {node.id for node in server_map.nodes}
    cards = {card.key: card for card in layout.cards}
    for row in layout.rows.values():
        box = cards[row.card].rect
        assert box.x <= row.rect.x
        assert row.rect.right <= box.right
        assert box.y <= row.rect.y
        assert row.rect.y + row.rect.height <= box.y + box.height + 0.01
    placed = sorted(layout.cards, key=lambda c: (c.rect.x, c.rect.y))
    for index, card in enumerate(placed):
        for other in placed[index + 1 : index + 40]:
            assert not _overlap(card.rect, other.rect), (card.key, other.key)
    assert all(c.rect.x >= 0 and c.rect.right <= layout.width for c in layout.cards)
    assert all(c.rect.y >= 0 and c.rect.y + c.rect.height <= layout.height for c in layout.cards)


def test_clients_are_left_of_the_server_and_dependencies_right():
    server_map = synthetic_map(120)
    layout = layout_map(server_map)
    root = layout.rows[server_map.root_id]
    assert layout.side_of(server_map.root_id) == "center"
    for edge in server_map.edges:
        if edge.kind is not EdgeKind.CONNECTION:
            continue
        if edge.direction is Direction.INBOUND:
            assert layout.side_of(edge.source) == "left"
            assert layout.rows[edge.source].rect.right < root.rect.x
        else:
            assert layout.side_of(edge.target) == "right"
            assert layout.rows[edge.target].rect.x > root.rect.right


def test_the_server_card_lists_its_processes_each_followed_by_its_ports():
    server_map = synthetic_map(60)
    layout = layout_map(server_map)
    center = next(card for card in layout.cards if card.side == "center")
    kinds = [next(n for n in server_map.nodes if n.id == row).kind for row in center.rows]
    assert kinds[0] is NodeKind.MACHINE
    assert kinds[1] is NodeKind.PROCESS
    for row_id in center.rows[1:]:
        row = layout.rows[row_id]
        node = next(n for n in server_map.nodes if n.id == row_id)
        if node.kind is NodeKind.PORT:
            assert row.parent, "a listened port is nested under its process"
            assert center.rows.index(row.parent) < center.rows.index(row_id)


def test_the_same_map_lays_out_the_same_and_input_order_does_not_matter():
    server_map = synthetic_map(200)
    shuffled = server_map.model_copy(
        update={"nodes": server_map.nodes[::-1], "edges": server_map.edges[::-1]}
    )
    first, second = layout_map(server_map), layout_map(shuffled)
    assert first.rows == second.rows
    assert (first.width, first.height) == (second.width, second.height)


def test_long_bands_wrap_into_columns_so_a_big_map_stays_wide_not_tall():
    layout = layout_map(synthetic_map(3000))
    right_columns = {card.rect.x for card in layout.cards if card.side == "right"}
    left_columns = {card.rect.x for card in layout.cards if card.side == "left"}
    assert len(right_columns) > 3
    assert len(left_columns) > 3
    assert layout.height < 8000
    assert 0.5 < layout.width / layout.height < 6
    # wrapped columns grow away from the server, never through it
    center = next(card for card in layout.cards if card.side == "center").rect
    assert max(left_columns) + CARD_WIDTH < center.x
    assert min(right_columns) > center.right


def test_a_map_whose_server_machine_is_not_named_like_the_server_still_lays_out():
    start = datetime(2025, 1, 1, tzinfo=UTC)
    machine = MapNode(id=node_id(NodeKind.MACHINE, "m-1"), kind=NodeKind.MACHINE, name="srv01.corp")
    remote = MapNode(id=node_id(NodeKind.EXTERNAL, "x"), kind=NodeKind.EXTERNAL, name="x", port=53)
    server_map = ServerMap(
        server="srv01",
        source="s",
        window=MapWindow(start=start, end=start + timedelta(hours=1)),
        imported_at=start,
        nodes=(machine, remote),
        edges=(MapEdge(source=machine.id, target=remote.id, kind=EdgeKind.CONNECTION, port=53),),
    )
    layout = layout_map(server_map)
    assert layout.side_of(machine.id) == "center"
    assert layout.side_of(remote.id) == "right"
