"""VNet flow logs through Traffic Analytics as a map source: the ``NTANetAnalytics`` table.

The source that needs no agent on the servers and outlives the Dependency Agent: Network Watcher
logs every flow through a VNet, Traffic Analytics aggregates them (flows with the same source IP,
destination IP, destination port, protocol, direction and NSG rule become one record per processing
interval) into ``NTANetAnalytics`` rows with ``SrcIp``, ``DestIp``, ``DestPort``, ``L4Protocol``
(T / U), ``FlowDirection`` (Inbound / Outbound), ``FlowStatus`` (Allowed / Denied), the VM names
``SrcVm`` / ``DestVm`` (``subscription/resourcegroup/vm``), ``FlowType`` and the counters
``AllowedInFlows`` / ``AllowedOutFlows`` / ``DeniedInFlows`` / ``DeniedOutFlows``,
``BytesSrcToDest`` / ``BytesDestToSrc``; ``FlowStartTime`` is when the flow was first seen.

A server is a VM named in ``SrcVm`` / ``DestVm``; its IPs are the ones the flows show for it. The
map has machines and ports but no processes (a network log cannot see them): outbound, the server
connects to a port on the remote VM (or to an external endpoint when the IP is not a VM); inbound,
another VM (or, for IPs that are not VMs, a client group per port) connects to the server's port.
A flow seen at both ends (logged outbound at the source NIC and inbound at the destination NIC) is
counted once: per direction the totals are summed, and the larger direction is kept. A dependency
whose flows were all denied is marked failed.

Traffic Analytics processes flow logs every 10 or 60 minutes and needs up to an hour more to ingest
them, so an import sees the flows of its window only once they have arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from shared_code.domain.maps import (
    Direction,
    EdgeKind,
    MapEdge,
    MapNode,
    MapWindow,
    NodeKind,
    Protocol,
    ServerMap,
    node_id,
)
from shared_code.domain.mapsources import MapSourceDefinition, ServerGroupKind, ServerMapResult, ServerRef
from shared_code.errors import MapSourceError
from shared_code.mapsources.logquery import (
    LogQueryRunner,
    batch_answer,
    in_batches,
    is_ip,
    kql_datetime,
    kql_list,
    kql_string,
    row_count,
    row_text,
)

log = logging.getLogger(__name__)

SERVERS_TEMPLATE = "itsm-connector:flowlogs-servers v1"
MAP_TEMPLATE = "itsm-connector:flowlogs-map v1"
CHECK_TEMPLATE = "itsm-connector:flowlogs-check v1"
INGESTION_LAG = timedelta(hours=2)
"""How long after a flow Traffic Analytics may still be ingesting it (TimeGenerated > FlowStartTime)."""
DEFAULT_BATCH_SIZE = 50
MAX_CLIENT_IPS = 50
PROTOCOLS = {"T": Protocol.TCP, "U": Protocol.UDP}


def _scope_prefix(scope: str) -> str:
    """An ARM scope as the prefix of ``SrcVm`` values: ``{subscription}/{group}/`` or ``{subscription}/``."""
    parts = [part for part in scope.split("/") if part]
    if len(parts) >= 4:
        return f"{parts[1]}/{parts[3]}/"
    if len(parts) >= 2:
        return f"{parts[1]}/"
    return ""


def servers_query(vms: Sequence[str], scope_prefix: str, start: datetime, end: datetime) -> str:
    return f"""// {SERVERS_TEMPLATE}
let vms = {kql_list(vms)};
let scope = {kql_string(scope_prefix)};
let windowStart = {kql_datetime(start)};
let windowEnd = {kql_datetime(end)};
let flows = NTANetAnalytics
| where SubType == "FlowLog" and FlowStartTime >= windowStart and FlowStartTime < windowEnd;
union (flows | project Vm = SrcVm, Ip = SrcIp), (flows | project Vm = DestVm, Ip = DestIp)
| where isnotempty(Vm)
| extend VmName = tostring(split(Vm, "/")[-1])
| where (array_length(vms) > 0 and VmName in~ (vms)) or (strlen(scope) > 0 and Vm startswith scope)
| summarize Ips = make_set(Ip) by Vm
"""


def map_query(server_ips: Sequence[str], window: MapWindow) -> str:
    return f"""// {MAP_TEMPLATE}
