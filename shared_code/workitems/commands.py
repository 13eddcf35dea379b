"""``sync run``: the same sync the timer runs, on demand from the operator's terminal.

On a terminal one line is redrawn after every committed page (rows, pages, watermark), so a long
first sync visibly moves; piped output gets only the summary lines, which scripts can parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from shared_code.domain.workitem import WorkItemType
from shared_code.errors import InvalidInputError
from shared_code.workitems.engine import SyncOutcome, SyncProgress, SyncResult

if TYPE_CHECKING:
    from shared_code.bootstrap import Container

EXIT_OK, EXIT_FAILED = 0, 1


def parse_item_types(names: Sequence[str] | None) -> list[WorkItemType] | None:
    """``incidents`` / ``change_requests`` (dashes allowed) -> work-item types; None means all."""
    if not names:
        return None
    types: list[WorkItemType] = []
    for name in names:
        try:
            item_type = WorkItemType.from_sync_name(name.strip().lower().replace("-", "_"))
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if item_type not in types:
            types.append(item_type)
    return types


class _ProgressLine:
    """Redraws one status line per connection and type on a terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.width = 0

    def __call__(self, event: SyncProgress) -> None:
        where = f", up to {event.watermark.updated_at:%Y-%m-%d %H:%M:%S}" if event.watermark else ""
        rejected = f", {event.rejected:,} skipped" if event.rejected else ""
        text = (
            f"{event.connection} {event.item_type.sync_name}: {event.synced:,} rows in {event.pages:,} pages"
            f"{rejected}{where}"
        )
        self.out.write("\r" + text.ljust(self.width))
        self.width = len(text)
        if event.done:
            self.out.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.out.flush()


def describe(result: SyncResult) -> str:
    parts = [f"{result.connection} {result.item_type.sync_name}: {result.outcome.value}"]
    if result.outcome is not SyncOutcome.SKIPPED:
        parts.append(f"{result.synced:,} synced, {result.rejected:,} skipped rows, {result.pages:,} pages")
        if result.correlations_updated or result.alerts_closed:
            parts.append(
                f"{result.correlations_updated} correlations updated, {result.alerts_closed} alerts closed"
            )
        parts.append(f"{result.duration_seconds:.1f}s")
    text = ", ".join(parts)
    if result.outcome is SyncOutcome.INCOMPLETE:
        text += " (time budget reached; run again to continue)"
    if result.error:
        text += f"\n    {result.error}"
    return text


def sync_run(
    container: Container,
    connection: str | None,
    item_types: Sequence[str] | None,
    out: IO[str],
    isatty: bool,
) -> int:
    """Run the sync for one or every connection; 1 when any connection and type failed."""
    types = parse_item_types(item_types)
    engine = container.sync_engine
    progress = _ProgressLine(out) if isatty else None
    results = engine.run(connection, types, progress, trigger="cli")
    if not results:
        print("no connection syncs work items (see: connections add --sync)", file=out)
        return EXIT_OK
    for result in results:
        print(describe(result), file=out)
    return EXIT_FAILED if any(r.outcome is SyncOutcome.FAILED for r in results) else EXIT_OK
