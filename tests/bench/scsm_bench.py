"""SCSM sync benchmark: the app's initial sync of 20,000 incidents against plain paging plus plain writes.

    .venv/bin/python -m tests.bench.scsm_bench

What runs where (every address is 127.0.0.1):

* the loopback Cireson portal in its own process (``python -m tests.loopback.scsm --seed
  incident=20000``), so its CPU is not in this process; HTTPS with this process's throwaway CA.
  The incidents' ``LastModified`` spread over 119.9 days (the 120-day scope minus a margin);
* Azurite (in memory) and the loopback Entra ID and Key Vault of ``LoopbackStack`` in this process;
  the connection is added with the operator's CLI (``connections add --type scsm``).

Figure (stdout, ``name: value``; progress and detail on stderr):

``products.sync_ratio_to_raw_scsm``
    rows/s of the app's initial sync over rows/s of the same work done plainly, median over median
    of ``SCSM_BENCH_ROUNDS`` (default 5) full runs of each, alternated (raw, ours, raw, ours, ...)
    so the machine's noise hits both.

    *Ours* is ``sync_engine.run`` of a new connection (the registry's SCSM connector with its
    token sign-in, ``LastModified`` windows and keyset order, every row mapped to a ``WorkItem``;
    the engine's page prefetch, batched upserts into the WorkItems table, a watermark commit after
    every page, the lease and the Runs record), timed from call to return.

    *Raw* is what a script with no engine would do for the same result: one ``httpx.Client`` (same
    TLS) signs in once and walks ``GetProjectionByCriteria`` over ``LastModified`` windows sized to
    bring about a page each (``SYNC_PAGE_SIZE``) on a fetching thread, parsing each answer's JSON,
    while the main thread writes the previous window's rows, as entities with the same columns
    built straight from the JSON, written the way the engine writes (``tests/bench/rawsync.py``:
    batched upserts with ``upsert_transaction``, at most 100 rows per
    partition transaction, partitions in parallel, the same partitioning) into a fresh table of the
    same Azurite. No mapping model, no watermark, no lease.

    Both write every row once into an empty table (a fresh prefix per run). CPU seconds of this
    process, the portal process and Azurite during each run go to stderr, to show where time goes.

The benchmark exits 1 when the ratio misses the 0.8 target, when a sync does not end ``succeeded``,
when either side reads a different number of rows than the portal holds, or when anything connects
elsewhere than loopback. Everything it starts is stopped on every exit path, SIGTERM included.
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

from shared_code.bootstrap import get_container
from shared_code.domain.workitem import WorkItemType
from shared_code.state.tables import Entity
from shared_code.state.workitems import partition_of, row_key
from shared_code.workitems.engine import SyncOutcome
from tests.bench.loopbackproc import LoopbackProcess
from tests.bench.machine import log, run_bench
from tests.bench.rawsync import RawFetchError, fetch_and_write
from tests.bench.sync_bench import group_cpu_seconds
from tests.loopback import netguard
from tests.loopback import scsm as portal
from tests.loopback.azurite import Azurite
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

ROOT = Path(__file__).resolve().parents[2]
ROWS = int(os.environ.get("SCSM_BENCH_ROWS", "20000"))
ROUNDS = int(os.environ.get("SCSM_BENCH_ROUNDS", "5"))
SPAN_DAYS = 119.9
SCOPE_DAYS = 120
TARGET = 0.8
NO_LOGS = {"LOGS_INGESTION_ENDPOINT": "", "LOGS_INGESTION_RULE_ID": ""}


class BenchError(RuntimeError):
    """A run did not do what the benchmark needs (failed, or read the wrong number of rows)."""


class PortalProcess(LoopbackProcess):
    """``python -m tests.loopback.scsm --seed incident=N`` (HTTPS with this process's CA)."""

    def __init__(self, rows: int) -> None:
        super().__init__(
            "tests.loopback.scsm",
            ["--seed", f"incident={rows}", "--span-days", str(SPAN_DAYS), "--no-request-bodies"],
            name="portal",
            error=BenchError,
        )
        self.rows = rows

    def start(self) -> PortalProcess:
        self.launch()
        self.ready(2)
        return self

    def count(self) -> int:
        with httpx.Client(base_url=self.url, verify=loopback_tls().client_context(), timeout=60) as http:
            response = http.get("/__loopback/stats")
        response.raise_for_status()
        return int(response.json()["objects"]["incident"])


class Cpu:
    def __init__(self, *groups: int | None) -> None:
        self._groups = groups

    def sample(self) -> tuple[float, ...]:
        return (time.process_time(), *(group_cpu_seconds(group) for group in self._groups))

    def describe(self, before: tuple[float, ...]) -> str:
        here, scsm, azurite = (a - b for a, b in zip(self.sample(), before, strict=True))
        return f"CPU s: this process {here:.1f}, portal {scsm:.1f}, Azurite {azurite:.1f}"


# -- raw: plain paging and plain batched writes ------------------------------------------------------


def _iso(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value or value.startswith("0001"):
        return None
    return datetime.fromisoformat(value)


def _name(value: Any) -> str:
    return str(value.get("Name") or "") if isinstance(value, dict) else ""


def _display(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value.get("DisplayName") or "") if isinstance(value, dict) else ""


def raw_entity(connection: str, row: dict[str, Any]) -> Entity:
    """The WorkItems row's columns, straight from the portal's JSON (no model in between)."""
    base_id = str(row["BaseId"]).lower()
    status = row.get("Status") or {}
    return {
        "PartitionKey": partition_of(connection, WorkItemType.INCIDENT, base_id),
        "RowKey": row_key(base_id),
        "connection": connection,
        "item_type": "Incident",
        "source_id": base_id,
        "number": row["Id"],
        "updated_at": _iso(row["LastModified"]),
        "state": _name(status),
        "state_code": str(status.get("Id") or ""),
        "urgency": _name(row.get("Urgency")),
        "impact": _name(row.get("Impact")),
        "priority": str(row.get("Priority") or ""),
        "created_by": _display(row.get("CreatedWorkItem")),
        "resolved_by": _display(row.get("TroubleTicketResolvedByUser")),
        "closed_by": _display(row.get("TroubleTicketClosedByUser")),
        "source": _name(row.get("Source")),
        "assigned_to": _display(row.get("AssignedWorkItem")),
        "category": _name(row.get("Classification")),
        "title": row.get("Title") or "",
        "description": row.get("Description") or "",
        "computer": _display(row.get("AboutConfigItem")),
        "created_at": _iso(row.get("CreatedDate")),
        "resolved_at": _iso(row.get("ResolvedDate")),
        "closed_at": _iso(row.get("ClosedDate")),
        "correlation_id": "",
    }


def raw_windows(http: httpx.Client, token: str, page_size: int) -> Iterator[list[dict[str, Any]]]:
    """Every incident of the scope, one ``LastModified`` window (about a page of rows) at a time."""
    headers = {"Accept": "application/json", "Authorization": f"Token {token}"}
    now = datetime.now(UTC)
    lower = now - timedelta(days=SCOPE_DAYS)
    window = timedelta(days=1)
    while True:
        upper = lower + window
        left = {"GenericProperty": "LastModified"}
        terms = [
            {
                "SimpleExpression": {
                    "ValueExpressionLeft": left,
                    "Operator": "Greater",
                    "ValueExpressionRight": {"Value": portal.ts(lower)},
                }
            }
        ]
        last = upper >= now
        if not last:
            terms.append(
                {
                    "SimpleExpression": {
                        "ValueExpressionLeft": left,
                        "Operator": "LessEqual",
                        "ValueExpressionRight": {"Value": portal.ts(upper)},
                    }
                }
            )
        expression = terms[0] if last else {"And": {"Expression": terms}}
        body = {"Id": portal.INCIDENT_PROJECTION, "Criteria": {"Base": {"Expression": expression}}}
        response = http.post("/api/V3/Projection/GetProjectionByCriteria", json=body, headers=headers)
        response.raise_for_status()
        rows: list[dict[str, Any]] = response.json()
        yield rows
        if last:
            return
        rate = len(rows) / window.total_seconds()
        window = timedelta(seconds=page_size / rate) if rows else window * 4
        window = min(max(window, timedelta(seconds=1)), timedelta(days=30))
        lower = upper


def raw_pass(
    server: PortalProcess, azurite: Azurite, table_name: str, page_size: int
) -> tuple[int, int, float]:
    """(rows, requests, seconds) of plain paging with the rows written as the engine writes."""
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    table = service.create_table_if_not_exists(table_name)
    requests = 0
    started = time.perf_counter()

    def pages() -> Iterator[list[Entity]]:
        nonlocal requests
        with httpx.Client(base_url=server.url, verify=loopback_tls().client_context(), timeout=60) as http:
            body = {
                "UserName": portal.DEFAULT_USERNAME,
                "Password": portal.DEFAULT_PASSWORD,
                "LanguageCode": "ENU",
            }
            token = http.post("/api/V3/Authorization/GetToken", json=body).json()
            for rows in raw_windows(http, token, page_size):
                requests += 1
                yield [raw_entity("raw", row) for row in rows]

    try:
        written = fetch_and_write(table, pages)
    except RawFetchError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        table.close()
        service.close()
    return written, requests, time.perf_counter() - started


# -- ours: the app's sync engine -------------------------------------------------------------------


def add_connection(stack: LoopbackStack, name: str, server: PortalProcess) -> None:
    code, output = stack.cli(
        "connections",
        "add",
        name,
        "--type",
        "scsm",
        "--url",
        server.url,
        "--user",
        portal.DEFAULT_USERNAME,
        "--sync",
        "incidents",
        "--scope-days",
        str(SCOPE_DAYS),
        "--secrets-stdin",
        stdin=f"{portal.DEFAULT_PASSWORD}\n",
    )
    if code != 0:
        raise BenchError(f"connections add {name} failed ({code}): {output}")


def drop_table(azurite: Azurite, name: str) -> None:
    with TableServiceClient.from_connection_string(azurite.connection_string) as service:
        service.delete_table(name)


def measure(stack: LoopbackStack, azurite: Azurite, server: PortalProcess, cpu: Cpu) -> float:
    expected = server.count()
    raw_rates: list[float] = []
    our_rates: list[float] = []
    for n in range(1, ROUNDS + 1):
        with stack.app(**NO_LOGS) as container:
            page_size = container.settings.sync_page_size
        raw_table = f"rawscsm{n}"
        before = cpu.sample()
        rows, requests, seconds = raw_pass(server, azurite, raw_table, page_size)
        if rows != expected:
            raise BenchError(f"raw paging read {rows} rows, the portal holds {expected}")
        raw_rates.append(rows / seconds)
        log(
            f"round {n} raw:  {rows:,} rows, {requests} queries in {seconds:.2f}s "
            f"({rows / seconds:,.0f} rows/s); {cpu.describe(before)}"
        )
        drop_table(azurite, raw_table)

        prefix, name = f"scsmround{n}", f"bench-scsm-{n}"
        with stack.app(TABLE_PREFIX=prefix, **NO_LOGS):
            add_connection(stack, name, server)
            engine = get_container().sync_engine
            before = cpu.sample()
            started = time.perf_counter()
            [result] = engine.run(name, [WorkItemType.INCIDENT], trigger="bench")
            seconds = time.perf_counter() - started
            described = cpu.describe(before)
        if result.outcome is not SyncOutcome.SUCCEEDED:
            raise BenchError(f"round {n}: the sync ended {result.outcome.value}: {result.error}")
        if result.synced != expected or result.rejected:
            raise BenchError(f"round {n}: synced {result.synced} (rejected {result.rejected}) of {expected}")
        our_rates.append(result.synced / seconds)
        log(
            f"round {n} sync: {result.synced:,} rows, {result.pages} pages in {seconds:.2f}s "
            f"({result.synced / seconds:,.0f} rows/s); {described}"
        )
        drop_table(azurite, f"{prefix}WorkItems")
    ratio = statistics.median(our_rates) / statistics.median(raw_rates)
    paired = ", ".join(f"{ours / raw:.3f}" for ours, raw in zip(our_rates, raw_rates, strict=True))
    log(
        f"median rows/s: raw {statistics.median(raw_rates):,.0f}, sync {statistics.median(our_rates):,.0f}; "
        f"ratio {ratio:.3f} (round by round: {paired})"
    )
    return ratio


def main() -> int:
    netguard.watch()
    loopback_tls()  # made before the portal process starts, which shares it
    with contextlib.ExitStack() as things:
        server = PortalProcess(ROWS)
        things.callback(server.stop)
        server.start()
        azurite = Azurite().start()
        things.callback(azurite.stop)
        stack = things.enter_context(LoopbackStack(azurite=azurite))
        log(f"portal: {server.count():,} incidents at {server.url}; Azurite at {azurite.table_endpoint}")
        ratio = measure(stack, azurite, server, Cpu(server.pid, azurite.pid))
        if netguard.foreign:
            raise BenchError(f"non-loopback network access: {netguard.foreign[:5]}")
    print(f"products.sync_ratio_to_raw_scsm: {ratio:.3f}")
    if ratio < TARGET:
        log(f"MISSED: products.sync_ratio_to_raw_scsm {ratio:.3f} is under the target {TARGET}")
        return 1
    return 0


def run() -> int:
    return run_bench(main, (BenchError,))


if __name__ == "__main__":
    sys.exit(run())
