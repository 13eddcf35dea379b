"""Bounded, selective retries for one httpx call.

Why not a generic retry decorator: what may be retried depends on HTTP semantics. A transport
error, a timeout, 408, 429 and 5xx may succeed later; any other 4xx will not, so it is returned at
once for the caller to map (401 included: the ``httpx.Auth`` already refreshed and retried once).
429 and 503 carry ``Retry-After``, which is honoured up to a cap so one call cannot stall a worker.

Non-idempotent calls (a POST that creates) pass ``idempotent=False``: then only failures where the
request certainly was not processed are retried (connect errors, pool timeouts, 408, 429, 503);
an ambiguous failure (read timeout, 500, 502, 504) raises at once so the caller can look first.

Log lines and messages carry the method, the URL path (never the query string, never headers or
bodies) and the status or exception class, so no credential or token can leak through them.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from shared_code.diagnose import describe
from shared_code.errors import ItsmAuthError, ItsmRejectedError, ItsmUnavailableError

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses worth another attempt; any other 5xx is retried too (see ``is_retryable_status``)."""

_RETRY_AFTER_STATUSES = frozenset({429, 503})
_SAFE_STATUSES = frozenset({408, 429, 503})  # the server says it did not process the request
_SAFE_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)

_testing = False
_skipped: deque[float] = deque(maxlen=1000)


def set_testing(enabled: bool) -> None:
    """Make the default sleep a no-op (like ``stamina.set_testing``) so test suites run instantly;
    the waits it skips are kept (``skipped_sleeps``), so a test can assert them without waiting.

    A ``sleep`` injected into a ``RetryPolicy`` is always used as given.
    """
    global _testing
    _testing = enabled
    _skipped.clear()


def skipped_sleeps() -> list[float]:
    """The waits (seconds) the default sleep skipped since testing was last switched (at most the
    last 1,000)."""
    return list(_skipped)


def _default_sleep(seconds: float) -> None:
    if _testing:
        _skipped.append(seconds)
    else:
        time.sleep(seconds)


def _full_jitter(cap: float) -> float:
    # not cryptographic: only spreads retries of many workers apart
    return random.uniform(0.0, cap)  # noqa: S311


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; ``sleep`` and ``jitter`` are injectable for tests."""

    max_attempts: int = 4
    base_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 30.0
    sleep: Callable[[float], None] = field(default=_default_sleep, repr=False, compare=False)
    jitter: Callable[[float], float] = field(default=_full_jitter, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff and Retry-After limits must not be negative")

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        cap = min(self.max_backoff, self.base_backoff * (2.0 ** (attempt - 1)))
        return max(0.0, min(cap, self.jitter(cap)))


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if unusable."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def send_with_retries(
    client: httpx.Client,
    request_factory: Callable[[], httpx.Request],
    policy: RetryPolicy | None = None,
    *,
    auth: httpx.Auth | None = None,
    idempotent: bool = True,
) -> httpx.Response:
    """Send a fresh request from ``request_factory`` until it gets a non-retryable answer.

    Returns the first response that is not retryable (2xx, 3xx, or a 4xx other than 408/429).
    Raises ``ItsmUnavailableError`` when the attempts run out (or, for a non-idempotent call, on
    an ambiguous failure), chained to the last transport error if there was one.
    """
    policy = policy or RetryPolicy()
    attempt = 0
    while True:
        attempt += 1
        request = request_factory()
        method, path = request.method, request.url.path
        error: httpx.TransportError | None = None
        response: httpx.Response | None = None
        try:
            response = client.send(request) if auth is None else client.send(request, auth=auth)
        except httpx.TransportError as exc:
            error = exc

        if response is not None:
            # an auth flow may end on its token endpoint's answer: name the request that failed
            method, path = response.request.method, response.request.url.path
            status = response.status_code
            if not is_retryable_status(status):
                return response
            response.close()
            retry_after = (
                parse_retry_after(response.headers.get("Retry-After"))
                if status in _RETRY_AFTER_STATUSES
                else None
            )
            what = f"HTTP {status}"
            safe = status in _SAFE_STATUSES
        else:
            assert error is not None
            status = None
            retry_after = None
            what = type(error).__name__
            safe = isinstance(error, _SAFE_ERRORS)

        if attempt >= policy.max_attempts or not (idempotent or safe):
            tried = f"{attempt} attempt{'s' if attempt != 1 else ''}"
            why = f"{what}: {describe(error, target=str(request.url))}" if error is not None else what
            raise ItsmUnavailableError(
                f"{method} {path} failed after {tried}: {why}", status=status
            ) from error

        if retry_after is not None:
            delay = min(retry_after, policy.max_retry_after)
        else:
            delay = policy.backoff(attempt)
        log.warning(
            "retrying %s %s after %s (attempt %d of %d) in %.2f s",
            method,
            path,
            what,
            attempt,
            policy.max_attempts,
            delay,
        )
        policy.sleep(delay)


def not_json(response: httpx.Response, *, product: str, what: str, guess: str) -> ItsmUnavailableError:
    """The error for an answer that is not the JSON asked for (a proxy's, sign-in or hibernation
    page): unavailable, with its status, its content type and ``guess`` at what answered."""
    content_type = response.headers.get("Content-Type", "").split(";")[0] or "no content type"
    return ItsmUnavailableError(
        f"{what}: {product} answered HTTP {response.status_code} with {content_type}, not JSON ({guess})",
        status=response.status_code,
    )


def refuse_unauthorised_or_redirected(
    response: httpx.Response,
    *,
    product: str,
    what: str,
    connection: str,
    refused: str = "the credentials",
    advice: str = "re-authorise the connection",
    url: str = "URL",
) -> None:
    """The answers every product maps the same way: 401 means the connection must be re-authorised
    (``ItsmAuthError``), a redirect means the configured URL is wrong (``ItsmRejectedError``)."""
    status = response.status_code
    if status == 401:
        raise ItsmAuthError(
            f"{product} refused {refused} of connection {connection!r} ({what}, HTTP 401): {advice}",
            status=401,
        )
    if 300 <= status < 400:
        location = httpx.URL(response.headers.get("Location", "")).host or "elsewhere"
        raise ItsmRejectedError(
            f"{product} redirected {what} to {location} (HTTP {status}): check the {url}", status=status
        )
