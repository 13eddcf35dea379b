"""Provance sync benchmark: the app's initial sync against raw paging plus plain table writes.

    .venv/bin/python -m tests.bench.provance_bench

Everything on 127.0.0.1. The loopback Dataverse runs in its own process (``python -m
tests.loopback.provance --seed incident=N``: ``PROVANCE_BENCH_ROWS``, default 20,000 incidents
modified over the last 25 days, HTTPS with this process's throwaway CA) with an Entra ID of its own,
so neither side pays for the server's CPU under this process's GIL (as in the Cherwell and SCSM
benchmarks). Azurite (its own Node.js process) and the loopback Entra ID and Key Vault of
``LoopbackStack`` serve the app here; the connection, added with the CLI, names the Dataverse
process's Entra as its ``--authority-host``.

``products.sync_ratio_to_raw_provance``
    seconds of *raw* over seconds of *ours* (so rows/s of ours over rows/s of raw), medians of
    ``PROVANCE_BENCH_ROUNDS`` (default 5, as SCSM) rounds, alternated raw, ours, raw, ours ... *Raw* is a
    plain ``httpx.Client`` with one Entra token from azure-identity, sending the connector's first
    query (same ``$select``, ``$filter``, ``$orderby``, page size ``SYNC_PAGE_SIZE`` = 1,000) and
    following ``@odata.nextLink`` (as many requests as the connector's keyset pages), parsing each
    page's JSON, and writing every row to a fresh Azurite table the way the engine writes
    (``tests/bench/rawsync.py``: the next page fetched while one is written, ``upsert_transaction``
    batches of at most 100 rows, the WorkItems partitioning, partitions in parallel), each as the
    WorkItems row the engine writes for it (same properties and values), built straight from the
    JSON with no model in between. *Ours* is ``sync_engine.run`` of a
    new connection added with the CLI, to a fresh table prefix: the same paging, the mapping to
    ``WorkItem``, the WorkItems upserts, a watermark per page, the lease and the Runs record. Log
    Analytics is off, so the table is the one sink for both. Target: >= 0.8; below it the benchmark
    says so and exits 1, as it does when a sync does not end ``succeeded`` with every row.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from azure.data.tables import TableServiceClient
from azure.identity import ClientSecretCredential

from shared_code.bootstrap import get_container
from shared_code.domain.workitem import WorkItemType
from shared_code.itsm.provance.connector import FORMATTED_VALUES
from shared_code.itsm.provance.mapping import FORMATTED, TableInfo
from shared_code.state.tables import Entity
from shared_code.state.workitems import partition_of, row_key
from shared_code.workitems.engine import SyncOutcome
from tests.bench.loopbackproc import LoopbackProcess
from tests.bench.machine import log, run_bench
from tests.bench.rawsync import CpuMeter, RawFetchError, fetch_and_write
from tests.loopback import netguard
from tests.loopback.azurite import Azurite
from tests.loopback.provance import PROVANCE_APP_ID, PROVANCE_APP_SECRET
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

ROOT = Path(__file__).resolve().parents[2]
ROWS = int(os.environ.get("PROVANCE_BENCH_ROWS", "20000"))
ROUNDS = int(os.environ.get("PROVANCE_BENCH_ROUNDS", "5"))
PAGE = 1000
SCOPE_DAYS = 30
SPAN_DAYS = 25
TARGET = 0.8
NO_LOGS = {"LOGS_INGESTION_ENDPOINT": "", "LOGS_INGESTION_RULE_ID": "", "SYNC_PAGE_SIZE": str(PAGE)}


class BenchError(RuntimeError):
    """A run did not do what the benchmark needs."""


class DataverseProcess(LoopbackProcess):
    """``python -m tests.loopback.provance --seed incident=N`` (HTTPS with this process's CA)."""

    def __init__(self, rows: int) -> None:
        super().__init__(
            "tests.loopback.provance",
            ["--seed", f"incident={rows}", "--span-days", str(SPAN_DAYS)],
            name="Dataverse",
            error=BenchError,
        )
        self.rows = rows
        self.authority = ""
        self.tenant_id = ""
        self.account = ""
        self.incidents = 0
        self.columns: frozenset[str] = frozenset()

    def start(self) -> DataverseProcess:
        self.launch()
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        words = self.ready(6, timeout)
        self.authority, self.tenant_id, self.account = words[2:5]
        self.incidents = int(words[5])

    def credential(self) -> ClientSecretCredential:
        """The app registration's credential against the Dataverse process's own Entra ID."""
        return ClientSecretCredential(
            self.tenant_id,
            PROVANCE_APP_ID,
            PROVANCE_APP_SECRET,
            authority=self.authority,
            disable_instance_discovery=True,
            connection_verify=loopback_tls().ca_bundle_path,
        )

    def incident_columns(self) -> frozenset[str]:
        """The incident table's columns as ``EntityDefinitions`` lists them (what the connector reads)."""
        credential = self.credential()
        try:
            token = credential.get_token(f"{self.url}/.default").token
        finally:
            credential.close()
        with httpx.Client(verify=loopback_tls().client_context(), timeout=60) as http:
            response = http.get(
                f"{self.url}/api/data/v9.2/EntityDefinitions(LogicalName='incident')",
                params={"$select": "LogicalName", "$expand": "Attributes($select=LogicalName)"},
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
            response.raise_for_status()
        return frozenset(str(a["LogicalName"]) for a in response.json()["Attributes"])

    def connection_options(self) -> list[str]:
        """``connections add`` options (the secret goes through stdin)."""
        return [
            "--type",
            "provance",
            "--url",
            self.url,
            "--private-instance",
            "--user",
            PROVANCE_APP_ID,
            "--tenant-id",
            self.tenant_id,
            "--authority-host",
            self.authority,
            "--customer",
            f"accounts({self.account})",
            "--secrets-stdin",
        ]


_LIFECYCLE = {0: "in_progress", 1: "resolved", 2: "cancelled"}  # incident statecode


def _shown(row: dict[str, Any], name: str) -> str:
    value = row.get(name + FORMATTED, row.get(name))
    return "" if value is None else str(value)


def raw_entity(connection: str, row: dict[str, Any]) -> Entity:
    """The WorkItems row's columns straight from the Web API's JSON (no model in between), so both
    passes write the same properties: what the engine's row has, as plain values."""
    record = str(row["incidentid"])
    modified = datetime.fromisoformat(row["modifiedon"])
    lifecycle = _LIFECYCLE[row["statecode"]]
    finished = lifecycle != "in_progress"
    entity: Entity = {
        "PartitionKey": partition_of(connection, WorkItemType.INCIDENT, record),
        "RowKey": row_key(record),
        "connection": connection,
        "item_type": "Incident",
        "source_id": record,
        "number": row["ticketnumber"],
        "updated_at": modified,
        "state": _shown(row, "statuscode"),
        "lifecycle": lifecycle,
        "state_code": str(row.get("statuscode", "")),
        "urgency": "",
        "impact": "",
        "priority": _shown(row, "prioritycode"),
        "created_by": _shown(row, "_createdby_value"),
        "resolved_by": "",
        "closed_by": "",
        "source": _shown(row, "caseorigincode"),
        "assigned_to": _shown(row, "_ownerid_value"),
        "category": _shown(row, "casetypecode"),
        "title": row.get("title") or "",
        "description": row.get("description") or "",
        "computer": "",
        "created_at": datetime.fromisoformat(row["createdon"]),
        "correlation_id": "",
        "change_type": "",
        "risk": "",
    }
    if finished:
        who = "resolved" if lifecycle == "resolved" else "closed"
        entity[f"{who}_by"] = _shown(row, "_modifiedby_value")
        entity[f"{who}_at"] = modified
    return entity


def raw_pass(dataverse: DataverseProcess, azurite: Azurite, table_name: str) -> tuple[int, float]:
    """Page with plain httpx (following nextLink), write every row as the engine writes; (rows, s)."""
    info = TableInfo(
        "incident",
        "incidents",
        "incidentid",
        "title",
        dataverse.columns,
        number_column="ticketnumber",
    )
    since = (datetime.now(UTC) - timedelta(days=SCOPE_DAYS)).strftime("%Y-%m-%dT%H:%M:%SZ")
    started = time.perf_counter()
    credential = dataverse.credential()
    token = credential.get_token(f"{dataverse.url}/.default").token
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json",
        "OData-MaxVersion": "4.0",
        "OData-Version": "4.0",
        "Prefer": f"{FORMATTED_VALUES},odata.maxpagesize={PAGE}",
    }
    params: dict[str, str] | None = {
        "$select": ",".join(info.sync_select()),
        "$filter": f"modifiedon gt {since}",
        "$orderby": "modifiedon asc,versionnumber asc",
    }
    url = f"{dataverse.url}/api/data/v9.2/incidents"

    def pages(http: httpx.Client) -> Iterator[list[Entity]]:
        next_url: str | None = url
        query: dict[str, str] | None = params
        while next_url is not None:
            response = http.get(next_url, params=query, headers=headers)
            response.raise_for_status()
            body = response.json()
            rows: list[dict[str, Any]] = body["value"]
            yield [raw_entity("raw", row) for row in rows]
            next_url, query = body.get("@odata.nextLink"), None

    with (
        httpx.Client(verify=loopback_tls().client_context(), timeout=60) as http,
        TableServiceClient.from_connection_string(azurite.connection_string) as service,
    ):
        table = service.create_table_if_not_exists(table_name)
        seen = fetch_and_write(table, lambda: pages(http))
    credential.close()
    return seen, time.perf_counter() - started


def our_pass(
    stack: LoopbackStack, dataverse: DataverseProcess, prefix: str, cpu: CpuMeter
) -> tuple[int, float, str]:
    with stack.app(TABLE_PREFIX=prefix, **NO_LOGS) as container:
        name = f"pv-bench-{prefix}"
        code, output = stack.cli(
            "connections",
            "add",
            name,
            *dataverse.connection_options(),
            "--sync",
            "incidents",
            "--scope-days",
            str(SCOPE_DAYS),
            stdin=f"{PROVANCE_APP_SECRET}\n",
        )
        if code != 0:
            raise BenchError(f"connections add failed: {output}")
        engine = get_container().sync_engine
        assert container is get_container()
        cpu_before = cpu.sample()
        started = time.perf_counter()
        [result] = engine.run(name, [WorkItemType.INCIDENT], trigger="bench")
        seconds = time.perf_counter() - started
        spent = cpu.describe(cpu_before)
    if result.outcome is not SyncOutcome.SUCCEEDED or result.rejected:
        raise BenchError(
            f"our sync ended {result.outcome.value} ({result.rejected} rejected): {result.error}"
        )
    return result.synced, seconds, spent


def main() -> int:
    netguard.watch()
    loopback_tls()  # made before the Dataverse process starts, which shares it
    with contextlib.ExitStack() as things:
        dataverse = DataverseProcess(ROWS).start()
        things.callback(dataverse.stop)
        azurite = Azurite().start()
        things.callback(azurite.stop)
        stack = things.enter_context(LoopbackStack(azurite=azurite))
        dataverse.wait_ready()
        dataverse.columns = dataverse.incident_columns()
        total = dataverse.incidents
        log(f"Dataverse at {dataverse.url} with {total:,} incidents; Azurite at {azurite.table_endpoint}")
        raw_times: list[float] = []
        our_times: list[float] = []
        cpu = CpuMeter({"Dataverse": dataverse.pid, "Azurite": azurite.pid})
        for round_number in range(ROUNDS):
            cpu_before = cpu.sample()
            rows, seconds = raw_pass(dataverse, azurite, f"raw{round_number}x{os.getpid()}")
            raw_spent = cpu.describe(cpu_before)
            if rows != total:
                raise BenchError(f"raw paging read {rows} rows of {total}")
            raw_times.append(seconds)
            synced, ours, our_spent = our_pass(
                stack, dataverse, f"pvb{round_number}x{os.getpid() % 10000}", cpu
            )
            if synced != total:
                raise BenchError(f"our sync stored {synced} rows of {total}")
            our_times.append(ours)
            log(
                f"round {round_number + 1}: raw {seconds:.2f} s ({rows / seconds:,.0f} rows/s; {raw_spent}), "
                f"ours {ours:.2f} s ({synced / ours:,.0f} rows/s; {our_spent})"
            )
        if netguard.foreign:
            raise BenchError(f"non-loopback network access: {netguard.foreign[:5]}")
    raw, ours = statistics.median(raw_times), statistics.median(our_times)
    ratio = raw / ours
    paired = ", ".join(f"{r / o:.3f}" for r, o in zip(raw_times, our_times, strict=True))
    log(f"medians: raw {raw:.2f} s, ours {ours:.2f} s for {total:,} rows; round by round {paired}")
    print(f"products.sync_ratio_to_raw_provance: {ratio:.3f}")
    if ratio < TARGET:
        log(f"MISSED: products.sync_ratio_to_raw_provance {ratio:.3f} < {TARGET}")
        return 1
    return 0


def run() -> int:
    return run_bench(main, (BenchError, RawFetchError))


if __name__ == "__main__":
    sys.exit(run())
