"""The composition root: settings -> credential, tables, secrets, HTTP client, connectors, services.

Both entry points (the Functions triggers in ``functions/`` and the CLI) get their services here;
nothing is built at import time, so a bad setting surfaces as one clear error on first use
instead of stopping the Functions host from indexing every function.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, overload
from urllib.parse import urlsplit

import certifi
import httpx
from azure.core.credentials import TokenCredential

from shared_code import netsafety, telemetry, tlstrust
from shared_code.alerts.delivery import AlertDelivery
from shared_code.alerts.intake import AlertIntake
from shared_code.alerts.processor import AlertProcessor
from shared_code.domain.connection import ConnectionBase
from shared_code.health import PROBE_SECRET, TIMER_JOBS, HealthMonitor, TimerHealth, summarise_timer_runs
from shared_code.jobs.lease import JobLease
from shared_code.jobs.retention import RetentionJob, RetentionRule
from shared_code.maps.importer import MapImporter
from shared_code.maps.publish import CmdbPublisher
from shared_code.mapsources.registry import MapSourceDeps, build_map_source
from shared_code.monitor.alerts_management import AlertsManagementClient
from shared_code.monitor.logs_ingestion import LogsUploader
from shared_code.ports.itsm import ConnectorPorts
from shared_code.products import build_connector, parse_connection
from shared_code.secrets import KeyVaultSecretStore, SecretStore
from shared_code.security.secure_webhook import SecureWebhookValidator
from shared_code.settings import Settings
from shared_code.state import connections as connections_table
from shared_code.state import correlations as correlations_table
from shared_code.state import deliveries as deliveries_table
from shared_code.state import maps as maps_table
from shared_code.state import mapsources as mapsources_table
from shared_code.state import runs as runs_table
from shared_code.state import syncerrors as syncerrors_table
from shared_code.state import syncstate as syncstate_table
from shared_code.state import workitems as workitems_table
from shared_code.state.connections import ConnectionRepository
from shared_code.state.correlations import CorrelationRepository
from shared_code.state.deliveries import DeliveryRepository
from shared_code.state.maps import MapRepository
from shared_code.state.mapsources import MapSourceRepository
from shared_code.state.queues import ALERT_QUEUE, queue_client
from shared_code.state.retention import ExpiredRows, deliveries_expired, newest_first_expired
from shared_code.state.runs import RunRepository
from shared_code.state.syncerrors import SyncErrorRepository
from shared_code.state.syncstate import SyncStateRepository
from shared_code.state.tables import TableStore, get_entity
from shared_code.state.workitems import WorkItemRepository
from shared_code.workitems.backsync import BackSync
from shared_code.workitems.engine import SyncEngine
from shared_code.workitems.sinks import LogAnalyticsSink, SyncErrorLog, TableSink, WorkItemSink

MAP_STATE_TABLE = "MapState"
"""Lease rows of the map import (one per source), shaped like SyncState rows."""

T = TypeVar("T")


def utc_now() -> datetime:
    return datetime.now(UTC)


class lazy(Generic[T]):
    """A member built on first use, exactly once per instance, whichever threads race for it.

    ``functools.cached_property`` locked until Python 3.11 (one lock for every instance of the
    class: one container's slow build held up every other container) and does not lock at all
    since 3.12 (two requests could each build their own credential or table store). This takes the
    instance's own re-entrant ``_lazy_lock`` (a member's factory may use other members); once
    built, the value sits in the instance ``__dict__`` and is read without any lock.
    """

    def __init__(self, factory: Callable[[Any], T]) -> None:
        self._factory = factory
        self._name = factory.__name__
        self.__doc__ = factory.__doc__

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> lazy[T]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any]) -> T: ...

    def __get__(self, instance: object | None, owner: type[Any]) -> lazy[T] | T:
        if instance is None:
            return self
        values = instance.__dict__
        if self._name in values:
            return values[self._name]  # type: ignore[no-any-return]
        with instance.__dict__["_lazy_lock"]:
            if self._name not in values:
                values[self._name] = self._factory(instance)
            return values[self._name]  # type: ignore[no-any-return]


# Entra ID authority hosts of the public and national clouds; MSAL validates any other host with an
# "instance discovery" call to login.microsoftonline.com, which fails for a private authority
# (Azure Stack Hub, AD FS, a test Entra) and leaks its name, so discovery is off for those.
KNOWN_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)


def build_credential(
    settings: Settings, environ: Mapping[str, str] | None = None, *, ca_file: str = ""
) -> TokenCredential:
    """The app's Azure identity: managed identity in Azure, env / developer sign-in locally.

    ``ca_file``: the CA file to verify TLS with (``tlstrust.trust_file``: the default roots plus
    TLS_CA_BUNDLE); default: the SDK's own.
    """
    from azure.identity import DefaultAzureCredential  # noqa: PLC0415 - imported only when needed

    environ = os.environ if environ is None else environ
    kwargs: dict[str, object] = {}
    if ca_file:
        kwargs["connection_verify"] = ca_file
    authority = environ.get("AZURE_AUTHORITY_HOST", "")
    if authority and (urlsplit(authority).hostname or "") not in KNOWN_AUTHORITY_HOSTS:
        kwargs["disable_instance_discovery"] = True
    return DefaultAzureCredential(**kwargs)


def build_ssl_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    if settings.tls_ca_bundle:
        context.load_verify_locations(cafile=settings.tls_ca_bundle)
    return context


class Container:
    """Long-lived collaborators for one process, each made on first use (see ``lazy``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        credential: TokenCredential | None = None,
        secrets: SecretStore | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._credential = credential
        self._secrets = secrets
        self._lock = threading.Lock()
        self._lazy_lock = threading.RLock()
        self._connectors: dict[str, tuple[ConnectionBase, ConnectorPorts]] = {}

    @lazy
    def ca_file(self) -> str:
        """The CA file for the Azure SDK clients: default roots plus TLS_CA_BUNDLE ('' without one)."""
        return tlstrust.trust_file(self.settings.tls_ca_bundle)

    @lazy
    def credential(self) -> TokenCredential:
        return self._credential or build_credential(self.settings, ca_file=self.ca_file)

    @lazy
    def tables(self) -> TableStore:
        needs_credential = bool(self.settings.identity_table_endpoint)
        return TableStore.from_settings(
            self.settings, self.credential if needs_credential else None, ca_file=self.ca_file
        )

    @lazy
    def secrets(self) -> SecretStore:
        return self._secrets or KeyVaultSecretStore(
            self.settings.key_vault_url,
            self.credential,
            ca_bundle=self.ca_file,
            timeout=self.settings.http_timeout_seconds,
        )

    @lazy
    def http(self) -> httpx.Client:
        timeout = httpx.Timeout(
            self.settings.http_timeout_seconds, connect=min(10.0, self.settings.http_timeout_seconds)
        )
        tls = build_ssl_context(self.settings)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        # every connection is checked on the address it resolves to (never a metadata service)
        transport = netsafety.guard_transport(
            httpx.HTTPTransport(verify=tls, limits=limits),
            allow_loopback=self.settings.allow_loopback_instances,
        )
        return httpx.Client(
            timeout=timeout,
            verify=tls,  # for proxy mounts from the environment
            limits=limits,
            transport=transport,
            headers={"User-Agent": "azure-monitor-itsm-connector/0.1"},
        )

    @lazy
    def connections(self) -> ConnectionRepository:
        return ConnectionRepository(self.tables.table(connections_table.TABLE), parse_connection)

    @lazy
    def deliveries(self) -> DeliveryRepository:
        return DeliveryRepository(self.tables.table(deliveries_table.TABLE))

    @lazy
    def correlations(self) -> CorrelationRepository:
        return CorrelationRepository(self.tables.table(correlations_table.TABLE))

    def connector_for(self, connection: ConnectionBase) -> ConnectorPorts:
        """One connector per connection (and definition), so token caches and pools are reused."""
        with self._lock:
            cached = self._connectors.get(connection.name)
            if cached and cached[0] == connection:
                return cached[1]
            connector = build_connector(connection, self.secrets, self.http)
            self._connectors[connection.name] = (connection, connector)
            return connector

    def forget_connector(self, name: str) -> None:
        """Drop a cached connector (its credentials changed), so the next use builds a fresh one."""
        with self._lock:
            cached = self._connectors.pop(name, None)
        if cached is not None:
            cached[1].close()

    @lazy
    def alert_intake(self) -> AlertIntake:
        return AlertIntake(self.connections, self.deliveries, self.clock)

    @lazy
    def alert_delivery(self) -> AlertDelivery:
        processor = AlertProcessor(
            self.correlations,
            self.clock,
            lease_seconds=float(self.settings.alert_lease_seconds),
            dependencies=self.maps,
        )
        return AlertDelivery(
            self.connections,
            self.deliveries,
            processor,
            self.connector_for,
            self.clock,
            max_attempts=self.settings.alert_max_attempts,
        )

    @lazy
    def secure_webhook(self) -> SecureWebhookValidator:
        return SecureWebhookValidator(
            self.settings.authority_host, self.http, build_ssl_context(self.settings)
        )

    @lazy
    def health(self) -> HealthMonitor:
        return build_health_monitor(self)

    @lazy
    def sync_engine(self) -> SyncEngine:
        return build_sync_engine(self)

    @lazy
    def map_sources(self) -> MapSourceRepository:
        return MapSourceRepository(self.tables.table(mapsources_table.TABLE))

    @lazy
    def maps(self) -> MapRepository:
        return MapRepository(self.tables.table(maps_table.TABLE))

    @lazy
    def map_source_deps(self) -> MapSourceDeps:
        settings = self.settings
        return MapSourceDeps(
            credential=self.credential,
            http=self.http,
            arm_endpoint=str(settings.arm_endpoint),
            logs_query_endpoint=str(settings.logs_query_endpoint),
            logs_query_audience=str(settings.logs_query_audience),
            ca_bundle=self.ca_file,
            clock=self.clock,
        )

    @lazy
    def map_importer(self) -> MapImporter:
        return MapImporter(
            sources=self.map_sources,
            build_source=lambda definition: build_map_source(definition, self.map_source_deps),
            maps=self.maps,
            lease=JobLease(
                SyncStateRepository(self.tables.table(MAP_STATE_TABLE)),
                self.clock,
                lease=timedelta(minutes=10),
                what="map import",
            ),
            runs=RunRepository(self.tables.table(runs_table.TABLE)),
            clock=self.clock,
            publisher=CmdbPublisher(self.connections, self.connector_for),
        )

    @lazy
    def retention(self) -> RetentionJob:
        settings, tables = self.settings, self.tables
        rules = {
            deliveries_table.TABLE: RetentionRule(
                ExpiredRows(tables.table(deliveries_table.TABLE), deliveries_expired),
                timedelta(days=settings.retention_deliveries_days),
            ),
            runs_table.TABLE: RetentionRule(
                ExpiredRows(tables.table(runs_table.TABLE), newest_first_expired),
                timedelta(days=settings.retention_runs_days),
            ),
            syncerrors_table.TABLE: RetentionRule(
                ExpiredRows(tables.table(syncerrors_table.TABLE), newest_first_expired),
                timedelta(days=settings.retention_sync_errors_days),
            ),
        }
        return RetentionJob(
            rules,
            RunRepository(tables.table(runs_table.TABLE)),
            self.clock,
            max_rows_per_table=settings.retention_max_rows,
        )

    def close(self) -> None:
        with self._lock:
            for _, connector in self._connectors.values():
                connector.close()
            self._connectors.clear()
        if "http" in self.__dict__:
            self.http.close()
        if "tables" in self.__dict__:
            self.tables.close()
        if "health" in self.__dict__:
            self.health.close()


def build_sync_engine(container: Container) -> SyncEngine:
    """The engine over the WorkItems table, Log Analytics (when configured) and backward sync."""
    settings = container.settings
    tables = container.tables
    sinks: list[WorkItemSink] = [TableSink(WorkItemRepository(tables.table(workitems_table.TABLE)))]
    uploader: LogsUploader | None = None
    if settings.logs_ingestion_enabled:
        uploader = LogsUploader(
            settings.logs_ingestion_endpoint,
            settings.logs_ingestion_rule_id,
            container.credential,
            ca_bundle=container.ca_file,
            timeout=settings.http_timeout_seconds,
        )
        sinks.append(LogAnalyticsSink(uploader, settings.logs_ingestion_stream, container.clock))
    errors = SyncErrorLog(
        SyncErrorRepository(tables.table(syncerrors_table.TABLE)),
        uploader,
        settings.logs_ingestion_error_stream,
    )
    alerts = AlertsManagementClient(
        container.credential,
        settings.arm_endpoint,
        ca_bundle=container.ca_file,
        timeout=settings.http_timeout_seconds,
    )
    return SyncEngine(
        connections=container.connections,
        connector_for=container.connector_for,
        sync_state=SyncStateRepository(tables.table(syncstate_table.TABLE)),
        sinks=sinks,
        errors=errors,
        runs=RunRepository(tables.table(runs_table.TABLE)),
        clock=container.clock,
        page_size=settings.sync_page_size,
        overlap=timedelta(seconds=settings.sync_overlap_seconds),
        backsync=BackSync(container.correlations, alerts, container.clock),
    )


def build_health_monitor(container: Container) -> HealthMonitor:
    """The probes over the container's own clients (nothing is contacted until a check runs)."""
    settings = container.settings
    queue_credential = None if settings.storage_connection else container.credential

    def tables() -> None:
        get_entity(container.tables.table(connections_table.TABLE), "health-probe", "probe")

    def queues() -> None:
        client = queue_client(settings, queue_credential, ALERT_QUEUE)
        try:
            from azure.core.exceptions import ResourceNotFoundError  # noqa: PLC0415

            try:
                client.get_queue_properties()
            except ResourceNotFoundError:
                return  # reachable and authorised; the host creates the queue when it starts
        finally:
            client.close()

    def key_vault() -> None:
        container.secrets.get(PROBE_SECRET)

    def timers() -> dict[str, TimerHealth]:
        repository = RunRepository(container.tables.table(runs_table.TABLE))
        return {
            name: summarise_timer_runs(repository.list(job, limit=50)) for name, job in TIMER_JOBS.items()
        }

    probes = {"tables": tables, "queues": queues, "keyVault": key_vault}
    return HealthMonitor(probes, timers, container.clock, timeout=settings.health_timeout_seconds)


_container: Container | None = None
_container_lock = threading.Lock()


SWITCH_INTERVAL_SECONDS = 0.001


def tune_interpreter() -> None:
    """Let a thread whose answer arrived take the GIL within 1 ms instead of CPython's default 5 ms.

    The app overlaps threads that wait for answers (the sync reads the next page while it maps and
    writes this one; the SDKs' calls) with CPU work. A thread whose answer arrived while another
    computes waits up to the switch interval for the GIL, at every read of that answer, so with 5 ms
    the sync's next request sat behind the mapping of the page in hand. Measured on the sync
    bench's null-sink engine, 20,000 rows, medians of 3 alternated rounds: 1.19 s at 5 ms, 1.09 s at
    1 ms, 0.96 s for paging alone (docs/benchmarks.md). Called by the app's entry points
    (``function_app.py``, the CLI), not on import; never raised: a host that chose a shorter
    interval keeps it."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_SECONDS:
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def get_container(environ: Mapping[str, str] | None = None) -> Container:
    """The process-wide container, built from the environment on first use."""
    global _container
    with _container_lock:
        if _container is None:
            telemetry.configure(os.environ if environ is None else environ)
            _container = Container(Settings.from_environ(os.environ if environ is None else environ))
        return _container


def reset_container() -> None:
    """Drop the process-wide container (settings changed: tests, the demo, CLI runs)."""
    global _container
    with _container_lock:
        if _container is not None:
            _container.close()
        _container = None
