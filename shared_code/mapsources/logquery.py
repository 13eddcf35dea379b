"""Log Analytics queries for the table sources (VM Insights Map tables, Traffic Analytics).

One ``LogQueryRunner`` wraps ``azure.monitor.query.LogsQueryClient`` with what every map query
needs: the app's credential and the query API's audience (``https://api.loganalytics.io``, which
is not the endpoint's host), ``Prefer: wait=N`` from the source's timeout, bounded retries of
429/5xx/504 that honour ``Retry-After`` (azure-core's RetryPolicy, told that a query POST is a read
and safe to repeat), a cross-workspace query when a source names several workspaces, and one
answer type: the rows as dicts plus, for a partial answer, the service's error text.

Queries are fixed templates with parameters (``let`` statements on top, a marker comment on the
first line): the KQL is reviewed once and the loopback test server recognises each template by its
marker and computes the same answer from seeded rows.

Failures become ``MapSourceError`` with the service's error code and message (never the query
text, never a token); the caller decides which servers the failure concerns.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError
from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.policies import RetryPolicy

from shared_code.domain.maps import MapWindow
from shared_code.domain.mapsources import ServerMapResult, ServerRef
from shared_code.errors import MapSourceError

log = logging.getLogger(__name__)

DEFAULT_LOGS_QUERY_ENDPOINT = "https://api.loganalytics.azure.com"
DEFAULT_LOGS_QUERY_AUDIENCE = "https://api.loganalytics.io"
MAX_RETRY_AFTER_SECONDS = 60.0

_SAFE_LITERAL = re.compile(r"^[^\x00-\x1f\x7f\"\\]{0,512}$")


class QueryRetryPolicy(RetryPolicy):  # type: ignore[type-arg]
    """azure-core's RetryPolicy for query POSTs: a query is a read, so 429 and 5xx are retried as
    for a GET (the stock policy retries a POST only on 500/503/504 or with Retry-After), and a
    ``Retry-After`` is honoured up to a cap so one throttled batch cannot stall an import."""

    def __init__(self, *, max_retry_after: float = MAX_RETRY_AFTER_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_retry_after = max_retry_after

    def _is_method_retryable(self, settings: dict[str, Any], request: Any, response: Any = None) -> bool:
        return True

    def get_retry_after(self, response: PipelineResponse[Any, Any]) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self._max_retry_after)


@dataclass(frozen=True)
class QueryAnswer:
    """The rows of a query's primary table (column name -> value) and, for a partial answer, why."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    partial_error: str = ""


def kql_string(value: str) -> str:
    """A KQL string literal for a value that needs no escaping (names, ids, IPs); anything with a
    quote, backslash or control character is refused rather than escaped."""
    if not _SAFE_LITERAL.match(value):
        raise ValueError("value cannot be used in a query (quote, backslash or control character)")
    return f'"{value}"'


def kql_list(values: Sequence[str]) -> str:
    return "dynamic([" + ",".join(kql_string(value) for value in values) + "])"


def kql_datetime(value: datetime) -> str:
    moment = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return f"datetime({moment.strftime('%Y-%m-%dT%H:%M:%S.%fZ')})"


def row_text(row: Mapping[str, Any], name: str) -> str:
    """A column of an answer row as stripped text ("" when null)."""
    value = row.get(name)
    return "" if value is None else str(value).strip()


