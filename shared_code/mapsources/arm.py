"""Azure Resource Manager calls of the map sources: bearer tokens as an ``httpx.Auth``, and the
workspace customer-id lookup ``maps sources add`` uses when the operator gave only a resource id.

Tokens come from the app's ``TokenCredential`` (managed identity in Azure) for the ARM audience of
the configured endpoint; a 401 drops the cached token and the request is sent once more with a
fresh one. Retries of 429/5xx are ``shared_code.httpretry``'s, not this module's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any
from urllib.parse import urlsplit

import httpx
from azure.core.credentials import AccessToken, TokenCredential
from azure.core.exceptions import AzureError
from pydantic import ValidationError

from shared_code.domain.mapsources import Workspace
from shared_code.errors import ItsmUnavailableError, MapSourceError
from shared_code.httpretry import RetryPolicy, send_with_retries

PUBLIC_ARM_SCOPE = "https://management.azure.com/.default"
SOVEREIGN_ARM_HOSTS = ("management.usgovcloudapi.net", "management.chinacloudapi.cn")
WORKSPACE_API_VERSION = "2022-10-01"
TOKEN_REFRESH_MARGIN = 300.0


def arm_scope(arm_endpoint: str) -> str:
    """The token scope for an ARM endpoint: the public cloud's, or a national cloud's own host."""
    host = urlsplit(arm_endpoint).hostname or ""
    return f"https://{host}/.default" if host in SOVEREIGN_ARM_HOSTS else PUBLIC_ARM_SCOPE


class TokenCredentialAuth(httpx.Auth):
    """Bearer tokens from an azure-identity credential, cached until five minutes before expiry."""

    requires_response_body = True

    def __init__(self, credential: TokenCredential, scope: str) -> None:
        self._credential = credential
        self._scope = scope
        self._lock = threading.Lock()
        self._token: AccessToken | None = None

    def __repr__(self) -> str:
        return f"TokenCredentialAuth(scope={self._scope!r})"

    def _bearer(self, *, fresh: bool = False) -> str:
        with self._lock:
            if fresh or self._token is None or self._token.expires_on - TOKEN_REFRESH_MARGIN < time.time():
                try:
                    self._token = self._credential.get_token(self._scope)
                except AzureError as exc:
                    audience = self._scope.removesuffix("/.default")
                    raise MapSourceError(
                        f"could not get a token for {audience} ({type(exc).__name__})"
                    ) from exc
            return self._token.token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._bearer()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._bearer(fresh=True)}"
            yield request


def send(
    http: httpx.Client,
    auth: httpx.Auth,
    method: str,
    url: str,
    *,
    params: dict[str, str] | None = None,
    json_body: Any = None,
    policy: RetryPolicy | None = None,
    what: str = "Azure Resource Manager",
    timeout: httpx.Timeout | None = None,
) -> httpx.Response:
    """One ARM call with bounded retries; transport failures and exhausted retries become
    ``MapSourceError`` (any answer that is not retryable is returned for the caller to read)."""
    try:
        return send_with_retries(
            http,
            lambda: http.build_request(
                method, url, params=params, json=json_body, timeout=timeout or http.timeout
            ),
            policy,
            auth=auth,
            idempotent=True,  # map reads, including generateMap, change nothing
        )
    except ItsmUnavailableError as exc:
        raise MapSourceError(f"{what} kept failing: {exc}", status=exc.status) from exc


def error_text(response: httpx.Response) -> str:
    """``HTTP 404 ResourceNotFound: ...`` from an ARM error body, bounded."""
    text = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return text
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = str(error.get("code") or ""), str(error.get("message") or "")
        text += f" {code}" if code else ""
        text += f": {message[:300]}" if message else ""
    return text


def workspace_customer_id(
    http: httpx.Client,
    credential: TokenCredential,
    arm_endpoint: str,
    workspace: Workspace,
    *,
    policy: RetryPolicy | None = None,
) -> str:
    """The workspace's customer id (GUID) read from its ARM resource (needs read on the workspace)."""
    auth = TokenCredentialAuth(credential, arm_scope(arm_endpoint))
    response = send(
        http,
        auth,
        "GET",
        f"{arm_endpoint.rstrip('/')}{workspace.resource_id}",
        params={"api-version": WORKSPACE_API_VERSION},
        policy=policy,
    )
    if response.status_code != 200:
        raise MapSourceError(
            f"could not read workspace {workspace.name}: {error_text(response)}", status=response.status_code
        )
    try:
        customer_id = str(response.json()["properties"]["customerId"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MapSourceError(f"workspace {workspace.name}: the answer has no properties.customerId") from exc
    try:
        return Workspace(resource_id=workspace.resource_id, customer_id=customer_id).customer_id
    except ValidationError as exc:
        raise MapSourceError(f"workspace {workspace.name}: properties.customerId is not a GUID") from exc
