"""After a create failed in transit: did it land? (shared by the products' connectors)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from shared_code.domain.workitem import WorkItemRef
from shared_code.errors import ItsmError

log = logging.getLogger(__name__)


def landed_create(
    find_by_correlation: Callable[[str], WorkItemRef | None], correlation_id: str, connection: str
) -> WorkItemRef | None:
    """The incident a create that failed in transit (timeout, reset) made after all, found by its
    correlation id; None when there is none or the product cannot say now (the caller then raises
    the create's own error and the delivery is retried, which looks again first)."""
    try:
        found = find_by_correlation(correlation_id)
    except ItsmError:
        return None
    if found is not None:
        log.warning(
            "the create of an incident for connection %r failed in transit, but %s exists: using it",
            connection,
            found.number,
        )
    return found
