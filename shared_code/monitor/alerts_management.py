"""Closing Azure Monitor alerts through the Alerts Management API (backward sync).

Built on azure-core's pipeline, as the Azure SDKs are: a bearer-token policy (token cache and
refresh), a retry policy that honours ``Retry-After`` in seconds or as an HTTP date, and the
requests transport with the app's CA bundle. Closing an alert is idempotent (``newState=Closed``), so
the POST may be retried after a 429, a 5xx or a connection error.

Only ids of the exact Alerts Management form are closed, and the request URL is built from the
parsed parts, never from the id as given: an id that passed the webhook's looser checks (published
test payloads use ids that are not GUIDs) but carries ``..`` segments, another provider or extra
segments cannot make the app close an alert elsewhere.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from azure.core import PipelineClient
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ClientAuthenticationError
from azure.core.pipeline.policies import (
    BearerTokenCredentialPolicy,
    HeadersPolicy,
    RequestIdPolicy,
    RetryPolicy,
)
from azure.core.pipeline.transport import HttpTransport, RequestsTransport
from azure.core.rest import HttpRequest

from shared_code.domain.alert import CloseOutcome, parse_alert_id
from shared_code.errors import AlertsApiError

API_VERSION = "2019-05-05-preview"
PUBLIC_ARM_SCOPE = "https://management.azure.com/.default"
SOVEREIGN_ARM_HOSTS = ("management.usgovcloudapi.net", "management.chinacloudapi.cn")


def arm_scope(arm_endpoint: str) -> str:
    host = urlsplit(arm_endpoint).hostname or ""
    return f"https://{host}/.default" if host in SOVEREIGN_ARM_HOSTS else PUBLIC_ARM_SCOPE


class _IdempotentRetry(RetryPolicy):  # type: ignore[type-arg]  # generic only in the stubs
    """azure-core's retry policy, allowed to repeat this client's POST (closing is idempotent)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._method_whitelist = frozenset({"POST"})


class AlertsManagementClient:
    """``POST {arm}{alertId}/changestate?newState=Closed`` with the app's identity."""

    def __init__(
        self,
        credential: TokenCredential,
        arm_endpoint: str,
        *,
        scope: str | None = None,
        ca_bundle: str = "",
        timeout: float = 20.0,
        retry_total: int = 3,
        retry_backoff_max: float = 30.0,
        transport: HttpTransport[Any, Any] | None = None,
    ) -> None:
        self._arm = arm_endpoint.rstrip("/")
        policies = [
            RequestIdPolicy(),
            HeadersPolicy({"User-Agent": "azure-monitor-itsm-connector/0.1"}),
            _IdempotentRetry(
                retry_total=retry_total,
                retry_backoff_factor=0.8,
                retry_backoff_max=retry_backoff_max,
                retry_on_status_codes=[429, 500, 502, 503, 504],
            ),
            BearerTokenCredentialPolicy(credential, scope or arm_scope(arm_endpoint)),
        ]
        if transport is None:
            transport = RequestsTransport(
                connection_verify=ca_bundle or True, connection_timeout=timeout, read_timeout=timeout
            )
        self._pipeline: PipelineClient[HttpRequest, Any] = PipelineClient(
            base_url=self._arm, policies=policies, transport=transport
        )

    def close_alert(self, alert_id: str) -> CloseOutcome:
        ref = parse_alert_id(alert_id)
        if ref is None:
            raise AlertsApiError(
                f"not an Alerts Management alert id of the exact form: {alert_id[:200]!r}", permanent=True
            )
        request = HttpRequest(
            "POST",
            f"{self._arm}{ref.path}/changestate",
            params={"api-version": API_VERSION, "newState": "Closed"},
        )
        try:
            response = self._pipeline.send_request(request)
        except ClientAuthenticationError as exc:
            raise AlertsApiError(
                f"could not get a token for Azure Resource Manager ({type(exc).__name__})", permanent=False
            ) from exc
        except AzureError as exc:
            raise AlertsApiError(
                f"closing alert {ref.path}: {type(exc).__name__} after retries", permanent=False
            ) from exc
        status = response.status_code
        if status < 300:
            return CloseOutcome.CLOSED
        if status == 404:
            return CloseOutcome.NOT_FOUND
        if status == 429 or status >= 500:
            raise AlertsApiError(
                f"closing alert {ref.path}: HTTP {status} after retries", permanent=False, status=status
            )
        hint = (
            "; the app's identity needs 'Monitoring Contributor' on the alerts' scope"
            if status in (401, 403)
            else ""
        )
        raise AlertsApiError(
            f"closing alert {ref.path}: HTTP {status} {_error_text(response)}{hint}",
            permanent=True,
            status=status,
        )

    def close(self) -> None:
        self._pipeline.close()


def _error_text(response: Any) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("code") or error.get("message") or "")[:200]
    except (ValueError, AttributeError):
        return ""
