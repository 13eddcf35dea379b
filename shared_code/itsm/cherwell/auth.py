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
from shared_code.itsm.tokenauth import connection_label as _label
from shared_code.itsm.tokenauth import retryable as _retryable
from shared_code.itsm.tokenauth import reveal as _reveal

__all__ = ["CherwellAuth", "RefreshTokenStore", "SecretSource"]

log = logging.getLogger(__name__)


DEFAULT_EXPIRES_IN = 1200.0  # a stock client's access token lifetime: 20 minutes
EXPIRY_SKEW_SECONDS = 60.0
MAX_ERROR_TEXT = 200
_RETRYABLE_TOKEN_STATUSES = frozenset({408, 429})


class CherwellAuth(CachedTokenAuth):
    """Password and refresh_token grants against ``{api}/token?auth_mode=...``."""

    answered_by = "Cherwell"

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
        super().__init__(connection_name=connection_name, clock=clock)
        self._expiry_skew = expiry_skew
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


def _seconds(value: object) -> float:
    """``expires_in`` as seconds (a number, or a numeric string after some proxies)."""
    return lifetime_seconds(value, DEFAULT_EXPIRES_IN)


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
