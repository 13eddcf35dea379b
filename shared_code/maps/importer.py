"""The dependency-map import: every enabled source's servers, fetched, diffed and stored.

What the SCOM integration's hourly rule did, run over the shared job machinery: per source a lease
(``JobLease`` over the MapState table, scope = source name, subject = ``import``) so the timer and
an on-demand import never fetch the same source at once; the window ``[now - window_minutes, now]``;
one ``fetch`` over the group (the source batches its queries); each map diffed against the stored
one (``ServerMap.with_changes_since``) and stored, writing only what changed; one ``Runs`` row per
source (job ``maps``) with the counts and each failed server's reason. A server that fails keeps its
previous map; the other servers go on. The lease is renewed as results arrive.

With a ``CmdbPublisher`` and connections that have create-CI on, the servers stored in the run
(changed or not) and their dependencies are then published to those connections' CMDBs
(``maps/publish.py``); what the CMDB did or refused is part of the run's counts and detail, and
never fails the import.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from shared_code.domain.maps import MapWindow, ServerMap
from shared_code.domain.mapsources import MapSourceDefinition, MapSourceKind
from shared_code.domain.runs import RunRecord, SyncStateRow
from shared_code.errors import BusyError, ConnectorAppError, InvalidInputError, StateError
from shared_code.jobs.lease import JobLease, RunTally
from shared_code.maps.publish import CmdbPublisher, PublishBatch, PublishOutcome
from shared_code.ports.maps import MapSource, ServerMapResult, ServerRef
from shared_code.ports.mapstore import MapSourceStore, MapStore
from shared_code.ports.state import RunLog

log = logging.getLogger(__name__)

JOB = "maps"
SUBJECT = "import"
RENEW_EVERY = 50
"""Renew the lease after this many servers' results (a big group takes minutes)."""
DETAIL_LIMIT = 3800


class ImportOutcome(StrEnum):
    OK = "ok"
    PARTIAL = "partial"  # some servers failed; their previous maps stay
    FAILED = "failed"  # the source could not be read at all
    BUSY = "busy"  # another import of this source holds the lease


@dataclass(frozen=True)
class ImportProgress:
    """One server done (for the CLI's progress line)."""

    source: str
    server: str
    done: int
    total: int
    ok: bool


@dataclass
class ImportResult:
    source: str
    outcome: ImportOutcome
    run_id: str = ""
    imported: int = 0  # servers whose stored graph changed (or was new)
    unchanged: int = 0  # servers whose graph was the one stored: nothing written
    failed: int = 0
    added: int = 0  # dependencies added over all servers
    removed: int = 0
    duration_seconds: float = 0.0
    error: str = ""
    errors: dict[str, str] = field(default_factory=dict)  # server -> why
    warnings: dict[str, str] = field(default_factory=dict)
    matched: set[str] = field(default_factory=set)  # the requested names this source's group holds
    published: list[PublishOutcome] = field(default_factory=list)  # one per create-CI connection

    @property
    def counts(self) -> dict[str, int]:
        counts = {
            "imported": self.imported,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "added": self.added,
            "removed": self.removed,
        }
        if self.published:
            counts["cisCreated"] = sum(p.new_items for p in self.published)
            counts["relationsCreated"] = sum(p.new_relations for p in self.published)
        return counts


SourceBuilder = Callable[[MapSourceDefinition], MapSource]
ProgressSink = Callable[[ImportProgress], None]