let serverIps = {kql_list(server_ips)};
let windowStart = {kql_datetime(window.start)};
let windowEnd = {kql_datetime(window.end)};
NTANetAnalytics
| where SubType == "FlowLog" and FlowStartTime >= windowStart and FlowStartTime < windowEnd
| where SrcIp in (serverIps) or DestIp in (serverIps)
| where L4Protocol in ("T", "U")
| summarize AllowedFlows = sum(coalesce(AllowedInFlows, 0) + coalesce(AllowedOutFlows, 0)),
    DeniedFlows = sum(coalesce(DeniedInFlows, 0) + coalesce(DeniedOutFlows, 0)),
    BytesSrcToDest = sum(BytesSrcToDest), BytesDestToSrc = sum(BytesDestToSrc)
    by SrcIp, DestIp, DestPort, L4Protocol, FlowDirection, FlowStatus, SrcVm, DestVm, FlowType
"""


def check_query(start: datetime, end: datetime) -> str:
    return f"""// {CHECK_TEMPLATE}
let windowStart = {kql_datetime(start)};
let windowEnd = {kql_datetime(end)};
NTANetAnalytics
| where SubType == "FlowLog" and FlowStartTime >= windowStart and FlowStartTime < windowEnd
| summarize Flows = count()
"""


# ------------------------------------------------------------------------------------------------
# rows -> graph (pure)
# ------------------------------------------------------------------------------------------------
def vm_name(vm: str) -> str:
    """``subscription/group/vm`` -> ``vm``."""
    return vm.rstrip("/").split("/")[-1]


@dataclass(frozen=True)
class Flow:
    """One dependency as the flows show it: who connected to which IP, port and protocol."""

    src_ip: str
    dest_ip: str
    port: int
    protocol: Protocol
    src_vm: str
    dest_vm: str
    allowed: int
    denied: int
    bytes_src_to_dest: int
    bytes_dest_to_src: int


def merge_flows(rows: Iterable[Mapping[str, Any]]) -> list[Flow]:
    """Rows summed per direction, then the larger direction kept per (src, dest, port, protocol):
    a flow logged at both NICs is counted once. Raises ValueError on a row that makes no sense."""
    per_direction: dict[tuple[str, str, int, str], dict[str, list[Any]]] = {}
    for row in rows:
        protocol = row_text(row, "L4Protocol").upper()
        if protocol not in PROTOCOLS:
            raise ValueError("L4Protocol is neither T nor U")
        raw_port = row.get("DestPort")
        if raw_port is None or raw_port == "":
            raise ValueError("DestPort is missing")
        port = int(raw_port)
        if not 0 <= port <= 65535:
            raise ValueError("DestPort is not a port number")
        src, dest = row_text(row, "SrcIp"), row_text(row, "DestIp")
        if not is_ip(src) or not is_ip(dest):
            raise ValueError("SrcIp or DestIp is not an IP address")
        key = (src, dest, port, protocol)
        direction = row_text(row, "FlowDirection").lower() or "outbound"
        total = per_direction.setdefault(key, {}).setdefault(direction, [0, 0, 0, 0, "", ""])
        total[0] += row_count(row, "AllowedFlows")
        total[1] += row_count(row, "DeniedFlows")
        total[2] += row_count(row, "BytesSrcToDest")
        total[3] += row_count(row, "BytesDestToSrc")
        total[4] = total[4] or row_text(row, "SrcVm")
        total[5] = total[5] or row_text(row, "DestVm")
    flows = []
    for (src, dest, port, protocol), directions in per_direction.items():
        totals = list(directions.values())
        flows.append(
            Flow(
                src_ip=src,
                dest_ip=dest,
                port=port,
                protocol=PROTOCOLS[protocol],
                src_vm=next((t[4] for t in totals if t[4]), ""),
                dest_vm=next((t[5] for t in totals if t[5]), ""),
                allowed=max(t[0] for t in totals),
                denied=max(t[1] for t in totals),
                bytes_src_to_dest=max(t[2] for t in totals),
                bytes_dest_to_src=max(t[3] for t in totals),
            )
        )
    flows.sort(key=lambda f: (f.src_ip, f.dest_ip, f.port, f.protocol.value))
    return flows


def build_server_map(
    server: ServerRef,
    flows: Iterable[Flow],
    *,
    source: str,
    window: MapWindow,
    imported_at: datetime,
) -> ServerMap:
    """One VM's map from the merged flows that touch its IPs."""
    own_ips = set(server.ips)
    root_key = server.machine_id or server.computer
    root = node_id(NodeKind.MACHINE, root_key)
    nodes: dict[str, MapNode] = {
        root: MapNode(
            id=root,
            kind=NodeKind.MACHINE,
            name=server.computer,
            monitored=True,
            ips=tuple(sorted(own_ips))[:20],
            properties={"vm": root_key},
        )
    }
    edges: dict[str, MapEdge] = {}
    client_ips: dict[str, set[str]] = {}

    def machine(vm: str, ip: str) -> str:
        nid = node_id(NodeKind.MACHINE, vm)
        if nid not in nodes:
            nodes[nid] = MapNode(
                id=nid, kind=NodeKind.MACHINE, name=vm_name(vm), ips=(ip,), properties={"vm": vm}
            )
        elif ip not in nodes[nid].ips and len(nodes[nid].ips) < 20:
            known = nodes[nid]
            nodes[nid] = MapNode(
                id=known.id,
                kind=known.kind,
                name=known.name,
                ips=tuple(sorted({*known.ips, ip})),
                properties=known.properties,
            )
        return nid

    def port_node(owner: str, owner_key: str, ip: str, port: int, protocol: Protocol) -> str:
        nid = node_id(NodeKind.PORT, owner_key, ip, str(port), protocol.value)
        if nid not in nodes:
            nodes[nid] = MapNode(
                id=nid,
                kind=NodeKind.PORT,
                name=f"{ip}:{port}",
                machine=owner,
                ips=(ip,),
                port=port,
                protocol=protocol,
            )
        return nid

    def connect(source_id: str, target: str, flow: Flow, direction: Direction) -> None:
        outbound = direction is Direction.OUTBOUND
        edge = MapEdge(
            source=source_id,
            target=target,
            kind=EdgeKind.CONNECTION,
            port=flow.port,
            protocol=flow.protocol,
            direction=direction,
        )
        known = edges.get(edge.key)
        allowed = flow.allowed + (known.links_established if known else 0)
        denied = flow.denied + (known.links_failed if known else 0)
        sent = flow.bytes_src_to_dest if outbound else flow.bytes_dest_to_src
        received = flow.bytes_dest_to_src if outbound else flow.bytes_src_to_dest
        edges[edge.key] = MapEdge(
            source=source_id,
            target=target,
            kind=EdgeKind.CONNECTION,
            port=flow.port,
            protocol=flow.protocol,
            direction=direction,
            failed=allowed == 0 and denied > 0,
            links_established=allowed,
            links_failed=denied,
            bytes_sent=sent + (known.bytes_sent if known else 0),
            bytes_received=received + (known.bytes_received if known else 0),
        )

    for flow in flows:
        if flow.src_ip in own_ips and flow.dest_ip not in own_ips:
            if flow.dest_vm:
                remote = machine(flow.dest_vm, flow.dest_ip)
                target = port_node(remote, flow.dest_vm, flow.dest_ip, flow.port, flow.protocol)
            else:
                target = node_id(NodeKind.EXTERNAL, flow.dest_ip)
                nodes.setdefault(
                    target, MapNode(id=target, kind=NodeKind.EXTERNAL, name=flow.dest_ip, ips=(flow.dest_ip,))
                )
            connect(root, target, flow, Direction.OUTBOUND)
        elif flow.dest_ip in own_ips and flow.src_ip not in own_ips:
            local = port_node(root, root_key, flow.dest_ip, flow.port, flow.protocol)
            if flow.src_vm:
                client = machine(flow.src_vm, flow.src_ip)
            else:
                client = node_id(NodeKind.CLIENT_GROUP, root_key, str(flow.port), flow.protocol.value)
                nodes.setdefault(
                    client,
                    MapNode(
                        id=client,
                        kind=NodeKind.CLIENT_GROUP,
                        name=f"Clients of :{flow.port}",
                        machine=root,
                        port=flow.port,
                        protocol=flow.protocol,
                    ),
                )
                client_ips.setdefault(client, set()).add(flow.src_ip)
            connect(client, local, flow, Direction.INBOUND)
    for group, ips in client_ips.items():
        known = nodes[group]
        ordered = tuple(sorted(ips))
        nodes[group] = MapNode(
            id=known.id,
            kind=known.kind,
            name=known.name,
            machine=known.machine,
            port=known.port,
            protocol=known.protocol,
            ips=ordered[:MAX_CLIENT_IPS],
            properties={"clients": str(len(ordered))},
        )
    return ServerMap(
        server=server.computer,
        machine_id=server.machine_id,
        source=source,
        source_kind="flowlogs",
        window=window,
        imported_at=imported_at,
        nodes=tuple(sorted(nodes.values(), key=lambda node: node.id)),
        edges=tuple(sorted(edges.values(), key=lambda edge: edge.key)),
    )


