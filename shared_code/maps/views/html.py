"""The server dependency view as one self-contained HTML page (``GET /api/maps/{server}``).

No CDN, no external file: the CSS, the SVG and the small filter script are inline. A Content
Security Policy admits exactly that script (by its SHA-256) and nothing else, so even a name that
slipped past escaping could not run script; every name is escaped anyway (``_text.esc``). The
script reads only ``data-`` attributes and form values; it never builds markup from them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime

from shared_code.domain.maps import ServerMap
from shared_code.maps.views._model import MapView, view_of
from shared_code.maps.views._text import esc, one_line, shorten
from shared_code.maps.views.svg import SVG_STYLE, edge_direction_counts, render_svg_inline

PAGE_STYLE = """
*{box-sizing:border-box}
body{margin:0;font-family:"Segoe UI",system-ui,-apple-system,"DejaVu Sans",sans-serif;
 color:#1c2b33;background:#eef1f3}
header{background:#fff;border-bottom:1px solid #cfd8dc;padding:12px 20px 10px}
h1{font-size:20px;margin:0 0 6px;word-break:break-all}
h1 small{font-weight:400;color:#607d8b;font-size:13px}
.facts{display:flex;flex-wrap:wrap;gap:4px 22px;margin:0;font-size:13px}
.facts div{display:flex;gap:6px}
.facts dt{color:#607d8b}
.facts dd{margin:0;font-weight:600;word-break:break-all}
.changes{display:flex;flex-wrap:wrap;gap:4px 24px;margin-top:6px;font-size:13px}
.changes summary{cursor:pointer}
.changes ul{margin:4px 0 0;padding-left:20px;max-height:160px;overflow:auto;font-size:12px}
.changes .added summary{color:#2e7d32}
.changes .removed summary{color:#c62828}
.toolbar{display:flex;flex-wrap:wrap;align-items:center;gap:8px 18px;margin-top:10px;font-size:13px}
.toolbar label{display:flex;align-items:center;gap:6px}
.toolbar select,.toolbar button{font:inherit;padding:3px 6px}
#filter-status{color:#455a64}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#37474f;margin-top:8px}
.legend span{display:inline-flex;align-items:center;gap:5px}
.swatch{display:inline-block;width:14px;height:10px;border:1.5px solid;border-radius:2px}
.sw-client{background:#f3f8fd;border-color:#5b8fc7}.sw-server{background:#263238;border-color:#263238}
.sw-dep{background:#f3faf3;border-color:#5a9e5f}.sw-group{background:#f7f1fa;border-color:#8e5aa8}
.sw-ext{background:#fff6ec;border-color:#d98324}.sw-unmon{background:#fff;border-color:#78909c;border-style:dashed}
.line{display:inline-block;width:26px;border-top:2px solid #4f8f54}
.line.in{border-top-color:#4a7fb5}.line.failed{border-top:2px dashed #d32f2f}
main{overflow:auto;height:calc(100vh - 150px);min-height:420px;background:#fff;margin:10px;
 border:1px solid #cfd8dc}
main.fit svg.map{width:100%;height:auto}
"""

FILTER_SCRIPT = """
(function () {
  "use strict";
  var svg = document.querySelector("svg.map");
  var portSelect = document.getElementById("filter-port");
  var processSelect = document.getElementById("filter-process");
  var status = document.getElementById("filter-status");
  var canvas = document.querySelector("main");
  var edges = Array.prototype.slice.call(svg.querySelectorAll("g.edge"));
  var cards = Array.prototype.slice.call(svg.querySelectorAll("g.card"));
  function apply() {
    var port = portSelect.value, proc = processSelect.value, filtering = port !== "" || proc !== "";
    var seen = new Set(), shown = 0;
    edges.forEach(function (edge) {
      var match = (port === "" || edge.dataset.port === port) &&
                  (proc === "" || edge.dataset.process === proc);
      edge.classList.toggle("hidden", !match);
      if (match) { shown += 1; seen.add(edge.dataset.source); seen.add(edge.dataset.target); }
    });
    cards.forEach(function (card) {
      var rows = Array.prototype.slice.call(card.querySelectorAll("g.node"));
      var visible = new Set();
      rows.forEach(function (row) {
        var id = row.dataset.nodeId;
        if (!filtering || seen.has(id) || (card.dataset.side === "center" && proc !== "" && id === proc)) {
          visible.add(id);
          if (row.dataset.parent) { visible.add(row.dataset.parent); }
        }
      });
      var any = false;
      rows.forEach(function (row) {
        var keep = row.classList.contains("head") || visible.has(row.dataset.nodeId);
        row.classList.toggle("hidden", !keep);
        if (!row.classList.contains("head") && keep) { any = true; }
        if (row.classList.contains("head") && visible.has(row.dataset.nodeId)) { any = true; }
      });
      card.classList.toggle("hidden", filtering && card.dataset.side !== "center" && !any);
    });
    status.textContent = filtering ? shown + " of " + edges.length + " connections shown"
                                   : edges.length + " connections";
  }
  portSelect.addEventListener("change", apply);
  processSelect.addEventListener("change", apply);
  document.getElementById("filter-reset").addEventListener("click", function () {
    portSelect.value = ""; processSelect.value = ""; apply();
  });
  document.getElementById("fit").addEventListener("change", function (event) {
    canvas.classList.toggle("fit", event.target.checked);
  });
  apply();
})();
"""


def _script_hash(script: str) -> str:
    return base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_script_hash(FILTER_SCRIPT)}'; base-uri 'none'; form-action 'none'"
)


def _fact(label: str, value: str) -> str:
    return f"<div><dt>{esc(label)}</dt><dd>{esc(value)}</dd></div>"


def _change_list(css: str, title: str, items: Iterable[str], count: int) -> str:
    body = "".join(f"<li>{esc(item)}</li>" for item in items)
    return f'<details class="{css}"><summary>{esc(title)} ({count})</summary><ul>{body}</ul></details>'


def _when(moment: datetime) -> str:
    """UTC to the minute (``2025-06-02T09:30Z``); a naive time is taken as UTC."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


def render_html(server_map: ServerMap, *, view: MapView | None = None, json_href: str = "") -> str:
    """The whole page: header (server, source, window, import time, counts, changes), filters, legend, map."""
    view = view if view is not None else view_of(server_map)
    inbound, outbound, failed = edge_direction_counts(view)
    changes = server_map.changes
    source = server_map.source + (f" ({server_map.source_kind})" if server_map.source_kind else "")
    facts = [
        _fact("Source", source),
        _fact("Window", f"{_when(server_map.window.start)} \u2192 {_when(server_map.window.end)}"),
        _fact("Imported", _when(server_map.imported_at)),
        _fact("Nodes", str(len(server_map.nodes))),
        _fact("Inbound", str(inbound)),
        _fact("Outbound", str(outbound)),
        _fact("Failed", str(failed)),
        _fact("Changes", f"+{len(changes.added)} / \u2212{len(changes.removed)}"),
    ]
    port_options = "".join(f'<option value="{port}">{port}</option>' for port in view.ports())
    process_options = "".join(
        f'<option value="{esc(process.id)}" title="{esc(one_line(process.name))}">'
        f"{esc(shorten(process.name, 48))}</option>"
        for process in view.server_processes()
    )
    json_link = f' <a href="{esc(json_href)}">JSON</a>' if json_href else ""
    title = f"Dependency map: {one_line(server_map.server)}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CONTENT_SECURITY_POLICY)}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="referrer" content="no-referrer">',
            f"<title>{esc(title)}</title>",
            f"<style>{PAGE_STYLE}{SVG_STYLE}</style></head><body>",
            "<header>",
            f'<h1><span class="server-name">{esc(one_line(server_map.server))}</span>'
            f" <small>server dependency map{json_link}</small></h1>",
            f'<dl class="facts">{"".join(facts)}</dl>',
            '<div class="changes">',
            _change_list(
                "added", "Dependencies added", map(view.describe_change, changes.added), len(changes.added)
            ),
            _change_list(
                "removed",
                "Dependencies removed",
                map(view.describe_change, changes.removed),
                len(changes.removed),
            ),
            "</div>",
            '<div class="toolbar">',
            '<label>Port <select id="filter-port"><option value="">All ports</option>'
            f"{port_options}</select></label>",
            '<label>Process <select id="filter-process"><option value="">All processes</option>'
            f"{process_options}</select></label>",
            '<button type="button" id="filter-reset">Show all</button>',
            '<label><input type="checkbox" id="fit"> Fit to window</label>',
            '<span id="filter-status" aria-live="polite"></span>',
            "</div>",
            '<div class="legend">',
            '<span><i class="swatch sw-client"></i>client</span>',
            '<span><i class="swatch sw-server"></i>server</span>',
            '<span><i class="swatch sw-dep"></i>dependency</span>',
            '<span><i class="swatch sw-group"></i>client group</span>',
            '<span><i class="swatch sw-ext"></i>external endpoint</span>',
            '<span><i class="swatch sw-unmon"></i>not monitored</span>',
            "<span>\u2699 process</span><span>\u25b8 port</span>",
            '<span><i class="line in"></i>inbound</span>',
            '<span><i class="line"></i>outbound (port on the line)</span>',
            '<span class="legend-failed"><i class="line failed"></i>failed connection</span>',
            "</div>",
            "</header>",
            f"<main>{render_svg_inline(view)}</main>",
            f"<script>{FILTER_SCRIPT}</script>",
            "</body></html>",
        ]
    )
