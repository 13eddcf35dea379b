"""Correlation ids on every log record, OpenTelemetry to Application Insights, and custom metrics.

* **Correlation id.** One id follows an alert from the webhook through the queue to the ITSM call:
  its delivery id. It lives in a ``ContextVar`` (set by ``correlation_scope`` / ``bind_correlation_id``)
  and a log record factory copies it onto every record as ``correlation_id``, whichever logger
  and handler the record meets (a filter on one logger would miss records of its children, and
  the Functions worker's own handler is not ours to touch). Exported logs carry it as a custom
  dimension.
* **Export.** ``configure()`` runs once, on first use of the app (never at import, so indexing
  cannot fail on it): with ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set it calls
  ``azure.monitor.opentelemetry.configure_azure_monitor``; without it nothing is exported and
  nothing is contacted.
* **Metrics.** ``metrics()`` holds the app's counters on an OpenTelemetry meter. Without a
  configured meter provider the API's no-op provider takes the calls, so counting costs nearly
  nothing; tests bind their own provider with an in-memory reader (``bind_meter_provider``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import Counter, MeterProvider

log = logging.getLogger(__name__)

CONNECTION_STRING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
AUTHENTICATION_STRING = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"
"""``Authorization=AAD`` (and ``ClientId=<user-assigned identity>``): the setting the Functions host
reads for Entra ID export; the app reads the same one for its own exporter."""
METER_NAME = "azure_monitor_itsm_connector"
CORRELATION_ATTRIBUTE = "correlation_id"

_correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")


@contextmanager
def correlation_scope(correlation_id: str = "") -> Iterator[None]:
    """Records logged inside carry ``correlation_id`` (or the one bound later inside); restored after."""
    token = _correlation_id.set(correlation_id)
    try:
        yield
    finally:
        _correlation_id.reset(token)


def bind_correlation_id(correlation_id: str) -> None:
    """Set the id of the current scope once it is known (the webhook learns it from the payload)."""
    _correlation_id.set(correlation_id)


def current_correlation_id() -> str:
    return _correlation_id.get()


_factory_lock = threading.Lock()
_factory_installed = False


def install_correlation_ids() -> None:
    """Make every log record carry ``correlation_id`` (idempotent)."""
    global _factory_installed
    with _factory_lock:
        if _factory_installed:
            return
        previous: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if not hasattr(record, CORRELATION_ATTRIBUTE):
                setattr(record, CORRELATION_ATTRIBUTE, _correlation_id.get())
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True


@dataclass(frozen=True)
class Metrics:
    """The app's counters (attributes: low-cardinality names only, never ids or secrets)."""

    deliveries: Counter
    delivery_failures: Counter
    coalesced_firings: Counter
    sync_rows: Counter
    map_imports: Counter

    @classmethod
    def on(cls, provider: MeterProvider | None = None) -> Metrics:
        meter = (provider or otel_metrics.get_meter_provider()).get_meter(METER_NAME)
        return cls(
            deliveries=meter.create_counter(
                "itsm.alert.deliveries", unit="{delivery}", description="alert deliveries completed"
            ),
            delivery_failures=meter.create_counter(
                "itsm.alert.delivery_failures",
                unit="{attempt}",
                description="failed delivery attempts (final: ended failed; else retried)",
            ),
            coalesced_firings=meter.create_counter(
                "itsm.alert.coalesced_firings",
                unit="{firing}",
                description="firings folded into an open work item without a new note",
            ),
            sync_rows=meter.create_counter(
                "itsm.sync.rows", unit="{row}", description="work items written by the sync"
            ),
            map_imports=meter.create_counter(
                "itsm.maps.imports", unit="{import}", description="dependency-map imports"
            ),
        )


_metrics_lock = threading.Lock()
_metrics: Metrics | None = None


def metrics() -> Metrics:
    """The counters, made on first use over the global meter provider (no-op unless configured)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = Metrics.on()
        return _metrics


def bind_meter_provider(provider: MeterProvider | None) -> None:
    """Count on ``provider`` from now on (tests: an in-memory reader); None: the global one again."""
    global _metrics
    with _metrics_lock:
        _metrics = Metrics.on(provider) if provider is not None else None


_configure_lock = threading.Lock()
_configured: bool | None = None


def configure(environ: Mapping[str, str] | None = None) -> bool:
    """Correlation ids on log records, and Azure Monitor export when a connection string is set.

    Runs once per process (later calls return the first answer). Returns whether export is on.
    A failing exporter setup is logged and leaves the app running without export.
    """
    global _configured
    install_correlation_ids()
    with _configure_lock:
        if _configured is not None:
            return _configured
        env = os.environ if environ is None else environ
        connection_string = env.get(CONNECTION_STRING, "")
        _configured = False
        if not connection_string.strip():
            return False
        try:
            from azure.monitor.opentelemetry import configure_azure_monitor  # noqa: PLC0415 - heavy, opt-in

            options: dict[str, Any] = {"connection_string": connection_string}
            client_id = entra_client_id(env.get(AUTHENTICATION_STRING, ""))
            if client_id is not None:  # Application Insights with local auth off: export with Entra ID
                from azure.identity import ManagedIdentityCredential  # noqa: PLC0415

                options["credential"] = ManagedIdentityCredential(client_id=client_id or None)
            configure_azure_monitor(**options)
        except Exception as exc:  # noqa: BLE001 - telemetry must never stop the app
            log.error("Application Insights export could not be configured: %s", type(exc).__name__)
            return False
        _configured = True
        bind_meter_provider(None)  # counters made before now move to the configured provider
        return True


def entra_client_id(authentication: str) -> str | None:
    """From ``Authorization=AAD;ClientId=...``: the identity's client id ("" for the system-assigned
    identity), or None when export is not Entra-authenticated."""
    parts = {
        key.strip().lower(): value.strip()
        for key, _, value in (part.partition("=") for part in authentication.split(";"))
        if key.strip()
    }
    if parts.get("authorization", "").upper() != "AAD":
        return None
    return parts.get("clientid", "")
