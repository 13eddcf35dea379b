"""The host's storage queues, as the app itself sees them (the health check; bindings are the host's).

The queue is found the way the Functions host finds it: the ``AzureWebJobsStorage`` connection
string, else identity-based ``AzureWebJobsStorage__queueServiceUri`` or ``__accountName`` with the
app's credential.
"""

from __future__ import annotations

from azure.core.credentials import TokenCredential
from azure.storage.queue import QueueClient, QueueServiceClient

from shared_code.errors import ConfigurationError
from shared_code.settings import DEVELOPMENT_STORAGE, Settings
from shared_code.state.tables import transport_options

ALERT_QUEUE = "alert-deliveries"
"""The queue between the webhook and the delivery function."""

AZURITE_QUEUE_CONNECTION = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;"
)


def queue_client(
    settings: Settings, credential: TokenCredential | None, name: str, *, timeout: float = 5.0
) -> QueueClient:
    """A client for queue ``name`` with short timeouts (nothing is contacted here)."""
    if settings.storage_connection:
        conn = settings.storage_connection
        if conn.strip() == DEVELOPMENT_STORAGE:
            conn = AZURITE_QUEUE_CONNECTION
        endpoint = QueueServiceClient.from_connection_string(conn).url
        service = QueueServiceClient.from_connection_string(
            conn, **transport_options(endpoint, connect_timeout=min(timeout, 5.0), read_timeout=timeout)
        )
    else:
        endpoint = settings.queue_service_uri or (
            f"https://{settings.storage_account_name}.queue.core.windows.net"
            if settings.storage_account_name
            else ""
        )
        if not endpoint or credential is None:
            raise ConfigurationError(
                "no queue storage: set AzureWebJobsStorage, or AzureWebJobsStorage__accountName "
                "(identity-based, with AzureWebJobsStorage__credential=managedidentity)"
            )
        service = QueueServiceClient(
            endpoint,
            credential=credential,
            **transport_options(endpoint, connect_timeout=min(timeout, 5.0), read_timeout=timeout),
        )
    return service.get_queue_client(name)
