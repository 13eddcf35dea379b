"""A fake ITSM product that records every call (for unit tests of the alert processor)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared_code.domain.sync import SyncCursor, SyncPage
from shared_code.domain.workitem import IncidentDraft, WorkItemRef, WorkItemState, WorkItemType
from shared_code.errors import ItsmRejectedError, ItsmUnavailableError
from shared_code.ports.itsm import ConnectorPorts


@dataclass
class FakeIncident:
    ref: WorkItemRef
    draft: IncidentDraft
    state: WorkItemState = WorkItemState.OPEN
    notes: list[str] = field(default_factory=list)
    configuration_item: str | None = None


class FakeItsm:
    """Incidents in a dict. Like the ServiceNow connector, a create looks its configuration item up
    first (``ensure_configuration_item``, which the calls list leaves out).

    Hooks for the slow-product tests: ``on_ci_lookup`` runs inside a CI lookup and ``on_create``
    inside a create, before it takes effect (each is called with the connector and then cleared,
    so a nested call does not run it again). ``gone`` maps incident ids to the status their writes
    answer from then on (404 deleted, 403 read-only to the integration user).
    """

    def __init__(self, *, call_seconds: float = 0.0) -> None:
        self.incidents: dict[str, FakeIncident] = {}
        self.calls: list[str] = []
        self.fail_next: list[Exception] = []
        self.reopen_rejected = False
        self.call_seconds = call_seconds
        self.cis: dict[str, str] = {}
        self.ci_lookups: list[str] = []
        self.on_ci_lookup: Callable[[FakeItsm], None] | None = None
        self.on_create: Callable[[FakeItsm], None] | None = None
        self.gone: dict[str, int] = {}
        self._lock = threading.Lock()

    def _call(self, name: str) -> None:
        if self.call_seconds:
            time.sleep(self.call_seconds)
        with self._lock:
            self.calls.append(name)
            if self.fail_next:
                raise self.fail_next.pop(0)

    def _writable(self, ref: WorkItemRef, what: str) -> FakeIncident:
        status = self.gone.get(ref.id)
        if status is not None:
            raise ItsmRejectedError(f"{what} {ref.number}: HTTP {status}", status=status)
        return self.incidents[ref.id]

    @property
    def writes(self) -> int:
        return sum(1 for c in self.calls if c in ("create", "note", "resolve", "reopen"))

    def check(self) -> str:
        return "fake"

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        ci = None
        if draft.configuration_item:
            ci = self.ensure_configuration_item(
                draft.configuration_item, create=draft.create_configuration_item
            )
        hook, self.on_create = self.on_create, None
        if hook is not None:
            hook(self)
        self._call("create")
        with self._lock:
            number = f"INC{len(self.incidents) + 10001:07d}"
            ref = WorkItemRef(id=f"id{len(self.incidents)}", number=number)
            self.incidents[ref.id] = FakeIncident(ref, draft, configuration_item=ci)
            return ref

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        self._call("find")
        matches = [
            i.ref
            for i in self.incidents.values()
            if i.draft.correlation_id == correlation_id and i.state is WorkItemState.OPEN
        ]
        return matches[-1] if matches else None

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        self._call("note")
        self._writable(ref, "note on").notes.append(text)

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        self._call("resolve")
        incident = self._writable(ref, "resolve")
        incident.notes.append(note)
        incident.state = WorkItemState.RESOLVED

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        self._call("reopen")
        if self.reopen_rejected:
            raise ItsmRejectedError("cannot reopen a closed incident", status=403)
        incident = self._writable(ref, "reopen")
        incident.notes.append(note)
        incident.state = WorkItemState.OPEN

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        return self.incidents[ref.id].state

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        self.ci_lookups.append(name)
        hook, self.on_ci_lookup = self.on_ci_lookup, None
        if hook is not None:
            hook(self)
        return self.cis.get(name)

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        raise ItsmUnavailableError("the fake does not sync")

    def close(self) -> None:
        return None

    def ports(self) -> ConnectorPorts:
        """What the registry would hand the alert path: incidents and CI lookups, no change feed."""
        return ConnectorPorts(
            product="Fake", check=self.check, close=self.close, incidents=self, configuration_items=self
        )
