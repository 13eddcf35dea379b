"""The *raw* side of the product sync benchmarks: plain pages written the way the engine writes.

Each product benchmark compares the app's initial sync with a hand-written loop doing the same I/O.
For the ratio to measure the engine and the connector (and not a difference in how rows reach Table
Storage), every raw loop writes the way ``SyncEngine`` with ``WorkItemRepository`` does:

* the next page is fetched while the current one is written (the engine's one-page prefetch): the
  product's page iterator runs on its own thread, one page ahead and no more: it asks for the next
  page only once the writer has taken the one before (a plain queue would let it run two pages
  ahead, a deeper pipeline than the engine's, which smooths the raw side's stalls);
* a page's entities are grouped by partition, split with ``transactions`` (at most 100 rows and
  ~3 MB each) and written with ``upsert_transaction`` (the documented ``$batch`` body, not the
  SDK's ``submit_transaction`` whose client-side CPU would make raw slow for no reason of ours),
  partitions in parallel on ``BUCKETS`` threads.

Only what makes it the app is left out: the mapping to ``WorkItem``, watermarks, lease, Runs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from azure.data.tables import TableClient

from shared_code.state.tablebatch import transactions, upsert_transaction
from shared_code.state.tables import Entity
from shared_code.state.workitems import BUCKETS
from tests.bench.sync_bench import group_cpu_seconds

PageSource = Callable[[], Iterator[list[Entity]]]


class RawFetchError(RuntimeError):
    """The raw loop's paging failed (the product answered something the loop did not expect)."""


def write_page(table: TableClient, pool: ThreadPoolExecutor, entities: list[Entity]) -> None:
    """One page's entities as batched upserts, partitions in parallel (as ``WorkItemRepository``)."""
    partitions: dict[str, list[Entity]] = {}
    for entity in entities:
        partitions.setdefault(str(entity["PartitionKey"]), []).append(entity)
    chunks = [chunk for rows in partitions.values() for chunk in transactions(rows)]
    if len(chunks) <= 1:
        for chunk in chunks:
            upsert_transaction(table, chunk)
        return
    for future in [pool.submit(upsert_transaction, table, chunk) for chunk in chunks]:
        future.result()


def fetch_and_write(table: TableClient, pages: PageSource) -> int:
    """Run ``pages`` one page ahead on a fetching thread and write each page here; rows written."""
    ready: queue.Queue[list[Entity] | None] = queue.Queue(maxsize=1)
    taken = threading.Semaphore(0)  # released by the writer for every page it takes
    failure: list[BaseException] = []
    stop = threading.Event()

    def fetch() -> None:
        try:
            for page in pages():
                if stop.is_set():
                    return
                ready.put(page)
                taken.acquire()  # the next fetch starts when the writer starts on this page
        except BaseException as exc:  # reported by the writer below
            failure.append(exc)
        finally:
            ready.put(None)

    written = 0
    fetcher = threading.Thread(target=fetch, name="raw-fetch", daemon=True)
    fetcher.start()
    try:
        with ThreadPoolExecutor(BUCKETS, thread_name_prefix="raw-write") as pool:
            while (page := ready.get()) is not None:
                taken.release()
                write_page(table, pool, page)
                written += len(page)
    finally:
        stop.set()
        taken.release()
        while fetcher.is_alive():  # let a fetcher blocked on a full queue or a page see the stop
            taken.release()
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        fetcher.join()
    if failure:
        raise RawFetchError(f"raw paging failed: {failure[0]!r}") from failure[0]
    return written


class CpuMeter:
    """CPU seconds of this process and of the other processes a pass keeps busy (by process group),
    logged beside each pass: on a shared machine the wall-clock rates swing with other load, the
    CPU each side spent does not."""

    def __init__(self, groups: dict[str, int | None]) -> None:
        self._groups = groups

    def sample(self) -> tuple[float, ...]:
        return (time.process_time(), *(group_cpu_seconds(group) for group in self._groups.values()))

    def describe(self, before: tuple[float, ...]) -> str:
        spent = [after - start for after, start in zip(self.sample(), before, strict=True)]
        parts = [f"this process {spent[0]:.1f}"]
        parts += [f"{name} {seconds:.1f}" for name, seconds in zip(self._groups, spent[1:], strict=True)]
        return f"CPU s: {', '.join(parts)}"
