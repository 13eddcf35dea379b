"""Everything the app talks to, on loopback, in one object: the tests', the demo's and the bench's.

    with LoopbackStack() as stack, stack.app() as container:
        stack.add_servicenow_connection("sn-demo")
        host = FunctionHost(function_app.app, stack.queues())
        ...

* Azurite (tables, queues) in memory on free ports, or one passed in (a test session shares one);
* Entra ID, Key Vault, ServiceNow, Logs Ingestion and Alerts Management over TLS with the
  throwaway CA in ``tests/loopback/tls.py``; Key Vault, Logs Ingestion and Alerts Management accept
  only tokens the loopback Entra issued for their audience;
* for the dependency maps (``maps=True``, the default): the Log Analytics query API
  (``LOGS_QUERY_ENDPOINT``) and the Service Map API, mounted in the Alerts Management loopback so
  both ARM APIs share the one ``ARM_ENDPOINT`` the app reads.

``app()`` points the process environment (the app settings and the ``AZURE_*`` variables of
azure-identity's EnvironmentCredential) at these servers and resets the app's container, so the
functions in ``function_app.app`` and the CLI build their real clients against them, exactly as
they would in Azure. Nothing of the app is replaced.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

from azure.storage.queue import QueueServiceClient

from shared_code.bootstrap import Container, get_container, reset_container
from shared_code.cli import Cli, main
from tests import canary
from tests.loopback.alerts_management import AlertsManagementLoopback
from tests.loopback.azurite import Azurite
from tests.loopback.entra import EntraLoopback
from tests.loopback.keyvault import KeyVaultLoopback
from tests.loopback.loganalytics import LogAnalyticsLoopback
from tests.loopback.logs_ingestion import LogsIngestionLoopback
from tests.loopback.servicemap import ServiceMapApi
from tests.loopback.servicenow import ServiceNowLoopback
from tests.loopback.tls import loopback_tls

LOGS_RULE_ID = "dcr-0123456789abcdef0123456789abcdef"
LOGS_STREAM = "Custom-ServiceDesk_CL"
LOGS_ERROR_STREAM = "Custom-ServiceDeskLog_CL"

# variables that would steer azure-identity away from the loopback Entra (or off the machine)
FOREIGN_IDENTITY_VARIABLES = (
    "AZURE_REGIONAL_AUTHORITY_NAME",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "REQUESTS_CA_BUNDLE",
)


class LoopbackStack:
    """Starts (and stops) the loopback services; ``azurite`` may be shared and is then not stopped."""

    def __init__(
        self,
        *,
        azurite: Azurite | None = None,
        servicenow: ServiceNowLoopback | None = None,
        table_prefix: str = "",
        maps: bool = True,
    ) -> None:
        self._own_azurite = azurite is None
        self.azurite = azurite or Azurite()
        self.entra = EntraLoopback()
        self.keyvault = KeyVaultLoopback(self.entra)
        self._own_servicenow = servicenow is None
        self.servicenow = servicenow or ServiceNowLoopback(
            rotate_refresh_tokens=True, client_secret=canary.CLIENT_SECRET, password=canary.PASSWORD
        )
        self.logs = LogsIngestionLoopback(self.entra, rules={LOGS_RULE_ID: (LOGS_STREAM, LOGS_ERROR_STREAM)})
        self.alerts = AlertsManagementLoopback(self.entra)
        self.loganalytics: LogAnalyticsLoopback | None = LogAnalyticsLoopback(self.entra) if maps else None
        self.servicemap = ServiceMapApi()
        if maps:
            self.alerts.mount(self.servicemap)
        self.table_prefix = table_prefix
        self._started: list[Any] = []

    @property
    def ca_bundle(self) -> str:
        return loopback_tls().ca_bundle_path

    def start(self) -> LoopbackStack:
        try:
            if self._own_azurite:
                self.azurite.start()
                self._started.append(self.azurite)
            for server in (self.entra, self.keyvault, self.logs, self.alerts, self.loganalytics):
                if server is None:
                    continue
                server.start()
                self._started.append(server)
            if self._own_servicenow:
                self.servicenow.start()
                self._started.append(self.servicenow)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        while self._started:
            server = self._started.pop()
            with contextlib.suppress(Exception):
                server.stop()

    def __enter__(self) -> LoopbackStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the app's view ------------------------------------------------------------------------

    def app_environment(self, **overrides: str) -> dict[str, str]:
        """App settings and identity variables that point the app at this stack."""
        env = {
            "AzureWebJobsStorage": self.azurite.connection_string,
            "KEY_VAULT_URL": self.keyvault.vault_url,
            "TLS_CA_BUNDLE": self.ca_bundle,
            "TABLE_PREFIX": self.table_prefix,
            "LOGS_INGESTION_ENDPOINT": self.logs.url,
            "LOGS_INGESTION_RULE_ID": LOGS_RULE_ID,
            "LOGS_INGESTION_STREAM": LOGS_STREAM,
            "LOGS_INGESTION_ERROR_STREAM": LOGS_ERROR_STREAM,
            "ARM_ENDPOINT": self.alerts.url,
            **({"LOGS_QUERY_ENDPOINT": self.loganalytics.url} if self.loganalytics is not None else {}),
            "HTTP_TIMEOUT_SECONDS": "10",
            # every server here is on 127.0.0.1, which the app refuses to call unless told it is a test
            "ALLOW_LOOPBACK_INSTANCES": "true",
            **self.entra.environment(),
        }
        env.update(overrides)
        return env

    @contextlib.contextmanager
    def app(self, **overrides: str) -> Iterator[Container]:
        """The process environment set to ``app_environment()`` and a fresh app container."""
        saved = dict(os.environ)
        try:
            for name in FOREIGN_IDENTITY_VARIABLES:
                os.environ.pop(name, None)
            os.environ.update(self.app_environment(**overrides))
            reset_container()
            yield get_container()
        finally:
            reset_container()
            os.environ.clear()
            os.environ.update(saved)

    def queues(self) -> QueueServiceClient:
        return QueueServiceClient.from_connection_string(self.azurite.connection_string)

    def cli(self, *argv: str, stdin: str = "") -> tuple[int, str]:
        """Run the operator's CLI in this process (inside ``app()``); returns exit code and output."""
        out = io.StringIO()
        cli = Cli(out=out, err=out, stdin=io.StringIO(stdin), environ=dict(os.environ))
        code = main(list(argv), cli)
        canary.observe(out.getvalue(), f"CLI output of {' '.join(argv[:2])}")
        return code, out.getvalue()

    def add_servicenow_connection(self, name: str, *options: str) -> str:
        """``connections add`` against the loopback ServiceNow (OAuth), secrets through stdin."""
        snow = self.servicenow
        code, output = self.cli(
            "connections",
            "add",
            name,
            "--type",
            "servicenow",
            "--url",
            snow.url,
            "--private-instance",
            "--user",
            snow.username,
            "--client-id",
            snow.client_id,
            "--secrets-stdin",
            *options,
            stdin=f"{snow.client_secret}\n{snow.password}\n",
        )
        if code != 0:
            raise RuntimeError(f"connections add {name} failed ({code}): {output}")
        return output
