"""Credentials for the ServiceNow REST API as ``httpx.Auth`` flows.

``ServiceNowOAuth`` speaks OAuth 2 to the instance's ``/oauth_token.do`` (form-encoded password and
refresh_token grants). It caches the access token in memory, refreshes it before it expires or when
the API answers 401 (then retries the request exactly once), and writes a rotated refresh token
back through a ``RefreshTokenStore`` so the next cold start can use it instead of the password.

Why an auth flow and not headers set by the connector: the flow sees the 401 and can send the token
request through the same client (same TLS settings, timeouts and proxies), and the connector stays
ignorant of how it is authenticated.

The flows are for the synchronous ``httpx.Client`` only: one ``threading.Lock`` makes sure only one
thread talks to the token endpoint at a time while the others wait for its result.

No secret, token or password ever reaches a log line, an exception message or a repr.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import httpx

from shared_code.errors import ItsmAuthError, SecretStoreError
from shared_code.itsm.tokenauth import (
    CachedTokenAuth,
    RefreshTokenStore,
    SecretSource,
    lifetime_seconds,
)
from shared_code.itsm.tokenauth import connection_label as _connection_label
from shared_code.itsm.tokenauth import retryable as _retryable
from shared_code.itsm.tokenauth import reveal as _reveal

__all__ = ["RefreshTokenStore", "SecretSource", "ServiceNowBasicAuth", "ServiceNowOAuth"]

log = logging.getLogger(__name__)


DEFAULT_EXPIRES_IN = 1800.0
EXPIRY_SKEW_SECONDS = 60.0
_RETRYABLE_TOKEN_STATUSES = frozenset({408, 429})


class ServiceNowOAuth(CachedTokenAuth):
    """OAuth 2 (password and refresh_token grants) against ``{instance}/oauth_token.do``."""

    answered_by = "ServiceNow"

    def __init__(
        self,
        token_url: str,
        *,
        client_id: str,
        client_secret: SecretSource,
        username: str,
        password: SecretSource,
        refresh_token_store: RefreshTokenStore | None = None,
        connection_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        expiry_skew: float = EXPIRY_SKEW_SECONDS,
    ) -> None:
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._username = username
        self._password = password
        self._store = refresh_token_store
        super().__init__(connection_name=connection_name, clock=clock)
        self._expiry_skew = expiry_skew
        self._refresh_token: str | None = None
        self._stored_refresh_token: str | None = None
        self._store_loaded = False

    @property
    def username(self) -> str:
        """The ServiceNow user the tokens are issued to (for ``connections test``)."""
        return self._username

    def __repr__(self) -> str:
        return (
            f"ServiceNowOAuth(token_url={self._token_url!r}, client_id={self._client_id!r}, "
            f"username={self._username!r}, connection={self._connection_name!r})"
        )

    # -- the flow ---------------------------------------------------------------------------------

    # -- the token endpoint (called with the lock held) -----------------------------------------

    def _obtain(self) -> Generator[httpx.Request, httpx.Response, str | None]:
        """A new access token: refresh grant first when there is a refresh token, else password.

        Returns None when the token endpoint gave a retryable answer (5xx, 408, 429): that response
        then ends the flow and the caller's retry policy deals with it.
        """
        if not self._store_loaded:
            stored = self._store.load() if self._store is not None else None
            self._refresh_token = self._stored_refresh_token = stored or None
            self._store_loaded = True

        if self._refresh_token:
            response = yield self._token_request(
                {"grant_type": "refresh_token", "refresh_token": self._refresh_token}
            )
            if response.status_code == 200:
                return self._accept(response, "refresh_token")
            if _retryable(response.status_code):
                return None
            log.warning(
                "ServiceNow refused the refresh token of connection %s (HTTP %d): trying the password grant",
                _connection_label(self._connection_name),
                response.status_code,
            )
            self._refresh_token = None

        response = yield self._token_request(
            {"grant_type": "password", "username": self._username, "password": _reveal(self._password)}
        )
        if response.status_code == 200:
            return self._accept(response, "password")
        if _retryable(response.status_code):
            return None
        # read the store again next time: someone may re-authorise the connection meanwhile
        self._store_loaded = False
        label = _connection_label(self._connection_name)
        endpoint = httpx.URL(self._token_url).path
        raise ItsmAuthError(
            f"ServiceNow refused the OAuth credentials of connection {label} "
            f"(HTTP {response.status_code} from {endpoint}): re-authorise the connection",
            status=response.status_code,
        )

    def _token_request(self, grant: dict[str, str]) -> httpx.Request:
        form = {"client_id": self._client_id, "client_secret": _reveal(self._client_secret)} | grant
        return httpx.Request("POST", self._token_url, data=form, headers={"Accept": "application/json"})

    def _accept(self, response: httpx.Response, grant: str) -> str:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        access = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(access, str) or not access:
            raise ItsmAuthError(
                f"the OAuth token endpoint of connection {_connection_label(self._connection_name)} answered "
                "without an access token (is OAuth enabled for this client?): re-authorise the connection",
                status=response.status_code,
            )
        assert isinstance(body, dict)
        expires_in = _seconds(body.get("expires_in"))
        lifetime = max(0.0, expires_in - min(self._expiry_skew, expires_in / 2))
        self._token = (access, self._clock() + lifetime)
        refresh = body.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self._refresh_token = refresh
            if refresh != self._stored_refresh_token:
                self._save_refresh_token(refresh)
        log.info(
            "obtained a ServiceNow access token for connection %s (%s grant, valid %d s)",
            _connection_label(self._connection_name),
            grant,
            int(expires_in),
        )
        return access

    def _save_refresh_token(self, token: str) -> None:
        """Keep a rotated refresh token; failing to is logged, not fatal (the password grant remains)."""
        if self._store is None:
            return
        try:
            self._store.save(token)
        except SecretStoreError as exc:
            log.warning(
                "could not store the new refresh token of connection %s: %s",
                _connection_label(self._connection_name),
                type(exc).__name__,
            )
            return
        self._stored_refresh_token = token


def _seconds(value: object) -> float:
    """``expires_in`` as seconds; ServiceNow sends a number, some proxies turn it into a string."""
    return lifetime_seconds(value, DEFAULT_EXPIRES_IN)


class ServiceNowBasicAuth(httpx.Auth):
    """HTTP Basic with the connection's user; a 401 means the password is wrong or the user locked."""

    def __init__(self, username: str, password: SecretSource, *, connection_name: str = "") -> None:
        self._username = username
        self._password = password
        self._connection_name = connection_name
        self._header: str | None = None  # built on first use: reading the password may call Key Vault
        self._lock = threading.Lock()

    @property
    def username(self) -> str:
        return self._username

    def __repr__(self) -> str:
        return f"ServiceNowBasicAuth(username={self._username!r}, connection={self._connection_name!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._authorization()
        response = yield request
        if response.status_code == 401:
            with self._lock:
                self._header = None  # read the password again next time, it may have been changed
            raise ItsmAuthError(
                f"ServiceNow refused the user name and password of connection "
                f"{_connection_label(self._connection_name)}: re-authorise the connection",
                status=401,
            )

    def _authorization(self) -> str:
        with self._lock:
            if self._header is None:
                raw = f"{self._username}:{_reveal(self._password)}".encode()
                self._header = "Basic " + base64.b64encode(raw).decode("ascii")
            return self._header
