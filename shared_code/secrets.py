"""The secret store: connection secrets in Azure Key Vault, referenced by name.

Values travel as ``SecretStr`` and are revealed only where a protocol needs them (the OAuth form,
the Basic header). Error messages name the secret and the failure class, never the value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Protocol

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.secrets import SecretClient
from pydantic import SecretStr

from shared_code.diagnose import KEY_VAULT_ROLE, describe
from shared_code.errors import SecretStoreError

log = logging.getLogger(__name__)

CLEARED_REFRESH_TOKEN = "-"  # noqa: S105 - a marker that no token is stored, not a secret
"""The value of a refresh-token secret that holds no token (after ``connections reauthorise``).

The secret is overwritten with this rather than deleted: a vault has soft delete on (it can no
longer be turned off), and a soft-deleted name refuses every write for its retention period (90
days by default), so the OAuth flow could not store the next refresh token. Key Vault appears to take
an empty value too, but its API only documents ``value`` as a required string; a one-character marker
is accepted everywhere, is visible as deliberate in the portal, and is never a ServiceNow token."""

RECOVER_WAIT_SECONDS = 60.0


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

    def _why(self, exc: BaseException) -> str:
        return describe(exc, target=self._vault_url, role=KEY_VAULT_ROLE)

    def get(self, name: str) -> SecretStr | None:
        try:
            value = self._secrets().get_secret(name).value
        except ResourceNotFoundError:
            return None
        except AzureError as exc:
            raise SecretStoreError(
                f"reading secret {name!r} from Key Vault failed: {self._why(exc)}"
            ) from exc
        return SecretStr(value) if value is not None else None

    def set(self, name: str, value: SecretStr) -> None:
        """Write a new version; a soft-deleted secret of that name is recovered first (a deleted
        name cannot be reused until it is purged, and purging needs a right the app should not have)."""
        try:
            self._write(name, value)
        except ResourceExistsError as exc:
            if not _deleted_but_recoverable(exc):
                raise SecretStoreError(
                    f"writing secret {name!r} to Key Vault failed: {self._why(exc)}"
                ) from exc
            log.info("secret %s is deleted but recoverable: recovering it to write a new version", name)
            try:
                # recovery takes seconds; bounded, so a stuck one ends in the write's own error
                self._secrets().begin_recover_deleted_secret(name).wait(timeout=RECOVER_WAIT_SECONDS)
            except AzureError as recover_exc:
                raise SecretStoreError(
                    f"secret {name!r} is deleted but recoverable and recovering it failed "
                    f"({type(recover_exc).__name__}): the identity needs the secrets recover permission, "
                    "or purge the deleted secret"
                ) from recover_exc
            self._write(name, value)

    def _write(self, name: str, value: SecretStr) -> None:
        """One set_secret call; every failure but the deleted-name conflict becomes SecretStoreError."""
        try:
            self._secrets().set_secret(name, value.get_secret_value(), content_type="text/plain")
        except ResourceExistsError:
            raise
        except AzureError as exc:
            raise SecretStoreError(f"writing secret {name!r} to Key Vault failed: {self._why(exc)}") from exc

    def delete(self, name: str) -> None:
        try:
            self._secrets().begin_delete_secret(name).wait()
        except ResourceNotFoundError:
            return
        except AzureError as exc:
            raise SecretStoreError(
                f"deleting secret {name!r} from Key Vault failed: {self._why(exc)}"
            ) from exc


class StoredRefreshToken:
    """A connection's rotating OAuth refresh token, kept in the secret store."""

    def __init__(self, store: SecretStore, name: str) -> None:
        self._store = store
        self._name = name

    def load(self) -> str | None:
        """The stored token, or None when there is none (no secret, or one cleared by reauthorise)."""
        value = self._store.get(self._name)
        token = value.get_secret_value().strip() if value is not None else ""
        return token if token and token != CLEARED_REFRESH_TOKEN else None

    def save(self, token: str) -> None:
        self._store.set(self._name, SecretStr(token))
        log.info("stored the rotated refresh token in secret %s", self._name)

    def clear(self) -> None:
        """Forget the token by writing the cleared marker as a new version (never a delete: see
        ``CLEARED_REFRESH_TOKEN``), so the next sign-in uses the password grant."""
        self._store.set(self._name, SecretStr(CLEARED_REFRESH_TOKEN))
        log.info("cleared the refresh token in secret %s", self._name)


def _deleted_but_recoverable(exc: ResourceExistsError) -> bool:
    """Key Vault's 409 for a name that is soft-deleted (innererror ObjectIsDeletedButRecoverable)."""
    error = getattr(exc, "error", None)
    inner = getattr(error, "innererror", None) or {}
    code = inner.get("code") if isinstance(inner, Mapping) else None
    return code == "ObjectIsDeletedButRecoverable" or "deleted but recoverable" in str(exc.message or "")
