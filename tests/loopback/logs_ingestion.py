"""A loopback Azure Monitor Logs Ingestion endpoint (a data collection endpoint, DCE).

``POST /dataCollectionRules/{ruleId}/streams/{streamName}?api-version=2023-01-01`` with a JSON
array body, gzip-compressed by ``azure.monitor.ingestion.LogsIngestionClient`` (1.1.x:
``Content-Encoding: gzip``, chunks of at most 1 MiB of serialized records) and a bearer token for
``https://monitor.azure.com/.default`` (1.0.x asked for ``https://monitor.azure.com//.default``;
both are accepted). 204 on success.

    with LogsIngestionLoopback(entra, rules={"dcr-0123": {"Custom-ItsmWorkItems_CL"}}) as dce:
        client = LogsIngestionClient(endpoint=dce.url, credential=cred, connection_verify=ca_path)
        client.upload(rule_id="dcr-0123", stream_name="Custom-ItsmWorkItems_CL", logs=[...])
        dce.records("Custom-ItsmWorkItems_CL")

Errors: unknown rule or stream 404, uncompressed body over ``max_body_bytes`` (1 MiB) 413, not a
JSON array 400, missing/invalid token 401; ``fail_next(count, status, retry_after)`` injects faults
(e.g. 429 or 503 with ``Retry-After``, which azure-core's RetryPolicy honours).
"""

from __future__ import annotations

import json
import threading
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from tests.loopback.base import LoopbackServer
from tests.loopback.entra import (
    NoDelayHandler,
    RecordedRequest,
    RequestLog,
    TokenValidator,
    bearer_token,
    token_problem,
)