def row_count(row: Mapping[str, Any], name: str) -> int:
    """A count column of an answer row (0 when null or empty); ``ValueError`` when negative or not
    a number, which costs the rows' servers their maps, not the import."""
    value = row.get(name)
    if value is None or value == "":
        return 0
    number = int(value)
    if number < 0:
        raise ValueError(f"{name} is negative")
    return number


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class LogQueryRunner:
    """Runs one templated query against one or more workspaces; see the module docstring."""

    def __init__(
        self,
        credential: TokenCredential,
        *,
        endpoint: str = DEFAULT_LOGS_QUERY_ENDPOINT,
        audience: str = DEFAULT_LOGS_QUERY_AUDIENCE,
        timeout_seconds: int = 120,
        retries: int = 3,
        retry_backoff_factor: float = 0.8,
        connection_verify: str | bool = True,
    ) -> None:
        from azure.monitor.query import LogsQueryClient  # noqa: PLC0415 - only when a source is built

        self.timeout_seconds = timeout_seconds
        self._client = LogsQueryClient(
            credential,
            endpoint=endpoint.rstrip("/"),
            audience=audience.rstrip("/"),
            retry_policy=QueryRetryPolicy(
                retry_total=retries,
                retry_backoff_factor=retry_backoff_factor,
                retry_backoff_max=30,
                timeout=(timeout_seconds + 30) * (retries + 1),
            ),
            connection_timeout=10,
            read_timeout=timeout_seconds + 30,
            connection_verify=connection_verify,
        )

    def query(
        self,
        workspaces: Sequence[str],
        query: str,
        *,
        start: datetime,
        end: datetime,
    ) -> QueryAnswer:
        """The primary table's rows; a partial answer keeps its rows and its error text.

        Raises ``MapSourceError`` when the service refuses or keeps failing, or the answer has no
        table at all (a 204 answer is no data: an empty answer).
        """
        from azure.monitor.query import LogsQueryPartialResult  # noqa: PLC0415

        primary, others = workspaces[0], list(workspaces[1:])
        statuses: list[int] = []
        try:
            result = self._client.query_workspace(
                primary,
                query,
                timespan=(start, end),
                server_timeout=self.timeout_seconds,
                additional_workspaces=others or None,
                raw_response_hook=lambda response: statuses.append(response.http_response.status_code),
            )
        except ClientAuthenticationError as exc:
            raise MapSourceError(
                f"Log Analytics refused the app's identity ({_describe(exc)}); it needs the Log Analytics "
                "Reader role on the workspace",
                status=_status(exc),
            ) from exc
        except HttpResponseError as exc:
            status = _status(exc)
            if status == 204:
                return QueryAnswer()
            if status is not None and status < 300:
                raise MapSourceError(
                    f"Log Analytics answered something that is not a query result (HTTP {status})",
                    status=status,
                ) from exc
            raise MapSourceError(
                f"Log Analytics query failed: {_describe(exc)}", status=_status(exc)
            ) from exc
        except AzureError as exc:
            raise MapSourceError(f"Log Analytics unreachable: {type(exc).__name__}") from exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if statuses and statuses[-1] == 204:
                return QueryAnswer()  # 204 No Content: the query matched nothing
            raise MapSourceError(
                f"Log Analytics answered something that is not a query result ({type(exc).__name__})"
            ) from exc

        if isinstance(result, LogsQueryPartialResult):
            tables = result.partial_data or []
            error = result.partial_error
            partial = (
                f"{error.code or 'PartialError'}: {error.message or ''}".strip() if error else "PartialError"
            )
        else:
            tables = result.tables
            partial = ""
        if not tables:
            if partial:
                raise MapSourceError(f"Log Analytics returned no data, only an error: {partial[:300]}")
            return QueryAnswer()
        table = tables[0]
        columns = [str(name) for name in table.columns]
        rows = [dict(zip(columns, row, strict=False)) for row in table.rows]
        return QueryAnswer(rows=rows, partial_error=partial[:500])

    def close(self) -> None:
        self._client.close()


def _status(exc: HttpResponseError) -> int | None:
    return getattr(exc, "status_code", None)


def _describe(exc: HttpResponseError) -> str:
    """``HTTP 400 BadArgumentError: ...`` from the service's error body, bounded, no request data."""
    status = _status(exc)
    code = ""
    message = ""
    error = getattr(exc, "error", None)
    if error is not None:
        code = str(getattr(error, "code", "") or "")
        message = str(getattr(error, "message", "") or "")
    if not code and exc.response is not None:
        try:
            body = json.loads(exc.response.text())
        except (ValueError, TypeError, AttributeError):
            body = None
        if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
            code = str(body["error"].get("code") or "")
            message = str(body["error"].get("message") or "")
    text = f"HTTP {status}" if status else type(exc).__name__
    if code:
        text += f" {code}"
    if message:
        text += f": {message[:300]}"
    return text


def in_batches(
    servers: Sequence[ServerRef],
    window: MapWindow,
    *,
    max_window_minutes: int,
    usable: Callable[[ServerRef], bool],
    unusable: str,
    batch_size: int,
    fetch_batch: Callable[[Sequence[ServerRef]], Iterator[ServerMapResult]],
) -> Iterator[ServerMapResult]:
    """The table sources' ``fetch``: one result for every server the source cannot query (why:
    ``unusable``), then the others a batch (one query) at a time."""
    if window.end - window.start > timedelta(minutes=max_window_minutes):
        raise MapSourceError(f"the window is longer than {max_window_minutes} minutes")
    known = [server for server in servers if usable(server)]
    for server in servers:
        if not usable(server):
            yield ServerMapResult(server=server, error=unusable)
    for start in range(0, len(known), batch_size):
        yield from fetch_batch(known[start : start + batch_size])


def batch_answer(
    runner: LogQueryRunner,
    workspaces: Sequence[str],
    query: str,
    batch: Sequence[ServerRef],
    *,
    start: datetime,
    end: datetime,
    what: str,
) -> QueryAnswer | list[ServerMapResult]:
    """The batch's answer, or (the query failed after its retries) one failed result per server of
    the batch: a failed batch costs only its own servers."""
    try:
        return runner.query(workspaces, query, start=start, end=end)
    except MapSourceError as exc:
        log.warning("%s batch of %d servers failed: %s", what, len(batch), exc)
        return [ServerMapResult(server=server, error=str(exc)) for server in batch]
