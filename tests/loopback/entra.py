"""A loopback Microsoft Entra ID (v2.0 endpoints) for the app's real credential code.

What MSAL (inside azure-identity) asks for, served over TLS on 127.0.0.1:

* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (tenant discovery, v2.0 issuer) and
  ``GET /{tenant}/.well-known/openid-configuration`` (v1.0: issuer ``https://sts.windows.net/{tid}/``);
* ``GET /common/discovery/keys`` and ``GET /{tenant}/discovery/v2.0/keys``: the JWKS of the RSA keys
  made with :meth:`EntraLoopback.add_signing_key`, which sign the JWTs that
  :meth:`EntraLoopback.signed_token` issues (secure webhook tests); ``openid_fault`` /
  ``keys_fault`` make those routes answer an error status instead;
* ``GET /common/discovery/instance`` (instance discovery; MSAL only calls it on
  login.microsoftonline.com unless told otherwise, served for completeness);
* ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=client_credentials``, ``client_id``,
  ``client_secret`` and ``scope``: checks the client and secret, issues an opaque random bearer
  token recorded with its scope, tenant, client and expiry.

Other loopback servers check bearer tokens with :meth:`EntraLoopback.validate`
(``validate(token, audience_prefix)``), or with a :class:`StaticTokenCredential` when a test wants
tokens without any HTTP round trip.

Recipe (verified with azure-identity 1.27.0 / msal 1.39.0; see tests/integration/test_loopback_azure.py):

Environment, as the app reads it::

    AZURE_TENANT_ID=<entra.tenant_id>
    AZURE_CLIENT_ID=<a client added with entra.add_client(...)>
    AZURE_CLIENT_SECRET=<its secret>
    AZURE_AUTHORITY_HOST=<entra.url>              # https://127.0.0.1:PORT (must be https)
    AZURE_TOKEN_CREDENTIALS=EnvironmentCredential # optional, recommended: DefaultAzureCredential
                                                  # then holds only EnvironmentCredential
    # unset AZURE_REGIONAL_AUTHORITY_NAME (region discovery would probe IMDS)

Keyword arguments, on the credential (all three credential types accept them)::

    DefaultAzureCredential(disable_instance_discovery=True, connection_verify=ca_bundle_path,
                           exclude_managed_identity_credential=True, ...)
    ClientSecretCredential(tenant_id, client_id, secret, authority=entra.url,
                           disable_instance_discovery=True, connection_verify=ca_bundle_path)

* ``disable_instance_discovery=True`` is REQUIRED: without it MSAL treats 127.0.0.1 as an unknown
  authority and first calls ``https://login.microsoftonline.com/common/discovery/instance``
  (non-loopback). azure-identity has no environment variable for it; it is a kwarg only.
* TLS trust: ``connection_verify=<ca bundle path>`` (an azure-core transport option; the credential
  hands it to MSAL's HTTP pipeline). Alternatively ``REQUESTS_CA_BUNDLE=<ca bundle path>`` in the
  environment works too, because azure-core's RequestsTransport lets requests merge it;
  ``SSL_CERT_FILE`` does NOT (requests uses certifi's bundle, not OpenSSL's default paths).
* DefaultAzureCredential tries EnvironmentCredential first; when that is configured (all three
  AZURE_* variables) a failure to authenticate stops the chain, so managed identity is not
  reached. It is reached when the environment is incomplete: exclude it
  (``exclude_managed_identity_credential=True``, plus ``exclude_workload_identity_credential``,
  ``exclude_cli_credential`` ...) or set ``AZURE_TOKEN_CREDENTIALS=EnvironmentCredential``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qs

import jwt
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.loopback.base import LoopbackHandler, LoopbackServer

DEFAULT_TENANT_ID = "72f988bf-0000-4000-8000-0000000000aa"
DEFAULT_CLIENT_ID = "11111111-2222-4333-8444-555555555555"
DEFAULT_CLIENT_SECRET = "loopback-client-secret"  # test-only value


# --------------------------------------------------------------------------------------------
# Shared by the loopback servers that take bearer tokens
# --------------------------------------------------------------------------------------------
@runtime_checkable
class TokenValidator(Protocol):
    def validate(self, token: str, audience_prefix: str) -> bool: ...


def scope_matches(scope: str, audience_prefix: str) -> bool:
    """``https://vault.azure.net/.default`` matches audience ``https://vault.azure.net`` (also with a
    trailing or doubled slash, as some SDKs send ``https://monitor.azure.com//.default``)."""
    prefix = audience_prefix.rstrip("/")
    return scope == prefix or scope.startswith(prefix + "/")


