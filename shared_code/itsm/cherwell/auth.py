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
from collections.abc import Callable

import httpx

from shared_code.errors import ItsmAuthError
from shared_code.itsm.tokenauth import PasswordGrantAuth, RefreshTokenStore, SecretSource
from shared_code.itsm.tokenauth import connection_label as _label
from shared_code.itsm.tokenauth import reveal as _reveal

__all__ = ["CherwellAuth", "RefreshTokenStore", "SecretSource"]

log = logging.getLogger(__name__)


DEFAULT_EXPIRES_IN = 1200.0  # a stock client's access token lifetime: 20 minutes
EXPIRY_SKEW_SECONDS = 60.0
MAX_ERROR_TEXT = 200


class CherwellAuth(PasswordGrantAuth):
    """Password and refresh_token grants against ``{api}/token?auth_mode=...``."""

    answered_by = "Cherwell"
    default_expires_in = DEFAULT_EXPIRES_IN

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
        super().__init__(
            username=username,
            password=password,
            refresh_token_store=refresh_token_store,
            connection_name=connection_name,
            clock=clock,
            expiry_skew=expiry_skew,
        )
        self._token_url = httpx.URL(f"{api_url.rstrip('/')}/token", params={"auth_mode": auth_mode})
        self._client_id = client_id
        self._client_secret = client_secret

    def __repr__(self) -> str:
        return (
            f"CherwellAuth(token_url={str(self._token_url)!r}, client_id={self._client_id!r}, "
            f"username={self._username!r}, connection={self._connection_name!r})"
        )

    def _token_request(self, grant: dict[str, str]) -> httpx.Request:
        form = {"client_id": self._client_id} | grant
        if self._client_secret is not None:
            form["client_secret"] = _reveal(self._client_secret)
        return httpx.Request("POST", self._token_url, data=form, headers={"Accept": "application/json"})

    def _refusal_detail(self, response: httpx.Response) -> str:
        return self._error_text(response)

    def _refused(self, response: httpx.Response) -> ItsmAuthError:
        return ItsmAuthError(
            f"Cherwell refused the credentials of connection {_label(self._connection_name)} "
            f"(HTTP {response.status_code} from {self._token_url.path}: {self._error_text(response)}): "
            "check the user, password, client id and auth mode, then re-authorise the connection",
            status=response.status_code,
        )

    def _no_access_token(self, response: httpx.Response) -> ItsmAuthError:
        content_type = response.headers.get("Content-Type", "").split(";")[0] or "no content type"
        return ItsmAuthError(
            f"the token endpoint of connection {_label(self._connection_name)} answered {content_type} "
            "without an access token (a sign-in page in front of the API?): check the URL and auth mode",
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
