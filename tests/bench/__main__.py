"""``make bench``: every benchmark, each in its own process (so peak memory is its own).

Each prints one ``name: value`` line per figure on stdout; progress goes to stderr.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "tests.bench.azurite_bench",
    "tests.bench.alerts_bench",
    "tests.bench.sync_bench",
    "tests.bench.maps_render_bench",
    "tests.bench.maps_sources_bench",
    "tests.bench.cherwell_bench",
    "tests.bench.provance_bench",
    "tests.bench.scsm_bench",
    "tests.bench.maps_import_bench",
)


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"# {module}", file=sys.stderr, flush=True)
        code = subprocess.call([sys.executable, "-m", module])
        if code != 0:
            failed.append(module)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
