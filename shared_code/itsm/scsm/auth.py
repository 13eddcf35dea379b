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
import time
from collections.abc import Callable, Generator
from typing import Any

import httpx

from shared_code.errors import ItsmAuthError, ItsmUnavailableError
from shared_code.itsm.tokenauth import CachedTokenAuth, SecretSource, retryable
from shared_code.itsm.tokenauth import connection_label as _label
from shared_code.itsm.tokenauth import reveal as _reveal

log = logging.getLogger(__name__)

TOKEN_PATH = "/api/V3/Authorization/GetToken"  # noqa: S105 - an endpoint path, not a secret
TOKEN_MAX_AGE_SECONDS = 1800.0


class CiresonTokenAuth(CachedTokenAuth):
    """``Authorization: Token ...`` from the portal's GetToken endpoint, renewed when due or refused."""

    scheme = "Token"
    answered_by = "the Cireson portal"
    renewal = "signing in again"

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
        super().__init__(connection_name=connection_name, clock=clock)
        self._max_token_age = max_token_age

    @property
    def username(self) -> str:
        """The SCSM account the portal signs in (for ``connections test``)."""
        return self._username

    def __repr__(self) -> str:
        return (
            f"CiresonTokenAuth(token_url={self._token_url!r}, username={self._username!r}, "
            f"connection={self._connection_name!r})"
        )

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
        if retryable(status):
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