class MapImporter:
    def __init__(
        self,
        *,
        sources: MapSourceStore,
        build_source: SourceBuilder,
        maps: MapStore,
        lease: JobLease,
        runs: RunLog,
        clock: Callable[[], datetime],
        owner: str | None = None,
        publisher: CmdbPublisher | None = None,
    ) -> None:
        self._sources = sources
        self._build_source = build_source
        self._maps = maps
        self._lease = lease
        self._runs = runs
        self._clock = clock
        self._owner = owner or f"maps-{uuid.uuid4().hex[:12]}"
        self._publisher = publisher

    def definitions(self, source: str | None = None) -> list[MapSourceDefinition]:
        """The sources an import covers: the one named (even when disabled), else every enabled one
        that is read over the network (a migrate source's CSV is imported with the CLI)."""
        if source is not None:
            definition = self._sources.get(source)
            if definition.kind is MapSourceKind.MIGRATE:
                raise InvalidInputError(
                    f"map source {definition.name!r} is a migrate source: import its CSV export with the CLI"
                )
            return [definition]
        return [d for d in self._sources.list() if d.enabled and d.kind is not MapSourceKind.MIGRATE]

    def run(
        self,
        *,
        source: str | None = None,
        servers: Sequence[str] | None = None,
        trigger: str = "",
        progress: ProgressSink | None = None,
    ) -> list[ImportResult]:
        """Import every covered source now; ``servers`` narrows each to those computer names or
        machine ids (a name no source's group holds is reported as failed, never dropped)."""
        wanted = _wanted(servers)
        results = [
            self._import(definition, wanted, trigger, progress) for definition in self.definitions(source)
        ]
        if wanted:
            matched = {name for result in results for name in result.matched}
            missing = sorted(set(wanted.values()) - matched, key=str.lower)
            if missing and results:
                results[-1].errors |= dict.fromkeys(missing, "not in any map source's server group")
                results[-1].failed += len(missing)
                if results[-1].outcome is ImportOutcome.OK:
                    results[-1].outcome = ImportOutcome.PARTIAL
        return results

    def run_export(
        self,
        source: str,
        server_maps: Sequence[ServerMap],
        *,
        servers: Sequence[str] | None = None,
        trigger: str = "",
        progress: ProgressSink | None = None,
    ) -> ImportResult:
        """Import maps read from an export (Azure Migrate's dependency CSV) under the migrate source
        ``source``: stored, diffed, recorded in Runs and published to the CMDB like a timer import."""
        definition = self._sources.get(source)
        if definition.kind is not MapSourceKind.MIGRATE:
            raise InvalidInputError(
                f"map source {definition.name!r} is a {definition.kind.value} source, not a migrate "
                "source: add one with 'maps sources add NAME --kind migrate'"
            )
        wanted = _wanted(servers or definition.group.computers)
        result = self._import(definition, wanted, trigger, progress, _ExportSource(server_maps))
        if wanted:
            missing = sorted(set(wanted.values()) - result.matched, key=str.lower)
            if missing:
                result.errors |= dict.fromkeys(missing, "not in the export")
                result.failed += len(missing)
                if result.outcome is ImportOutcome.OK:
                    result.outcome = ImportOutcome.PARTIAL
        return result

    def _import(
        self,
        definition: MapSourceDefinition,
        wanted: dict[str, str],
        trigger: str,
        progress: ProgressSink | None,
        source: MapSource | None = None,
    ) -> ImportResult:
        started = self._clock()
        began = time.monotonic()
        result = ImportResult(source=definition.name, outcome=ImportOutcome.OK, run_id=uuid.uuid4().hex[:12])
        try:
            state = self._lease.acquire(definition.name, SUBJECT, self._owner)
        except BusyError as exc:
            result.outcome, result.error = ImportOutcome.BUSY, str(exc)
            return result
        try:
            targets = self._publisher.targets() if self._publisher is not None else []
            batch = PublishBatch() if targets else None
            state = self._fetch_and_store(definition, wanted, result, state, progress, batch, source)
            if self._publisher is not None and batch is not None and batch.servers:
                result.published = self._publisher.publish(targets, batch.servers, batch.dependencies)
                for outcome in result.published:
                    if outcome.errors:
                        result.warnings[f"cmdb {outcome.connection}"] = "; ".join(outcome.errors)[:500]
        except ConnectorAppError as exc:
            result.outcome, result.error = ImportOutcome.FAILED, str(exc)
        except Exception as exc:  # one source's bug must not stop the others
            log.exception("map import of %s failed", definition.name)
            result.outcome, result.error = ImportOutcome.FAILED, f"unexpected error: {type(exc).__name__}"
        finally:
            result.duration_seconds = time.monotonic() - began
            if result.outcome is ImportOutcome.OK and result.failed:
                result.outcome = ImportOutcome.PARTIAL
            self._lease.release(
                state,
                self._owner,
                started,
                RunTally(
                    succeeded=result.outcome is not ImportOutcome.FAILED,
                    outcome=result.outcome.value,
                    error=result.error,
                    done=result.imported + result.unchanged,
                    rejected=result.failed,
                ),
            )
            self._record(definition, result, started, trigger)
        return result

    def _fetch_and_store(
        self,
        definition: MapSourceDefinition,
        wanted: dict[str, str],
        result: ImportResult,
        state: SyncStateRow,
        progress: ProgressSink | None,
        batch: PublishBatch | None = None,
        given: MapSource | None = None,
    ) -> SyncStateRow:
        """Fetch and store the group's maps (collecting them in ``batch`` for the CMDB when given);
        returns the lease row as last renewed."""
        source = given if given is not None else self._build_source(definition)
        try:
            members = source.servers()
            if wanted:
                members = [ref for ref in members if _matches(ref, wanted, result.matched)]
            window = definition.window_ending(self._clock())
            total = len(members)
            for done, fetched in enumerate(source.fetch(members, window), start=1):
                ok = self._store_one(definition, fetched, result)
                if ok and batch is not None and fetched.map is not None:
                    batch.add(fetched.map)
                if progress is not None:
                    progress(ImportProgress(definition.name, fetched.server.computer, done, total, ok))
                if done % RENEW_EVERY == 0:
                    state = self._lease.renew(state)
        finally:
            source.close()
        return state

    def _store_one(
        self, definition: MapSourceDefinition, fetched: ServerMapResult, result: ImportResult
    ) -> bool:
        ref = fetched.server
        name = ref.computer
        if fetched.map is None:
            self._fail(definition, ref, fetched.error, result)
            return False
        try:
            previous = self._previous(fetched.map)
            current = fetched.map.with_changes_since(previous)
            written = self._maps.save(current)
        except StateError as exc:
            self._fail(definition, ref, str(exc), result)
            return False
        if written or previous is None:
            result.imported += 1
        else:
            result.unchanged += 1
        result.added += len(current.changes.added)
        result.removed += len(current.changes.removed)
        if fetched.warnings:
            result.warnings[name] = "; ".join(fetched.warnings)[:500]
        return True

    def _previous(self, server_map: ServerMap) -> ServerMap | None:
        try:
            return self._maps.load(server_map.server)
        except StateError:
            return None  # unreadable: the new map replaces it whole

    def _fail(
        self, definition: MapSourceDefinition, ref: ServerRef, error: str, result: ImportResult
    ) -> None:
        result.failed += 1
        result.errors[ref.computer] = error or "no map"
        try:
            self._maps.record_failure(
                ref.computer,
                machine_id=ref.machine_id,
                source=definition.name,
                source_kind=definition.kind.value,
                error=error or "no map",
                at=self._clock(),
            )
        except StateError as exc:
            log.warning("recording the failed map import of a server failed: %s", exc)

    def _record(
        self, definition: MapSourceDefinition, result: ImportResult, started: datetime, trigger: str
    ) -> None:
        finished = started + timedelta(seconds=result.duration_seconds)
        detail = json.dumps({"errors": result.errors, "warnings": result.warnings}, ensure_ascii=False)
        if len(detail) > DETAIL_LIMIT:
            detail = detail[: DETAIL_LIMIT - 1] + "…"
        try:
            self._runs.record(
                RunRecord(
                    job=JOB,
                    run_id=result.run_id,
                    trigger=trigger,
                    connection=definition.name,
                    item_type=SUBJECT,
                    started_at=started,
                    finished_at=finished,
                    duration_seconds=result.duration_seconds,
                    outcome=result.outcome.value,
                    counts=result.counts,
                    error=result.error,
                    detail=detail,
                )
            )
        except ConnectorAppError as exc:
            log.warning("recording the map import run of %s failed: %s", definition.name, exc)


