"""Work-item sync benchmark: throughput against plain keyset paging, incremental latency, memory.

    .venv/bin/python -m tests.bench.sync_bench

Prints ``sync.initial_ratio_to_raw`` (our rows/s over plain httpx keyset paging of the same feed,
runs alternated so noise hits both), ``sync.incremental_s`` (median of a few incremental runs after
touching 1,000 rows) and ``sync.peak_rss_mb_10k`` / ``sync.peak_rss_mb_100k`` (peak RSS of a fresh
child process syncing that many rows: flat memory means these stay close).

TEMPORARY: until the loopback ServiceNow (``tests/loopback/servicenow.py``, ``--seed`` mode) and
the ServiceNow connector land, the feed is a small keyset server in a subprocess (this module's
``--serve`` mode, ServiceNow-like JSON rows) read by a minimal httpx connector; swap both in then.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from azure.data.tables import TableServiceClient

from shared_code.connections import Connection
from shared_code.errors import NotFoundError
from shared_code.itsm.base import SyncCursor, SyncPage
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.tables import TableStore
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.engine import SyncEngine, SyncOutcome
from shared_code.workitems.model import WorkItem, WorkItemType
from shared_code.workitems.sinks import SyncErrorLog, TableSink

ROOT = Path(__file__).resolve().parents[2]
PAGE = 1000
TS = "%Y-%m-%d %H:%M:%S"


# -- the feed server (subprocess) -----------------------------------------------------------------


class _Feed:
    def __init__(self, count: int, days: int) -> None:
        rng = random.Random(7)
        end = datetime.now(UTC).replace(microsecond=0)
        self.rows: dict[str, dict[str, str]] = {}
        for n in range(count):
            updated = end - timedelta(seconds=rng.randrange(days * 86400))
            sys_id = f"{rng.getrandbits(128):032x}"
            self.rows[sys_id] = {
                "sys_id": sys_id,
                "number": f"INC{n:07d}",
                "sys_updated_on": updated.strftime(TS),
                "state": rng.choice(["New", "In Progress", "On Hold", "Resolved", "Closed"]),
                "short_description": f"Disk space low on server-{n % 500:03d}",
                "description": "Free space on volume C: dropped below 10 percent. " * 6,
                "urgency": "2",
                "impact": "2",
                "priority": "3",
                "assigned_to": "Service Desk",
                "category": "Hardware",
                "sys_created_on": (updated - timedelta(hours=3)).strftime(TS),
            }
        self.lock = threading.Lock()
        self._reindex()

    def _reindex(self) -> None:
        self.keys = sorted((r["sys_updated_on"], r["sys_id"]) for r in self.rows.values())

    def page(self, after_ts: str, after_id: str, limit: int) -> bytes:
        with self.lock:
            start = bisect.bisect_right(self.keys, (after_ts, after_id))
            keys = self.keys[start : start + limit + 1]
            rows = [self.rows[k[1]] for k in keys[:limit]]
        return json.dumps({"result": rows, "more": len(keys) > limit}).encode()

    def touch(self, count: int) -> None:
        now = datetime.now(UTC).strftime(TS)
        with self.lock:
            for sys_id in random.sample(sorted(self.rows), count):
                self.rows[sys_id]["sys_updated_on"] = now
                self.rows[sys_id]["state"] = "In Progress"
            self._reindex()


def serve(count: int, days: int, port_file: str) -> None:
    feed = _Feed(count, days)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            self._send(
                feed.page(
                    query.get("after_ts", [""])[0], query.get("after_id", [""])[0], int(query["limit"][0])
                )
            )

        def do_POST(self) -> None:
            feed.touch(int(parse_qs(urlsplit(self.path).query)["count"][0]))
            self._send(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


@contextmanager
def feed_server(count: int, days: int = 119) -> Iterator[str]:
    port_file = Path(f"/tmp/sync-bench-{os.getpid()}-{count}.port")
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.bench.sync_bench",
            "--serve",
            str(count),
            "--days",
            str(days),
            "--port-file",
            str(port_file),
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the feed server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        port_file.unlink(missing_ok=True)


# -- the two clients ------------------------------------------------------------------------------


class HttpFeed:
    """A minimal connector's ``fetch_changes`` over the feed server (parses rows into WorkItems)."""

    def __init__(self, url: str, connection: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.connection = connection

    def fetch_changes(self, item_type: WorkItemType, cursor: SyncCursor, page_size: int) -> SyncPage:
        params: dict[str, str | int] = {
            "after_ts": cursor.updated_at.strftime(TS),
            "after_id": cursor.last_id,
            "limit": page_size,
        }
        data = self.http.get("/api/now/table/incident", params=params).json()
        items = [self._item(row) for row in data["result"]]
        last = data["result"][-1] if data["result"] else None
        next_cursor = (
            SyncCursor(updated_at=_ts(last["sys_updated_on"]), last_id=last["sys_id"]) if last else cursor
        )
        return SyncPage(items=items, next_cursor=next_cursor, is_last=not data["more"])

    def _item(self, row: dict[str, str]) -> WorkItem:
        return WorkItem(
            connection=self.connection,
            item_type=WorkItemType.INCIDENT,
            source_id=row["sys_id"],
            number=row["number"],
            updated_at=_ts(row["sys_updated_on"]),
            created_at=_ts(row["sys_created_on"]),
            state=row["state"],
            title=row["short_description"],
            description=row["description"],
            urgency=row["urgency"],
            impact=row["impact"],
            priority=row["priority"],
            assigned_to=row["assigned_to"],
            category=row["category"],
        )

    def close(self) -> None:
        self.http.close()


def _ts(text: str) -> datetime:
    return datetime.strptime(text, TS).replace(tzinfo=UTC)


def raw_pass(url: str) -> tuple[int, float]:
    """Plain keyset paging of the whole feed with httpx (the upper bound for our throughput)."""
    rows, after_ts, after_id = 0, "", ""
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        while True:
            params: dict[str, str | int] = {"after_ts": after_ts, "after_id": after_id, "limit": PAGE}
            data = http.get("/api/now/table/incident", params=params).json()
            rows += len(data["result"])
            if data["result"]:
                after_ts, after_id = data["result"][-1]["sys_updated_on"], data["result"][-1]["sys_id"]
            if not data["more"]:
                return rows, time.perf_counter() - started


class _Connections:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def get(self, name: str) -> Connection:
        if name != self.connection.name:
            raise NotFoundError(name)
        return self.connection

    def list(self) -> list[Connection]:
        return [self.connection]


def make_engine(
    store: TableStore, url: str, name: str, overlap: timedelta = timedelta(seconds=120)
) -> tuple[SyncEngine, HttpFeed]:
    connection = Connection.model_validate(
        {
            "name": name,
            "partner_type": "servicenow",
            "server_url": "https://bench.service-now.com",
            "client_id": "bench",
            "username": "bench",
            "sync_data": ["incidents"],
            "sync_scope_days": 120,
        }
    )
    feed = HttpFeed(url, name)
    engine = SyncEngine(
        connections=_Connections(connection),
        connector_for=lambda c: feed,  # type: ignore[arg-type,return-value]
        sync_state=SyncStateRepository(store.table("SyncState")),
        sinks=[TableSink(WorkItemRepository(store.table("WorkItems")))],
        errors=SyncErrorLog(SyncErrorRepository(store.table("SyncErrors"))),
        runs=RunRepository(store.table("Runs")),
        clock=lambda: datetime.now(UTC),
        page_size=PAGE,
        overlap=overlap,
    )
    return engine, feed


def our_pass(store: TableStore, url: str, name: str) -> tuple[int, float]:
    engine, feed = make_engine(store, url, name)
    started = time.perf_counter()
    [result] = engine.run()
    elapsed = time.perf_counter() - started
    feed.close()
    if result.outcome is not SyncOutcome.SUCCEEDED:
        raise RuntimeError(f"sync failed: {result.error}")
    return result.synced, elapsed


def child(url: str, azurite: str, name: str) -> None:
    """One fresh process syncing the whole feed; prints its rows and its own peak RSS."""
    store = TableStore(TableServiceClient.from_connection_string(azurite))
    rows, elapsed = our_pass(store, url, name)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "seconds": elapsed, "peak_rss_mb": peak_kb / 1024}))


