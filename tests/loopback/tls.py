"""A throwaway certificate authority for the loopback HTTPS servers.

Connections must be https, and the Azure SDKs refuse bearer tokens over plain HTTP, so every
loopback server speaks TLS with a certificate for 127.0.0.1 / localhost / ::1 signed by a CA made
here. Clients trust it through the CA bundle file (``ca_bundle_path``), never through
``verify=False``.
"""

from __future__ import annotations

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


_lock = threading.Lock()
_instance: LoopbackTls | None = None


def loopback_tls() -> LoopbackTls:
    """The process-wide CA and server certificate (made once, files in a temp folder)."""
    global _instance
    with _lock:
        if _instance is None:
            folder = Path(tempfile.mkdtemp(prefix="itsm-loopback-tls-"))
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
            ca_path = folder / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_path))
            chain_path = folder / "server-chain.pem"
            cert.private_key_and_cert_chain_pem.write_to_path(str(chain_path))
            _instance = LoopbackTls(str(ca_path), str(chain_path), str(chain_path))
        return _instance
