"""The composition root: settings -> credential, tables, secrets, HTTP client, connectors, services.

Both entry points (the Functions triggers in ``functions/`` and the CLI) get their services here;
nothing is built at import time, so a bad setting surfaces as one clear error on first use
instead of stopping the Functions host from indexing every function.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, overload
from urllib.parse import urlsplit

import certifi
import httpx
from azure.core.credentials import TokenCredential

from shared_code import netsafety, tlstrust
from shared_code.alerts.delivery import AlertDelivery
from shared_code.alerts.intake import AlertIntake
from shared_code.alerts.processor import AlertProcessor
from shared_code.connections import Connection
from shared_code.itsm.base import ItsmConnector
from shared_code.itsm.registry import build_connector
from shared_code.secrets import KeyVaultSecretStore, SecretStore
from shared_code.settings import Settings
from shared_code.state import connections as connections_table
from shared_code.state import correlations as correlations_table
from shared_code.state import deliveries as deliveries_table
from shared_code.state.connections import ConnectionRepository
from shared_code.state.correlations import CorrelationRepository
from shared_code.state.deliveries import DeliveryRepository
from shared_code.state.tables import TableStore
from shared_code.workitems.engine import SyncEngine
from shared_code.workitems.wiring import build_sync_engine

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
        self._connectors: dict[str, tuple[Connection, ItsmConnector]] = {}

    @lazy
    def ca_file(self) -> str:
        """The CA file for the Azure SDK clients: default roots plus TLS_CA_BUNDLE ('' without one)."""
        return tlstrust.trust_file(self.settings.tls_ca_bundle)

    @lazy
    def credential(self) -> TokenCredential:
        return self._credential or build_credential(self.settings, ca_file=self.ca_file)

    @lazy
    def tables(self) -> TableStore:
        needs_credential = bool(self.settings.state_table_endpoint)
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
        return ConnectionRepository(self.tables.table(connections_table.TABLE))

    @lazy
    def deliveries(self) -> DeliveryRepository:
        return DeliveryRepository(self.tables.table(deliveries_table.TABLE))

    @lazy
    def correlations(self) -> CorrelationRepository:
        return CorrelationRepository(self.tables.table(correlations_table.TABLE))

    def connector_for(self, connection: Connection) -> ItsmConnector:
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
            self.correlations, self.clock, lease_seconds=float(self.settings.alert_lease_seconds)
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
    def sync_engine(self) -> SyncEngine:
        return build_sync_engine(self)

    def close(self) -> None:
        with self._lock:
            for _, connector in self._connectors.values():
                connector.close()
            self._connectors.clear()
        if "http" in self.__dict__:
            self.http.close()
        if "tables" in self.__dict__:
            self.tables.close()


_container: Container | None = None
_container_lock = threading.Lock()


def get_container(environ: Mapping[str, str] | None = None) -> Container:
    """The process-wide container, built from the environment on first use."""
    global _container
    with _container_lock:
        if _container is None:
            _container = Container(Settings.from_environ(os.environ if environ is None else environ))
        return _container


def reset_container() -> None:
    """Drop the process-wide container (settings changed: tests, the demo, CLI runs)."""
    global _container
    with _container_lock:
        if _container is not None:
            _container.close()
        _container = None
