"""Operator messages for infrastructure errors: what was unreachable, why, and what to do.

"creating table Connections failed: ServiceRequestError" names a class; an operator needs
"cannot reach 127.0.0.1:10002: connection refused: nothing listens there (is Azurite running, is
AzureWebJobsStorage right?)". ``describe`` reads that out of an azure-core or httpx error (and the
requests / urllib3 / socket / ssl errors they wrap), one place for every client of the app.

Only error classes, errno values, HTTP statuses, service error codes and the host are used: an
exception's own text can hold a request URL with a SAS token, so it is never copied.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestTimeoutError,
    ServiceResponseTimeoutError,
)

from shared_code.errors import UnsafeAddressError

STORAGE_ROLE = "Storage Table Data Contributor on the storage account"
KEY_VAULT_ROLE = "Key Vault Secrets Officer on the vault"
LOGS_ROLE = "Monitoring Metrics Publisher on the data collection rule"
ALERTS_ROLE = "Monitoring Contributor on the alerts' subscriptions"

_DNS_TEXT = (
    "name or service not known",
    "nodename nor servname",
    "getaddrinfo failed",
    "temporary failure in name resolution",
    "no address associated",
    "failed to resolve",
    "name resolution",
)
_MAX_CHAIN = 12


def host_of(url: str) -> str:
    """``host:port`` of a URL (never its path or query, which may carry a SAS token)."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    return parts.netloc.rsplit("@", 1)[-1] or url[:80]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: causes, contexts, azure-core's inner exception, and the reasons
    requests and urllib3 keep in their arguments (bounded, cycles skipped)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < _MAX_CHAIN:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = [
            current.__cause__,
            current.__context__,
            getattr(current, "inner_exception", None),
            getattr(current, "reason", None),
            *(arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)),
        ]
        todo.extend(item for item in inner if isinstance(item, BaseException))


def _text(exc: BaseException) -> str:
    try:
        return str(exc).lower()
    except Exception:  # noqa: BLE001 - a broken __str__ costs the hint, not the message
        return ""


def describe(exc: BaseException, *, target: str = "", role: str = "") -> str:
    """What went wrong reaching ``target`` (a URL or host) and what to do; ``role``: the Azure role
    the app's identity needs there, named when the service answers 403."""
    where = host_of(target) if target else "the service"
    chain = list(_chain(exc))
    for item in chain:
        if isinstance(item, UnsafeAddressError):
            return str(item)
    for item in chain:
        if isinstance(item, ClientAuthenticationError) and getattr(item, "status_code", None) is None:
            return (
                f"could not get a token for {where}: the app's identity (managed identity, or the "
                "AZURE_* variables locally) failed to sign in; check it exists and can reach Entra ID"
            )
        if isinstance(item, HttpResponseError) and item.status_code:
            return _http_answer(item, where, role)
        if isinstance(item, httpx.HTTPStatusError):
            status = item.response.status_code
            return f"{where} answered HTTP {status}" + (
                f": the app's identity needs {role}" if status == 403 and role else ""
            )
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError) or "certificate_verify_failed" in _text(item):
            return (
                f"cannot reach {where}: TLS: its certificate is not trusted. If it uses a private CA or a "
                "TLS-inspecting proxy, add that CA's PEM file to TLS_CA_BUNDLE"
            )
    for item in chain:
        if isinstance(item, ConnectionRefusedError) or getattr(item, "errno", None) == errno.ECONNREFUSED:
            return (
                f"cannot reach {where}: connection refused: nothing listens there. Check the endpoint "
                "(and locally, that Azurite or the loopback service is running)"
            )
        if isinstance(item, socket.gaierror) or any(hint in _text(item) for hint in _DNS_TEXT):
            return (
                f"cannot reach {where}: DNS: the name does not resolve. Check the name, and for a private "
                "endpoint the private DNS zone linked to the app's network"
            )
    for item in chain:
        if isinstance(item, ssl.SSLError):
            reason = getattr(item, "reason", None) or "no reason given"
            return f"cannot reach {where}: TLS handshake failed ({reason})"
        if (
            isinstance(item, httpx.ConnectTimeout | ServiceRequestTimeoutError)
            or "connecttimeout" in type(item).__name__.lower()
        ):
            return (
                f"cannot reach {where}: connecting timed out: a firewall, network security group or "
                "private endpoint may drop the traffic"
            )
        if (
            isinstance(item, TimeoutError | httpx.TimeoutException | ServiceResponseTimeoutError)
            or "timeout" in type(item).__name__.lower()
        ):
            return f"{where} did not answer in time: it may be overloaded or throttling; it is retried"
        if (
            isinstance(item, ConnectionResetError)
            or "connection aborted" in _text(item)
            or "reset by peer" in _text(item)
        ):
            return (
                f"the connection to {where} was reset (by the service, a proxy or a firewall on the way); "
                "it is retried, and if it persists check the network path"
            )
    return f"cannot reach {where}: {type(exc).__name__}"


def _http_answer(exc: HttpResponseError, where: str, role: str) -> str:
    status = exc.status_code
    error = getattr(exc, "error", None)
    code = (
        getattr(exc, "error_code", None) or (getattr(error, "code", None) if error is not None else "") or ""
    )
    answer = f"{where} answered HTTP {status}{f' {code}' if code else ''}"
    if status == 403:
        if code == "AuthorizationFailure":
            return (
                f"{answer}: the account refuses this request: allow the app's network in its firewall "
                f"(or private endpoint), and give the app's identity {role or 'the needed role'}"
            )
        return (
            f"{answer}: the app's identity lacks a role: give it {role}" if role else f"{answer}: forbidden"
        )
    if status == 401:
        return f"{answer}: the credential was refused (a wrong account key, or a token for another tenant)"
    return answer
