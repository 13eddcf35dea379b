"""How the last timer invocation is read from its Runs rows (one row per connection and type)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared_code.domain.runs import RunRecord
from shared_code.health import summarise_timer_runs

T0 = datetime(2024, 5, 6, 7, 0, tzinfo=UTC)


def run(minutes: float, outcome: str, trigger: str = "timer") -> RunRecord:
    started = T0 + timedelta(minutes=minutes)
    return RunRecord(
        trigger=trigger,
        started_at=started,
        finished_at=started + timedelta(seconds=30),
        duration_seconds=30,
        outcome=outcome,
    )


def test_the_worst_outcome_of_the_last_invocation_wins_and_older_invocations_do_not_count() -> None:
    newest_first = [run(30, "succeeded"), run(29.5, "failed"), run(29, "incomplete"), run(15, "failed")]

    summary = summarise_timer_runs(newest_first)

    assert summary.outcome == "failed"
    assert summary.runs == 3
    assert summary.last_run_at == T0 + timedelta(minutes=30, seconds=30)


def test_http_triggered_runs_are_not_the_timer_s() -> None:
    summary = summarise_timer_runs([run(40, "failed", trigger="http"), run(30, "incomplete")])

    assert (summary.outcome, summary.runs) == ("incomplete", 1)


def test_no_runs_yet() -> None:
    summary = summarise_timer_runs([])

    assert (summary.last_run_at, summary.outcome, summary.runs, summary.known) == (None, None, 0, True)


def test_map_import_outcomes_rank_like_the_sync_s() -> None:
    summary = summarise_timer_runs([run(30, "ok"), run(29.9, "partial"), run(29.8, "busy")])
    assert (summary.outcome, summary.runs) == ("partial", 3)
    assert summarise_timer_runs([run(30, "ok"), run(29.9, "busy")]).outcome == "ok"
