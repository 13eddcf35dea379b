"""A small threaded HTTPS server base shared by the loopback protocol servers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback.tls import loopback_tls


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class LoopbackHandler(BaseHTTPRequestHandler):
    """Request handler with JSON helpers; ``self.server.app`` is the owning LoopbackServer."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        return

    @property
    def app(self) -> Any:
        return self.server.app

    def parsed(self) -> tuple[str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return parts.path, parse_qs(parts.query, keep_blank_values=True)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if data:
            self.wfile.write(data)


class LoopbackServer:
    """Runs ``handler_class`` on 127.0.0.1 (free port, TLS by default) in a daemon thread."""

    handler_class: type[LoopbackHandler] = LoopbackHandler

    def __init__(self, *, tls: bool = True, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = _Server((host, port), self.handler_class)
        self._httpd.app = self  # type: ignore[attr-defined]
        self.tls = tls
        if tls:
            context = loopback_tls().server_context()
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self) -> LoopbackServer:
        httpd = self._httpd  # poll for shutdown every 50 ms so stop() returns quickly
        self._thread = threading.Thread(
            target=lambda: httpd.serve_forever(poll_interval=0.05), name=type(self).__name__, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def json_body(handler: LoopbackHandler) -> Any:
    raw = handler.read_body()
    return json.loads(raw) if raw else None
