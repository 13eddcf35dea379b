"""``TLS_CA_BUNDLE`` adds CAs to the trust store; it never replaces it.

The Azure SDK clients (identity, Key Vault, Logs Ingestion, Table Storage) take one CA *file* as
``connection_verify``, which replaces the default roots: given only the private CA, they would
stop trusting login.microsoftonline.com and every public endpoint. So they get a file holding
certifi's roots followed by the extra bundle, written once per content to the temp folder (the
only file this app writes; it holds public certificates, no secret). The httpx client adds the
bundle to an SSL context built on certifi (``bootstrap.build_ssl_context``), which needs no file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import certifi

from shared_code.errors import ConfigurationError

_lock = threading.Lock()
_written: dict[tuple[str, str], str] = {}


def trust_file(extra_bundle: str, *, base_bundle: str | None = None) -> str:
    """A CA file with the default roots (``base_bundle``, certifi's by default) and the certificates
    of ``extra_bundle``; '' when there is no extra bundle (the clients' defaults are then right)."""
    if not extra_bundle:
        return ""
    base = base_bundle or certifi.where()
    with _lock:
        cached = _written.get((base, extra_bundle))
        if cached and Path(cached).is_file():
            return cached
        try:
            extra = Path(extra_bundle).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"TLS_CA_BUNDLE: cannot read {extra_bundle} ({exc.strerror or type(exc).__name__}): "
                "set it to a PEM file of the extra CA certificates, or leave it empty"
            ) from exc
        if b"-----BEGIN CERTIFICATE-----" not in extra:
            raise ConfigurationError(f"TLS_CA_BUNDLE: {extra_bundle} holds no PEM certificate")
        content = Path(base).read_bytes().rstrip(b"\n") + b"\n" + extra
        path = (
            Path(tempfile.gettempdir()) / f"itsm-connector-ca-{hashlib.sha256(content).hexdigest()[:16]}.pem"
        )
        if not path.is_file():
            partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            partial.write_bytes(content)
            os.replace(partial, path)  # atomic: a reader never sees half a file
        _written[(base, extra_bundle)] = str(path)
        return str(path)
