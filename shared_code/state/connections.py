"""The Connections table: one row per ITSM connection, never a secret value."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from azure.data.tables import TableClient

from shared_code.domain.connection import ConnectionBase
from shared_code.errors import NotFoundError, shown
from shared_code.state.tables import delete_entity, get_entity, insert_entity, merge_entity, query_entities

TABLE = "Connections"
PARTITION = "connection"


def _to_entity(connection: ConnectionBase) -> dict[str, object]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": connection.name,
        "PartnerType": connection.partner_type,
        "ServerUrl": connection.server_url,
        "Definition": connection.model_dump_json(),
        "SecretNames": ",".join(connection.secret_names),
    }


ConnectionParser = Callable[[dict[str, object]], ConnectionBase]
"""Turns a stored definition into its product's connection model (``products.parse_connection``)."""


class ConnectionRepository:
    """Reads are cached for ``cache_seconds`` so the webhook does not pay a table read per alert."""

    def __init__(
        self,
        table: TableClient,
        parse: ConnectionParser,
        *,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self._parse = parse
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, tuple[float, ConnectionBase]] = {}
        self._lock = threading.Lock()

    def add(self, connection: ConnectionBase) -> None:
        """Insert a new connection; AlreadyExistsError when the name is taken."""
        insert_entity(self._table, _to_entity(connection))
        self._forget(connection.name)

    def save(self, connection: ConnectionBase) -> None:
        merge_entity(self._table, _to_entity(connection))
        self._forget(connection.name)

    def get(self, name: str) -> ConnectionBase:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(name)
        if cached and now - cached[0] < self._cache_seconds:
            return cached[1]
        entity = get_entity(self._table, PARTITION, name)
        if entity is None:
            raise NotFoundError(f"no ITSM connection named {shown(name)}")
        connection = self._from_entity(entity)
        with self._lock:
            self._cache[name] = (now, connection)
        return connection

    def list(self) -> list[ConnectionBase]:
        rows = query_entities(self._table, "PartitionKey eq @p", {"p": PARTITION})
        return sorted((self._from_entity(row) for row in rows), key=lambda c: c.name)

    def remove(self, name: str) -> None:
        self.get(name)
        delete_entity(self._table, PARTITION, name)
        self._forget(name)

    def _from_entity(self, entity: dict[str, object]) -> ConnectionBase:
        return self._parse(json.loads(str(entity["Definition"])))

    def _forget(self, name: str) -> None:
        with self._lock:
            self._cache.pop(name, None)
