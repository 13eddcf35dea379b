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

import httpx

from shared_code.errors import ItsmAuthError
from shared_code.itsm.tokenauth import PasswordGrantAuth, RefreshTokenStore, SecretSource
from shared_code.itsm.tokenauth import connection_label as _connection_label
from shared_code.itsm.tokenauth import reveal as _reveal

__all__ = ["RefreshTokenStore", "SecretSource", "ServiceNowBasicAuth", "ServiceNowOAuth"]

log = logging.getLogger(__name__)


DEFAULT_EXPIRES_IN = 1800.0
EXPIRY_SKEW_SECONDS = 60.0


class ServiceNowOAuth(PasswordGrantAuth):
    """OAuth 2 (password and refresh_token grants) against ``{instance}/oauth_token.do``."""

    answered_by = "ServiceNow"
    default_expires_in = DEFAULT_EXPIRES_IN

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
        super().__init__(
            username=username,
            password=password,
            refresh_token_store=refresh_token_store,
            connection_name=connection_name,
            clock=clock,
            expiry_skew=expiry_skew,
        )
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret

    def __repr__(self) -> str:
        return (
            f"ServiceNowOAuth(token_url={self._token_url!r}, client_id={self._client_id!r}, "
            f"username={self._username!r}, connection={self._connection_name!r})"
        )

    def _token_request(self, grant: dict[str, str]) -> httpx.Request:
        form = {"client_id": self._client_id, "client_secret": _reveal(self._client_secret)} | grant
        return httpx.Request("POST", self._token_url, data=form, headers={"Accept": "application/json"})

    def _refused(self, response: httpx.Response) -> ItsmAuthError:
        label = _connection_label(self._connection_name)
        endpoint = httpx.URL(self._token_url).path
        return ItsmAuthError(
            f"ServiceNow refused the OAuth credentials of connection {label} "
            f"(HTTP {response.status_code} from {endpoint}): re-authorise the connection",
            status=response.status_code,
        )

    def _no_access_token(self, response: httpx.Response) -> ItsmAuthError:
        return ItsmAuthError(
            f"the OAuth token endpoint of connection {_connection_label(self._connection_name)} answered "
            "without an access token (is OAuth enabled for this client?): re-authorise the connection",
            status=response.status_code,
        )


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
