"""A throwaway certificate authority for the loopback HTTPS servers.

Connections must be https, and the Azure SDKs refuse bearer tokens over plain HTTP, so every
loopback server speaks TLS with a certificate for 127.0.0.1 / localhost / ::1 signed by a CA made
here. Clients trust it through the CA bundle file (``ca_bundle_path``), never through
``verify=False``.

A loopback server started in another process (``python -m tests.loopback.servicenow``) shares the
parent's CA when ``LOOPBACK_TLS_DIR`` names the parent's folder (``shared_tls_environment()``).
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class LoopbackTls:
    ca_bundle_path: str
    cert_chain_path: str
    key_path: str

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_chain_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_bundle_path)


TLS_DIR_VARIABLE = "LOOPBACK_TLS_DIR"
_CA_FILE = "ca.pem"
_CHAIN_FILE = "server-chain.pem"

_lock = threading.Lock()
_instance: LoopbackTls | None = None


def loopback_tls() -> LoopbackTls:
    """The process-wide CA and server certificate (made once, files in a temp folder)."""
    global _instance
    with _lock:
        if _instance is None:
            shared = os.environ.get(TLS_DIR_VARIABLE, "")
            if shared and (Path(shared) / _CA_FILE).is_file() and (Path(shared) / _CHAIN_FILE).is_file():
                folder = Path(shared)  # the parent process's CA (see shared_tls_environment)
            else:
                folder = Path(tempfile.mkdtemp(prefix="itsm-loopback-tls-"))
                ca = trustme.CA()
                cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
                ca.cert_pem.write_to_path(str(folder / _CA_FILE))
                cert.private_key_and_cert_chain_pem.write_to_path(str(folder / _CHAIN_FILE))
            chain_path = str(folder / _CHAIN_FILE)
            _instance = LoopbackTls(str(folder / _CA_FILE), chain_path, chain_path)
        return _instance


def shared_tls_environment() -> dict[str, str]:
    """Environment for a child process whose loopback servers should use this process's CA."""
    return {TLS_DIR_VARIABLE: str(Path(loopback_tls().ca_bundle_path).parent)}
