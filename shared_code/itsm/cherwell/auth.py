"""Cherwell's OAuth 2 token endpoint (``POST {api}/token``) as an ``httpx.Auth`` flow.

The REST API takes form-encoded ``grant_type=password`` (client id, user name, password, and the
client secret for native clients) or ``grant_type=refresh_token``, with the sign-in mode as the
``auth_mode`` query parameter. Access tokens live about 20 minutes; the refresh token that comes
with each one replaces the previous (the old one stops working), so every new refresh token is
written back through a ``RefreshTokenStore`` (Key Vault), and the next cold start refreshes
instead of sending the password again.

The token endpoint is an OWIN OAuth server: refused credentials come back as HTTP 400 with
``{"error": "invalid_grant", "error_description": ...}`` (not 401). An API call answered 401 gets
a new access token and is sent again exactly once; a second 401 goes back to the caller.

One ``threading.Lock`` lets one thread at a time talk to the token endpoint (synchronous
``httpx.Client`` only). No secret, token or password reaches a log line, an exception or a repr.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import httpx
from pydantic import SecretStr

from shared_code.errors import ItsmAuthError, SecretStoreError

log = logging.getLogger(__name__)

SecretSource = SecretStr | Callable[[], SecretStr]
"""A secret, or a callable that reads it when first needed (so building the auth reads nothing)."""

DEFAULT_EXPIRES_IN = 1200.0  # a stock client's access token lifetime: 20 minutes
EXPIRY_SKEW_SECONDS = 60.0
MAX_ERROR_TEXT = 200
_RETRYABLE_TOKEN_STATUSES = frozenset({408, 429})


class RefreshTokenStore(Protocol):
    """Where a connection's rotating refresh token lives between process starts."""

    def load(self) -> str | None: ...

    def save(self, token: str) -> None: ...


def _reveal(source: SecretSource) -> str:
    secret = source() if callable(source) else source
    return secret.get_secret_value()


def _label(connection_name: str) -> str:
    return repr(connection_name) if connection_name else "(unnamed)"


class CherwellAuth(httpx.Auth):
    """Password and refresh_token grants against ``{api}/token?auth_mode=...``."""

    # the 401 must be read before this flow blocks on the lock, so its connection goes back to the pool
    requires_response_body = True

    def __init__(
        self,
        api_url: str,
        *,
        client_id: str,
        username: str,
        password: SecretSource,
        auth_mode: str = "Internal",
        client_secret: SecretSource | None = None,
        refresh_token_store: RefreshTokenStore | None = None,
        connection_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        expiry_skew: float = EXPIRY_SKEW_SECONDS,
    ) -> None:
        self._token_url = httpx.URL(f"{api_url.rstrip('/')}/token", params={"auth_mode": auth_mode})
        self._client_id = client_id
        self._username = username
        self._password = password
        self._client_secret = client_secret
        self._store = refresh_token_store
        self._connection_name = connection_name
        self._clock = clock
        self._expiry_skew = expiry_skew
        self._lock = threading.Lock()
        # (access token, monotonic expiry): one tuple so readers never pair a token with another's expiry
        self._token: tuple[str, float] | None = None
        self._refresh_token: str | None = None
        self._stored_refresh_token: str | None = None
        self._store_loaded = False

    @property
    def username(self) -> str:
        """The Cherwell user the tokens are issued to (for ``connections test``)."""
        return self._username

    def __repr__(self) -> str:
        return (
            f"CherwellAuth(token_url={str(self._token_url)!r}, client_id={self._client_id!r}, "
            f"username={self._username!r}, connection={self._connection_name!r})"
        )

    # -- the flow ---------------------------------------------------------------------------------

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._valid_token()
        if token is None:
            with self._lock:
                token = self._valid_token()
                if token is None:
                    obtained = yield from self._obtain()
                    if obtained is None:
                        return  # the token endpoint's retryable answer goes back to the caller
                    token = obtained
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return

        with self._lock:
            current = self._valid_token()
            if current is None or current == token:
                # our token was refused (expired early, or the user logged out): get a new one,
                # unless another thread already did
                self._token = None
                log.info(
                    "Cherwell answered 401 for connection %s: obtaining a new access token",
                    _label(self._connection_name),
                )
                obtained = yield from self._obtain()
                if obtained is None:
                    return
                current = obtained
        request.headers["Authorization"] = f"Bearer {current}"
        yield request  # exactly one retry; a second 401 goes back to the caller

    def _valid_token(self) -> str | None:
        token = self._token
        if token is None or self._clock() >= token[1]:
            return None
        return token[0]

    # -- the token endpoint (called with the lock held) -----------------------------------------

    def _obtain(self) -> Generator[httpx.Request, httpx.Response, str | None]:
        """A new access token: the refresh grant when a refresh token is known, else the password.

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
                "Cherwell refused the refresh token of connection %s (HTTP %d, %s): using the password",
                _label(self._connection_name),
                response.status_code,
                self._error_text(response),
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
        raise ItsmAuthError(
            f"Cherwell refused the credentials of connection {_label(self._connection_name)} "
            f"(HTTP {response.status_code} from {self._token_url.path}: {self._error_text(response)}): "
            "check the user, password, client id and auth mode, then re-authorise the connection",
            status=response.status_code,
        )

    def _error_text(self, response: httpx.Response) -> str:
        """The endpoint's error text with any of our secrets blanked out, should it echo one."""
        text = _oauth_error(response)
        secrets = [self._refresh_token or "", _reveal(self._password)]
        if self._client_secret is not None:
            secrets.append(_reveal(self._client_secret))
        for secret in secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    def _token_request(self, grant: dict[str, str]) -> httpx.Request:
        form = {"client_id": self._client_id} | grant
        if self._client_secret is not None:
            form["client_secret"] = _reveal(self._client_secret)
        return httpx.Request("POST", self._token_url, data=form, headers={"Accept": "application/json"})

    def _accept(self, response: httpx.Response, grant: str) -> str:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        access = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(access, str) or not access:
            content_type = response.headers.get("Content-Type", "").split(";")[0] or "no content type"
            raise ItsmAuthError(
                f"the token endpoint of connection {_label(self._connection_name)} answered {content_type} "
                "without an access token (a sign-in page in front of the API?): check the URL and auth mode",
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
            "obtained a Cherwell access token for connection %s (%s grant, valid %d s)",
            _label(self._connection_name),
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
                _label(self._connection_name),
                type(exc).__name__,
            )
            return
        self._stored_refresh_token = token


def _retryable(status: int) -> bool:
    return status >= 500 or status in _RETRYABLE_TOKEN_STATUSES


def _seconds(value: object) -> float:
    """``expires_in`` as seconds (a number, or a numeric string after some proxies)."""
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        return DEFAULT_EXPIRES_IN
    try:
        seconds = float(value)
    except ValueError:
        return DEFAULT_EXPIRES_IN
    return seconds if seconds > 0 else DEFAULT_EXPIRES_IN


def _oauth_error(response: httpx.Response) -> str:
    """The OAuth ``error`` code and description, shortened; never the request."""
    try:
        body = response.json()
    except ValueError:
        return "no error details"
    if not isinstance(body, dict):
        return "no error details"
    parts = [str(body.get(key) or "").strip() for key in ("error", "error_description")]
    text = " ".join(": ".join(part for part in parts if part).split()) or "no error details"
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 1] + "…"
