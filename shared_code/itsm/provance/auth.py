"""Bearer tokens for the Dataverse Web API from Entra ID (client credentials) as an ``httpx.Auth`` flow.

The token comes from azure-identity's ``ClientSecretCredential`` for the scope
``https://<environment>/.default`` (Dataverse's resource is the environment URL). The credential is
built on first use, because the client secret is read from Key Vault then and not when the connector
is built; azure-identity caches the token and renews it before it expires. A 401 from Dataverse means
the token was revoked or the environment no longer takes it: the flow drops the credential (and with
it the cached token), gets a new token and retries the request exactly once.

The authority host is the connection's, else ``AZURE_AUTHORITY_HOST`` (which azure-identity reads
itself), else the public cloud; a private authority (a test Entra, Azure Stack) gets instance
discovery turned off, as the app's own credential does. ``TLS_CA_BUNDLE`` is the trust the app's
other clients use for a private CA.

No secret or token reaches a log line, an exception message or a repr.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Generator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from azure.core.credentials import TokenCredential
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from pydantic import SecretStr

from shared_code.errors import ItsmAuthError, ItsmUnavailableError

log = logging.getLogger(__name__)

PUBLIC_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)
MAX_ERROR_TEXT = 300

CredentialFactory = Callable[[], TokenCredential]


def client_secret_credential(
    tenant_id: str,
    client_id: str,
    client_secret: Callable[[], SecretStr],
    *,
    authority_host: str = "",
    environ: Mapping[str, str] | None = None,
) -> CredentialFactory:
    """A factory of ``ClientSecretCredential``s for one connection (called on first use and after a 401)."""

    def build() -> TokenCredential:
        from azure.identity import ClientSecretCredential  # noqa: PLC0415 - only when a token is needed

        env = os.environ if environ is None else environ
        authority = authority_host or env.get("AZURE_AUTHORITY_HOST", "")
        kwargs: dict[str, Any] = {}
        if authority:
            kwargs["authority"] = authority
            if (urlsplit(authority).hostname or "") not in PUBLIC_AUTHORITY_HOSTS:
                kwargs["disable_instance_discovery"] = True
        ca_bundle = env.get("TLS_CA_BUNDLE", "")
        if ca_bundle:
            kwargs["connection_verify"] = ca_bundle
        secret = client_secret().get_secret_value()
        return ClientSecretCredential(tenant_id, client_id, secret, **kwargs)

    return build


class DataverseAuth(httpx.Auth):
    """``Authorization: Bearer`` from an Entra credential; one retry with a fresh token after a 401."""

    requires_response_body = True  # the 401 is read before the lock, so its connection is released

    def __init__(self, credential: CredentialFactory, scope: str, *, connection_name: str = "") -> None:
        self._factory = credential
        self._scope = scope
        self._connection_name = connection_name
        self._lock = threading.Lock()
        self._credential: TokenCredential | None = None

    def __repr__(self) -> str:
        return f"DataverseAuth(scope={self._scope!r}, connection={self._connection_name!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        credential = self._current()
        request.headers["Authorization"] = f"Bearer {self._token(credential)}"
        response = yield request
        if response.status_code != 401:
            return
        log.info(
            "Dataverse answered 401 for connection %r: getting a new token from Entra ID",
            self._connection_name,
        )
        with self._lock:
            if self._credential is credential:
                self._credential = None  # a new credential has an empty token cache
        request.headers["Authorization"] = f"Bearer {self._token(self._current())}"
        yield request  # exactly one retry; a second 401 goes back to the caller

    def _current(self) -> TokenCredential:
        with self._lock:
            if self._credential is None:
                self._credential = self._factory()
            return self._credential

    def _token(self, credential: TokenCredential) -> str:
        try:
            return credential.get_token(self._scope).token
        except ClientAuthenticationError as exc:
            with self._lock:
                if self._credential is credential:
                    self._credential = None  # the secret may be replaced meanwhile: read it again
            if _unreachable(exc):
                raise ItsmUnavailableError(
                    f"Entra ID could not be reached for connection {self._connection_name!r}: "
                    f"{_first_line(exc)}"
                ) from exc
            raise ItsmAuthError(
                f"Entra ID refused the app credentials of connection {self._connection_name!r} "
                f"({_first_line(exc)}): re-authorise the connection"
            ) from exc
        except ServiceRequestError as exc:
            raise ItsmUnavailableError(
                f"Entra ID could not be reached for connection {self._connection_name!r}: "
                f"{type(exc).__name__}"
            ) from exc


def _unreachable(exc: ClientAuthenticationError) -> bool:
    """The token endpoint failed (5xx, throttled) rather than refusing the credentials."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


def _first_line(exc: Exception) -> str:
    """The AADSTS code and sentence of an Entra error (never a secret: Entra does not echo it)."""
    message = str(getattr(exc, "message", "") or exc)
    start = message.find("AADSTS")
    text = message[start:] if start >= 0 else message
    line = " ".join(text.split(". ")[0].split())
    return line if len(line) <= MAX_ERROR_TEXT else line[: MAX_ERROR_TEXT - 1] + "…"
