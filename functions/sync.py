"""Work-item sync triggers: the schedule (``SYNC_SCHEDULE``) and ``POST /api/sync/{connection}``.

Both call the same engine; a run stops at a time budget below the host's limits (10-minute
function timeout, 230-second HTTP idle limit) with its watermark committed, and the next run
continues from there, so a large first sync spans several runs instead of timing out.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import azure.functions as func

from functions.http_errors import error_response, json_response
from shared_code.bootstrap import get_container
from shared_code.domain.connection import CONNECTION_NAME
from shared_code.domain.workitem import WorkItemType
from shared_code.errors import NotFoundError, shown
from shared_code.workitems.engine import SyncOutcome, SyncResult

log = logging.getLogger(__name__)

SYNC_SCHEDULE = os.environ.get("SYNC_SCHEDULE", "0 */15 * * * *")
TIMER_BUDGET = timedelta(minutes=8)
HTTP_BUDGET = timedelta(seconds=180)

bp = func.Blueprint()  # type: ignore[no-untyped-call]


def result_body(result: SyncResult) -> dict[str, object]:
    return {
        "connection": result.connection,
        "type": result.item_type.sync_name,
        "outcome": result.outcome.value,
        "runId": result.run_id,
        "counts": result.counts,
        "durationSeconds": round(result.duration_seconds, 3),
        "watermark": result.watermark.model_dump(mode="json") if result.watermark else None,
        "error": result.error or None,
    }


@bp.function_name("sync_work_items")
@bp.timer_trigger(arg_name="timer", schedule=SYNC_SCHEDULE, run_on_startup=False)
def sync_work_items(timer: func.TimerRequest) -> None:
    """Sync every connection that syncs incidents or change requests."""
    if timer.past_due:
        log.info("the sync timer is past due; running now")
    results = get_container().sync_engine.run(trigger="timer", time_budget=TIMER_BUDGET)
    for result in results:
        if result.outcome is SyncOutcome.FAILED:
            log.error("sync %s %s failed: %s", result.connection, result.item_type.sync_name, result.error)
        else:
            log.info(
                "sync %s %s %s: %d synced, %d skipped rows",
                result.connection,
                result.item_type.sync_name,
                result.outcome.value,
                result.synced,
                result.rejected,
            )


@bp.function_name("sync_connection")
@bp.route(route="sync/{connection}", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def sync_connection(req: func.HttpRequest) -> func.HttpResponse:
    """Sync one connection now (optionally ``?type=incidents|change_requests``)."""
    try:
        name = req.route_params.get("connection", "")
        if not CONNECTION_NAME.match(name):
            raise NotFoundError(f"no ITSM connection named {shown(name)}")
        wanted = req.params.get("type")
        types = WorkItemType.parse_many([wanted]) if wanted else None
        results = get_container().sync_engine.run(name, types, trigger="http", time_budget=HTTP_BUDGET)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear HTTP answer
        return error_response(exc)
    body: dict[str, object] = {"connection": name, "results": [result_body(r) for r in results]}
    failed = [r for r in results if r.outcome is SyncOutcome.FAILED]
    if failed:
        body["error"] = {"code": "sync_failed", "message": failed[0].error}
        return json_response(502, body)
    return json_response(200, body)
