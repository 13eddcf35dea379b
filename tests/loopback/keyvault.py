"""A loopback Azure Key Vault (secrets only) for ``azure.keyvault.secrets.SecretClient`` 4.12.

Speaks the data-plane REST API (any ``api-version``) over TLS:

* ``PUT /secrets/{name}`` set (new version), ``PATCH /secrets/{name}/{version}`` update properties;
* ``GET /secrets/{name}[/{version}]``, ``GET /secrets`` and ``GET /secrets/{name}/versions`` (paged
  with ``nextLink``, ``maxresults`` up to 25);
* ``DELETE /secrets/{name}`` (soft delete, returns a DeletedSecretBundle),
  ``GET /deletedsecrets[/{name}]``, ``DELETE /deletedsecrets/{name}`` (purge, 204),
  ``POST /deletedsecrets/{name}/recover``.

Authentication is Key Vault's challenge protocol: a request without a valid bearer token gets 401
with ``WWW-Authenticate: Bearer authorization="<authority>/<tenant>", resource="https://vault.azure.net"``;
the SDK fetches a token for ``https://vault.azure.net/.default`` and retries. Build the client with
``SecretClient(server.url, credential, verify_challenge_resource=False, connection_verify=ca_path)``
(the resource is vault.azure.net while the host is 127.0.0.1, hence the first kwarg).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

from tests.loopback.base import LoopbackServer
from tests.loopback.entra import (
    NoDelayHandler,
    RecordedRequest,
    RequestLog,
    TokenValidator,
    bearer_token,
    token_problem,
)

VAULT_RESOURCE = "https://vault.azure.net"
NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
MAX_PAGE = 25
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90
MAX_VALUE_BYTES = 25 * 1024


@dataclass
class _Version:
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    created: int
    updated: int
    enabled: bool = True
    exp: int | None = None
    nbf: int | None = None


@dataclass
class _Secret:
    versions: list[_Version] = field(default_factory=list)  # oldest first

    @property
    def current(self) -> _Version:
        return self.versions[-1]


@dataclass
class _Deleted:
    secret: _Secret
    deleted_date: int
    pending_polls: int


class KeyVaultError(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def _not_found(name: str) -> KeyVaultError:
    return KeyVaultError(
        404,
        "SecretNotFound",
        f"A secret with (name/id) {name} was not found in this key vault. If you recently deleted this "
        "secret you may be able to recover it using the correct recovery command. For help resolving "
        "this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
    )


class KeyVaultHandler(NoDelayHandler):
    app: KeyVaultLoopback

    def _handle(self, method: str) -> None:
        path, query = self.parsed()
        raw = self.read_body()  # always drain the body, keep-alive stays in step
        token = bearer_token(self)
        problem = token_problem(self.app.auth, token, VAULT_RESOURCE)
        if problem is not None:
            self.app.requests.add(RecordedRequest(method, path, query, 401, authorized=False))
            self._unauthorized(problem)
            return
        status: int
        body: Any
        try:
            fault = self.app.take_fault()
            if fault is not None:
                raise fault
            payload = _parse_json(raw) if raw else None
            status, body = self.app.dispatch(method, unquote(path), query, payload)
        except KeyVaultError as exc:
            status, body = exc.status, exc.body()
        except Exception as exc:  # a bug here must not kill the connection silently
            status, body = 500, {"error": {"code": "InternalServerError", "message": repr(exc)[:300]}}
        self.app.requests.add(
            RecordedRequest(method, path, query, status, authorized=True, body=_redact(body))
        )
        self.send_json(status, body if status != 204 else None)

    def _unauthorized(self, problem: str) -> None:
        challenge = (
            f'Bearer authorization="{self.app.authority}/{self.app.tenant_id}", resource="{VAULT_RESOURCE}"'
        )
        messages = {
            "missing": "AKV10000: Request is missing a Bearer or PoP token.",
            "audience": "AKV10022: Invalid audience.",
            "expired": "AKV10022: Invalid token: the token has expired.",
            "invalid": "AKV10032: Invalid issuer or token.",
        }
        self.send_json(
            401,
            {"error": {"code": "Unauthorized", "message": messages.get(problem, "Unauthorized")}},
            headers={"WWW-Authenticate": challenge},
        )

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_POST(self) -> None:
        self._handle("POST")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise KeyVaultError(400, "BadParameter", "The request body is not valid JSON.") from exc


def _redact(body: Any) -> Any:
    if isinstance(body, dict) and "value" in body and isinstance(body["value"], str):
        return {**body, "value": "***"}
    return body


class KeyVaultLoopback(LoopbackServer):
    """Loopback Key Vault. ``auth`` validates bearer tokens (an EntraLoopback or a
    StaticTokenCredential; None accepts any bearer token). ``authority`` / ``tenant_id`` go into the
    401 challenge and default to the validator's (if it is an EntraLoopback)."""

    handler_class = KeyVaultHandler

    def __init__(
        self,
        auth: TokenValidator | None = None,
        *,
        authority: str | None = None,
        tenant_id: str | None = None,
        delete_pending_polls: int = 0,
        page_size: int = MAX_PAGE,
    ) -> None:
        super().__init__()
        self.auth = auth
        self.authority = (
            authority or getattr(auth, "authority_host", None) or "https://login.microsoftonline.com"
        ).rstrip("/")
        self.tenant_id = (
            tenant_id or getattr(auth, "tenant_id", None) or "72f988bf-86f1-41af-91ab-2d7cd011db47"
        )
        self.delete_pending_polls = delete_pending_polls
        self.page_size = page_size
        self._lock = threading.RLock()
        self._secrets: dict[str, _Secret] = {}  # keyed by lower-case name (names are case-insensitive)
        self._names: dict[str, str] = {}  # lower -> name as first set
        self._deleted: dict[str, _Deleted] = {}
        self._faults: list[KeyVaultError] = []
        self.requests = RequestLog()

    @property
    def vault_url(self) -> str:
        return self.url

    # -- test accessors ------------------------------------------------------------------------
    def secrets_snapshot(self) -> dict[str, str]:
        """``{name: current value}`` of the live (not deleted) secrets."""
        with self._lock:
            return {self._names[k]: s.current.value for k, s in self._secrets.items()}

    def deleted_names(self) -> list[str]:
        with self._lock:
            return [self._names[k] for k in self._deleted]

    def put_secret(self, name: str, value: str, *, content_type: str | None = None) -> str:
        """Seed a secret directly (no HTTP); returns its version."""
        with self._lock:
            version = self._set(name, {"value": value, "contentType": content_type})
            return version.version

    def fail_next(
        self, count: int, status: int, code: str = "Throttled", message: str = "Injected fault"
    ) -> None:
        with self._lock:
            self._faults.extend(KeyVaultError(status, code, message) for _ in range(count))

    def take_fault(self) -> KeyVaultError | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    # -- shapes --------------------------------------------------------------------------------
    def _attributes(self, v: _Version) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enabled": v.enabled,
            "created": v.created,
            "updated": v.updated,
            "recoveryLevel": RECOVERY_LEVEL,
            "recoverableDays": RECOVERABLE_DAYS,
        }
        if v.exp is not None:
            attrs["exp"] = v.exp
        if v.nbf is not None:
            attrs["nbf"] = v.nbf
        return attrs

    def _bundle(self, name: str, v: _Version, *, with_value: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": f"{self.url}/secrets/{name}/{v.version}",
            "attributes": self._attributes(v),
        }
        if with_value:
            body = {"value": v.value, **body}
        if v.content_type is not None:
            body["contentType"] = v.content_type
        if v.tags:
            body["tags"] = dict(v.tags)
        return body

    def _item(self, name: str, v: _Version, *, versioned: bool) -> dict[str, Any]:
        body = self._bundle(name, v, with_value=False)
        if not versioned:
            body["id"] = f"{self.url}/secrets/{name}"
        return body

    def _deleted_bundle(self, name: str, d: _Deleted, *, with_value: bool = False) -> dict[str, Any]:
        body = {
            "recoveryId": f"{self.url}/deletedsecrets/{name}",
            "deletedDate": d.deleted_date,
            "scheduledPurgeDate": d.deleted_date + RECOVERABLE_DAYS * 86400,
            **self._bundle(name, d.secret.current, with_value=with_value),
        }
        return body

    # -- operations ----------------------------------------------------------------------------
    @staticmethod
    def _check_name(name: str) -> None:
        if not NAME.match(name):
            raise KeyVaultError(
                400,
                "BadParameter",
                f"The request URI contains an invalid name: {name}",
            )

    def _set(self, name: str, payload: Any) -> _Version:
        self._check_name(name)
        if not isinstance(payload, dict) or not isinstance(payload.get("value"), str):
            raise KeyVaultError(400, "BadParameter", "Property 'value' is required and must be a string.")
        if len(payload["value"].encode()) > MAX_VALUE_BYTES:
            raise KeyVaultError(400, "BadParameter", "Secret value is too large; the maximum is 25 KB.")
        key = name.lower()
        if key in self._deleted:
            raise KeyVaultError(
                409,
                "Conflict",
                f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be "
                "reused; in this state, the secret can only be recovered or purged.",
                inner="ObjectIsDeletedButRecoverable",
            )
        attrs = payload.get("attributes") or {}
        now = int(time.time())
        version = _Version(
            version=uuid.uuid4().hex,
            value=payload["value"],
            content_type=payload.get("contentType"),
            tags=payload.get("tags"),
            created=now,
            updated=now,
            enabled=bool(attrs.get("enabled", True)),
            exp=attrs.get("exp"),
            nbf=attrs.get("nbf"),
        )
        secret = self._secrets.setdefault(key, _Secret())
        self._names.setdefault(key, name)
        secret.versions.append(version)
        return version

    def _find(self, name: str, version: str | None) -> tuple[str, _Version]:
        self._check_name(name)
        secret = self._secrets.get(name.lower())
        if secret is None:
            raise _not_found(name)
        if not version:
            return self._names[name.lower()], secret.current
        for v in secret.versions:
            if v.version == version:
                return self._names[name.lower()], v
        raise _not_found(f"{name}/{version}")

    def _page(self, items: list[dict[str, Any]], path: str, query: dict[str, list[str]]) -> dict[str, Any]:
        try:
            size = int((query.get("maxresults") or [str(self.page_size)])[0])
        except ValueError as exc:
            raise KeyVaultError(400, "BadParameter", "maxresults must be an integer") from exc
        if not 1 <= size <= MAX_PAGE:
            raise KeyVaultError(400, "BadParameter", f"maxresults must be between 1 and {MAX_PAGE}")
        size = min(size, self.page_size)
        try:
            start = max(0, int((query.get("$skiptoken") or ["0"])[0] or 0))
        except ValueError as exc:
            raise KeyVaultError(400, "BadParameter", "Invalid $skiptoken") from exc
        page = items[start : start + size]
        next_link = None
        if start + size < len(items):
            params = {
                "api-version": (query.get("api-version") or ["7.6"])[0],
                "$skiptoken": str(start + size),
                "maxresults": str(size),
            }
            next_link = f"{self.url}{path}?{urlencode(params)}"
        return {"value": page, "nextLink": next_link}

    def dispatch(self, method: str, path: str, query: dict[str, list[str]], payload: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        with self._lock:
            if parts and parts[0] == "secrets":
                return self._secrets_route(method, parts[1:], path, query, payload)
            if parts and parts[0] == "deletedsecrets":
                return self._deleted_route(method, parts[1:], path, query)
        raise KeyVaultError(400, "BadParameter", f"Unknown request path {path} (method {method})")

    def _secrets_route(
        self, method: str, rest: list[str], path: str, query: dict[str, list[str]], payload: Any
    ) -> tuple[int, Any]:
        if not rest and method == "GET":
            items = [
                self._item(self._names[k], s.current, versioned=False)
                for k, s in sorted(self._secrets.items())
            ]
            return 200, self._page(items, path, query)
        if len(rest) == 1 and method == "PUT":
            version = self._set(rest[0], payload)
            return 200, self._bundle(self._names[rest[0].lower()], version)
        if len(rest) == 1 and method == "DELETE":
            name, _ = self._find(rest[0], None)
            key = name.lower()
            deleted = _Deleted(self._secrets.pop(key), int(time.time()), self.delete_pending_polls)
            self._deleted[key] = deleted
            return 200, self._deleted_bundle(name, deleted)
        if len(rest) == 2 and rest[1] == "versions" and method == "GET":
            name, _ = self._find(rest[0], None)
            versions = self._secrets[name.lower()].versions
            return 200, self._page([self._item(name, v, versioned=True) for v in versions], path, query)
        if len(rest) in (1, 2) and method == "GET":
            name, version = self._find(rest[0], rest[1] if len(rest) == 2 else None)
            if not version.enabled:
                raise KeyVaultError(
                    403,
                    "Forbidden",
                    "Operation get is not allowed on a disabled secret.",
                    inner="SecretDisabled",
                )
            return 200, self._bundle(name, version)
        if len(rest) in (1, 2) and method == "PATCH":
            name, version = self._find(rest[0], rest[1] if len(rest) == 2 else None)
            body = payload if isinstance(payload, dict) else {}
            attrs = body.get("attributes") or {}
            if "enabled" in attrs:
                version.enabled = bool(attrs["enabled"])
            for key in ("exp", "nbf"):
                if key in attrs:
                    setattr(version, key, attrs[key])
            if "contentType" in body:
                version.content_type = body["contentType"]
            if "tags" in body:
                version.tags = body["tags"]
            version.updated = int(time.time())
            return 200, self._bundle(name, version, with_value=False)
        raise KeyVaultError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _deleted_route(
        self, method: str, rest: list[str], path: str, query: dict[str, list[str]]
    ) -> tuple[int, Any]:
        if not rest and method == "GET":
            items = []
            for key, d in sorted(self._deleted.items()):
                item = self._deleted_bundle(self._names[key], d)
                item["id"] = f"{self.url}/secrets/{self._names[key]}"
                items.append(item)
            return 200, self._page(items, path, query)
        if not rest:
            raise KeyVaultError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
        self._check_name(rest[0])
        key = rest[0].lower()
        deleted = self._deleted.get(key)
        if deleted is None or (method == "GET" and deleted.pending_polls > 0):
            if deleted is not None:
                deleted.pending_polls -= 1  # soft delete still in progress, as the real service
            raise KeyVaultError(404, "SecretNotFound", f"Deleted Secret not found: {rest[0]}")
        name = self._names[key]
        if len(rest) == 1 and method == "GET":
            return 200, self._deleted_bundle(name, deleted)
        if len(rest) == 1 and method == "DELETE":
            del self._deleted[key]
            del self._names[key]
            return 204, None
        if len(rest) == 2 and rest[1] == "recover" and method == "POST":
            del self._deleted[key]
            self._secrets[key] = deleted.secret
            return 200, self._bundle(name, deleted.secret.current, with_value=False)
        raise KeyVaultError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def __enter__(self) -> KeyVaultLoopback:
        self.start()
        return self
