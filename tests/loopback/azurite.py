"""Start Azurite (the Azure Storage emulator: blob, queue, table) on free loopback ports.

``node_modules/.bin/azurite`` is installed by ``npm ci`` (``make setup``). The process runs with
in-memory persistence in its own session (process group), so ``stop()`` ends it and anything it
started, and leaves no files in the tree (its workspace is a temporary folder).

    with Azurite() as azurite:
        tables = TableServiceClient.from_connection_string(azurite.connection_string)

``Azurite(tls=True)`` serves HTTPS with the loopback CA's certificate (``tests/loopback/tls.py``),
as a storage account does: then only a client that trusts that CA can use it.

Ports are picked by binding port 0 and releasing it; if another process takes one of them before
Azurite binds it (a bind race), Azurite exits or the readiness probe finds a stranger on the port,
and the launch is retried with fresh ports.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tests.loopback.tls import loopback_tls

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO_ROOT / "node_modules" / ".bin" / "azurite"

ACCOUNT_NAME = "devstoreaccount1"
# The well-known development storage key (public, documented; not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

HOST = "127.0.0.1"


class AzuriteError(RuntimeError):
    """Azurite is missing or did not come up."""


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel considers free right now (held open together)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _is_azurite(port: int, *, tls: bool = False) -> bool:
    """The listener on ``port`` answers like Azurite (its ``Server`` header), not some stranger."""
    conn = (
        http.client.HTTPSConnection(HOST, port, timeout=2, context=loopback_tls().client_context())
        if tls
        else http.client.HTTPConnection(HOST, port, timeout=2)
    )
    try:
        conn.request("GET", f"/{ACCOUNT_NAME}?comp=list")
        response = conn.getresponse()
        response.read()
        return "azurite" in (response.getheader("Server") or "").lower()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class Azurite:
    """Azurite on ``127.0.0.1`` with blob/queue/table on free ports; a context manager."""

    def __init__(
        self,
        *,
        startup_timeout: float = 20.0,
        attempts: int = 3,
        binary: Path | None = None,
        tls: bool = False,
    ) -> None:
        self.binary = binary or AZURITE_BIN
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.attempts = attempts
        self.blob_port = self.queue_port = self.table_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._workspace: str | None = None
        self._log: IO[bytes] | None = None

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def blob_endpoint(self) -> str:
        return f"{self._scheme}://{HOST}:{self.blob_port}/{ACCOUNT_NAME}"

    @property
    def queue_endpoint(self) -> str:
        return f"{self._scheme}://{HOST}:{self.queue_port}/{ACCOUNT_NAME}"

    @property
    def table_endpoint(self) -> str:
        return f"{self._scheme}://{HOST}:{self.table_port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol={self._scheme};AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint};QueueEndpoint={self.queue_endpoint};"
            f"TableEndpoint={self.table_endpoint};"
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Azurite:
        if not self.binary.exists():
            raise AzuriteError(
                f"Azurite is not installed ({self.binary} is missing): run `npm ci` in {REPO_ROOT} "
                "(or `make setup`)"
            )
        if shutil.which("node") is None:
            raise AzuriteError("Node.js (`node`) is not on PATH; Azurite needs it")
        self._workspace = tempfile.mkdtemp(prefix="itsm-azurite-")
        problems: list[str] = []
        for _ in range(max(1, self.attempts)):
            problem = self._launch_once()
            if problem is None:
                return self
            problems.append(problem)
            self._terminate()
        self._cleanup_workspace()
        raise AzuriteError("Azurite did not start: " + " | ".join(problems))

    def _launch_once(self) -> str | None:
        assert self._workspace is not None
        self.blob_port, self.queue_port, self.table_port = _free_ports(3)
        args = [
            str(self.binary),
            "--inMemoryPersistence",
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--blobHost",
            HOST,
            "--blobPort",
            str(self.blob_port),
            "--queueHost",
            HOST,
            "--queuePort",
            str(self.queue_port),
            "--tableHost",
            HOST,
            "--tablePort",
            str(self.table_port),
        ]
        if self.tls:
            args += ["--cert", self._pem("cert"), "--key", self._pem("key")]
        if self._log is not None:
            self._log.close()
        self._log = open(os.path.join(self._workspace, "azurite.log"), "w+b")  # noqa: SIM115
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._workspace,
            start_new_session=True,  # its own process group: stop() signals the whole group
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return f"exited with {self._proc.returncode}: {self._output()}"
            if _accepts(self.table_port) and _accepts(self.queue_port) and _accepts(self.blob_port):
                if self._proc.poll() is not None:
                    return f"exited with {self._proc.returncode}: {self._output()}"
                if not (
                    _is_azurite(self.table_port, tls=self.tls) and _is_azurite(self.queue_port, tls=self.tls)
                ):
                    return "another process answered on a chosen port (bind race)"
                return None
            time.sleep(0.05)
        return f"no listener on ports {self.queue_port}/{self.table_port} after {self.startup_timeout:.0f}s"

    def _pem(self, part: str) -> str:
        """The loopback server certificate (or its key) alone in a file, as Azurite reads them."""
        assert self._workspace is not None
        pem = Path(loopback_tls().cert_chain_path).read_text()
        first_cert = pem.index("-----BEGIN CERTIFICATE-----")
        path = Path(self._workspace) / f"{part}.pem"
        path.write_text(pem[first_cert:] if part == "cert" else pem[:first_cert])
        return str(path)

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace").strip()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group we created with start_new_session
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        else:
            # Leader gone; make sure nothing it started lingers in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _cleanup_workspace(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    def stop(self) -> None:
        self._terminate()
        self._cleanup_workspace()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
