"""An in-memory CorrelationRepository with the same conditional-insert / ETag semantics."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

from shared_code.domain.correlation import Correlation, CorrelationState
from shared_code.errors import AlreadyExistsError, EtagConflict


class _CorrelationRows(dict[tuple[str, str], Correlation]):
    """Rows that get a new ETag on every write, as in Table Storage, including a test's direct
    edit (it stands for another instance's write: a row remembered before it must not match)."""

    def __init__(self) -> None:
        super().__init__()
        self._etags = itertools.count(1)

    def __setitem__(self, key: tuple[str, str], row: Correlation) -> None:
        super().__setitem__(key, row.model_copy(update={"etag": str(next(self._etags))}))


class InMemoryCorrelations:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Correlation] = _CorrelationRows()
        self._lock = threading.Lock()
        self.writes = 0

    def get(self, connection: str, key: str) -> Correlation | None:
        with self._lock:
            return self.rows.get((connection, key))

    def insert(self, row: Correlation) -> Correlation:
        with self._lock:
            if (row.connection, row.key) in self.rows:
                raise AlreadyExistsError("exists")
            self.rows[(row.connection, row.key)] = row
            self.writes += 1
            return self.rows[(row.connection, row.key)]

    def replace(self, row: Correlation) -> Correlation:
        with self._lock:
            current = self.rows.get((row.connection, row.key))
            if current is None or current.etag != row.etag:
                raise EtagConflict("changed")
            self.rows[(row.connection, row.key)] = row
            self.writes += 1
            return self.rows[(row.connection, row.key)]

    def list(self, connection: str, state: CorrelationState | None = None) -> Iterator[Correlation]:
        with self._lock:
            rows = [
                r
                for (c, _), r in self.rows.items()
                if c == connection and (state is None or r.state is state)
            ]
        yield from rows

    def pending(self, connection: str, limit: int) -> tuple[Correlation, ...]:
        with self._lock:
            rows = [
                r
                for (c, _), r in self.rows.items()
                if c == connection and r.state is CorrelationState.OPEN and r.unnoted_fires > 0
            ]
        return tuple(rows[:limit])
