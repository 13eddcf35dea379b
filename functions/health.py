"""``GET /api/health`` (anonymous): ok or degraded per dependency, and the timers' last runs.

200 when every dependency answered, 503 when one did not (load balancers and probes read the
status code). The body names dependencies and timers by role only; no secret, connection name,
URL or error text is in it.
"""

from __future__ import annotations

import logging

import azure.functions as func

from functions.http_errors import json_response
from shared_code.bootstrap import get_container
from shared_code.errors import ConfigurationError
from shared_code.health import Status

log = logging.getLogger(__name__)

bp = func.Blueprint()  # type: ignore[no-untyped-call]
NO_STORE = {"Cache-Control": "no-store"}


@bp.function_name("health")
@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    """Probe Table Storage, the alert queue and Key Vault concurrently, each briefly."""
    try:
        report = get_container().health.check()
    except ConfigurationError as exc:
        log.error("health: the app settings are invalid: %s", exc)
        body = {"status": Status.DEGRADED.value, "dependencies": {"configuration": {"status": "degraded"}}}
        return json_response(503, body, NO_STORE)
    body = report.model_dump(mode="json", by_alias=True, exclude_none=True)
    return json_response(200 if report.status is Status.OK else 503, body, NO_STORE)