def build_maps(
    rows: Sequence[Mapping[str, Any]],
    servers: Sequence[ServerRef],
    *,
    source: str,
    window: MapWindow,
    imported_at: datetime,
    partial_error: str = "",
) -> list[ServerMapResult]:
    """One result per server; a row that makes no sense costs only the servers whose IPs it names."""
    warnings = (f"partial data from Log Analytics: {partial_error}",) if partial_error else ()
    by_ip: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        for column in ("SrcIp", "DestIp"):
            ip = row_text(row, column)
            by_ip.setdefault(ip, []).append(row)
    results = []
    for server in servers:
        seen: dict[int, Mapping[str, Any]] = {}
        for ip in server.ips:
            for row in by_ip.get(ip, ()):
                seen[id(row)] = row
        try:
            flows = merge_flows(seen.values())
            server_map = build_server_map(
                server, flows, source=source, window=window, imported_at=imported_at
            )
        except (ValueError, TypeError, ValidationError) as exc:
            detail = str(exc)[:200] if not isinstance(exc, ValidationError) else "a node or edge is invalid"
            results.append(
                ServerMapResult(server=server, error=f"malformed data from Log Analytics: {detail}")
            )
            continue
        results.append(ServerMapResult(server=server, map=server_map, warnings=warnings))
    return results