class _ExportSource:
    """The maps of an export file, as a ``MapSource`` (the file was read and checked already)."""

    def __init__(self, server_maps: Sequence[ServerMap]) -> None:
        self._maps = {m.server.lower(): m for m in server_maps}

    def servers(self) -> list[ServerRef]:
        return [ServerRef(computer=m.server, machine_id=m.machine_id) for m in self._maps.values()]

    def fetch(self, servers: Sequence[ServerRef], window: MapWindow) -> Iterator[ServerMapResult]:
        for ref in servers:
            yield ServerMapResult(server=ref, map=self._maps[ref.computer.lower()])

    def check(self) -> str:
        return f"an export of {len(self._maps)} server(s)"

    def close(self) -> None:
        return None


def _wanted(servers: Sequence[str] | None) -> dict[str, str]:
    """lower-cased name -> the name as given."""
    return {s.strip().lower(): s.strip() for s in servers or () if s.strip()}


def _matches(ref: ServerRef, wanted: dict[str, str], matched: set[str]) -> bool:
    """Whether ``ref`` is one of the requested servers (noting the requested name in ``matched``)."""
    hits = [wanted[key] for key in (ref.computer.lower(), ref.machine_id.lower()) if key and key in wanted]
    matched.update(hits)
    return bool(hits)
