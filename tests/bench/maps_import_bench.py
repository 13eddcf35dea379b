"""The whole map import against raw work, side by side in one run, and its peak memory.

1,000 servers x 40 connections seeded in the loopback Log Analytics query API; the app's own
importer (``Container.map_importer``: VM Insights source, diff against the stored map, Maps table
in Azurite, lease, ``Runs``) imports them into fresh tables each round, in a fresh child process
(whose peak memory is the RSS figure; the loopback servers and Azurite stay in the parent, so the
child holds only the importer). "raw" is the same work done plainly, in a fresh child process too
(so neither side shares its interpreter with the loopback servers that answer it): the same queries
(server list, then one map query per batch) through a plain ``LogsQueryClient`` with the rows read
into dicts, and the same table rows the import stored written with plain batched upserts
(the project's batch writer, 100 per partition, one transaction at a time) into a fresh table.
The rounds alternate (``MAPS_BENCH_ROUNDS``, default 3: the raw pass alone moves by a quarter
between rounds on a shared machine); the ratio is of the medians.

Figures:

* ``maps.import_ratio_to_raw``: raw time / import time (target >= 0.8);
* ``maps.peak_rss_mb`` and ``maps.peak_rss_mb_100``: peak RSS (``VmHWM``) of a fresh child process
  that imports 1,000 and 100 servers (target: the 1,000 figure within 20% of the 100 figure).

A missed target is printed and the run exits 1. Everything started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure.data.tables import TableServiceClient
from azure.identity import ClientSecretCredential
from azure.monitor.query import LogsQueryClient

from shared_code.bootstrap import Container, get_container, tune_interpreter
from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.mapsources.vminsights import (
    DEFAULT_BATCH_SIZE,
    INVENTORY_LOOKBACK,
    map_query,
    servers_query,
)
from shared_code.state.maps import INDEX, graph_rows, server_key
from shared_code.state.tablebatch import transactions, upsert_transaction
from tests.loopback import netguard
from tests.loopback.loganalytics import SeededServer, seed_vminsights
from tests.loopback.stack import FOREIGN_IDENTITY_VARIABLES, LoopbackStack

ROOT = Path(__file__).resolve().parents[2]
SERVERS = int(os.environ.get("MAPS_BENCH_SERVERS", "1000"))  # the figure of record is 1,000
SMALL = 100
CONNECTIONS = 40
ROUNDS = int(os.environ.get("MAPS_BENCH_ROUNDS", "3"))
"""Rounds of (import, raw); one by default: a 1,000-server import into Azurite takes minutes."""
RATIO_TARGET = 0.8
RSS_FLATNESS = 1.2
WORKSPACE = "0c0c0c0c-0000-4000-8000-00000000c0c0"
RESOURCE = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg/providers/"
    "Microsoft.OperationalInsights/workspaces/bench-maps"
)
NO_LOGS = {
    "LOGS_INGESTION_ENDPOINT": "",
    "LOGS_INGESTION_RULE_ID": "",
    "HTTP_TIMEOUT_SECONDS": "60",
    "ALERT_LEASE_SECONDS": "150",
}
_STARTED = time.monotonic()


class BenchError(RuntimeError):
    pass


def log(text: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def definition(name: str, computers: Sequence[str] | None = None) -> MapSourceDefinition:
    group: dict[str, Any] = (
        {"kind": "computers", "computers": list(computers)}
        if computers is not None
        else {"kind": "subscription", "scope": "/subscriptions/00000000-0000-4000-8000-000000000001"}
    )
    return MapSourceDefinition.parse(
        {
            "name": name,
            "kind": "vminsights",
            "workspaces": [{"resource_id": RESOURCE, "customer_id": WORKSPACE}],
            "group": group,
            "timeout_seconds": 120,
        }
    )


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``, not ``ru_maxrss``, which a child inherits)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError("no VmHWM in /proc/self/status")


# -- the import (ours) -------------------------------------------------------------------------------


def import_once(container: Container, source: str, expected: int) -> float:
    started = time.perf_counter()
    [result] = container.map_importer.run(source=source, trigger="bench")
    seconds = time.perf_counter() - started
    if result.outcome.value != "ok" or result.imported != expected:
        raise BenchError(
            f"import of {source}: {result.outcome.value}, {result.imported} imported: {result.error}"
        )
    return seconds


# -- the same work, plainly --------------------------------------------------------------------------


def stored_rows(container: Container, servers: Sequence[SeededServer]) -> dict[str, list[dict[str, Any]]]:
    """partition -> the entities the import stored (graph rows and index rows), read back untimed."""
    partitions: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for seeded in servers:
        server_map = container.maps.load(seeded.computer)
        if server_map is None:
            raise BenchError(f"{seeded.computer} was not imported")
        partition = f"map|{server_key(server_map.server)}"
        for key, text in graph_rows(server_map).items():
            partitions[partition].append({"PartitionKey": partition, "RowKey": key, "Data": text})
        partitions[INDEX].append(
            {
                "PartitionKey": INDEX,
                "RowKey": server_key(server_map.server),
                "Server": server_map.server,
                "ImportedAt": server_map.imported_at,
                "Nodes": len(server_map.nodes),
                "Edges": len(server_map.edges),
            }
        )
    return partitions


def raw_once(
    client: LogsQueryClient,
    service: TableServiceClient,
    table: str,
    machine_ids: Sequence[str],
    rows: dict[str, list[dict[str, Any]]],
) -> float:
    started = time.perf_counter()
    source = definition("raw")
    window = source.window_ending(datetime.now(UTC))
    start = window.end - max(INVENTORY_LOOKBACK * 2, window.end - window.start)
    listed = client.query_workspace(
        WORKSPACE, servers_query([], source.group.scope_id, start, window.end), timespan=(start, window.end)
    )
    servers = [dict(zip(listed.tables[0].columns, r, strict=False)) for r in listed.tables[0].rows]  # type: ignore[union-attr]
    read = 0
    for at in range(0, len(machine_ids), DEFAULT_BATCH_SIZE):
        answer = client.query_workspace(
            WORKSPACE,
            map_query(machine_ids[at : at + DEFAULT_BATCH_SIZE], window),
            timespan=(window.start - INVENTORY_LOOKBACK, window.end),
            server_timeout=120,
        )
        result = answer.tables[0]  # type: ignore[union-attr]
        columns = list(result.columns)
        read += len([dict(zip(columns, row, strict=False)) for row in result.rows])
    table_client = service.create_table_if_not_exists(table)
    written = 0
    for entities in rows.values():
        # the project's batch writer, as the import uses it: the SDK's submit_transaction spends
        # about ten times its client CPU per entity, which would make "raw" slow for reasons that
        # have nothing to do with the import
        for chunk in transactions(entities):
            upsert_transaction(table_client, chunk)
            written += len(chunk)
    seconds = time.perf_counter() - started
    if len(servers) < len(machine_ids) or read < len(machine_ids) * CONNECTIONS:
        raise BenchError(f"raw pass read {len(servers)} servers and {read} rows")
    return seconds


def raw_child(table: str, rows_file: str) -> int:
    """``--raw TABLE ROWS_FILE``: the raw pass in a fresh process, clients built from the app's
    environment (the loopback Entra, Log Analytics and Azurite); prints one JSON line."""
    netguard.watch()
    data = json.loads(Path(rows_file).read_text(encoding="utf-8"))
    machine_ids: list[str] = data["machine_ids"]
    rows: dict[str, list[dict[str, Any]]] = {
        partition: [
            {**e, "ImportedAt": datetime.fromisoformat(e["ImportedAt"])} if "ImportedAt" in e else e
            for e in entities
        ]
        for partition, entities in data["rows"].items()
    }
    env = os.environ
    started = time.perf_counter()
    credential = ClientSecretCredential(
        env["AZURE_TENANT_ID"],
        env["AZURE_CLIENT_ID"],
        env["AZURE_CLIENT_SECRET"],
        authority=env["AZURE_AUTHORITY_HOST"],
        disable_instance_discovery=True,
        connection_verify=env["TLS_CA_BUNDLE"],
    )
    client = LogsQueryClient(
        credential,
        endpoint=env["LOGS_QUERY_ENDPOINT"],
        audience="https://api.loganalytics.io",
        connection_verify=env["TLS_CA_BUNDLE"],
    )
    service = TableServiceClient.from_connection_string(env["AzureWebJobsStorage"])
    try:
        raw_once(client, service, table, machine_ids, rows)
        seconds = time.perf_counter() - started
    finally:
        client.close()
        credential.close()
        service.close()
    print(json.dumps({"seconds": seconds, "foreign": [str(a) for a in netguard.foreign[:5]]}), flush=True)
    return 0


def child_raw(
    stack: LoopbackStack,
    table: str,
    machine_ids: Sequence[str],
    rows: dict[str, list[dict[str, Any]]],
    children: list[Any],
) -> float:
    """The raw pass in a fresh child process; its seconds."""
    rows_file = Path(tempfile.mkdtemp(prefix="maps-bench-")) / "rows.json"
    rows_file.write_text(
        json.dumps({"machine_ids": list(machine_ids), "rows": rows}, default=lambda v: v.isoformat()),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_IDENTITY_VARIABLES}
    env.update(stack.app_environment(**NO_LOGS))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.maps_import_bench", "--raw", table, str(rows_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError("the raw child did not finish in 15 minutes") from None
    finally:
        shutil.rmtree(rows_file.parent, ignore_errors=True)
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"the raw child failed ({proc.returncode}): {err.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    if report["foreign"]:
        raise BenchError(f"the raw child reached beyond loopback: {report['foreign']}")
    return float(report["seconds"])


# -- peak memory in a fresh process -------------------------------------------------------------------


def child(source: str, expected: int) -> int:
    """``--child SOURCE N``: the app (settings from the environment) imports SOURCE; one JSON line."""
    tune_interpreter()  # the app's process: as its entry points do (function_app.py, the CLI)
    netguard.watch()
    container = get_container()
    try:
        seconds = import_once(container, source, expected)
    finally:
        container.close()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": peak_rss_mb(),
                "foreign": [str(a) for a in netguard.foreign[:5]],
            }
        ),
        flush=True,
    )
    return 0


def child_import(
    stack: LoopbackStack, prefix: str, source: str, expected: int, children: list[Any]
) -> tuple[float, float]:
    """A fresh child process imports ``source`` into tables of its own: (seconds, peak RSS MB)."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_IDENTITY_VARIABLES}
    env.update(stack.app_environment(TABLE_PREFIX=prefix, **NO_LOGS))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.maps_import_bench", "--child", source, str(expected)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"the {expected}-server child did not finish in 15 minutes") from None
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"the {expected}-server child failed ({proc.returncode}): {err.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    if report["foreign"]:
        raise BenchError(f"the {expected}-server child reached beyond loopback: {report['foreign']}")
    log(f"child {expected} servers: {report['seconds']:.1f}s, peak RSS {report['peak_rss_mb']:.0f} MB")
    return float(report["seconds"]), float(report["peak_rss_mb"])


