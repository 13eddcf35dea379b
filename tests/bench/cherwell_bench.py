"""Cherwell sync benchmark: the engine's initial sync against raw paging plus plain table writes.

    .venv/bin/python -m tests.bench.cherwell_bench

What runs where (every address is 127.0.0.1):

* the loopback Cherwell in its own process (``python -m tests.loopback.cherwell --seed
  Incident=20000``, HTTPS with this process's throwaway CA), so its CPU is not in this process; the
  records' LastModifiedDateTime spread over 119.9 days, inside the connection's 120-day scope;
* Azurite (in memory) and the loopback Entra ID and Key Vault of ``LoopbackStack`` here; the
  connection is added with the operator's CLI (``connections add --type cherwell``).

Figure (stdout): ``products.sync_ratio_to_raw_cherwell``, rows/s of the engine over rows/s of raw,
median over median of ``CHERWELL_BENCH_ROUNDS`` (default 5, as SCSM) rounds, alternated (raw, engine, raw,
engine, ...) so the machine's noise hits both. Target >= 0.8; below it the benchmark says so on
stderr and exits 1.

*Raw* is what a hand-written loop needs for the same result: an ``httpx.Client`` (same TLS) gets a
token (password grant), looks up the business object and its field ids (summary, schema), sends the
connector's keyset searches (the drain of the cursor's second, then ``LastModifiedDateTime gt T``,
same fields, page size ``SYNC_PAGE_SIZE``) and parses each answer's JSON; each page's records are
written to a fresh table of the same Azurite the way the engine writes (``tests/bench/rawsync.py``:
the next page fetched while one is written; ``upsert_transaction`` batches of at most 100, the
WorkItems partitioning, partitions in parallel). Each record is written as the WorkItems row the
engine writes for it (same properties and values, date-times parsed), built straight from the JSON
with no model in between, so the two passes differ by the engine and the connector, not by what
reaches the table. The API requests of each pass are logged: both need the same ones.

*Engine* is ``container.sync_engine.run`` of a new connection (its own table prefix: an empty
WorkItems table), timed from call to return: the same paging and parsing through the connector
(OAuth flow, schema lookup), plus normalising every record to a ``WorkItem``, the WorkItems sink,
a watermark commit after every page, the lease and the Runs record. Log Analytics is off.

The benchmark exits 1 when a sync does not end ``succeeded``, when either pass reads a different
number of rows than the Cherwell process holds, or when anything connects beyond loopback. Everything
it starts is stopped on every exit path, SIGTERM included.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from azure.data.tables import TableServiceClient

from shared_code.bootstrap import get_container
from shared_code.domain.workitem import WorkItemType
from shared_code.itsm.cherwell.mapping import (
    LAST_MODIFIED,
    REC_ID,
    STOCK_LIFECYCLE,
    format_datetime,
    marker_of,
    parse_datetime,
    sync_field_names,
)
from shared_code.state.tables import Entity
from shared_code.state.workitems import partition_of, row_key
from shared_code.workitems.engine import SyncOutcome
from tests.bench.loopbackproc import LoopbackProcess
from tests.bench.machine import log, run_bench
from tests.bench.rawsync import CpuMeter, RawFetchError, fetch_and_write
from tests.loopback import cherwell as cw
from tests.loopback import netguard
from tests.loopback.azurite import Azurite
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

ROOT = Path(__file__).resolve().parents[2]
ROWS = int(os.environ.get("CHERWELL_BENCH_ROWS", "20000"))
ROUNDS = int(os.environ.get("CHERWELL_BENCH_ROUNDS", "5"))
TARGET = 0.8
SPAN_DAYS = 119.9
SCOPE_DAYS = 120
NO_LOGS = {"LOGS_INGESTION_ENDPOINT": "", "LOGS_INGESTION_RULE_ID": ""}


class BenchError(RuntimeError):
    """A pass did not do what the benchmark needs."""


class CherwellProcess(LoopbackProcess):
    """``python -m tests.loopback.cherwell --seed Incident=N`` (HTTPS with this process's CA)."""

    def __init__(self, rows: int) -> None:
        super().__init__(
            "tests.loopback.cherwell",
            ["--seed", f"Incident={rows}", "--span-days", str(SPAN_DAYS)],
            name="Cherwell",
            error=BenchError,
        )
        self.rows = rows

    def start(self) -> CherwellProcess:
        self.launch()
        return self

    def wait_ready(self, timeout: float = 120.0) -> str:
        self.ready(2, timeout)
        return self.url

    def stats(self) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, verify=loopback_tls().client_context(), timeout=60) as http:
            response = http.get("/__loopback/stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    def count(self) -> int:
        return int(self.stats()["objects"]["Incident"])

    def requests(self) -> int:
        """API requests served so far (the control endpoints not counted): both passes must need
        the same ones for the ratio to compare the engine and not the HTTP traffic."""
        return int(self.stats()["request_count"])


# -- raw: plain httpx paging and plain batched upserts ------------------------------------------------


def raw_pass(
    server: CherwellProcess, table_service: TableServiceClient, table_name: str, page_size: int
) -> tuple[int, float]:
    """Every record of the scope read as the connector reads it and written as the engine writes
    (``tests/bench/rawsync.py``); (rows, seconds)."""
    api = f"{server.url}{cw.API_ROOT}"
    table = table_service.create_table(table_name)
    started = time.perf_counter()
    with httpx.Client(verify=loopback_tls().client_context(), timeout=60) as http:
        token = http.post(
            f"{api}/token",
            params={"auth_mode": "Internal"},
            data={
                "grant_type": "password",
                "client_id": cw.DEFAULT_CLIENT_ID,
                "username": cw.DEFAULT_USERNAME,
                "password": cw.DEFAULT_PASSWORD,
            },
        ).json()["access_token"]
        headers = {"Accept": "application/json", "Authorization": f"Bearer {token}"}
        summary = http.get(
            f"{api}/api/V1/getbusinessobjectsummary/busobname/Incident", headers=headers
        ).json()
        bus_ob_id = summary[0]["busObId"]
        schema = http.get(
            f"{api}/api/V1/getbusinessobjectschema/busobid/{bus_ob_id}",
            params={"includerelationships": "true"},
            headers=headers,
        ).json()
        ids = {f["name"]: f["fieldId"] for f in schema["fieldDefinitions"]}
        fields = [ids[n] for n in sync_field_names(WorkItemType.INCIDENT) if n in ids]
        modified, rec_id = ids[LAST_MODIFIED], ids[REC_ID]

        def search(filters: list[dict[str, str]], sorting: list[str], size: int) -> list[dict[str, Any]]:
            request = {
                "busObId": bus_ob_id,
                "fields": fields,
                "filters": filters,
                "sorting": [{"fieldId": f, "sortDirection": 1} for f in sorting],
                "pageNumber": 1,
                "pageSize": size,
                "includeAllFields": False,
            }
            response = http.post(f"{api}/api/V1/getsearchresults", json=request, headers=headers)
            response.raise_for_status()
            records: list[dict[str, Any]] = response.json()["businessObjects"]
            return records

        def pages() -> Iterator[list[Entity]]:
            at = format_datetime(datetime.now(UTC) - timedelta(days=SCOPE_DAYS))
            last_id = ""
            for _ in range(1_000_000):  # bounded: ends at the first short page
                records: list[dict[str, Any]] = []
                if last_id:
                    records = search(
                        [
                            {"fieldId": modified, "operator": "eq", "value": at},
                            {"fieldId": rec_id, "operator": "gt", "value": last_id},
                        ],
                        [rec_id],
                        page_size,
                    )
                room = page_size - len(records)
                more: list[dict[str, Any]] = []
                if room > 0:
                    more = search(
                        [{"fieldId": modified, "operator": "gt", "value": at}], [modified, rec_id], room
                    )
                records += more
                if records:
                    values = {f["name"]: f["value"] for f in records[-1]["fields"]}
                    at, last_id = values[LAST_MODIFIED], records[-1]["busObRecId"]
                yield [entity_of(record) for record in records]
                if room > 0 and len(more) < room:
                    return

        rows = fetch_and_write(table, pages)
    return rows, time.perf_counter() - started


_TEXT_COLUMNS = {
    "state": "Status",
    "state_code": "Status",
    "urgency": "Urgency",
    "impact": "Impact",
    "priority": "Priority",
    "created_by": "CreatedBy",
    "resolved_by": "ResolvedBy",
    "closed_by": "ClosedBy",
    "source": "Source",
    "assigned_to": "OwnedBy",
    "category": "Category",
    "title": "ShortDescription",
    "description": "Description",
    "computer": "ConfigItemDisplayName",
}
_DATE_COLUMNS = {
    "created_at": "CreatedDateTime",
    "resolved_at": "ResolvedDateTime",
    "closed_at": "ClosedDateTime",
}
_LIFECYCLE = STOCK_LIFECYCLE[WorkItemType.INCIDENT]


def entity_of(record: dict[str, Any]) -> Entity:
    """The WorkItems row's columns straight from the record's JSON (no model in between), so both
    passes write the same properties: what the engine's row has, as plain values."""
    values = {f["name"]: f["value"] for f in record["fields"]}
    rec = str(record["busObRecId"])
    entity: Entity = {
        "PartitionKey": partition_of("raw", WorkItemType.INCIDENT, rec),
        "RowKey": row_key(rec),
        "connection": "raw",
        "item_type": "Incident",
        "source_id": rec,
        "number": record["busObPublicId"],
        "updated_at": parse_datetime(values[LAST_MODIFIED], LAST_MODIFIED),
    }
    for column, field in _TEXT_COLUMNS.items():
        entity[column] = values.get(field) or ""
    lifecycle = _LIFECYCLE.get(entity["state"].lower())
    if lifecycle is not None:
        entity["lifecycle"] = lifecycle.value
    for column, field in _DATE_COLUMNS.items():
        moment = parse_datetime(values.get(field) or "", field)
        if moment is not None:
            entity[column] = moment
    entity |= {"correlation_id": marker_of(entity["description"]), "change_type": "", "risk": ""}
    return entity


# -- the engine ------------------------------------------------------------------------------------------


def add_connection(stack: LoopbackStack, name: str, server: CherwellProcess) -> None:
    code, output = stack.cli(
        "connections",
        "add",
        name,
        "--type",
        "cherwell",
        "--url",
        server.url,
        "--user",
        cw.DEFAULT_USERNAME,
        "--client-id",
        cw.DEFAULT_CLIENT_ID,
        "--secrets-stdin",
        "--sync",
        "incidents",
        "--scope-days",
        str(SCOPE_DAYS),
        stdin=f"{cw.DEFAULT_PASSWORD}\n",
    )
    if code != 0:
        raise BenchError(f"connections add {name} failed ({code}): {output}")


def engine_pass(
    stack: LoopbackStack, name: str, server: CherwellProcess, cpu: CpuMeter
) -> tuple[int, float, int, int, str]:
    """One initial sync of a new connection; (rows, seconds, pages, requests, CPU spent)."""
    add_connection(stack, name, server)
    engine = get_container().sync_engine
    before = server.requests()
    cpu_before = cpu.sample()
    started = time.perf_counter()
    results = engine.run(name, [WorkItemType.INCIDENT], trigger="bench")
    seconds = time.perf_counter() - started
    spent = cpu.describe(cpu_before)
    requests = server.requests() - before
    [result] = results
    if result.outcome is not SyncOutcome.SUCCEEDED:
        raise BenchError(f"the sync of {name} ended {result.outcome.value}: {result.error}")
    if result.rejected:
        raise BenchError(f"the sync of {name} rejected {result.rejected} rows")
    return result.synced, seconds, result.pages, requests, spent


def drop_tables(azurite: Azurite, names: Sequence[str]) -> None:
    with TableServiceClient.from_connection_string(azurite.connection_string) as service:
        for name in names:
            with contextlib.suppress(Exception):
                service.delete_table(name)


def main() -> int:
    netguard.watch()
    loopback_tls()  # made before the Cherwell process starts, which shares it
    with contextlib.ExitStack() as resources:
        server = CherwellProcess(ROWS).start()
        resources.callback(server.stop)
        azurite = Azurite().start()
        resources.callback(azurite.stop)
        stack = resources.enter_context(LoopbackStack(azurite=azurite))
        server.wait_ready()
        expected = server.count()
        log(f"Cherwell: {expected:,} incidents at {server.url}; Azurite at {azurite.table_endpoint}")
        raw_rates: list[float] = []
        engine_rates: list[float] = []
        cpu = CpuMeter({"Cherwell": server.pid, "Azurite": azurite.pid})
        tables = TableServiceClient.from_connection_string(azurite.connection_string)
        resources.callback(tables.close)
        for n in range(1, ROUNDS + 1):
            with stack.app(**NO_LOGS) as container:
                page_size = container.settings.sync_page_size
            before, cpu_before = server.requests(), cpu.sample()
            rows, seconds = raw_pass(server, tables, f"raw{n}", page_size)
            spent = cpu.describe(cpu_before)
            requests = server.requests() - before
            if rows != expected:
                raise BenchError(f"raw paging read {rows} rows, the Cherwell process holds {expected}")
            raw_rates.append(rows / seconds)
            log(
                f"round {n} raw:    {rows:,} rows, {requests} requests, {seconds:.2f}s, "
                f"{rows / seconds:,.0f} rows/s; {spent}"
            )

            with stack.app(TABLE_PREFIX=f"cwround{n}", **NO_LOGS):
                rows, seconds, pages, requests, spent = engine_pass(stack, f"bench-cw-{n}", server, cpu)
            if rows != expected:
                raise BenchError(f"the engine synced {rows} rows, the Cherwell process holds {expected}")
            engine_rates.append(rows / seconds)
            log(
                f"round {n} engine: {rows:,} rows in {pages} pages, {requests} requests, {seconds:.2f}s, "
                f"{rows / seconds:,.0f} rows/s; {spent}"
            )
            drop_tables(azurite, [f"raw{n}", f"cwround{n}WorkItems"])
        if netguard.foreign:
            raise BenchError(f"non-loopback network access: {netguard.foreign[:5]}")
    ratio = statistics.median(engine_rates) / statistics.median(raw_rates)
    paired = ", ".join(f"{e / r:.3f}" for e, r in zip(engine_rates, raw_rates, strict=True))
    log(
        f"median rows/s: raw {statistics.median(raw_rates):,.0f}, "
        f"engine {statistics.median(engine_rates):,.0f}; round by round {paired}"
    )
    print(f"products.sync_ratio_to_raw_cherwell: {ratio:.3f}")
    if ratio < TARGET:
        log(f"MISSED: products.sync_ratio_to_raw_cherwell {ratio:.3f} is below the target {TARGET}")
        return 1
    return 0


def run() -> int:
    return run_bench(main, (BenchError, RawFetchError))


if __name__ == "__main__":
    sys.exit(run())
