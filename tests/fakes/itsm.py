"""A fake ITSM product that records every call (for unit tests of the alert processor)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from shared_code.errors import ItsmRejectedError, ItsmUnavailableError
from shared_code.itsm.base import IncidentDraft, SyncCursor, SyncPage, WorkItemRef, WorkItemState
from shared_code.workitems.model import WorkItemType


@dataclass
class FakeIncident:
    ref: WorkItemRef
    draft: IncidentDraft
    state: WorkItemState = WorkItemState.OPEN
    notes: list[str] = field(default_factory=list)


class FakeItsm:
    def __init__(self, *, call_seconds: float = 0.0) -> None:
        self.incidents: dict[str, FakeIncident] = {}
        self.calls: list[str] = []
        self.fail_next: list[Exception] = []
        self.reopen_rejected = False
        self.call_seconds = call_seconds
        self._lock = threading.Lock()

    def _call(self, name: str) -> None:
        if self.call_seconds:
            time.sleep(self.call_seconds)
        with self._lock:
            self.calls.append(name)
            if self.fail_next:
                raise self.fail_next.pop(0)

    @property
    def writes(self) -> int:
        return sum(1 for c in self.calls if c in ("create", "note", "resolve", "reopen"))

    def check(self) -> str:
        return "fake"

    def create_incident(self, draft: IncidentDraft) -> WorkItemRef:
        self._call("create")
        with self._lock:
            number = f"INC{len(self.incidents) + 10001:07d}"
            ref = WorkItemRef(id=f"id{len(self.incidents)}", number=number)
            self.incidents[ref.id] = FakeIncident(ref, draft)
            return ref

    def find_by_correlation(self, correlation_id: str) -> WorkItemRef | None:
        self._call("find")
        matches = [i.ref for i in self.incidents.values() if i.draft.correlation_id == correlation_id]
        return matches[-1] if matches else None

    def add_note(self, ref: WorkItemRef, text: str) -> None:
        self._call("note")
        self.incidents[ref.id].notes.append(text)

    def resolve(self, ref: WorkItemRef, note: str) -> None:
        self._call("resolve")
        incident = self.incidents[ref.id]
        incident.notes.append(note)
        incident.state = WorkItemState.RESOLVED

    def reopen(self, ref: WorkItemRef, note: str) -> None:
        self._call("reopen")
        if self.reopen_rejected:
            raise ItsmRejectedError("cannot reopen a closed incident", status=403)
        incident = self.incidents[ref.id]
        incident.notes.append(note)
        incident.state = WorkItemState.OPEN

    def get_state(self, ref: WorkItemRef) -> WorkItemState:
        return self.incidents[ref.id].state

    def ensure_configuration_item(self, name: str, *, create: bool) -> str | None:
        return None

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        raise ItsmUnavailableError("the fake does not sync")

    def close(self) -> None:
        return None