# -- the benchmark -----------------------------------------------------------------------------------


def run(children: list[Any]) -> int:
    with LoopbackStack() as stack:
        assert stack.loganalytics is not None
        stack.loganalytics.add_workspace(WORKSPACE)
        seeded = seed_vminsights(
            stack.loganalytics, WORKSPACE, servers=SERVERS, connections=CONNECTIONS, now=datetime.now(UTC)
        )
        machine_ids = sorted(s.machine_id for s in seeded)
        log(f"seeded {SERVERS} servers x {CONNECTIONS} connections")
        env = stack.app_environment(**NO_LOGS)
        service = TableServiceClient.from_connection_string(env["AzureWebJobsStorage"])
        ours: list[float] = []
        raws: list[float] = []
        try:
            small = [s.computer for s in seeded[:SMALL]]
            with stack.app(TABLE_PREFIX="rss100", **NO_LOGS) as container:
                container.map_sources.add(definition("bench100", small))
            _, rss_small = child_import(stack, "rss100", "bench100", SMALL, children)
            rss_large = 0.0
            rows: dict[str, list[dict[str, Any]]] = {}
            for n in range(1, ROUNDS + 1):
                prefix = f"mi{n}"
                with stack.app(TABLE_PREFIX=prefix, **NO_LOGS) as container:
                    container.map_sources.add(definition("bench"))
                seconds, rss = child_import(stack, prefix, "bench", SERVERS, children)
                rss_large = max(rss_large, rss)
                if not rows:
                    with stack.app(TABLE_PREFIX=prefix, **NO_LOGS) as container:
                        rows = stored_rows(container, seeded)  # untimed: what the import stored
                raw_seconds = child_raw(stack, f"raw{n}Maps", machine_ids, rows, children)
                for table in (f"{prefix}Maps", f"raw{n}Maps"):
                    service.delete_table(table)  # free Azurite's memory (untimed)
                log(f"round {n}: import {seconds:.1f}s, raw {raw_seconds:.1f}s")
                ours.append(seconds)
                raws.append(raw_seconds)
        finally:
            service.close()
    ours_median, raw_median = statistics.median(ours), statistics.median(raws)
    ratio = raw_median / ours_median
    print(f"maps.import_seconds: {ours_median:.2f}")
    print(f"maps.import_raw_seconds: {raw_median:.2f}")
    print(f"maps.import_ratio_to_raw: {ratio:.2f}")
    print(f"maps.peak_rss_mb_100: {rss_small:.1f}")
    print(f"maps.peak_rss_mb: {rss_large:.1f}")
    print(f"maps.peak_rss_growth_100_to_1000: {rss_large / rss_small:.2f}")
    failed = False
    if ratio < RATIO_TARGET:
        print(f"maps.import_ratio_to_raw {ratio:.2f} misses the target >= {RATIO_TARGET}", file=sys.stderr)
        failed = True
    if rss_large > rss_small * RSS_FLATNESS:
        print(
            f"maps.peak_rss_mb {rss_large:.1f} is more than {RSS_FLATNESS:.1f}x the 100-server "
            f"{rss_small:.1f}: memory is not flat",
            file=sys.stderr,
        )
        failed = True
    if netguard.foreign:
        print(f"non-loopback network access: {netguard.foreign[:3]}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.maps_import_bench")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "SERVERS"))
    parser.add_argument("--raw", nargs=2, metavar=("TABLE", "ROWS_FILE"))
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]))
    if args.raw:
        return raw_child(args.raw[0], args.raw[1])
    netguard.watch()
    children: list[Any] = []
    try:
        return run(children)
    except BenchError as exc:
        print(f"maps import benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in children:
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
