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
from typing import Protocol

import httpx
from pydantic import SecretStr

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
