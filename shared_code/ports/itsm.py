"""What an ITSM product offers, one small Protocol per capability.

A product implements the capabilities it supports and its registry entry (``products.py``)
says which, by filling the matching fields of ``ConnectorPorts``: the alert path asks for
``incidents`` (and ``cmdb`` where CIs are resolved or created), the sync for ``changes``, the map
import for ``cmdb``. A connector speaks its product's REST API over an injected ``httpx.Client``
and raises only the ``ItsmError`` family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared_code.domain.cmdb import CmdbPublication, Dependency
from shared_code.domain.sync import SyncCursor, SyncPage
from shared_code.domain.workitem import IncidentDraft, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import ConfigurationError

__all__ = [
    "ChangeFeed",
    "CmdbPublication",
    "ConfigurationItems",
    "ConnectorPorts",
    "Dependency",
    "DependencyCmdb",
    "IncidentWriter",
]


class IncidentWriter(Protocol):
    """Creates and moves incidents (or events) for the alert path; each call succeeds or raises."""

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        """Create an incident (or event) and return where it lives."""
        ...

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        """The newest open work item stamped with ``correlation_id`` (crash recovery of a create)."""
        ...

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        """Append a work note."""
        ...

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        """Resolve the work item, leaving ``note`` as the resolution notes and a work note."""
        ...

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        """Put a resolved work item back in progress with a work note."""
        ...

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        """Where the work item is in its lifecycle now."""
        ...


class NoteLedger(Protocol):
    """Finds a note by its marker (``domain.workitem.note_marker``) on a work item.

    A note whose answer was lost may have landed; the alert path asks before it writes the note
    of the same notification again (a queue retry), so an ambiguous write is never repeated blindly.
    """

    def has_note(self, ref: WorkItemRef, marker: str) -> bool:
        """Whether a note carrying ``marker`` is on the work item."""
        ...


class ChangeFeed(Protocol):
    """Keyset pages of changed work items, for the sync."""

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        """One page of work items of ``item_type`` changed after ``cursor``, oldest first."""
        ...


class ConfigurationItems(Protocol):
    """The product's CMDB as the alert path uses it: find (or create) a CI by name."""

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        """The product's id of the CI called ``name``; create it when missing and ``create`` is set."""
        ...


class DependencyCmdb(Protocol):
    """Servers and their dependencies as CIs and relationships (the map import's CMDB publisher)."""

    def publish_dependencies(
        self, servers: Sequence[str], dependencies: Sequence[Dependency]
    ) -> CmdbPublication:
        """Make the CIs and relationships exist (idempotent: a second call creates nothing). The
        product's per-item refusals come back in ``errors``; a call that fails as a whole raises
        ``ItsmError``."""
        ...


@dataclass(frozen=True)
class ConnectorPorts:
    """The capabilities one connection's product offers; ``None`` where it has none."""

    product: str
    check: Callable[[], str]
    """Make one authenticated call and describe what answered (``connections test``)."""
    close: Callable[[], None]
    incidents: IncidentWriter | None = None
    changes: ChangeFeed | None = None
    configuration_items: ConfigurationItems | None = None
    dependencies: DependencyCmdb | None = None
    notes: NoteLedger | None = None
    """Where written notes can be looked up by marker (then a retried note is confirmed first)."""

    def require_incidents(self) -> IncidentWriter:
        if self.incidents is None:
            raise ConfigurationError(f"{self.product} connections cannot receive alerts")
        return self.incidents

    def require_changes(self) -> ChangeFeed:
        if self.changes is None:
            raise ConfigurationError(f"{self.product} connections have no change feed to sync")
        return self.changes
