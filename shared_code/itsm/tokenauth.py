"""What the products' token flows share: a cached access token as an ``httpx.Auth`` flow.

The flow adds the cached token to each request; when there is none, or it is due, one thread gets a
new one from the product (``_obtain``, each product's own token endpoint) while the others wait for
it. A 401 from the API drops the token, gets a new one (unless another thread already did) and sends
the request again exactly once; a second 401 goes back to the caller. A token endpoint answer worth
retrying later (5xx, 408, 429) ends the flow with that answer, so the caller's retry policy decides.

For the synchronous ``httpx.Client`` only. No secret, token or password reaches a log line, an
exception message or a repr.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from typing import Any, Protocol

import httpx
from pydantic import SecretStr

from shared_code.errors import ItsmAuthError, SecretStoreError

log = logging.getLogger(__name__)

SecretSource = SecretStr | Callable[[], SecretStr]
"""A secret, or a callable that reads it when first needed (so building the auth reads nothing)."""

RETRYABLE_TOKEN_STATUSES = frozenset({408, 429})


class RefreshTokenStore(Protocol):
    """Where a connection's (rotating) refresh token lives between process starts."""

    def load(self) -> str | None: ...

    def save(self, token: str) -> None: ...


def reveal(source: SecretSource) -> str:
    secret = source() if callable(source) else source
    return secret.get_secret_value()


def connection_label(connection_name: str) -> str:
    return repr(connection_name) if connection_name else "(unnamed)"


def retryable(status: int) -> bool:
    """A token endpoint answer a later attempt may turn into a token."""
    return status >= 500 or status in RETRYABLE_TOKEN_STATUSES


def lifetime_seconds(value: object, default: float) -> float:
    """``expires_in`` as seconds: a number, or a numeric string after some proxies; else ``default``."""
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        return default
    try:
        seconds = float(value)
    except ValueError:
        return default
    return seconds if seconds > 0 else default


class CachedTokenAuth(httpx.Auth, ABC):
    """An access token cached in memory, renewed when due or refused (see the module docstring)."""

    # the 401 must be read before this flow blocks on the lock, so its connection goes back to the pool
    requires_response_body = True
    scheme = "Bearer"
    """The ``Authorization`` scheme the API expects."""
    answered_by = "the product"
    renewal = "obtaining a new access token"

    def __init__(self, *, connection_name: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self._connection_name = connection_name
        self._clock = clock
        self._lock = threading.Lock()
        # (access token, monotonic expiry): one tuple so readers never pair a token with another's expiry
        self._token: tuple[str, float] | None = None

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
        request.headers["Authorization"] = f"{self.scheme} {token}"
        response = yield request
        if response.status_code != 401:
            return

        with self._lock:
            current = self._valid_token()
            if current is None or current == token:
                # our token was refused; unless another thread already replaced it, get a new one
                self._token = None
                log.info(
                    "%s answered 401 for connection %s: %s",
                    self.answered_by,
                    connection_label(self._connection_name),
                    self.renewal,
                )
                obtained = yield from self._obtain()
                if obtained is None:
                    return
                current = obtained
        request.headers["Authorization"] = f"{self.scheme} {current}"
        yield request  # exactly one retry; a second 401 goes back to the caller

    def _valid_token(self) -> str | None:
        token = self._token
        if token is None or self._clock() >= token[1]:
            return None
        return token[0]

    @abstractmethod
    def _obtain(self) -> Generator[httpx.Request, httpx.Response, str | None]:
        """A new token from the product (called with the lock held; sets ``self._token``); None
        when the token endpoint's answer is worth retrying later (it then ends the flow)."""


class PasswordGrantAuth(CachedTokenAuth):
    """OAuth 2 password and refresh_token grants with a rotating refresh token (ServiceNow, Cherwell).

    The refresh token lives in a ``RefreshTokenStore`` (Key Vault) between process starts: it is
    read on first use, tried before the password, and written back whenever the endpoint rotates
    it. A refused refresh token falls back to the password; a refused password ends in
    ``ItsmAuthError`` ("re-authorise the connection"). Products say how to ask (``_token_request``)
    and how to explain a refusal (``_refused`` and ``_no_access_token``).
    """

    default_expires_in = 1800.0

    def __init__(
        self,
        *,
        username: str,
        password: SecretSource,
        refresh_token_store: RefreshTokenStore | None,
        connection_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        expiry_skew: float = 60.0,
    ) -> None:
        super().__init__(connection_name=connection_name, clock=clock)
        self._username = username
        self._password = password
        self._store = refresh_token_store
        self._expiry_skew = expiry_skew
        self._refresh_token: str | None = None
        self._stored_refresh_token: str | None = None
        self._store_loaded = False

    @property
    def username(self) -> str:
        """The user the tokens are issued to (for ``connections test``)."""
        return self._username

    @abstractmethod
    def _token_request(self, grant: dict[str, str]) -> httpx.Request:
        """The request that asks the token endpoint for ``grant`` (form fields of the grant)."""

    @abstractmethod
    def _refused(self, response: httpx.Response) -> ItsmAuthError:
        """The error for a refused password grant (names the connection, never a secret)."""

    @abstractmethod
    def _no_access_token(self, response: httpx.Response) -> ItsmAuthError:
        """The error for a 200 answer without an access token (a sign-in page, OAuth turned off)."""

    def _refusal_detail(self, response: httpx.Response) -> str:
        """What the log says of a refused refresh token besides its status (never a secret)."""
        return ""

    def _obtain(self) -> Generator[httpx.Request, httpx.Response, str | None]:
        """A new access token: the refresh grant when a refresh token is known, else the password."""
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
            if retryable(response.status_code):
                return None
            detail = self._refusal_detail(response)
            log.warning(
                "%s refused the refresh token of connection %s (HTTP %d%s): trying the password grant",
                self.answered_by,
                connection_label(self._connection_name),
                response.status_code,
                f", {detail}" if detail else "",
            )
            self._refresh_token = None

        response = yield self._token_request(
            {"grant_type": "password", "username": self._username, "password": reveal(self._password)}
        )
        if response.status_code == 200:
            return self._accept(response, "password")
        if retryable(response.status_code):
            return None
        # read the store again next time: someone may re-authorise the connection meanwhile
        self._store_loaded = False
        raise self._refused(response)

    def _accept(self, response: httpx.Response, grant: str) -> str:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        access = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(access, str) or not access or not isinstance(body, dict):
            raise self._no_access_token(response)
        expires_in = lifetime_seconds(body.get("expires_in"), self.default_expires_in)
        lifetime = max(0.0, expires_in - min(self._expiry_skew, expires_in / 2))
        self._token = (access, self._clock() + lifetime)
        refresh = body.get("refresh_token")
        if isinstance(refresh, str) and refresh:
            self._refresh_token = refresh
            if refresh != self._stored_refresh_token:
                self._save_refresh_token(refresh)
        log.info(
            "obtained a %s access token for connection %s (%s grant, valid %d s)",
            self.answered_by,
            connection_label(self._connection_name),
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
                connection_label(self._connection_name),
                type(exc).__name__,
            )
            return
        self._stored_refresh_token = token
