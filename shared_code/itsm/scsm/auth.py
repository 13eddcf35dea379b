"""Sign-in to the Cireson Portal API as an ``httpx.Auth`` flow.

The portal hands out a token for an SCSM account: ``POST /api/V3/Authorization/GetToken`` with the
JSON ``{"UserName", "Password", "LanguageCode"}`` answers the token as a JSON string, and every
other call carries ``Authorization: Token <token>``. There is no refresh token: a new token is
obtained with the password, before the cached one is ``max_token_age`` old or when the API answers
401 (then the request is retried exactly once).

Why a flow and not a header set by the connector: the flow sees the 401 and sends the sign-in
through the same client (same TLS settings, timeouts, proxies), and the connector stays ignorant of
how it is signed in. One ``threading.Lock`` makes sure only one thread signs in at a time.

No password or token ever reaches a log line, an exception message or a repr.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import httpx
from pydantic import SecretStr

from shared_code.errors import ItsmAuthError, ItsmUnavailableError

log = logging.getLogger(__name__)

TOKEN_PATH = "/api/V3/Authorization/GetToken"  # noqa: S105 - an endpoint path, not a secret
TOKEN_MAX_AGE_SECONDS = 1800.0
_RETRYABLE_STATUSES = frozenset({408, 429})

SecretSource = SecretStr | Callable[[], SecretStr]
"""A secret, or a callable that reads it when first needed (so building the auth reads nothing)."""


def _reveal(source: SecretSource) -> str:
    secret = source() if callable(source) else source
    return secret.get_secret_value()


def _label(connection_name: str) -> str:
    return repr(connection_name) if connection_name else "(unnamed)"


class CiresonTokenAuth(httpx.Auth):
    """``Authorization: Token ...`` from the portal's GetToken endpoint, renewed when due or refused."""

    # the 401 must be read before this flow blocks on the lock, so its connection goes back to the pool
    requires_response_body = True

    def __init__(
        self,
        portal_url: str,
        *,
        username: str,
        password: SecretSource,
        language_code: str = "ENU",
        connection_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        max_token_age: float = TOKEN_MAX_AGE_SECONDS,
    ) -> None:
        self._token_url = portal_url.rstrip("/") + TOKEN_PATH
        self._username = username
        self._password = password
        self._language_code = language_code
        self._connection_name = connection_name
        self._clock = clock
        self._max_token_age = max_token_age
        self._lock = threading.Lock()
        self._token: tuple[str, float] | None = None  # (token, monotonic time it stops being used)

    @property
    def username(self) -> str:
        """The SCSM account the portal signs in (for ``connections test``)."""
        return self._username

    def __repr__(self) -> str:
        return (
            f"CiresonTokenAuth(token_url={self._token_url!r}, username={self._username!r}, "
            f"connection={self._connection_name!r})"
        )

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._valid_token()
        if token is None:
            with self._lock:
                token = self._valid_token()
                if token is None:
                    obtained = yield from self._obtain()
                    if obtained is None:
                        return  # the sign-in's retryable answer goes back to the caller's retry policy
                    token = obtained
        request.headers["Authorization"] = f"Token {token}"
        response = yield request
        if response.status_code != 401:
            return

        with self._lock:
            current = self._valid_token()
            if current is None or current == token:
                # our token was refused (expired, or the portal restarted): sign in again, once
                self._token = None
                log.info(
                    "the Cireson portal answered 401 for connection %s: signing in again",
                    _label(self._connection_name),
                )
                obtained = yield from self._obtain()
                if obtained is None:
                    return
                current = obtained
        request.headers["Authorization"] = f"Token {current}"
        yield request  # exactly one retry; a second 401 goes back to the caller

    def _valid_token(self) -> str | None:
        token = self._token
        if token is None or self._clock() >= token[1]:
            return None
        return token[0]

    def _obtain(self) -> Generator[httpx.Request, httpx.Response, str | None]:
        """A new token (called with the lock held); None when the answer is worth retrying later."""
        body = {
            "UserName": self._username,
            "Password": _reveal(self._password),
            "LanguageCode": self._language_code,
        }
        response = yield httpx.Request(
            "POST", self._token_url, json=body, headers={"Accept": "application/json"}
        )
        status = response.status_code
        if status >= 500 or status in _RETRYABLE_STATUSES:
            return None
        label = _label(self._connection_name)
        if status in (400, 401, 403):
            raise ItsmAuthError(
                f"the Cireson portal refused the user name and password of connection {label} "
                f"(HTTP {status} from {TOKEN_PATH}): re-authorise the connection",
                status=status,
            )
        if status != 200:
            raise ItsmUnavailableError(
                f"the Cireson portal answered HTTP {status} to the sign-in of connection {label} "
                f"({TOKEN_PATH}): is the server URL the portal's?",
                status=status,
            )
        token = _token_of(response)
        if token is None:
            content_type = response.headers.get("Content-Type", "").split(";")[0] or "no content type"
            raise ItsmUnavailableError(
                f"the sign-in of connection {label} ({TOKEN_PATH}) answered {content_type} without a "
                "token: is the server URL the Cireson portal, and not a login page in front of it?",
                status=status,
            )
        self._token = (token, self._clock() + self._max_token_age)
        log.info("signed in to the Cireson portal for connection %s", label)
        return token


def _token_of(response: httpx.Response) -> str | None:
    """The token of a GetToken answer: a JSON string (some proxies drop the quotes: plain text)."""
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()
        content_type = response.headers.get("Content-Type", "").lower()
        if content_type.startswith("text/plain") and text and " " not in text and "<" not in text:
            return text
        return None
    if isinstance(body, str) and body.strip() and "<" not in body:
        return body.strip()
    return None
