"""Azurite's own latency, the floor under every table figure (moved here from the test suite,
where a speed assertion on a shared machine's emulator only made the suite flaky).

    .venv/bin/python -m tests.bench.azurite_bench

``azurite.create_entity_ms``: median of 30 single inserts; ``azurite.transaction_100_ms``: median
of 5 transactions of 100 upserts (the SDK's ``submit_transaction``). Targets: < 500 and < 2000 ms
(far above what an idle machine shows: they catch a broken emulator, not a slow one).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from typing import Any

from azure.data.tables import TableServiceClient

from tests.bench.machine import Targets, print_machine
from tests.loopback import netguard
from tests.loopback.azurite import Azurite

SINGLE_TARGET_MS = 500.0
BATCH_TARGET_MS = 2000.0


def main() -> int:
    netguard.watch()
    azurite = Azurite().start()
    try:
        service = TableServiceClient.from_connection_string(azurite.connection_string)
        table = service.create_table(f"lat{uuid.uuid4().hex[:10]}")
        single: list[float] = []
        for i in range(30):
            start = time.perf_counter()
            table.create_entity({"PartitionKey": "p", "RowKey": f"{i:04d}", "Payload": "x" * 200})
            single.append(time.perf_counter() - start)
        batches: list[float] = []
        for b in range(5):
            ops: list[Any] = [
                ("upsert", {"PartitionKey": f"b{b}", "RowKey": f"{i:03d}", "Payload": "x" * 200})
                for i in range(100)
            ]
            start = time.perf_counter()
            table.submit_transaction(ops)
            batches.append(time.perf_counter() - start)
        service.close()
    finally:
        azurite.stop()
    if netguard.foreign:
        print(f"non-loopback network access: {netguard.foreign[:3]}", file=sys.stderr)
        return 1
    single_ms, batch_ms = statistics.median(single) * 1000, statistics.median(batches) * 1000
    print(f"azurite.create_entity_ms: {single_ms:.2f}")
    print(f"azurite.transaction_100_ms: {batch_ms:.2f}")
    print_machine("azurite")
    targets = Targets()
    targets.check("azurite.create_entity_ms", single_ms, "<=", SINGLE_TARGET_MS)
    targets.check("azurite.transaction_100_ms", batch_ms, "<=", BATCH_TARGET_MS)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
