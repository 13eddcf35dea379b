"""VM Insights source throughput against the raw queries, side by side in one run.

1,000 servers x 40 connections seeded in the loopback query API. "raw" is the same batch queries
through a plain ``LogsQueryClient`` with the rows read into dicts; "source" is
``VmInsightsSource.fetch`` (the same queries plus the rows -> graph mapping). Prints
``maps.sources_fetch_ratio_to_raw`` (raw time / source time) and the medians. No target of its
own: the issue's target (``maps.import_ratio_to_raw`` >= 0.8) is for the whole import, table writes
included; this figure says how much of that budget the source's mapping takes.
"""

from __future__ import annotations

import statistics
import sys
import time
from datetime import UTC, datetime

from azure.identity import ClientSecretCredential
from azure.monitor.query import LogsQueryClient

from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.mapsources.logquery import LogQueryRunner
from shared_code.mapsources.vminsights import INVENTORY_LOOKBACK, VmInsightsSource, map_query
from tests.loopback import netguard
from tests.loopback.entra import EntraLoopback
from tests.loopback.loganalytics import LogAnalyticsLoopback, seed_vminsights
from tests.loopback.tls import loopback_tls

SERVERS = 1000
CONNECTIONS = 40
ROUNDS = 3
WORKSPACE = "0b0b0b0b-0000-4000-8000-00000000b0b0"
RESOURCE = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg/providers/"
    "Microsoft.OperationalInsights/workspaces/bench-ws"
)


def main() -> int:
    netguard.watch()
    now = datetime.now(UTC)
    ca = loopback_tls().ca_bundle_path
    with EntraLoopback() as entra, LogAnalyticsLoopback(entra) as la:
        la.add_workspace(WORKSPACE)
        seed_vminsights(la, WORKSPACE, servers=SERVERS, connections=CONNECTIONS, now=now)
        credential = ClientSecretCredential(
            entra.tenant_id,
            entra.client_id,
            entra.client_secret,
            authority=entra.url,
            disable_instance_discovery=True,
            connection_verify=ca,
        )
        definition = MapSourceDefinition.parse(
            {
                "name": "bench",
                "kind": "vminsights",
                "workspaces": [{"resource_id": RESOURCE, "customer_id": WORKSPACE}],
                "group": {
                    "kind": "subscription",
                    "scope": "/subscriptions/00000000-0000-4000-8000-000000000001",
                },
            }
        )
        source = VmInsightsSource(
            definition, LogQueryRunner(credential, endpoint=la.url, connection_verify=ca)
        )
        raw_client = LogsQueryClient(
            credential, endpoint=la.url, audience="https://api.loganalytics.io", connection_verify=ca
        )
        servers = source.servers()
        window = definition.window_ending(now)
        batches = [servers[i : i + source.batch_size] for i in range(0, len(servers), source.batch_size)]

        def run_source() -> float:
            start = time.perf_counter()
            results = list(source.fetch(servers, window))
            elapsed = time.perf_counter() - start
            assert len(results) == SERVERS
            assert all(r.ok for r in results)
            return elapsed

        def run_raw() -> float:
            start = time.perf_counter()
            rows = 0
            for batch in batches:
                result = raw_client.query_workspace(
                    WORKSPACE,
                    map_query([s.machine_id for s in batch], window),
                    timespan=(window.start - INVENTORY_LOOKBACK, window.end),
                    server_timeout=120,
                )
                table = result.tables[0]  # type: ignore[union-attr]
                columns = list(table.columns)
                rows += len([dict(zip(columns, row, strict=False)) for row in table.rows])
            assert rows > SERVERS * CONNECTIONS
            return time.perf_counter() - start

        run_source()
        run_raw()  # warm both
        source_times, raw_times = [], []
        for _ in range(ROUNDS):
            source_times.append(run_source())
            raw_times.append(run_raw())
        source.close()
        raw_client.close()
        credential.close()
    source_median, raw_median = statistics.median(source_times), statistics.median(raw_times)
    ratio = raw_median / source_median
    print(f"maps.sources_fetch_seconds: {source_median:.2f}")
    print(f"maps.sources_raw_query_seconds: {raw_median:.2f}")
    print(f"maps.sources_fetch_ratio_to_raw: {ratio:.2f}")
    if netguard.foreign:
        print(f"non-loopback network access: {netguard.foreign[:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
