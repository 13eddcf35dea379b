"""The base of stored rows: frozen, and changed only through named fields that exist.

``model_copy(update={...})`` accepts any key and silently keeps a typo as an unknown attribute;
``evolve`` refuses a name the model does not define, so a misspelt transition fails in the first
test that runs it instead of writing a row that lost the change.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(frozen=True)

    def evolve(self, **changes: Any) -> Self:
        unknown = sorted(set(changes) - set(type(self).model_fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(unknown)}")
        return self.model_copy(update=changes)

    def with_etag(self, etag: str) -> Self:
        """The row as stored, with the ETag the store answered (rows that have one)."""
        return self.evolve(etag=etag)