MONITOR_AUDIENCE = "https://monitor.azure.com"
MAX_BODY_BYTES = 1024 * 1024
_MAX_WIRE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class _Fault:
    status: int
    retry_after: float | None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class LogsIngestionHandler(NoDelayHandler):
    app: LogsIngestionLoopback

    def do_POST(self) -> None:
        path, query = self.parsed()
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_WIRE_BYTES:
            self.close_connection = True
            self._finish(path, query, 413, _error("ContentLengthLimitExceeded", "Request body is too large."))
            return
        raw = self.read_body()
        problem = token_problem(self.app.auth, bearer_token(self), MONITOR_AUDIENCE)
        if problem is not None:
            self._finish(path, query, 401, self._auth_error(problem), authorized=False)
            return
        fault = self.app.take_fault()
        if fault is not None:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            self._finish(
                path, query, fault.status, _error("InjectedFault", "Injected fault"), headers=headers
            )
            return
        try:
            status, body = self.app.ingest(unquote(path), query, raw, self.headers.get("Content-Encoding"))
        except Exception as exc:  # a bug here must not kill the connection silently
            status, body = 500, _error("InternalServerError", repr(exc)[:300])
        self._finish(path, query, status, body)

    def _auth_error(self, problem: str) -> dict[str, Any]:
        if problem == "missing":
            return _error(
                "InvalidAuthenticationToken", "Authorization header is missing or not a Bearer token."
            )
        if problem == "audience":
            return _error(
                "InvalidAuthenticationTokenAudience",
                f"The access token was issued for the wrong audience; expected {MONITOR_AUDIENCE}.",
            )
        if problem == "expired":
            return _error("ExpiredAuthenticationToken", "The access token has expired.")
        return _error("InvalidAuthenticationToken", "The access token is invalid.")

    def _finish(
        self,
        path: str,
        query: dict[str, list[str]],
        status: int,
        body: Any,
        *,
        authorized: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.app.requests.add(RecordedRequest("POST", path, query, status, authorized=authorized))
        all_headers = {"x-ms-request-id": str(uuid.uuid4()), **(headers or {})}
        self.send_json(status, body if status != 204 else None, headers=all_headers)


class LogsIngestionLoopback(LoopbackServer):
    """Loopback DCE. ``rules`` maps accepted DCR immutable ids to their stream names (None: accept
    any rule and stream). ``auth`` validates bearer tokens (None: any bearer token)."""

    handler_class = LogsIngestionHandler

    def __init__(
        self,
        auth: TokenValidator | None = None,
        *,
        rules: dict[str, Iterable[str]] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__()
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self._rules: dict[str, set[str]] | None = (
            None if rules is None else {r: set(streams) for r, streams in rules.items()}
        )
        self._records: dict[str, list[Any]] = {}
        self._by_rule: dict[tuple[str, str], int] = {}
        self._faults: list[_Fault] = []
        self.requests = RequestLog()

    # -- configuration and accessors -----------------------------------------------------------
    def add_rule(self, rule_id: str, *streams: str) -> None:
        with self._lock:
            if self._rules is None:
                self._rules = {}
            self._rules.setdefault(rule_id, set()).update(streams)

    def records(self, stream: str) -> list[Any]:
        """The records received for ``stream`` (decompressed, parsed), in arrival order."""
        with self._lock:
            return list(self._records.get(stream, []))

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._by_rule.clear()
        self.requests.clear()

    def fail_next(self, count: int, status: int, retry_after: float | None = None) -> None:
        """The next ``count`` authorized uploads get ``status`` (with ``Retry-After`` if given)."""
        with self._lock:
            self._faults.extend(_Fault(status, retry_after) for _ in range(count))

    def take_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    # -- protocol ------------------------------------------------------------------------------
    def ingest(
        self, path: str, query: dict[str, list[str]], raw: bytes, encoding: str | None
    ) -> tuple[int, dict[str, Any] | None]:
        parts = [p for p in path.split("/") if p]
        if len(parts) != 4 or parts[0] != "dataCollectionRules" or parts[2] != "streams":
            return 404, _error("NotFound", f"The requested resource {path} was not found.")
        rule_id, stream = parts[1], parts[3]
        if not (query.get("api-version") or [""])[0]:
            return 400, _error("MissingApiVersionParameter", "The api-version query parameter is required.")
        with self._lock:
            rules = None if self._rules is None else {k: set(v) for k, v in self._rules.items()}
        if rules is not None and rule_id not in rules:
            return 404, _error(
                "InvalidDataCollectionRule",
                f"Data collection rule with immutable Id '{rule_id}' not found.",
            )
        if rules is not None and stream not in rules[rule_id]:
            return 404, _error(
                "InvalidStream",
                f"Stream '{stream}' is not defined in data collection rule with immutable Id '{rule_id}'.",
            )
        try:
            body = self._decode(raw, encoding)
        except _TooLarge:
            return 413, _error(
                "ContentLengthLimitExceeded",
                f"Maximum allowed content length: {self.max_body_bytes} bytes. "
                "Provided content length exceeds it.",
            )
        except (ValueError, zlib.error) as exc:
            return 400, _error("InvalidContentEncoding" if encoding else "InvalidPayload", str(exc)[:200])
        try:
            rows = json.loads(body)
        except ValueError:
            return 400, _error("InvalidPayload", "The request body is not valid JSON.")
        if not isinstance(rows, list):
            return 400, _error("InvalidPayload", "The request body must be a JSON array.")
        with self._lock:
            self._records.setdefault(stream, []).extend(rows)
            self._by_rule[(rule_id, stream)] = self._by_rule.get((rule_id, stream), 0) + len(rows)
        return 204, None

    def _decode(self, raw: bytes, encoding: str | None) -> bytes:
        if not encoding or encoding.lower() == "identity":
            if len(raw) > self.max_body_bytes:
                raise _TooLarge
            return raw
        if encoding.lower() != "gzip":
            raise ValueError(f"Unsupported Content-Encoding '{encoding}'")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = inflater.decompress(raw, self.max_body_bytes + 1)  # bounded: no gzip bombs
        if len(data) > self.max_body_bytes:
            raise _TooLarge
        if not inflater.eof:
            raise ValueError("truncated gzip body")
        return data

    def __enter__(self) -> LogsIngestionLoopback:
        self.start()
        return self


class _TooLarge(Exception):
    pass
