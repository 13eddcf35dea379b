"""The Logs Ingestion API (data collection rules) through ``azure-monitor-ingestion``.

One client per endpoint, made on first use; every failure leaves as one ``SinkError`` that names the
stream and, for a refused token, the role the app's identity needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
from azure.monitor.ingestion import LogsIngestionClient

from shared_code.diagnose import LOGS_ROLE, describe
from shared_code.errors import SinkError


class LogsUploader:
    """One lazily made ``LogsIngestionClient`` for a data collection endpoint and rule."""

    def __init__(
        self,
        endpoint: str,
        rule_id: str,
        credential: TokenCredential,
        *,
        ca_bundle: str = "",
        timeout: float = 20.0,
        client_factory: Callable[..., LogsIngestionClient] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.rule_id = rule_id
        self._credential = credential
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._client_factory = client_factory
        self._client: LogsIngestionClient | None = None
        self._lock = threading.Lock()

    def _logs(self) -> LogsIngestionClient:
        with self._lock:
            if self._client is None:
                kwargs: dict[str, Any] = {"connection_timeout": self._timeout, "read_timeout": self._timeout}
                if self._ca_bundle:
                    kwargs["connection_verify"] = self._ca_bundle
                factory = self._client_factory or LogsIngestionClient
                self._client = factory(endpoint=self.endpoint, credential=self._credential, **kwargs)
            return self._client

    def upload(self, stream: str, records: Sequence[dict[str, Any]]) -> None:
        """Upload ``records`` to ``stream``; any failure becomes one SinkError naming the stream."""
        if not records:
            return
        try:
            self._logs().upload(rule_id=self.rule_id, stream_name=stream, logs=list(records))
        except ClientAuthenticationError as exc:
            raise SinkError(
                f"Logs Ingestion: the app's identity could not get a token ({type(exc).__name__}); "
                "check its role assignment 'Monitoring Metrics Publisher' on the data collection rule"
            ) from exc
        except HttpResponseError as exc:
            reason = exc.reason or (exc.error.code if exc.error else "") or type(exc).__name__
            raise SinkError(
                f"Logs Ingestion upload to stream {stream} failed: HTTP {exc.status_code} {reason}"
            ) from exc
        except AzureError as exc:
            reason = describe(exc, target=self.endpoint, role=LOGS_ROLE)
            raise SinkError(f"Logs Ingestion upload to stream {stream} failed: {reason}") from exc

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
