"""What every benchmark prints beside its figures: how fast and how busy the machine was, peak
memory read the same way everywhere, and targets that fail the run when missed.

The machine is shared (two cores, other work on them): a figure means little without the speed
of the machine at the time (``speed_index``: a fixed pure-Python ``timeit``, higher is faster) and
its load average.
"""

from __future__ import annotations

import contextlib
import operator
import os
import resource
import signal
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from shared_code.bootstrap import tune_interpreter

_SPEED_SNIPPET = "sum(i * i for i in range(10_000))"
_SPEED_REFERENCE_S = 0.0004
"""About what one run of the snippet takes on an idle 3 GHz core with CPython 3.11: index 1.0."""


def speed_index() -> float:
    """Reference time over the best of 7 timings of a fixed snippet (1.0 on the reference core)."""
    best = min(timeit.repeat(_SPEED_SNIPPET, number=20, repeat=7)) / 20
    return _SPEED_REFERENCE_S / best


def load_average() -> str:
    with contextlib.suppress(OSError):
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} {five:.2f} {fifteen:.2f}"
    return "unknown"


def print_machine(prefix: str) -> None:
    """``<prefix>.speed_index`` and ``<prefix>.load_avg`` lines, on stdout beside the figures."""
    print(f"{prefix}.speed_index: {speed_index():.2f}", flush=True)
    print(f"{prefix}.load_avg: {load_average()}", flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries the parent's
    peak over into a child across fork/exec, so a child's ``ru_maxrss`` is at least its parent's."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB (macOS: bytes)


_COMPARE: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass
class Targets:
    """Figures checked against their targets; a miss is said on stderr and fails the run."""

    missed: list[str] = field(default_factory=list)

    def check(self, name: str, value: float, op: str, target: float) -> None:
        if not _COMPARE[op](value, target):
            message = f"{name} missed its target: {value:g} (target {op} {target:g})"
            self.missed.append(message)
            print(f"MISSED {message}", file=sys.stderr, flush=True)

    def exit_code(self) -> int:
        return 1 if self.missed else 0


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress and detail on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the caller's ExitStack: everything started is stopped


def run_bench(main: Callable[[], int], failures: tuple[type[Exception], ...]) -> int:
    """Run a benchmark's ``main`` as the app runs (its entry points' interpreter setting), with
    SIGTERM stopping what it started, and a run that could not measure (``failures``) said in one
    line and exit 1."""
    tune_interpreter()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main()
    except failures as exc:
        log(f"FAILED: {exc}")
        return 1