# -- Azurite --------------------------------------------------------------------------------------


@contextmanager
def azurite() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [
            str(ROOT / "node_modules/.bin/azurite-table"),
            "--inMemoryPersistence",
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
            f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_child(url: str, conn_string: str, name: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.bench.sync_bench",
            "--child",
            url,
            "--azurite",
            conn_string,
            "--name",
            name,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    rounds = int(os.environ.get("SYNC_BENCH_ROUNDS", "2"))
    big = int(os.environ.get("SYNC_BENCH_ROWS", "100000"))
    with azurite() as conn_string, feed_server(big) as url, feed_server(10_000) as small_url:
        store = TableStore(TableServiceClient.from_connection_string(conn_string))
        raw_rates: list[float] = []
        our_rates: list[float] = []
        for n in range(rounds):
            rows, seconds = raw_pass(url)
            raw_rates.append(rows / seconds)
            print(f"  raw keyset paging: {rows} rows in {seconds:.1f}s ({rows / seconds:,.0f} rows/s)")
            rows, seconds = our_pass(store, url, f"bench{n}")
            our_rates.append(rows / seconds)
            print(f"  sync to Azurite:   {rows} rows in {seconds:.1f}s ({rows / seconds:,.0f} rows/s)")
        ratio = statistics.median(our_rates) / statistics.median(raw_rates)

        # The overlap re-reads the rows at the watermark, so a run right after a burst of 1,000 touches
        # would re-read that burst next time. Between measured runs, one untimed run after a single
        # touch moves the watermark on (as other activity does in the 15 minutes between timer runs).
        engine, feed = make_engine(store, url, "bench0", overlap=timedelta(seconds=2))
        engine.run()
        incremental: list[float] = []
        for _ in range(3):
            time.sleep(2.5)
            httpx.post(f"{url}/touch", params={"count": 1}, timeout=60)
            engine.run()
            time.sleep(2.5)
            httpx.post(f"{url}/touch", params={"count": 1000}, timeout=60)
            started = time.perf_counter()
            [result] = engine.run()
            incremental.append(time.perf_counter() - started)
            print(f"  incremental: {result.synced} rows in {incremental[-1]:.2f}s")
        feed.close()

        small = run_child(small_url, conn_string, "rss10k")
        large = run_child(url, conn_string, "rss100k")
        print(f"  child 10k:  {small['rows']} rows, peak RSS {small['peak_rss_mb']:.0f} MB")
        print(f"  child 100k: {large['rows']} rows, peak RSS {large['peak_rss_mb']:.0f} MB")
        store.close()
    print(f"sync.initial_ratio_to_raw: {ratio:.2f}")
    print(f"sync.incremental_s: {statistics.median(incremental):.2f}")
    print(f"sync.peak_rss_mb_10k: {small['peak_rss_mb']:.0f}")
    print(f"sync.peak_rss_mb_100k: {large['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=int)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--port-file")
    parser.add_argument("--child")
    parser.add_argument("--azurite")
    parser.add_argument("--name")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.days, args.port_file)
    elif args.child:
        child(args.child, args.azurite, args.name)
    else:
        main()
