"""Domain errors -> HTTP responses, in one place (status codes live at the edge, nowhere else)."""

from __future__ import annotations

import json
import logging
from typing import Any

import azure.functions as func

from shared_code.errors import (
    AlertSchemaError,
    ConfigurationError,
    ConnectorAppError,
    IdentityProviderError,
    InvalidInputError,
    MalformedPayloadError,
    NotCommonSchemaError,
    NotFoundError,
    PayloadTooLargeError,
    SecretStoreError,
    StateError,
    UnauthorizedError,
    UnsupportedPayloadError,
)

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[Exception], int, str]] = [
    (PayloadTooLargeError, 413, "payload_too_large"),
    (UnsupportedPayloadError, 415, "unsupported_media_type"),
    (MalformedPayloadError, 400, "malformed_json"),
    (NotCommonSchemaError, 422, "not_common_alert_schema"),
    (AlertSchemaError, 422, "invalid_alert"),
    (InvalidInputError, 400, "invalid_request"),
    (NotFoundError, 404, "not_found"),
    (UnauthorizedError, 401, "unauthorized"),  # generic message; the reason is logged where refused
    # the app's own trouble, not the caller's: 503 makes action groups retry later
    (ConfigurationError, 503, "misconfigured"),
    (StateError, 503, "storage_unavailable"),
    (SecretStoreError, 503, "secrets_unavailable"),
    (IdentityProviderError, 503, "identity_provider_unavailable"),
]


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json", headers=headers
    )


def error_response(exc: Exception) -> func.HttpResponse:
    """The response for ``exc``; unexpected errors are logged and answered without internals."""
    for kind, status, code in _STATUS:
        if isinstance(exc, kind):
            error: dict[str, Any] = {"code": code, "message": str(exc)}
            if isinstance(exc, AlertSchemaError) and exc.path:
                error["path"] = exc.path
            headers = {"Retry-After": "30"} if status == 503 else None
            if status == 401:
                headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            if status >= 500:
                log.error("request failed: %s", exc)
            return json_response(status, {"error": error}, headers)
    if isinstance(exc, ConnectorAppError):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return json_response(502, {"error": {"code": "upstream_failed", "message": str(exc)}})
    log.exception("unexpected error")
    return json_response(
        500, {"error": {"code": "internal", "message": "unexpected error; see the app's logs"}}
    )
