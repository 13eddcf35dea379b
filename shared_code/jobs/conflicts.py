"""The one way a read-decide-write step is repeated after losing an optimistic-concurrency race.

A conditional insert that finds the row (``AlreadyExistsError``) or an ETag-matched replace that
finds it changed (``EtagConflict``) means another instance wrote first: the step reads again and
decides again on the row as it is now. Bounded, so a row that never settles ends in a clear error
instead of a spin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from shared_code.errors import AlreadyExistsError, EtagConflict

T = TypeVar("T")


def retry_on_conflict(
    step: Callable[[], T],
    *,
    attempts: int,
    give_up: Callable[[], Exception] | None = None,
    pause: Callable[[int], None] | None = None,
) -> T:
    """Run ``step`` until it does not lose a race, at most ``attempts`` times.

    ``pause(n)`` runs after the n-th lost race (jitter under contention); when every attempt lost,
    ``give_up()`` is raised (default: the last conflict itself)."""
    for lost in range(1, max(attempts, 1) + 1):
        try:
            return step()
        except (EtagConflict, AlreadyExistsError) as exc:
            if lost >= attempts:
                if give_up is None:
                    raise
                raise give_up() from exc
            if pause is not None:
                pause(lost)
    raise AssertionError("unreachable")  # pragma: no cover