def token_problem(validator: TokenValidator | None, token: str | None, audience_prefix: str) -> str | None:
    """None when ``token`` is acceptable, else ``missing`` / ``invalid`` / ``expired`` / ``audience``."""
    if not token:
        return "missing"
    if validator is None:
        return None
    explain = getattr(validator, "token_problem", None)
    if callable(explain):
        problem = explain(token, audience_prefix)
        return problem if isinstance(problem, str) or problem is None else "invalid"
    return None if validator.validate(token, audience_prefix) else "invalid"


class NoDelayHandler(LoopbackHandler):
    """``LoopbackHandler`` with TCP_NODELAY on the connection. The base handler writes the headers
    and the body separately; with Nagle on, the body waits for the client's delayed ACK and every
    response costs ~40 ms (measured: 44 ms per SecretClient call, 1-2 ms with this)."""

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def bearer_token(handler: LoopbackHandler) -> str | None:
    value = handler.headers.get("Authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    authorized: bool
    body: Any = None
    at: float = field(default_factory=time.time)


class RequestLog:
    """Thread-safe list of :class:`RecordedRequest`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[RecordedRequest] = []

    def add(self, item: RecordedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def __call__(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IssuedToken:
    token: str
    tenant_id: str
    client_id: str
    scopes: tuple[str, ...]
    expires_on: int


class _TokenTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, IssuedToken] = {}

    def issue(
        self, prefix: str, tenant_id: str, client_id: str, scopes: Iterable[str], lifetime: int
    ) -> IssuedToken:
        issued = IssuedToken(
            token=f"{prefix}.{secrets.token_urlsafe(32)}",
            tenant_id=tenant_id,
            client_id=client_id,
            scopes=tuple(scopes),
            expires_on=int(time.time()) + lifetime,
        )
        with self._lock:
            self._tokens[issued.token] = issued
        return issued

    def get(self, token: str) -> IssuedToken | None:
        with self._lock:
            return self._tokens.get(token)

    def all(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._tokens.values())

    def revoke(self, token: str | None = None) -> None:
        with self._lock:
            if token is None:
                self._tokens.clear()
            else:
                self._tokens.pop(token, None)

    def problem(self, token: str, audience_prefix: str) -> str | None:
        issued = self.get(token)
        if issued is None:
            return "invalid"
        if issued.expires_on <= time.time():
            return "expired"
        if not any(scope_matches(s, audience_prefix) for s in issued.scopes):
            return "audience"
        return None


class StaticTokenCredential:
    """A ``TokenCredential`` (``get_token`` / ``get_token_info``) that mints tokens locally, and the
    validator that accepts exactly those tokens for the scope they were minted for. For tests that
    do not need MSAL in the loop."""

    def __init__(
        self,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        client_id: str = DEFAULT_CLIENT_ID,
        lifetime: int = 3600,
    ) -> None:
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.lifetime = lifetime
        self._table = _TokenTable()
        self.requested_scopes: list[tuple[str, ...]] = []

    def _issue(self, scopes: tuple[str, ...]) -> IssuedToken:
        self.requested_scopes.append(scopes)
        return self._table.issue("static", self.tenant_id, self.client_id, scopes, self.lifetime)

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        issued = self._issue(scopes)
        return AccessToken(issued.token, issued.expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        issued = self._issue(scopes)
        return AccessTokenInfo(issued.token, issued.expires_on, token_type="Bearer", refresh_on=None)

    def validate(self, token: str, audience_prefix: str) -> bool:
        return self._table.problem(token, audience_prefix) is None

    def token_problem(self, token: str, audience_prefix: str) -> str | None:
        return self._table.problem(token, audience_prefix)

    def revoke(self, token: str | None = None) -> None:
        self._table.revoke(token)

    def close(self) -> None:
        return

    def __enter__(self) -> StaticTokenCredential:
        return self

    def __exit__(self, *exc: object) -> None:
        return


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------
def _aad_error(code: str, aadsts: int, description: str, *, status: int = 400) -> tuple[int, dict[str, Any]]:
    return status, {
        "error": code,
        "error_description": f"AADSTS{aadsts}: {description} Trace ID: {uuid.uuid4()} "
        f"Correlation ID: {uuid.uuid4()} Timestamp: {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}",
        "error_codes": [aadsts],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "trace_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()),
    }


@dataclass(frozen=True)
class SigningKey:
    """An RSA key pair the loopback Entra signs JWTs with; ``jwk`` is its public half as published."""

    kid: str
    private_pem: bytes
    public_pem: bytes
    jwk: dict[str, Any]


def make_signing_key(kid: str | None = None) -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = kid or uuid.uuid4().hex
    public = private.public_key()
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
    jwk.update({"kid": kid, "use": "sig", "kty": "RSA"})
    return SigningKey(
        kid=kid,
        private_pem=private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        public_pem=public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        jwk=jwk,
    )


V1_ISSUER = "https://sts.windows.net/{tid}/"
_KEY_ROUTES = (["common", "discovery", "keys"], ["common", "discovery", "v2.0", "keys"])


class EntraHandler(NoDelayHandler):
    app: EntraLoopback

    def do_GET(self) -> None:
        path, query = self.parsed()
        parts = [p for p in path.split("/") if p]
        status, body = 404, {"error": "not_found", "error_description": f"no route for GET {path}"}
        if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            status, body = self.app.openid_configuration(parts[0])
            status, body = self.app.faulted("openid", status, body)
        elif len(parts) == 3 and parts[1:] == [".well-known", "openid-configuration"]:
            status, body = self.app.openid_configuration_v1(parts[0])
            status, body = self.app.faulted("openid", status, body)
        elif parts in _KEY_ROUTES or (len(parts) >= 3 and parts[1] == "discovery" and parts[-1] == "keys"):
            status, body = self.app.faulted("keys", 200, self.app.jwks())
        elif parts == ["common", "discovery", "instance"]:
            status, body = 200, self.app.instance_discovery(query)
        self.app.log_request(RecordedRequest("GET", path, query, status, authorized=True))
        self.send_json(status, body)

    def do_POST(self) -> None:
        path, query = self.parsed()
        raw = self.read_body()
        parts = [p for p in path.split("/") if p]
        if len(parts) == 4 and parts[1:] == ["oauth2", "v2.0", "token"]:
            form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
            status, body = self.app.token_request(parts[0], form)
            logged = {k: v for k, v in form.items() if k != "client_secret"}
        else:
            status, body, logged = 404, {"error": "not_found", "error_description": path}, {}
        self.app.log_request(RecordedRequest("POST", path, query, status, authorized=True, body=logged))
        self.send_json(status, body, headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"})


class EntraLoopback(LoopbackServer):
    """Loopback Entra ID token service. ``url`` is the authority host (``AZURE_AUTHORITY_HOST``)."""

    handler_class = EntraHandler

    def __init__(
        self,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        clients: dict[str, str] | None = None,
        token_lifetime: int = 3600,
    ) -> None:
        super().__init__()
        self.tenant_id = tenant_id
        self.token_lifetime = token_lifetime
        self._clients_lock = threading.Lock()
        self._clients: dict[str, str] = dict(clients or {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET})
        self._tokens = _TokenTable()
        self.requests = RequestLog()
        self._signing_keys: list[SigningKey] = []
        self.openid_fault: int | None = None
        self.keys_fault: int | None = None

    # -- configuration -------------------------------------------------------------------------
    @property
    def authority_host(self) -> str:
        return self.url

    @property
    def client_id(self) -> str:
        """The first registered client (the default one unless ``clients`` was given)."""
        with self._clients_lock:
            return next(iter(self._clients))

    @property
    def client_secret(self) -> str:
        with self._clients_lock:
            return self._clients[next(iter(self._clients))]

    def add_client(self, client_id: str, secret: str) -> None:
        with self._clients_lock:
            self._clients[client_id] = secret

    def environment(self, client_id: str | None = None) -> dict[str, str]:
        """The environment variables that point azure-identity's EnvironmentCredential here."""
        cid = client_id or self.client_id
        with self._clients_lock:
            secret = self._clients[cid]
        return {
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": cid,
            "AZURE_CLIENT_SECRET": secret,
            "AZURE_AUTHORITY_HOST": self.url,
            "AZURE_TOKEN_CREDENTIALS": "EnvironmentCredential",
        }

    # -- tokens --------------------------------------------------------------------------------
    def mint(self, *scopes: str, client_id: str | None = None) -> IssuedToken:
        """Issue a token without HTTP (for tests that hand-craft requests)."""
        return self._tokens.issue(
            "entra", self.tenant_id, client_id or self.client_id, scopes, self.token_lifetime
        )

    def issued_tokens(self) -> list[IssuedToken]:
        return self._tokens.all()

    def revoke(self, token: str | None = None) -> None:
        """Forget one token (or all): servers then answer 401 for it."""
        self._tokens.revoke(token)

    def validate(self, token: str, audience_prefix: str) -> bool:
        return self._tokens.problem(token, audience_prefix) is None

    def token_problem(self, token: str, audience_prefix: str) -> str | None:
        return self._tokens.problem(token, audience_prefix)

    def log_request(self, item: RecordedRequest) -> None:
        self.requests.add(item)

    # -- signed JWTs (secure webhook) ----------------------------------------------------------
    def add_signing_key(self, kid: str | None = None) -> SigningKey:
        """A new RSA key, published in the key set from now on."""
        key = make_signing_key(kid)
        with self._clients_lock:
            self._signing_keys.append(key)
        return key

    def signing_key(self) -> SigningKey:
        """The first published key (made on first use: RSA key generation is not free)."""
        with self._clients_lock:
            if self._signing_keys:
                return self._signing_keys[0]
        return self.add_signing_key()

    def jwks(self) -> dict[str, Any]:
        with self._clients_lock:
            return {"keys": [key.jwk for key in self._signing_keys]}

    def signed_token(
        self, claims: dict[str, Any], *, key: SigningKey | None = None, headers: dict[str, Any] | None = None
    ) -> str:
        """``claims`` signed RS256 with ``key`` (default: the first published key), its kid in the header."""
        key = key or self.signing_key()
        return jwt.encode(
            claims, key.private_pem, algorithm="RS256", headers={"kid": key.kid, **(headers or {})}
        )

    def faulted(self, route: str, status: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fault = self.openid_fault if route == "openid" else self.keys_fault
        if fault is None:
            return status, body
        return fault, {"error": "temporarily_unavailable", "error_description": f"{route} fault injected"}

    # -- protocol ------------------------------------------------------------------------------
    def _known_tenant(self, tenant: str) -> bool:
        return tenant.lower() in {self.tenant_id.lower(), "organizations", "common"}

    def openid_configuration(self, tenant: str) -> tuple[int, dict[str, Any]]:
        if not self._known_tenant(tenant):
            return _aad_error(
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                "signing into the correct cloud.",
            )
        tid = self.tenant_id if tenant.lower() in {"organizations", "common"} else tenant
        base = f"{self.url}/{tid}"
        return 200, {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{self.url}/{tid}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": f"{self.url}/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "oid"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "loopback",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }

    def openid_configuration_v1(self, tenant: str) -> tuple[int, dict[str, Any]]:
        """The v1.0 document: Entra's v1 issuer (sts.windows.net) and the common key set."""
        status, body = self.openid_configuration(tenant)
        if status != 200:
            return status, body
        tid = self.tenant_id if tenant.lower() in {"organizations", "common"} else tenant
        return 200, {
            **body,
            "issuer": V1_ISSUER.format(tid=tid),
            "jwks_uri": f"{self.url}/common/discovery/keys",
            "token_endpoint": f"{self.url}/{tid}/oauth2/token",
        }

    def instance_discovery(self, query: dict[str, list[str]]) -> dict[str, Any]:
        host = self.url.split("://", 1)[1]
        return {
            "tenant_discovery_endpoint": f"{self.url}/{self.tenant_id}/v2.0/.well-known/openid-configuration",
            "api-version": (query.get("api-version") or ["1.1"])[0],
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        }

    def token_request(self, tenant: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if not self._known_tenant(tenant) or tenant.lower() in {"organizations", "common"}:
            return _aad_error(
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found (client credentials need a tenant id).",
            )
        grant = form.get("grant_type", "")
        if grant != "client_credentials":
            return _aad_error(
                "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'."
            )
        client_id = form.get("client_id", "")
        with self._clients_lock:
            expected = self._clients.get(client_id)
        if expected is None:
            return _aad_error(
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.",
            )
        secret = form.get("client_secret")
        if secret is None:
            return _aad_error(
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or "
                "'client_secret'.",
                status=401,
            )
        if not secrets.compare_digest(secret.encode(), expected.encode()):
            return _aad_error(
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{client_id}'.",
                status=401,
            )
        scopes = form.get("scope", "").split()
        resource_scopes = [s for s in scopes if s not in {"openid", "profile", "offline_access"}]
        if len(resource_scopes) != 1 or not resource_scopes[0].endswith("/.default"):
            return _aad_error(
                "invalid_scope",
                1002012,
                f"The provided value for scope {' '.join(scopes)} is not valid. Client credential flows must "
                "have a scope value with /.default suffixed to the resource identifier (application ID URI).",
            )
        issued = self._tokens.issue("entra", self.tenant_id, client_id, resource_scopes, self.token_lifetime)
        return 200, {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": issued.token,
        }

    def __enter__(self) -> EntraLoopback:
        self.start()
        return self
