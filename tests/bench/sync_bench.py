"""Work-item sync benchmark: the real sync against plain paging, incremental runs, peak memory.

    .venv/bin/python -m tests.bench.sync_bench        (``make bench`` runs it with the others)

What runs where (every address is 127.0.0.1):

* the loopback ServiceNow in its own process (``python -m tests.loopback.servicenow --seed ...``),
  so its CPU is not in this process: 100,000 incidents for the throughput and incremental figures,
  and a second one with 10,000 for the small memory figure. Their ``sys_updated_on`` spread over
  119.9 days: the connection's 120-day scope minus a margin, so no row ages out of the scope while
  the benchmark runs. They share this process's throwaway CA (``LOOPBACK_TLS_DIR``): HTTPS, as
  ServiceNow is;
* Azurite (``tests/loopback/azurite.py``, in memory) and the loopback Entra ID and Key Vault of
  ``LoopbackStack`` in this process; connections are added with the operator's CLI
  (``connections add``), secrets going to the loopback Key Vault;
* the product as the app builds it: the app container's ``sync_engine`` (``build_sync_engine``:
  the ServiceNow connector from the registry with OAuth, the ``SyncEngine`` with its page prefetch,
  the ``TableSink`` over the WorkItems table, SyncState leases and watermarks, Runs, SyncErrors,
  backward sync). Log Analytics is not configured (``LOGS_INGESTION_*`` empty), so the table is
  the one sink.

Figures (stdout, ``name: value``, with ``sync.speed_index`` and ``sync.load_avg``; progress and
detail on stderr; a missed target is said and the process exits 1):

``sync.initial_ratio_to_raw``
    rows/s of the initial sync of all rows over rows/s of a fair baseline: raw paging PLUS plain
    batched upserts of the same rows (each field's value, 8 partitions as the WorkItems table, the
    SDK's ``submit_transaction``, 100 rows a transaction, partitions in parallel) into a table of
    the same Azurite. Median over median of ``SYNC_BENCH_ROUNDS`` (default 3) full runs of each,
    alternated so the machine's noise hits both. *Raw* paging is an ``httpx.Client`` (same TLS, one
    OAuth token) sending exactly the connector's keyset queries (the drain of the cursor's second,
    then ``sys_updated_on>T``, same ``sysparm_*``, page size ``SYNC_PAGE_SIZE``) and parsing each
    answer's JSON. *Ours* is ``sync_engine.run`` of a new connection: paging, normalising every row
    to a ``WorkItem``, batched upserts, a watermark commit per page, the lease, the Runs record,
    into a fresh table prefix. Log Analytics is off for both (no upload on either side). Target >= 0.9.
``sync.null_sink_ratio_to_raw``
    the same engine with a sink that stores nothing (``NullSink``) against raw paging alone, same
    rounds: the engine's own cost. Target >= 0.85. The engine against raw paging alone (the old,
    unfair figure) goes to stderr. CPU seconds of this process, the ServiceNow process and Azurite
    during each run go to stderr, to show where the time goes.
``sync.cpu_us_per_row``
    CPU microseconds (``time.process_time``) per synced row of the child process that runs the
    big initial sync (below): the engine's process, nothing else in it. Target <= 120.
``sync.incremental_s``
    median of 3 incremental runs of the connection of the last throughput round (its WorkItems
    table holds the 100,000 rows), each after 1,000 random rows were touched (``/__loopback/touch``:
    state moved on, a work note; ``sys_updated_on`` now). These runs use ``SYNC_OVERLAP_SECONDS=2``
    and, before each touch, one untimed run after touching a single row moves the watermark on (as
    other activity does between timer runs); with the default 120 s overlap a run started seconds
    after the previous one would read the previous 1,000 rows again. Each timed run reads the 1,000
    rows plus that one row.
``sync.peak_rss_mb_10k`` / ``sync.peak_rss_mb_100k``
    peak RSS (``VmHWM``) of a fresh child process (``--child``: settings from its environment,
    the app's container, nothing else) running a full initial sync of 10,000 / 100,000 rows, each
    with its own connection and table prefix (the 10,000 rows from their own ServiceNow process,
    the 100,000 from the first one). Flat memory means these stay close; their ratio goes to
    stderr. Not ``ru_maxrss``, which a child inherits from its parent across fork/exec.

The benchmark exits 1 (printing no figures) when any sync does not end ``succeeded``, when an
initial sync's count differs from the rows the ServiceNow process holds, when an incremental run
reads fewer than the touched rows, or when anything connects elsewhere than loopback. Everything
it starts (both ServiceNow processes, Azurite, the loopback servers, child processes) is stopped
on every exit path, SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from azure.data.tables import TableServiceClient, TransactionOperation, UpdateMode

from shared_code.bootstrap import Container, get_container, tune_interpreter
from shared_code.domain.workitem import WorkItem, WorkItemType
from shared_code.itsm.servicenow.mapping import SYNC_FIELDS, TABLES
from shared_code.monitor.alerts_management import AlertsManagementClient
from shared_code.state import runs as runs_table
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import syncstate as syncstate_table
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.tables import bucket_of
from shared_code.workitems.backsync import BackSync
from shared_code.workitems.engine import SyncEngine, SyncOutcome, SyncResult
from shared_code.workitems.sinks import SyncErrorLog
from tests.bench.loopbackproc import LoopbackProcess
from tests.bench.machine import Targets, log, peak_rss_mb, print_machine, run_bench
from tests.loopback import netguard
from tests.loopback import servicenow as snow
from tests.loopback.azurite import Azurite
from tests.loopback.stack import FOREIGN_IDENTITY_VARIABLES, LoopbackStack
from tests.loopback.tls import loopback_tls

ROOT = Path(__file__).resolve().parents[2]
ROWS = int(os.environ.get("SYNC_BENCH_ROWS", "100000"))
SMALL_ROWS = 10_000
ROUNDS = int(os.environ.get("SYNC_BENCH_ROUNDS", "3"))
SPAN_DAYS = 119.9
SCOPE_DAYS = 120
TOUCHED = 1000
INCREMENTAL_RUNS = 3
INCREMENTAL_OVERLAP_SECONDS = 2
ITEM_TYPE = WorkItemType.INCIDENT
TS = "%Y-%m-%d %H:%M:%S"
# the app's settings for every run here: no Log Analytics, so the WorkItems table is the only sink
NO_LOGS = {"LOGS_INGESTION_ENDPOINT": "", "LOGS_INGESTION_RULE_ID": ""}
INITIAL_RATIO_TARGET = 0.9
NULL_SINK_RATIO_TARGET = 0.85
CPU_US_PER_ROW_TARGET = 120.0


class BenchError(RuntimeError):
    """A run did not do what the benchmark needs (failed, or synced the wrong number of rows)."""


def check_network() -> None:
    if netguard.foreign:
        raise BenchError(f"non-loopback network access: {netguard.foreign[:5]}")


# -- CPU accounting (Linux /proc; zero elsewhere) -----------------------------------------------------


def group_cpu_seconds(group: int | None) -> float:
    """User + system CPU seconds of every live process in process group ``group``."""
    if group is None:
        return 0.0
    ticks = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group:  # pgrp
                ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    here: float
    servicenow: float
    azurite: float


class CpuMeter:
    def __init__(self, servicenow_group: int | None, azurite_group: int | None) -> None:
        self._groups = (servicenow_group, azurite_group)

    def sample(self) -> CpuSample:
        return CpuSample(
            time.process_time(), group_cpu_seconds(self._groups[0]), group_cpu_seconds(self._groups[1])
        )

    def describe(self, before: CpuSample) -> str:
        after = self.sample()
        here, servicenow = after.here - before.here, after.servicenow - before.servicenow
        return (
            f"CPU s: this process {here:.1f}, ServiceNow {servicenow:.1f}, "
            f"Azurite {after.azurite - before.azurite:.1f}"
        )


# -- the loopback ServiceNow in its own process ------------------------------------------------------


class ServiceNowProcess(LoopbackProcess):
    """``python -m tests.loopback.servicenow --seed incident=N`` (HTTPS with this process's CA)."""

    def __init__(self, rows: int) -> None:
        super().__init__(
            "tests.loopback.servicenow",
            ["--seed", f"{TABLES[ITEM_TYPE]}={rows}", "--span-days", str(SPAN_DAYS)],
            name=f"ServiceNow ({rows} rows)",
            error=BenchError,
        )
        self.rows = rows

    def start(self) -> ServiceNowProcess:
        self.launch()
        return self

    def wait_ready(self, timeout: float = 180.0) -> str:
        self.ready(2, timeout)
        return self.url

    def control(self, action: str, **args: object) -> dict[str, Any]:
        """A ``/__loopback/`` control call (no auth): ``stats`` is a GET, the others POST."""
        with httpx.Client(base_url=self.url, verify=loopback_tls().client_context(), timeout=120) as http:
            if action == "stats":
                response = http.get("/__loopback/stats")
            else:
                response = http.post(f"/__loopback/{action}", content=json.dumps(args))
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def count(self) -> int:
        return int(self.control("stats")["tables"][TABLES[ITEM_TYPE]])


# -- raw: the connector's keyset queries with plain httpx, nothing stored -----------------------------


def plain_entities(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows as flat table entities (each field's value), by partition as the WorkItems table
    spreads them (8 buckets of the sys_id)."""
    partitions: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        source_id = row["sys_id"]["value"]
        entity = {"PartitionKey": f"raw-{bucket_of(source_id, 8):02d}", "RowKey": source_id}
        for name, cell in row.items():
            entity[name] = cell["value"] if isinstance(cell, dict) else cell
        partitions.setdefault(entity["PartitionKey"], []).append(entity)
    return partitions


class PlainWriter:
    """Plain batched upserts with the SDK's ``submit_transaction`` (100 rows a transaction),
    partitions in parallel as the WorkItems repository writes them."""

    def __init__(self, azurite: Azurite, table: str) -> None:
        self._service = TableServiceClient.from_connection_string(azurite.connection_string)
        self._service.create_table_if_not_exists(table)
        self._table = self._service.get_table_client(table)
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="raw-writes")

    def write(self, rows: list[dict[str, Any]]) -> None:
        chunks = [
            entities[start : start + 100]
            for entities in plain_entities(rows).values()
            for start in range(0, len(entities), 100)
        ]
        operations = [
            [(TransactionOperation.UPSERT, e, {"mode": UpdateMode.REPLACE}) for e in chunk]
            for chunk in chunks
        ]
        for future in [self._pool.submit(self._table.submit_transaction, ops) for ops in operations]:
            future.result()

    def close(self) -> None:
        self._pool.shutdown()
        self._table.close()
        self._service.close()


def raw_pass(
    server: ServiceNowProcess, page_size: int, writer: PlainWriter | None = None
) -> tuple[int, int, float]:
    """Page through every row of the scope as ``fetch_changes`` does, writing each page with
    ``writer`` when there is one; (rows, requests, seconds)."""
    fields = ",".join(SYNC_FIELDS[ITEM_TYPE])
    path = f"/api/now/table/{TABLES[ITEM_TYPE]}"
    rows_seen = requests = 0
    started = time.perf_counter()
    with httpx.Client(base_url=server.url, verify=loopback_tls().client_context(), timeout=60) as http:
        token = http.post(
            "/oauth_token.do",
            data={
                "grant_type": "password",
                "client_id": snow.DEFAULT_CLIENT_ID,
                "client_secret": snow.DEFAULT_CLIENT_SECRET,
                "username": snow.DEFAULT_USERNAME,
                "password": snow.DEFAULT_PASSWORD,
            },
        ).json()["access_token"]
        headers = {"Accept": "application/json", "Authorization": f"Bearer {token}"}

        def page(query: str, limit: int) -> list[dict[str, Any]]:
            nonlocal requests
            requests += 1
            params = {
                "sysparm_limit": str(limit),
                "sysparm_fields": fields,
                "sysparm_exclude_reference_link": "true",
                "sysparm_no_count": "true",
                "sysparm_display_value": "all",
                "sysparm_query": query,
            }
            response = http.get(path, params=params, headers=headers)
            response.raise_for_status()
            result: list[dict[str, Any]] = response.json()["result"]
            return result

        at = (datetime.now(UTC) - timedelta(days=SCOPE_DAYS)).strftime(TS)
        last_id = ""
        while True:
            rows: list[dict[str, Any]] = []
            if last_id:
                rows = page(f"sys_updated_on={at}^sys_id>{last_id}^ORDERBYsys_id", page_size)
            more: list[dict[str, Any]] = []
            room = page_size - len(rows)
            if room > 0:
                more = page(f"sys_updated_on>{at}^ORDERBYsys_updated_on^ORDERBYsys_id", room)
            rows += more
            rows_seen += len(rows)
            if writer is not None and rows:
                writer.write(rows)
            if rows:
                at, last_id = rows[-1]["sys_updated_on"]["value"], rows[-1]["sys_id"]["value"]
            if room > 0 and len(more) < room:
                return rows_seen, requests, time.perf_counter() - started


# -- ours: the app's sync engine ----------------------------------------------------------------------


def add_connection(stack: LoopbackStack, name: str, server: ServiceNowProcess) -> None:
    """``connections add`` (OAuth, secrets through stdin to the loopback Key Vault), inside ``app()``."""
    code, output = stack.cli(
        "connections",
        "add",
        name,
        "--type",
        "servicenow",
        "--url",
        server.url,
        "--private-instance",
        "--user",
        snow.DEFAULT_USERNAME,
        "--client-id",
        snow.DEFAULT_CLIENT_ID,
        "--secrets-stdin",
        "--sync",
        "incidents",
        "--scope-days",
        str(SCOPE_DAYS),
        stdin=f"{snow.DEFAULT_CLIENT_SECRET}\n{snow.DEFAULT_PASSWORD}\n",
    )
    if code != 0:
        raise BenchError(f"connections add {name} failed ({code}): {output}")


def checked(result: SyncResult, what: str, *, expected: int | None = None, at_least: int = 0) -> SyncResult:
    if result.outcome is not SyncOutcome.SUCCEEDED:
        raise BenchError(f"{what}: the sync ended {result.outcome.value}: {result.error}")
    if expected is not None and result.synced != expected:
        raise BenchError(f"{what}: synced {result.synced} rows, the ServiceNow process holds {expected}")
    if result.synced < at_least:
        raise BenchError(f"{what}: synced {result.synced} rows, fewer than the {at_least} touched")
    if result.rejected:
        raise BenchError(f"{what}: {result.rejected} rows rejected")
    return result


def run_sync(stack: LoopbackStack, connection: str) -> tuple[SyncResult, float]:
    """One ``sync_engine.run`` of the app container that ``stack.app()`` made; (result, seconds)."""
    engine = get_container().sync_engine
    started = time.perf_counter()
    results = engine.run(connection, [ITEM_TYPE], trigger="bench")
    seconds = time.perf_counter() - started
    if len(results) != 1:
        raise BenchError(f"sync of {connection}: {len(results)} results, expected one")
    return results[0], seconds


def drop_table(azurite: Azurite, table: str) -> None:
    """Free Azurite's memory of a finished round (untimed)."""
    with TableServiceClient.from_connection_string(azurite.connection_string) as service:
        service.delete_table(table)


# -- peak memory: a fresh process per size ------------------------------------------------------------


def child(connection: str) -> int:
    """``--child``: the app (settings from the environment) syncs ``connection``; prints one JSON line."""
    netguard.watch()
    container = get_container()
    try:
        engine = container.sync_engine
        started, cpu_started = time.perf_counter(), time.process_time()
        results = engine.run(connection, [ITEM_TYPE], trigger="bench")
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        container.close()
    print(
        json.dumps(
            {
                "outcomes": [r.outcome.value for r in results],
                "synced": sum(r.synced for r in results),
                "errors": [r.error for r in results if r.error],
                "seconds": seconds,
                "cpu_s": cpu,
                "peak_rss_mb": peak_rss_mb(),
                "foreign": [str(a) for a in netguard.foreign[:5]],
            }
        ),
        flush=True,
    )
    return 0


def child_environment(stack: LoopbackStack, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_IDENTITY_VARIABLES}
    env.update(stack.app_environment(TABLE_PREFIX=prefix, **NO_LOGS))
    return env


def peak_rss(
    stack: LoopbackStack, server: ServiceNowProcess, children: list[subprocess.Popen[str]]
) -> tuple[float, float]:
    """A fresh child process syncs all of ``server``'s rows into its own table prefix; its peak RSS
    and its CPU microseconds per synced row (the engine's process only)."""
    prefix = f"rss{server.rows // 1000}k"
    name = f"bench-rss-{server.rows}"
    with stack.app(TABLE_PREFIX=prefix, **NO_LOGS):
        add_connection(stack, name, server)
    expected = server.count()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.sync_bench", "--child", name],
        cwd=ROOT,
        env=child_environment(stack, prefix),
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
        raise BenchError(f"the {server.rows}-row child did not finish in 15 minutes") from None
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise BenchError(f"the {server.rows}-row child failed ({proc.returncode}): {err.strip()[-2000:]}")
    report: dict[str, Any] = json.loads(lines[-1])
    if report["foreign"]:
        raise BenchError(f"the {server.rows}-row child reached beyond loopback: {report['foreign']}")
    if report["outcomes"] != [SyncOutcome.SUCCEEDED.value]:
        raise BenchError(f"the {server.rows}-row child's sync ended {report['outcomes']}: {report['errors']}")
    if report["synced"] != expected:
        raise BenchError(f"the {server.rows}-row child synced {report['synced']} rows of {expected}")
    log(
        f"child {server.rows:,} rows: synced {report['synced']:,} in {report['seconds']:.1f}s "
        f"({report['synced'] / report['seconds']:,.0f} rows/s), CPU {report['cpu_s']:.1f}s, "
        f"peak RSS {report['peak_rss_mb']:.0f} MB"
    )
    return float(report["peak_rss_mb"]), float(report["cpu_s"]) * 1e6 / max(1, report["synced"])


# -- the benchmark ------------------------------------------------------------------------------------


class NullSink:
    """A sink that stores nothing: the engine's own cost (paging, parsing, normalising, watermark,
    lease, Runs record) against raw paging alone."""

    name = "null"

    def write(self, items: Sequence[WorkItem]) -> None:
        return None


def null_sink_engine(container: Container) -> SyncEngine:
    """``build_sync_engine``'s engine with the null sink as its only sink."""
    tables = container.tables
    settings = container.settings
    return SyncEngine(
        connections=container.connections,
        connector_for=container.connector_for,
        sync_state=SyncStateRepository(tables.table(syncstate_table.TABLE)),
        sinks=[NullSink()],
        errors=SyncErrorLog(SyncErrorRepository(tables.table(syncerrors_table.TABLE)), None, ""),
        runs=RunRepository(tables.table(runs_table.TABLE)),
        clock=container.clock,
        page_size=settings.sync_page_size,
        overlap=timedelta(seconds=settings.sync_overlap_seconds),
        backsync=BackSync(
            container.correlations,
            AlertsManagementClient(
                container.credential, settings.arm_endpoint, ca_bundle=settings.tls_ca_bundle
            ),
            container.clock,
        ),
    )


@dataclass
class Rates:
    raw: list[float]
    raw_writes: list[float]
    ours: list[float]
    null_sink: list[float]

    @staticmethod
    def ratio(ours: list[float], baseline: list[float]) -> float:
        return statistics.median(ours) / statistics.median(baseline)


def throughput(
    stack: LoopbackStack, azurite: Azurite, server: ServiceNowProcess, meter: CpuMeter
) -> tuple[Rates, str]:
    """Alternated full runs: raw paging, raw paging + plain writes, the engine, the engine with a
    null sink; (rows/s of each, prefix of the last engine round)."""
    expected = server.count()
    rates = Rates([], [], [], [])
    prefix = ""
    for n in range(1, ROUNDS + 1):
        with stack.app(**NO_LOGS) as container:
            page_size = container.settings.sync_page_size
        before = meter.sample()
        rows, requests, seconds = raw_pass(server, page_size)
        if rows != expected:
            raise BenchError(f"raw paging read {rows} rows, the ServiceNow process holds {expected}")
        rates.raw.append(rows / seconds)
        log(
            f"round {n} raw:  {rows:,} rows, {requests} requests in {seconds:.1f}s "
            f"({rows / seconds:,.0f} rows/s); {meter.describe(before)}"
        )

        writer = PlainWriter(azurite, f"raw{n}Plain")
        try:
            before = meter.sample()
            rows, requests, seconds = raw_pass(server, page_size, writer)
        finally:
            writer.close()
        drop_table(azurite, f"raw{n}Plain")
        if rows != expected:
            raise BenchError(f"raw paging + writes read {rows} rows, the ServiceNow process holds {expected}")
        rates.raw_writes.append(rows / seconds)
        log(
            f"round {n} raw + writes: {rows:,} rows in {seconds:.1f}s "
            f"({rows / seconds:,.0f} rows/s); {meter.describe(before)}"
        )

        if prefix:
            drop_table(azurite, f"{prefix}WorkItems")
        prefix, name = f"round{n}", f"bench-round{n}"
        with stack.app(TABLE_PREFIX=prefix, **NO_LOGS):
            add_connection(stack, name, server)
            requests_before = int(server.control("stats")["request_count"])
            before = meter.sample()
            result, seconds = run_sync(stack, name)
            cpu = meter.describe(before)
            requests = int(server.control("stats")["request_count"]) - requests_before - 1
        checked(result, f"initial sync, round {n}", expected=expected)
        rates.ours.append(result.synced / seconds)
        log(
            f"round {n} sync: {result.synced:,} rows, {result.pages} pages, {requests} requests in "
            f"{seconds:.1f}s ({result.synced / seconds:,.0f} rows/s); {cpu}"
        )

        null_prefix = f"null{n}"
        with stack.app(TABLE_PREFIX=null_prefix, **NO_LOGS) as container:
            add_connection(stack, f"bench-null{n}", server)
            engine = null_sink_engine(container)
            before = meter.sample()
            started = time.perf_counter()
            results = engine.run(f"bench-null{n}", [ITEM_TYPE], trigger="bench")
            seconds = time.perf_counter() - started
            cpu = meter.describe(before)
        checked(results[0], f"null-sink sync, round {n}", expected=expected)
        rates.null_sink.append(results[0].synced / seconds)
        log(
            f"round {n} null sink: {results[0].synced:,} rows in {seconds:.1f}s "
            f"({results[0].synced / seconds:,.0f} rows/s); {cpu}"
        )
    for label, ours, baseline in (
        ("sync / raw + writes", rates.ours, rates.raw_writes),
        ("null sink / raw", rates.null_sink, rates.raw),
    ):
        paired = ", ".join(f"{o / b:.3f}" for o, b in zip(ours, baseline, strict=True))
        log(f"{label}: ratio of medians {Rates.ratio(ours, baseline):.3f} (round by round: {paired})")
    log(f"(engine / raw paging alone, nothing stored by raw: {Rates.ratio(rates.ours, rates.raw):.3f})")
    return rates, prefix


def incremental(stack: LoopbackStack, server: ServiceNowProcess, prefix: str, meter: CpuMeter) -> float:
    """Median seconds of incremental runs, each after ``TOUCHED`` rows were touched."""
    name = f"bench-{prefix}"
    table = TABLES[ITEM_TYPE]
    times: list[float] = []
    with stack.app(TABLE_PREFIX=prefix, SYNC_OVERLAP_SECONDS=str(INCREMENTAL_OVERLAP_SECONDS), **NO_LOGS):
        for n in range(1, INCREMENTAL_RUNS + 1):
            # the previous touches must be older than the overlap behind the next watermark
            time.sleep(INCREMENTAL_OVERLAP_SECONDS + 1.5)
            server.control("touch", table=table, count=1)
            checked(run_sync(stack, name)[0], f"incremental run {n}, moving the watermark", at_least=1)
            server.control("touch", table=table, count=TOUCHED)
            before = meter.sample()
            result, seconds = run_sync(stack, name)
            checked(result, f"incremental run {n}", at_least=TOUCHED)
            times.append(seconds)
            log(
                f"incremental {n}: {result.synced:,} rows in {result.pages} pages, {seconds:.2f}s; "
                f"{meter.describe(before)}"
            )
    return statistics.median(times)


def main() -> int:
    netguard.watch()
    loopback_tls()  # made before the ServiceNow processes start, which share it
    children: list[subprocess.Popen[str]] = []
    with contextlib.ExitStack() as stack_of_things:

        def stop_children() -> None:
            for proc in children:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        stack_of_things.callback(stop_children)
        big = ServiceNowProcess(ROWS).start()
        stack_of_things.callback(big.stop)
        small = ServiceNowProcess(SMALL_ROWS).start()
        stack_of_things.callback(small.stop)
        azurite = Azurite().start()
        stack_of_things.callback(azurite.stop)
        stack = stack_of_things.enter_context(LoopbackStack(azurite=azurite))
        log(f"Azurite at {azurite.table_endpoint}; seeding the loopback ServiceNow processes")
        big.wait_ready()
        small.wait_ready()
        log(f"ServiceNow: {big.count():,} incidents at {big.url}, {small.count():,} at {small.url}")
        meter = CpuMeter(big.pid, azurite.pid)

        rates, last_prefix = throughput(stack, azurite, big, meter)
        seconds = incremental(stack, big, last_prefix, meter)
        drop_table(azurite, f"{last_prefix}WorkItems")
        rss_small, _ = peak_rss(stack, small, children)
        rss_big, cpu_per_row = peak_rss(stack, big, children)
        log(f"peak RSS big / 10k: {rss_big / rss_small:.3f}")
        check_network()
    targets = Targets()
    initial = Rates.ratio(rates.ours, rates.raw_writes)
    null_sink = Rates.ratio(rates.null_sink, rates.raw)
    print(f"sync.initial_ratio_to_raw: {initial:.3f}")
    print(f"sync.null_sink_ratio_to_raw: {null_sink:.3f}")
    print(f"sync.cpu_us_per_row: {cpu_per_row:.1f}")
    print(f"sync.incremental_s: {seconds:.2f}")
    print(f"sync.peak_rss_mb_10k: {rss_small:.1f}")
    print(f"sync.peak_rss_mb_100k: {rss_big:.1f}")
    print_machine("sync")
    targets.check("sync.initial_ratio_to_raw", initial, ">=", INITIAL_RATIO_TARGET)
    targets.check("sync.null_sink_ratio_to_raw", null_sink, ">=", NULL_SINK_RATIO_TARGET)
    targets.check("sync.cpu_us_per_row", cpu_per_row, "<=", CPU_US_PER_ROW_TARGET)
    return targets.exit_code()


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sync_bench")
    parser.add_argument("--child", metavar="CONNECTION", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tune_interpreter()  # the app's process, as its entry points do (function_app.py, the CLI)
        return child(args.child)
    return run_bench(main, (BenchError,))


if __name__ == "__main__":
    sys.exit(run())
