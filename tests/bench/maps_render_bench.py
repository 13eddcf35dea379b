"""Map-view rendering benchmark: a 300-node diagram, and how the time grows to 3,000 nodes.

    .venv/bin/python -m tests.bench.maps_render_bench [--repeats 15]

Prints on stdout, one ``name: value`` line each (context goes to stderr):

* ``maps.render_300_ms``: median time to render the HTML server view (layout, SVG, header, filters)
  of a 300-node synthetic map (``tests/fakes/maps.py``).
* ``maps.render_3000_over_300``: median 3,000-node time over median 300-node time, both measured in
  this run, alternating sizes so a noisy neighbour slows both alike. Target: <= 12 (close to
  linear: ten times the nodes). The process exits 1 when the target is missed.

Times are the process's CPU time (``time.process_time``): rendering is single-threaded pure
computation, and on the two cores shared with other workers wall time mostly measures the
neighbours; the wall-clock medians go to stderr beside them. Each render starts after a
``gc.collect()`` so one render's garbage is not charged to the next.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

from shared_code.maps.views.html import render_html
from tests.fakes.maps import synthetic_map

TARGET_RATIO = 12.0


def _time_render(server_map, wall: list[float] | None = None) -> float:
    gc.collect()
    started, started_wall = time.process_time(), time.perf_counter()
    body = render_html(server_map)
    elapsed = time.process_time() - started
    if wall is not None:
        wall.append(time.perf_counter() - started_wall)
    if len(body) < 1000:
        raise RuntimeError("the view came out empty")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    small, large = synthetic_map(300), synthetic_map(3000)
    for _ in range(3):  # warm-up: imports, regex compilation, allocator
        _time_render(small)
    _time_render(large)
    small_times: list[float] = []
    large_times: list[float] = []
    small_wall: list[float] = []
    large_wall: list[float] = []
    for _ in range(args.repeats):
        small_times.append(_time_render(small, small_wall))
        large_times.append(_time_render(large, large_wall))
        small_times.append(_time_render(small, small_wall))
    small_ms = statistics.median(small_times) * 1000
    large_ms = statistics.median(large_times) * 1000
    ratio = large_ms / small_ms
    print(
        f"# CPU: 300 nodes median {small_ms:.1f} ms of {len(small_times)},"
        f" 3,000 nodes median {large_ms:.1f} ms"
        f" of {len(large_times)}; wall: {statistics.median(small_wall) * 1000:.1f} ms and"
        f" {statistics.median(large_wall) * 1000:.1f} ms",
        file=sys.stderr,
    )
    print(f"maps.render_300_ms: {small_ms:.2f}")
    print(f"maps.render_3000_over_300: {ratio:.2f}")
    if ratio > TARGET_RATIO:
        print(f"maps.render_3000_over_300 missed its target: {ratio:.2f} > {TARGET_RATIO}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
