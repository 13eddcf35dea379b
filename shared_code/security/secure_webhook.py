"""Azure Monitor "Secure Webhook" tokens: an action group proves it is Azure Monitor.

An action group with a secure webhook signs in as the first-party "AZNS AAD Webhook" app and sends
an Entra ID access token issued for the customer's own app registration, which has assigned the
``ActionGroupsSecureWebhook`` app role to that first-party app. A connection that names the app
registration (``secure_webhook_app_id`` / ``secure_webhook_tenant_id``) accepts only such tokens.

Checked, in this order, before anything is fetched for the token: RS256 in the header and a key
id, the token version, and the tenant; then, with the tenant's OpenID metadata (issuer, key set):
the RS256 signature, ``exp`` / ``nbf`` (small leeway), issuer, audience, the caller's app id
(``appid`` in v1 tokens, ``azp`` in v2) and the role.

  v1: iss ``https://sts.windows.net/{tid}/``, aud = the Application ID URI or the client id
  v2: iss ``https://login.microsoftonline.com/{tid}/v2.0``, aud = the client id

The expected issuer is the one the tenant's metadata document names (so sovereign clouds and a
test authority work unchanged). Metadata is cached for a day, the key set for an hour; a token
signed with an unknown key id makes the key set be fetched once more (at most once per
``REFRESH_INTERVAL`` per key set, so a stream of made-up key ids cannot turn the app into a
fetcher), and is refused if the key is still unknown.

Refusals raise ``UnauthorizedError`` (its message is generic; the reason is logged here);
metadata or keys that cannot be fetched raise ``IdentityProviderError`` (the app cannot decide
now; the caller should retry).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from jwt import PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError, PyJWKError

from shared_code.errors import IdentityProviderError, ItsmUnavailableError, UnauthorizedError
from shared_code.httpretry import RetryPolicy, send_with_retries

log = logging.getLogger(__name__)

AZNS_WEBHOOK_APP_ID = "461e8683-5575-4561-ac7f-899cc907d62a"
"""The first-party app Azure Monitor action groups sign in as to send a secure webhook."""
WEBHOOK_ROLE = "ActionGroupsSecureWebhook"
ALGORITHM = "RS256"
LEEWAY_SECONDS = 60
METADATA_TTL_SECONDS = 24 * 3600.0
KEY_SET_TTL_SECONDS = 3600.0
REFRESH_INTERVAL = 10.0
MAX_TOKEN_CHARS = 16_384
FETCH_TIMEOUT_SECONDS = 5.0
"""Fetches happen while an action group waits (it gives up after 10 s), so they stay short."""

_V1, _V2 = "1.0", "2.0"


@dataclass(frozen=True)
class SecureWebhookRequirement:
    """What one connection demands of a token; ``connection`` only names it in the log."""

    connection: str
    tenant_id: str
    app_id: str
    app_id_uri: str = ""

    def audiences(self, version: str) -> list[str]:
        """v2 tokens carry the client id; v1 tokens the Application ID URI or the client id."""
        if version == _V2:
            return [self.app_id]
        return [self.app_id, *([self.app_id_uri] if self.app_id_uri else [])]


@dataclass(frozen=True)
class VerifiedCaller:
    tenant_id: str
    caller_app_id: str
    token_version: str


@dataclass(frozen=True)
class _Metadata:
    issuer: str
    jwks_uri: str
    fetched_at: float


class SecureWebhookValidator:
    """Validates bearer tokens against Entra ID at ``authority_host``; thread-safe, caches inside."""

    def __init__(
        self,
        authority_host: str,
        http: httpx.Client,
        ssl_context: ssl.SSLContext,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        fetch_timeout: float = FETCH_TIMEOUT_SECONDS,
    ) -> None:
        self._authority = authority_host.rstrip("/")
        self._http = http
        self._ssl_context = ssl_context
        self._retry = retry or RetryPolicy(
            max_attempts=2, base_backoff=0.2, max_backoff=0.5, max_retry_after=1
        )
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._lock = threading.Lock()
        self._metadata: dict[tuple[str, str], _Metadata] = {}
        self._key_sets: dict[str, PyJWKClient] = {}
        self._last_refresh: dict[str, float] = {}

    def verify(self, authorization: str | None, requirement: SecureWebhookRequirement) -> VerifiedCaller:
        try:
            return self._verify(authorization, requirement)
        except UnauthorizedError as exc:
            log.warning(
                "secure webhook: refused a request for connection %s: %s", requirement.connection, exc.reason
            )
            raise

    def _verify(self, authorization: str | None, requirement: SecureWebhookRequirement) -> VerifiedCaller:
        token = _bearer_token(authorization)
        header, unverified = _peek(token)
        if header.get("alg") != ALGORITHM:
            raise UnauthorizedError(f"token algorithm {str(header.get('alg'))[:20]!r} is not {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise UnauthorizedError("token header has no key id (kid)")
        version = unverified.get("ver")
        if version not in (_V1, _V2):
            raise UnauthorizedError(f"token version {str(version)[:10]!r} is neither 1.0 nor 2.0")
        tenant = str(unverified.get("tid", ""))
        if tenant.lower() != requirement.tenant_id.lower():
            raise UnauthorizedError(f"token tenant {tenant[:40]!r} is not the connection's tenant")

        metadata = self._tenant_metadata(requirement.tenant_id, version)
        key = self._signing_key(metadata.jwks_uri, kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[ALGORITHM],
                audience=requirement.audiences(version),
                issuer=metadata.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "nbf", "iss", "aud", "tid"]},
            )
        except jwt.InvalidTokenError as exc:
            raise UnauthorizedError(f"token refused: {type(exc).__name__}: {str(exc)[:200]}") from None

        if str(claims.get("tid", "")).lower() != requirement.tenant_id.lower():
            raise UnauthorizedError("token tenant is not the connection's tenant")
        caller = str(claims.get("appid" if version == _V1 else "azp", ""))
        if caller.lower() != AZNS_WEBHOOK_APP_ID:
            raise UnauthorizedError(f"caller app {caller[:40]!r} is not Azure Monitor's secure webhook app")
        roles = claims.get("roles")
        if not isinstance(roles, list) or WEBHOOK_ROLE not in roles:
            raise UnauthorizedError(f"token lacks the {WEBHOOK_ROLE} role")
        return VerifiedCaller(tenant_id=tenant, caller_app_id=caller, token_version=version)

    # -- metadata and keys ----------------------------------------------------------------------

    def _tenant_metadata(self, tenant: str, version: str) -> _Metadata:
        now = self._clock()
        with self._lock:
            cached = self._metadata.get((tenant, version))
        if cached is not None and now - cached.fetched_at < METADATA_TTL_SECONDS:
            return cached
        path = (
            ".well-known/openid-configuration" if version == _V1 else "v2.0/.well-known/openid-configuration"
        )
        url = f"{self._authority}/{tenant}/{path}"
        try:
            response = send_with_retries(
                self._http,
                lambda: self._http.build_request("GET", url, timeout=self._fetch_timeout),
                self._retry,
            )
        except ItsmUnavailableError as exc:
            raise IdentityProviderError(f"Entra ID metadata could not be fetched: {exc}") from exc
        if response.status_code != 200:
            raise IdentityProviderError(
                f"Entra ID metadata for the tenant answered HTTP {response.status_code} (v{version})"
            )
        try:
            document = response.json()
            issuer = str(document["issuer"]).replace("{tenantid}", tenant)
            jwks_uri = str(document["jwks_uri"])
        except (ValueError, KeyError, TypeError) as exc:
            raise IdentityProviderError("Entra ID metadata is not an OpenID configuration document") from exc
        if not jwks_uri.lower().startswith("https://"):
            raise IdentityProviderError("Entra ID metadata names a key set that is not https")
        metadata = _Metadata(issuer=issuer, jwks_uri=jwks_uri, fetched_at=now)
        with self._lock:
            self._metadata[(tenant, version)] = metadata
        return metadata

    def _key_set(self, jwks_uri: str) -> PyJWKClient:
        with self._lock:
            client = self._key_sets.get(jwks_uri)
            if client is None:
                client = PyJWKClient(
                    jwks_uri,
                    cache_jwk_set=True,
                    lifespan=KEY_SET_TTL_SECONDS,
                    timeout=self._fetch_timeout,
                    ssl_context=self._ssl_context,
                    cooldown_duration=0,  # refreshes are rationed here, per key set
                )
                self._key_sets[jwks_uri] = client
            return client

    def _signing_key(self, jwks_uri: str, kid: str) -> jwt.PyJWK:
        client = self._key_set(jwks_uri)
        key = self._find_key(client, kid, refresh=False)
        if key is None and self._may_refresh(jwks_uri):
            key = self._find_key(client, kid, refresh=True)
        if key is None:
            raise UnauthorizedError(f"token key id {kid[:80]!r} is not in the tenant's key set")
        return key

    def _may_refresh(self, jwks_uri: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last_refresh.get(jwks_uri)
            if last is not None and now - last < REFRESH_INTERVAL:
                return False
            self._last_refresh[jwks_uri] = now
            return True

    @staticmethod
    def _find_key(client: PyJWKClient, kid: str, *, refresh: bool) -> jwt.PyJWK | None:
        try:
            keys = client.get_signing_keys(refresh=refresh)
        except PyJWKClientConnectionError as exc:
            raise IdentityProviderError("Entra ID signing keys could not be fetched") from exc
        except (PyJWKClientError, PyJWKError) as exc:
            raise IdentityProviderError(f"Entra ID signing keys are unusable: {type(exc).__name__}") from exc
        return client.match_kid(keys, kid)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise UnauthorizedError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("the Authorization header is not a bearer token")
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        raise UnauthorizedError(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims WITHOUT verification: only to choose what to verify against."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.InvalidTokenError, json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise UnauthorizedError("the bearer token is not a JWT") from None
    if not isinstance(claims, dict):
        raise UnauthorizedError("the bearer token's payload is not a JSON object")
    return header, claims
