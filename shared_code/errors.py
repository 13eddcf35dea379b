"""One error hierarchy for the whole app.

    ConnectorAppError                 base of everything raised on purpose
    ├── ConfigurationError            app settings missing or invalid (lists every problem)
    ├── InvalidInputError             something a caller sent is wrong (payload, CLI argument)
    │   ├── AlertSchemaError          a Common Alert Schema payload failed validation (has .path)
    │   │   └── NotCommonSchemaError  the payload is not the Common Alert Schema at all
    │   ├── MalformedPayloadError     the body is not parseable JSON
    │   ├── UnsupportedPayloadError   the body is not JSON at all (content type)
    │   ├── PayloadTooLargeError      the body is over the size limit
    │   └── UnsafeAddressError        a URL names (or resolves to) an address the app never calls
    ├── UnauthorizedError             the caller did not prove who it is (secure webhook token)
    ├── IdentityProviderError         Entra ID metadata or signing keys could not be fetched
    ├── NotFoundError                 a named connection, delivery or row does not exist
    ├── AlreadyExistsError            a create found the row already there
    ├── SecretStoreError              Key Vault could not be read or written
    ├── StateError                    Table Storage failed or an ETag race was lost too often
    │   ├── EtagConflict              an ETag-matched write lost its race: re-read and try again
    │   └── BusyError                 another instance holds the lease on this correlation now
    ├── RetryLaterError               a delivery failed in a way a later attempt may fix
    ├── MapSourceError                a dependency-map source (Log Analytics, Service Map) failed a
    │                                 call after bounded retries or answered something unusable
    ├── SinkError                     a sink outside Table Storage (Log Analytics) failed a write
    ├── AlertsApiError                the Alerts Management API failed (has .permanent, .status)
    └── ItsmError                     the ITSM product failed a call
        ├── ItsmAuthError             credentials refused: the connection must be re-authorised
        ├── ItsmRejectedError         a 4xx that retrying cannot fix (has .status)
        └── ItsmUnavailableError      5xx, 429, timeouts or transport errors after bounded retries

Messages never contain a secret, a token or a password: they are built from names, ids, status
codes and the product's own error text. A value a client sent is shown through ``shown`` (cut to
80 characters), so a megabyte sent in is never echoed back. HTTP status codes are chosen at the
edge (functions/), never here.
"""

from __future__ import annotations

SHOWN_LIMIT = 80


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``repr`` of a value taken from a request, cut to ``limit`` characters with an ellipsis."""
    if isinstance(value, str) and len(value) > limit * 4:
        value = value[: limit * 4]  # repr of a megabyte string costs a megabyte: cut it first
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConnectorAppError(Exception):
    """Base of every error this app raises on purpose."""


class ConfigurationError(ConnectorAppError):
    """App settings are missing or invalid."""


class InvalidInputError(ConnectorAppError):
    """Something a caller sent is wrong; the message says what and where."""


class AlertSchemaError(InvalidInputError):
    """A Common Alert Schema payload failed validation at ``path`` (e.g. ``data.essentials.severity``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.detail = message
        super().__init__(f"{path}: {message}" if path else message)


class NotCommonSchemaError(AlertSchemaError):
    """The payload is not the Common Alert Schema (the action group has it turned off)."""


class MalformedPayloadError(InvalidInputError):
    """The body is not parseable JSON."""


class UnsupportedPayloadError(InvalidInputError):
    """The body is not JSON at all (its content type says otherwise)."""


class PayloadTooLargeError(InvalidInputError):
    """The body is over the size limit."""


class UnauthorizedError(ConnectorAppError):
    """The caller did not prove who it is. The message is deliberately generic (it is what the
    caller sees); the reason goes to the log only, so a probe learns nothing from the answer."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__("authentication failed")


class IdentityProviderError(ConnectorAppError):
    """Entra ID's OpenID metadata or signing keys could not be fetched: the app cannot judge a
    token now (not the caller's fault, so the answer asks it to retry)."""


class UnsafeAddressError(InvalidInputError):
    """A URL names, or its host resolves to, an address the app never connects to (a metadata
    service, link-local, loopback unless allowed): see ``shared_code.netsafety``."""


class NotFoundError(ConnectorAppError):
    """A named connection, delivery or stored row does not exist."""


class AlreadyExistsError(ConnectorAppError):
    """A create found the row already there."""


class SecretStoreError(ConnectorAppError):
    """Key Vault could not be read or written."""


class StateError(ConnectorAppError):
    """Table Storage failed, or an optimistic-concurrency race was lost too many times."""


class EtagConflict(StateError):
    """An ETag-matched write lost the race: re-read and try again."""


class BusyError(StateError):
    """Another instance holds the lease on this correlation; try again shortly."""


class RetryLaterError(ConnectorAppError):
    """A delivery attempt failed in a way a later attempt may fix; the queue should retry it."""


class MapSourceError(ConnectorAppError):
    """A dependency-map source failed a call after bounded retries, or answered something unusable."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class SinkError(ConnectorAppError):
    """A sink outside Table Storage (Log Analytics) refused or failed a write."""


class AlertsApiError(ConnectorAppError):
    """The Alerts Management API failed. ``permanent`` errors (403, 400, an id of the wrong form) are
    logged and skipped; others (429, 5xx, transport) make the page fail so the next run tries again."""

    def __init__(self, message: str, *, permanent: bool, status: int | None = None) -> None:
        self.permanent = permanent
        self.status = status
        super().__init__(message)


class ItsmError(ConnectorAppError):
    """The ITSM product failed a call."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ItsmAuthError(ItsmError):
    """The product refused the credentials; the connection must be re-authorised."""


class ItsmRejectedError(ItsmError):
    """The product rejected the request with a 4xx that retrying cannot fix."""


class ItsmUnavailableError(ItsmError):
    """The product kept failing (5xx, 429, timeouts, transport errors) after bounded retries."""
