"""The retention timer (``RETENTION_SCHEDULE``, daily by default): old state rows pruned by age."""

from __future__ import annotations

import logging
import os

import azure.functions as func

from shared_code.bootstrap import get_container
from shared_code.settings import DEFAULT_RETENTION_SCHEDULE

log = logging.getLogger(__name__)

# read at import, before settings are validated (Settings checks the same variable's shape)
RETENTION_SCHEDULE = os.environ.get("RETENTION_SCHEDULE", DEFAULT_RETENTION_SCHEDULE)

bp = func.Blueprint()  # type: ignore[no-untyped-call]


@bp.function_name("prune_state")
@bp.timer_trigger(arg_name="timer", schedule=RETENTION_SCHEDULE, run_on_startup=False)
def prune_state(timer: func.TimerRequest) -> None:
    """Delete expired deliveries, runs and sync errors (bounded per run; recorded in Runs)."""
    result = get_container().retention.run(trigger="timer")
    if result.outcome == "failed":
        log.error("retention failed: %s", result.error)
