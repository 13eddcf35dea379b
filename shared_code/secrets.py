"""The secret store: connection secrets in Azure Key Vault, referenced by name.

Values travel as ``SecretStr`` and are revealed only where a protocol needs them (the OAuth form,
the Basic header). Error messages name the secret and the failure class, never the value.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient
from pydantic import SecretStr

from shared_code.errors import SecretStoreError

log = logging.getLogger(__name__)


class SecretStore(Protocol):
    def get(self, name: str) -> SecretStr | None:
        """The current value, or None when the secret does not exist."""
        ...

    def set(self, name: str, value: SecretStr) -> None: ...

    def delete(self, name: str) -> None: ...


class KeyVaultSecretStore:
    """Key Vault behind the SecretStore protocol; the SecretClient is made on first use."""

    def __init__(
        self, vault_url: str, credential: TokenCredential, *, ca_bundle: str = "", timeout: float = 20.0
    ) -> None:
        self._vault_url = vault_url
        self._credential = credential
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self._client: SecretClient | None = None
        self._lock = threading.Lock()

    def _secrets(self) -> SecretClient:
        with self._lock:
            if self._client is None:
                kwargs: dict[str, object] = {
                    "connection_timeout": self._timeout,
                    "read_timeout": self._timeout,
                }
                if self._ca_bundle:
                    kwargs["connection_verify"] = self._ca_bundle
                    # a private endpoint or test vault is not under vault.azure.net
                    kwargs["verify_challenge_resource"] = False
                self._client = SecretClient(self._vault_url, self._credential, **kwargs)
            return self._client

    def get(self, name: str) -> SecretStr | None:
        try:
            value = self._secrets().get_secret(name).value
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise SecretStoreError(
                f"reading secret {name!r} from Key Vault failed: {type(exc).__name__}"
            ) from exc
        return SecretStr(value) if value is not None else None

    def set(self, name: str, value: SecretStr) -> None:
        try:
            self._secrets().set_secret(name, value.get_secret_value(), content_type="text/plain")
        except AzureError as exc:
            raise SecretStoreError(
                f"writing secret {name!r} to Key Vault failed: {type(exc).__name__}"
            ) from exc

    def delete(self, name: str) -> None:
        try:
            self._secrets().begin_delete_secret(name).wait()
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            raise SecretStoreError(
                f"deleting secret {name!r} from Key Vault failed: {type(exc).__name__}"
            ) from exc


class StoredRefreshToken:
    """A connection's rotating OAuth refresh token, kept in the secret store."""

    def __init__(self, store: SecretStore, name: str) -> None:
        self._store = store
        self._name = name

    def load(self) -> str | None:
        value = self._store.get(self._name)
        return value.get_secret_value() if value else None

    def save(self, token: str) -> None:
        self._store.set(self._name, SecretStr(token))
        log.info("stored the rotated refresh token in secret %s", self._name)
