"""The mapped-servers index (``GET /api/maps``): a table in HTML, or the same rows as JSON.

Each row links to the server's view (HTML) and its JSON form; server names are percent-encoded into
the path and HTML-escaped into the page. The page has no script and a policy that allows none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from urllib.parse import quote

from shared_code.domain.maps import MapListing, MapStatus
from shared_code.maps.views._text import esc, one_line

INDEX_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_STYLE = """
body{margin:0;font-family:"Segoe UI",system-ui,-apple-system,"DejaVu Sans",sans-serif;
 color:#1c2b33;background:#eef1f3}
header{background:#fff;border-bottom:1px solid #cfd8dc;padding:14px 20px}
h1{font-size:20px;margin:0}
header p{margin:4px 0 0;color:#607d8b;font-size:13px}
table{border-collapse:collapse;margin:14px 20px;background:#fff;font-size:13px;min-width:60%}
th,td{border-bottom:1px solid #e0e6e9;padding:6px 10px;text-align:left;vertical-align:top}
th{background:#f5f7f8;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.status-ok{color:#2e7d32;font-weight:600}.status-failed{color:#c62828;font-weight:600}
.error{display:block;color:#c62828;font-size:12px;max-width:40em;word-break:break-word}
.server{word-break:break-all;max-width:28em;display:inline-block}
a{color:#1565c0}
"""


def server_path(base_path: str, server: str) -> str:
    """``{base}/{server}`` with the name percent-encoded as one path segment."""
    return f"{base_path.rstrip('/')}/{quote(server, safe='')}"


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="minutes").replace("+00:00", "Z") if moment else "never"


def sorted_listings(listings: Sequence[MapListing]) -> list[MapListing]:
    return sorted(listings, key=lambda row: (row.server.lower(), row.server))


def render_index_html(listings: Sequence[MapListing], *, base_path: str = "/api/maps") -> str:
    rows: list[str] = []
    for item in sorted_listings(listings):
        href = server_path(base_path, item.server)
        status = f'<span class="status-{item.status.value}">{esc(item.status.value)}</span>'
        if item.status is MapStatus.FAILED and item.last_error:
            status += f'<span class="error">{esc(one_line(item.last_error))}</span>'
        source = item.source + (f" ({item.source_kind})" if item.source_kind else "")
        rows.append(
            "<tr>"
            f'<td><a class="server" href="{esc(href)}">{esc(one_line(item.server))}</a></td>'
            f"<td>{status}</td>"
            f"<td>{esc(_when(item.imported_at))}</td>"
            f"<td>{esc(one_line(source))}</td>"
            f'<td class="num">{item.nodes}</td>'
            f'<td class="num">{item.clients}</td>'
            f'<td class="num">{item.dependencies}</td>'
            f'<td class="num">{item.failed}</td>'
            f'<td class="num">+{item.added} / \u2212{item.removed}</td>'
            f'<td><a href="{esc(href)}">view</a> \u00b7 <a href="{esc(href + "?format=json")}">json</a>'
            f' \u00b7 <a href="{esc(href + "?format=drawio")}">draw.io</a>'
            f' \u00b7 <a href="{esc(href + "?format=svg")}">svg</a></td>'
            "</tr>"
        )
    body = "".join(rows) or '<tr><td colspan="10">No server has been mapped yet.</td></tr>'
    failed = sum(1 for item in listings if item.status is MapStatus.FAILED)
    summary = f"{len(listings)} servers mapped" + (f", {failed} with a failed last import" if failed else "")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(INDEX_POLICY)}">',
            '<meta name="referrer" content="no-referrer">',
            "<title>Server dependency maps</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<header><h1>Server dependency maps</h1><p>{esc(summary)} \u00b7"
            f' <a href="{esc(base_path.rstrip("/") + "?format=json")}">JSON</a></p></header>',
            "<table><thead><tr><th>Server</th><th>Status</th><th>Last import</th><th>Source</th>"
            "<th>Nodes</th><th>Clients</th><th>Dependencies</th><th>Failed</th><th>Changes</th>"
            "<th>Formats</th></tr></thead>",
            f"<tbody>{body}</tbody></table>",
            "</body></html>",
        ]
    )


def render_index_json(listings: Sequence[MapListing], *, base_path: str = "/api/maps") -> str:
    servers = []
    for item in sorted_listings(listings):
        body = item.to_json()
        href = server_path(base_path, item.server)
        body["links"] = {"html": href, "json": href + "?format=json"}
        servers.append(body)
    return json.dumps({"servers": servers}, ensure_ascii=False)
