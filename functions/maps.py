"""Dependency-map triggers: the import timer (``MAP_IMPORT_SCHEDULE``), ``POST /api/maps/import``,
and the server dependency views ``GET /api/maps`` and ``GET /api/maps/{server}``.

The views read only the Maps table (no source is contacted); an import runs the same
``MapImporter`` as the CLI, so a server added to a group is mapped on demand, not an hour later.
"""

from __future__ import annotations

import json
import logging
import os

import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from functions.http_errors import error_response, json_response
from shared_code.bootstrap import get_container
from shared_code.errors import InvalidInputError, NotFoundError, shown
from shared_code.maps.importer import ImportOutcome, ImportResult
from shared_code.maps.views import (
    ViewFormat,
    parse_format,
    render_index_html,
    render_index_json,
    render_view,
    server_path,
)

log = logging.getLogger(__name__)

MAP_IMPORT_SCHEDULE = os.environ.get("MAP_IMPORT_SCHEDULE", "0 0 * * * *")
BASE_PATH = "/api/maps"
MAX_BODY_BYTES = 256 * 1024
DOWNLOADS = frozenset({ViewFormat.DRAWIO, ViewFormat.CSV, ViewFormat.SCOM_MP, ViewFormat.MERMAID})

bp = func.Blueprint()  # type: ignore[no-untyped-call]


class ImportRequest(BaseModel):
    """``POST /api/maps/import`` body (optional): which servers, and optionally one source."""

    model_config = ConfigDict(extra="forbid")

    servers: list[str] = Field(default_factory=list, max_length=5000)
    source: str | None = Field(default=None, max_length=50)


def import_body(result: ImportResult) -> dict[str, object]:
    return {
        "source": result.source,
        "outcome": result.outcome.value,
        "runId": result.run_id,
        "counts": result.counts,
        "durationSeconds": round(result.duration_seconds, 3),
        "errors": result.errors,
        "warnings": result.warnings,
        "error": result.error or None,
    }


def parse_import_request(raw: bytes) -> ImportRequest:
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidInputError(f"the request body is over {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return ImportRequest()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError('the request body is not JSON: send {"servers": ["name", ...]}') from exc
    if not isinstance(data, dict):
        raise InvalidInputError('the request body must be a JSON object like {"servers": ["name", ...]}')
    try:
        return ImportRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'body'}: {error['msg']}" for error in exc.errors()
        )
        raise InvalidInputError(f"invalid import request: {problems}") from None


@bp.function_name("maps_import_timer")
@bp.timer_trigger(arg_name="timer", schedule=MAP_IMPORT_SCHEDULE, run_on_startup=False)
def maps_import_timer(timer: func.TimerRequest) -> None:
    """Import the maps of every enabled source."""
    if timer.past_due:
        log.info("the map import timer is past due; running now")
    for result in get_container().map_importer.run(trigger="timer"):
        if result.outcome is ImportOutcome.FAILED:
            log.error("map import %s failed: %s", result.source, result.error)
        else:
            log.info("map import %s %s: %s", result.source, result.outcome.value, result.counts)


@bp.function_name("maps_import")
@bp.route(route="maps/import", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def maps_import(req: func.HttpRequest) -> func.HttpResponse:
    """Import now: every enabled source, or ``{"source": ...}``, optionally only ``{"servers": [...]}``."""
    try:
        request = parse_import_request(req.get_body())
        results = get_container().map_importer.run(
            source=request.source, servers=request.servers or None, trigger="http"
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP answer
        return error_response(exc)
    body: dict[str, object] = {"results": [import_body(r) for r in results]}
    failed = [r for r in results if r.outcome is ImportOutcome.FAILED]
    if failed:
        body["error"] = {"code": "import_failed", "message": failed[0].error}
        return json_response(502, body)
    return json_response(200, body)


def _wants_json(req: func.HttpRequest) -> bool:
    if (req.params.get("format") or "").strip().lower() == "json":
        return True
    accept = (req.headers.get("accept") or "").lower()
    return "application/json" in accept and "text/html" not in accept


@bp.function_name("maps_index")
@bp.route(route="maps", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def maps_index(req: func.HttpRequest) -> func.HttpResponse:
    """The mapped servers: last import, status and dependency counts (HTML, or JSON)."""
    try:
        fmt = (req.params.get("format") or "").strip().lower()
        if fmt not in ("", "html", "json"):
            raise InvalidInputError(f"format {fmt[:40]!r} is not one of html, json")
        listings = get_container().maps.listings()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP answer
        return error_response(exc)
    if _wants_json(req):
        return func.HttpResponse(
            render_index_json(listings, base_path=BASE_PATH), status_code=200, mimetype="application/json"
        )
    return func.HttpResponse(
        render_index_html(listings, base_path=BASE_PATH),
        status_code=200,
        mimetype="text/html",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


@bp.function_name("maps_server")
@bp.route(route="maps/{server}", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def maps_server(req: func.HttpRequest) -> func.HttpResponse:
    """One server's map: ``?format=html|svg|json|mermaid|drawio|csv|scom-mp`` (HTML by default)."""
    try:
        name = req.route_params.get("server", "")
        view_format = parse_format(req.params.get("format"))
        maps = get_container().maps
        listing = maps.find(name)
        server_map = maps.load(listing.server) if listing is not None else None
        if server_map is None:
            reason = (
                f"; its last import failed: {listing.last_error}" if listing and listing.last_error else ""
            )
            raise NotFoundError(f"no dependency map of {shown(name)}{reason}")
        view = render_view(
            server_map, view_format, json_href=f"{server_path(BASE_PATH, server_map.server)}?format=json"
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP answer
        return error_response(exc)
    headers = {"X-Content-Type-Options": "nosniff"}
    if view_format in DOWNLOADS:
        headers["Content-Disposition"] = f'attachment; filename="{view.filename}"'
    mimetype = view.media_type.split(";")[0].strip()
    return func.HttpResponse(view.body, status_code=200, mimetype=mimetype, charset="utf-8", headers=headers)
