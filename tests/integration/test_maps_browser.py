"""The HTML views in a real headless Chromium (Debian's ``chromium``, installed by ``make browser``).

Never skipped: without Chromium the tests fail and say how to install it. Playwright drives the
system browser (``executable_path``); it downloads nothing. Screenshots go to ``MAPS_SCREENSHOT_DIR``
when set (to look at them), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from shared_code.domain.maps import EdgeKind, MapStatus, ServerMap, listing_of
from shared_code.maps.views import render_index_html
from shared_code.maps.views._model import view_of
from shared_code.maps.views.html import render_html
from tests.fakes.maps import synthetic_map

RED = "rgb(211, 47, 47)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Chromium is not installed: run `make browser` (apt-get install chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    chosen = os.environ.get("MAPS_SCREENSHOT_DIR")
    target = Path(chosen) if chosen else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    return target


def _open(browser: Browser, tmp_path: Path, html: str, *, width: int = 1600, height: int = 1000) -> Page:
    page_file = tmp_path / "view.html"
    page_file.write_text(html, encoding="utf-8")
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(page_file.as_uri())
    page.wait_for_selector("svg.map")
    page.errors = errors  # type: ignore[attr-defined]
    return page


def _visible_edges(page: Page) -> list[dict[str, str]]:
    found: list[dict[str, str]] = page.eval_on_selector_all(
        "g.edge",
        "els => els.filter(e => getComputedStyle(e).display !== 'none')"
        ".map(e => ({port: e.dataset.port, process: e.dataset.process, source: e.dataset.source,"
        " target: e.dataset.target}))",
    )
    return found


def test_a_small_map_shows_every_node_and_connection_marks_failed_ones_and_runs_no_name(
    browser, tmp_path, shots
):
    server_map = synthetic_map(5, hostile=True, failed_every=2)
    page = _open(browser, tmp_path, render_html(server_map), width=1200, height=700)
    connections = [e for e in server_map.edges if e.kind is EdgeKind.CONNECTION]
    assert page.locator("g.edge").count() == len(connections)
    assert page.locator("g.node").count() == len(server_map.nodes)
    failed = page.locator("g.edge.failed path")
    assert failed.count() == sum(e.failed for e in connections) > 0
    style = failed.first.evaluate("p => [getComputedStyle(p).stroke, getComputedStyle(p).strokeDasharray]")
    assert style[0] == RED
    assert style[1] not in ("none", "")
    legend = page.locator(".legend-failed")
    assert "failed connection" in legend.inner_text()
    legend_line = legend.locator("i.line").evaluate(
        "e => [getComputedStyle(e).borderTopStyle, getComputedStyle(e).borderTopColor]"
    )
    assert legend_line == ["dashed", RED]
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []  # type: ignore[attr-defined]
    page.screenshot(path=str(shots / "map-5.png"), full_page=True)
    page.close()


def test_hostile_names_are_text_never_markup_or_script(browser, tmp_path, shots):
    server_map = synthetic_map(90, hostile=True)
    page = _open(browser, tmp_path, render_html(server_map))
    assert page.evaluate("window.__pwned") is None
    assert page.locator("script").count() == 1
    assert page.locator("img").count() == 0
    assert page.locator("svg b, svg x, body > b").count() == 0
    tooltips = page.eval_on_selector_all("g.node > title", "els => els.map(e => e.textContent)")
    for node in server_map.nodes:
        if node.name.startswith(("<script>", '"><img', "]]>", "=cmd")):
            assert any(node.name in tip for tip in tooltips), node.name
    ids = set(page.eval_on_selector_all("g.node", "els => els.map(e => e.dataset.nodeId)"))
    assert ids == {node.id for node in server_map.nodes}, "data- attributes carry the exact ids"
    assert page.errors == []  # type: ignore[attr-defined]
    page.screenshot(path=str(shots / "map-hostile.png"))
    page.close()


def _expected(server_map: ServerMap, *, port: int | None = None, process: str = "") -> set[tuple[str, str]]:
    view = view_of(server_map)
    return {
        (e.source, e.target)
        for e in view.connections
        if (port is None or e.port == port) and (not process or view.server_process(e) == process)
    }


def test_a_300_node_map_filters_by_port_and_by_process(browser, tmp_path, shots):
    server_map = synthetic_map(300)
    page = _open(browser, tmp_path, render_html(server_map), width=1800, height=1100)
    total = page.locator("g.edge").count()
    assert total == len(_expected(server_map))
    assert page.locator("#filter-status").inner_text() == f"{total} connections"
    page.screenshot(path=str(shots / "map-300.png"))

    page.select_option("#filter-port", "443")
    shown = _visible_edges(page)
    assert shown
    assert all(edge["port"] == "443" for edge in shown)
    assert {(e["source"], e["target"]) for e in shown} == _expected(server_map, port=443)
    assert page.locator("#filter-status").inner_text() == f"{len(shown)} of {total} connections shown"
    touched = {e["source"] for e in shown} | {e["target"] for e in shown}
    visible_cards = page.eval_on_selector_all(
        "g.card", "els => els.filter(c => getComputedStyle(c).display !== 'none').map(c => c.dataset.card)"
    )
    layout = view_of(server_map).layout
    expected_cards = {layout.rows[node].card for node in touched} | {layout.root}
    assert set(visible_cards) == expected_cards, "cards with no 443 connection are hidden"
    hidden_rows = page.eval_on_selector_all(
        "g.card[data-side='right'] g.node:not(.head)",
        "els => els.filter(e => getComputedStyle(e).display === 'none').map(e => e.dataset.nodeId)",
    )
    assert hidden_rows == [] or not set(hidden_rows) & touched
    page.screenshot(path=str(shots / "map-300-port-443.png"))

    processes = view_of(server_map).server_processes()
    chosen = processes[1]
    page.select_option("#filter-port", "")
    page.select_option("#filter-process", chosen.id)
    shown = _visible_edges(page)
    assert shown
    assert all(edge["process"] == chosen.id for edge in shown)
    assert {(e["source"], e["target"]) for e in shown} == _expected(server_map, process=chosen.id)
    other_process_rows = page.eval_on_selector_all(
        "g.card[data-side='center'] g.node.kind-process",
        "els => els.filter(e => getComputedStyle(e).display !== 'none').map(e => e.dataset.nodeId)",
    )
    assert other_process_rows == [chosen.id]

    page.select_option("#filter-port", "443")
    both = _visible_edges(page)
    assert {(e["source"], e["target"]) for e in both} == _expected(server_map, port=443, process=chosen.id)

    page.click("#filter-reset")
    assert len(_visible_edges(page)) == total
    assert page.errors == []  # type: ignore[attr-defined]
    screenshot = shots / "map-300-process.png"
    page.select_option("#filter-process", chosen.id)
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 20_000
    page.close()


def test_the_index_links_every_server_to_its_view_and_json(browser, tmp_path, shots):
    maps = [synthetic_map(20, server=name) for name in ("web-01", "db 02/#?", "<b>x</b>")]
    listings = [listing_of(m) for m in maps]
    listings[1] = listing_of(maps[1], status=MapStatus.FAILED, last_error="query timed out")
    page_file = tmp_path / "index.html"
    page_file.write_text(render_index_html(listings, base_path="/api/maps"), encoding="utf-8")
    page = browser.new_page()
    page.goto(page_file.as_uri())
    servers = page.eval_on_selector_all("a.server", "els => els.map(a => [a.textContent, a.pathname])")
    assert sorted(text for text, _ in servers) == sorted(m.server for m in maps)
    for _text, path in servers:
        assert path.startswith("/api/maps/")
        assert "/" not in path.removeprefix("/api/maps/")
    assert page.locator("tbody b").count() == 0
    assert "query timed out" in page.locator("tbody").inner_text()
    page.screenshot(path=str(shots / "index.png"))
    page.close()