# ------------------------------------------------------------------------------------------------
# the source
# ------------------------------------------------------------------------------------------------
class FlowLogsSource:
    """``MapSource`` over Traffic Analytics' ``NTANetAnalytics`` in the definition's workspaces."""

    def __init__(
        self,
        definition: MapSourceDefinition,
        runner: LogQueryRunner,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.definition = definition
        self._runner = runner
        self._clock = clock
        self.batch_size = max(1, batch_size)
        self._workspaces = [workspace.customer_id for workspace in definition.workspaces]

    def servers(self) -> list[ServerRef]:
        group = self.definition.group
        end = self._clock()
        start = end - timedelta(minutes=max(self.definition.window_minutes, 120))
        vms = list(group.computers) if group.kind is ServerGroupKind.COMPUTERS else []
        prefix = _scope_prefix(group.scope_id) if group.kind is not ServerGroupKind.COMPUTERS else ""
        answer = self._runner.query(
            self._workspaces, servers_query(vms, prefix, start, end), start=start, end=end
        )
        if answer.partial_error:
            raise MapSourceError(f"the server list is incomplete: {answer.partial_error}")
        refs: dict[str, ServerRef] = {}
        for row in answer.rows:
            vm = row_text(row, "Vm")
            if not vm:
                continue
            ips = tuple(sorted(ip for ip in _ips(row.get("Ips")) if is_ip(ip)))[:20]
            refs[vm.lower()] = ServerRef(
                computer=vm_name(vm), machine_id=vm, workspace=self._workspaces[0], ips=ips
            )
        found = sorted(refs.values(), key=lambda ref: ref.computer.lower())
        if group.kind is ServerGroupKind.COMPUTERS:
            named = {ref.computer.lower() for ref in found}
            found += [
                ServerRef(computer=name, workspace=self._workspaces[0])
                for name in group.computers
                if name.lower() not in named
            ]
        return found

    def fetch(self, servers: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        return in_batches(
            servers,
            window,
            max_window_minutes=self.definition.max_window_minutes,
            usable=lambda server: bool(server.ips),
            unusable="no flows for this VM in the workspaces (is Traffic Analytics on for its VNet?)",
            batch_size=self.batch_size,
            fetch_batch=lambda batch: self._fetch_batch(batch, window),
        )

    def _fetch_batch(self, batch: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        ips = sorted({ip for server in batch for ip in server.ips})
        answer = batch_answer(
            self._runner,
            self._workspaces,
            map_query(ips, window),
            batch,
            start=window.start,
            end=window.end + INGESTION_LAG,
            what="flow-log",
        )
        if isinstance(answer, list):
            yield from answer
            return
        yield from build_maps(
            answer.rows,
            batch,
            source=self.definition.name,
            window=window,
            imported_at=self._clock(),
            partial_error=answer.partial_error,
        )

    def check(self) -> str:
        end = self._clock()
        start = end - timedelta(hours=24)
        answer = self._runner.query(self._workspaces, check_query(start, end), start=start, end=end)
        flows = row_count(answer.rows[0], "Flows") if answer.rows else 0
        if flows == 0:
            raise MapSourceError(
                "no NTANetAnalytics flow records in the last 24 hours: turn on VNet flow logs with "
                "Traffic Analytics into these workspaces"
            )
        return f"{flows} Traffic Analytics flow records in the last 24 hours"

    def close(self) -> None:
        self._runner.close()


def _ips(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        import json  # noqa: PLC0415 - dynamic columns arrive as JSON text

        try:
            value = json.loads(value)
        except ValueError:
            return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(item) for item in value if item)
    return ()
