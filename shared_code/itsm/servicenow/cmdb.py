"""ServiceNow's CMDB behind the ``DependencyCmdb`` port: servers as CIs, dependencies as relationships.

Through the Identification and Reconciliation API (``POST /api/now/identifyreconcile``), never the
Table API: the instance's identification rules decide whether a server already exists (by name,
by IP address...), so a server Discovery or another tool already put in the CMDB is updated, not
duplicated, and a second publication of the same map makes no new CI and no new relationship.

The payload is ``{"items": [{"className", "values": {"name", "ip_address"}}], "relations":
[{"parent": i, "child": j, "type": "Depends on::Used by"}]}`` with ``sysparm_data_source`` set to
the data source registered for this app (a ``discovery_source`` choice: without it the instance
parks the payload among its incomplete payloads). The instance answers 200 even when it refused
items: each entry of ``result.items`` / ``result.relations`` has an ``operation`` (``INSERT``,
``UPDATE``, ``NO_CHANGE``...) and possibly ``errors`` ([{"error", "message"}]); those are read
and returned, never taken for success.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared_code.domain.cmdb import CmdbPublication, Dependency
from shared_code.errors import ItsmUnavailableError
from shared_code.itsm.servicenow.connector import ServiceNowConnector

log = logging.getLogger(__name__)

IRE_PATH = "/api/now/identifyreconcile"
SERVER_CLASS = "cmdb_ci_server"
DEPENDS_ON = "Depends on::Used by"
MAX_ITEMS_PER_CALL = 100
"""Items per payload: big enough for few calls, small enough for the instance's transaction quota."""
MAX_ERRORS = 50
ERROR_TEXT = 200


@dataclass
class _Payload:
    """One request's worth of CIs (index by lower-cased name) and relationships between them."""

    items: list[dict[str, Any]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    relations: list[dict[str, Any]] = field(default_factory=list)
    related: set[tuple[int, int]] = field(default_factory=set)

    def add_item(self, name: str, ip: str) -> int:
        key = name.lower()
        at = self.index.get(key)
        if at is not None:
            values = self.items[at]["values"]
            if ip and not values.get("ip_address"):
                values["ip_address"] = ip
            return at
        values = {"name": name} | ({"ip_address": ip} if ip else {})
        self.items.append({"className": SERVER_CLASS, "values": values})
        self.names.append(name)
        self.index[key] = len(self.items) - 1
        return len(self.items) - 1

    def room_for(self, *names: str) -> bool:
        new = {n.lower() for n in names} - set(self.index)
        return len(self.items) + len(new) <= MAX_ITEMS_PER_CALL

    def body(self) -> dict[str, Any]:
        return {"items": self.items, "relations": self.relations}


def payloads(servers: Sequence[str], dependencies: Sequence[Dependency]) -> Iterator[_Payload]:
    """The publication cut into payloads of at most ``MAX_ITEMS_PER_CALL`` CIs, each relationship
    in the payload that holds both its ends, each CI and relationship once per payload."""
    current = _Payload()
    for dependency in dependencies:
        server, target = dependency.server.strip(), dependency.depends_on.strip()
        if not server or not target or server.lower() == target.lower():
            continue
        if not current.room_for(server, target):
            yield current
            current = _Payload()
        parent = current.add_item(server, dependency.server_ip)
        child = current.add_item(target, dependency.depends_on_ip)
        if (parent, child) not in current.related:
            current.related.add((parent, child))
            current.relations.append({"parent": parent, "child": child, "type": DEPENDS_ON})
    for server in servers:
        name = server.strip()
        if not name or name.lower() in current.index:
            continue
        if not current.room_for(name):
            yield current
            current = _Payload()
        current.add_item(name, "")
    if current.items:
        yield current


class ServiceNowDependencyCmdb:
    """Implements ``shared_code.ports.itsm.DependencyCmdb`` over one connection's connector."""

    def __init__(self, connector: ServiceNowConnector, data_source: str) -> None:
        if not data_source.strip():
            raise ValueError("the Identification and Reconciliation API needs a data source")
        self._connector = connector
        self._data_source = data_source

    def publish_dependencies(
        self, servers: Sequence[str], dependencies: Sequence[Dependency]
    ) -> CmdbPublication:
        new_items = new_relations = 0
        errors: list[str] = []
        for payload in payloads(servers, dependencies):
            body = self._connector.send_api(
                "POST",
                IRE_PATH,
                what="POST identifyreconcile",
                params={"sysparm_data_source": self._data_source},
                json=payload.body(),
                idempotent=True,  # identification makes a repeated payload a no-op
            )
            items, relations = _results(body, len(payload.items), len(payload.relations))
            for name, entry in zip(payload.names, items, strict=True):
                problems = _errors(entry)
                if problems:
                    errors.append(f"CI {name[:100]}: {problems}")
                elif _operation(entry) == "INSERT":
                    new_items += 1
            for relation, entry in zip(payload.relations, relations, strict=True):
                problems = _errors(entry)
                parent, child = payload.names[relation["parent"]], payload.names[relation["child"]]
                if problems:
                    errors.append(f"{parent[:100]} depends on {child[:100]}: {problems}")
                elif _operation(entry) == "INSERT":
                    new_relations += 1
        if errors:
            log.warning(
                "connection %r: ServiceNow refused %d CIs or relationships of the dependency map",
                self._connector.connection_name,
                len(errors),
            )
        return CmdbPublication(
            new_items=new_items, new_relations=new_relations, errors=tuple(errors[:MAX_ERRORS])
        )


def _results(
    body: Mapping[str, Any], item_count: int, relation_count: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The per-item and per-relation results, one for each sent (else the answer is unusable)."""
    result = body.get("result")
    if not isinstance(result, Mapping):
        raise ItsmUnavailableError("POST identifyreconcile: ServiceNow answered without a result object")
    items = result.get("items") or []
    relations = result.get("relations") or []
    if (
        not isinstance(items, list)
        or not isinstance(relations, list)
        or len(items) != item_count
        or len(relations) != relation_count
        or not all(isinstance(entry, Mapping) for entry in [*items, *relations])
    ):
        raise ItsmUnavailableError(
            "POST identifyreconcile: ServiceNow's answer does not list one result per item and relationship"
        )
    return items, relations


def _operation(entry: Mapping[str, Any]) -> str:
    return str(entry.get("operation") or "").upper()


def _errors(entry: Mapping[str, Any]) -> str:
    """The entry's errors as one short line ("" when it has none)."""
    raw = entry.get("errors") or []
    if not isinstance(raw, list):
        raw = [raw]
    parts = []
    for error in raw:
        if isinstance(error, Mapping):
            code = str(error.get("error") or "").strip()
            message = " ".join(str(error.get("message") or "").split())
            parts.append(": ".join(p for p in (code, message) if p) or "error")
        else:
            parts.append(" ".join(str(error).split()))
    text = "; ".join(parts)
    return text if len(text) <= ERROR_TEXT else text[: ERROR_TEXT - 1] + "…"
