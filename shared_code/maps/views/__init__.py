"""Renderers of a server dependency map: pure functions of a ``ServerMap`` (and, for SCOM, a version).

``render_view(server_map, "drawio")`` answers ``GET /api/maps/{server}?format=drawio`` and friends
with a body, its media type and a download file name; an unknown format is an
``InvalidInputError`` naming the formats there are. The index page is ``render_index_html`` /
``render_index_json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from shared_code.domain.maps import ServerMap
from shared_code.errors import InvalidInputError
from shared_code.maps.scom import render_management_pack, version_from_time
from shared_code.maps.views._text import safe_filename
from shared_code.maps.views.csvexport import render_migrate_csv
from shared_code.maps.views.drawio import render_drawio
from shared_code.maps.views.html import render_html
from shared_code.maps.views.index import render_index_html, render_index_json, server_path
from shared_code.maps.views.mermaid import render_mermaid
from shared_code.maps.views.svg import render_svg

__all__ = [
    "RenderedView",
    "ViewFormat",
    "render_index_html",
    "render_index_json",
    "render_json",
    "render_view",
    "server_path",
]


class ViewFormat(StrEnum):
    HTML = "html"
    SVG = "svg"
    JSON = "json"
    MERMAID = "mermaid"
    DRAWIO = "drawio"
    CSV = "csv"
    SCOM_MP = "scom-mp"


_MEDIA: dict[ViewFormat, tuple[str, str]] = {
    ViewFormat.HTML: ("text/html; charset=utf-8", ".html"),
    ViewFormat.SVG: ("image/svg+xml; charset=utf-8", ".svg"),
    ViewFormat.JSON: ("application/json; charset=utf-8", ".json"),
    ViewFormat.MERMAID: ("text/plain; charset=utf-8", ".mmd"),
    ViewFormat.DRAWIO: ("application/vnd.jgraph.mxfile; charset=utf-8", ".drawio"),
    ViewFormat.CSV: ("text/csv; charset=utf-8", ".csv"),
    ViewFormat.SCOM_MP: ("application/xml; charset=utf-8", ".xml"),
}


@dataclass(frozen=True)
class RenderedView:
    body: str
    media_type: str
    filename: str


def render_json(server_map: ServerMap) -> str:
    return json.dumps(server_map.to_json(), ensure_ascii=False)


def parse_format(value: str | None) -> ViewFormat:
    """``?format=`` as a ``ViewFormat`` (missing means HTML); unknown values are the caller's error."""
    text = (value or "html").strip().lower()
    try:
        return ViewFormat(text)
    except ValueError as exc:
        choices = ", ".join(f.value for f in ViewFormat)
        raise InvalidInputError(f"format {text[:40]!r} is not one of {choices}") from exc


def render_view(
    server_map: ServerMap,
    view_format: str | ViewFormat | None,
    *,
    scom_version: str | None = None,
    json_href: str = "",
) -> RenderedView:
    """``server_map`` in ``view_format`` (``scom_version`` defaults to one derived from the import time)."""
    chosen = view_format if isinstance(view_format, ViewFormat) else parse_format(view_format)
    if chosen is ViewFormat.HTML:
        body = render_html(server_map, json_href=json_href)
    elif chosen is ViewFormat.SVG:
        body = render_svg(server_map)
    elif chosen is ViewFormat.JSON:
        body = render_json(server_map)
    elif chosen is ViewFormat.MERMAID:
        body = render_mermaid(server_map)
    elif chosen is ViewFormat.DRAWIO:
        body = render_drawio(server_map)
    elif chosen is ViewFormat.CSV:
        body = render_migrate_csv(server_map)
    else:
        body = render_management_pack(
            [server_map], version=scom_version or version_from_time(server_map.imported_at)
        )
    media_type, suffix = _MEDIA[chosen]
    return RenderedView(body=body, media_type=media_type, filename=safe_filename(server_map.server, suffix))
