"""The operator's CLI against the loopback stack: connections add / list / show / test /
reauthorise / remove, with secrets only ever in Key Vault."""

from __future__ import annotations

import json
import uuid

import pytest

from shared_code.bootstrap import Container
from shared_code.secrets import CLEARED_REFRESH_TOKEN, StoredRefreshToken
from tests.loopback.stack import LoopbackStack


def add(stack: LoopbackStack, name: str, *options: str, password: str | None = None) -> tuple[int, str]:
    snow = stack.servicenow
    return stack.cli(
        "connections", "add", name, "--type", "servicenow", "--url", snow.url, "--private-instance",
        "--user", snow.username, "--client-id", snow.client_id, "--secrets-stdin", *options,
        stdin=f"{snow.client_secret}\n{password or snow.password}\n",
    )  # fmt: skip


def test_add_stores_secrets_in_key_vault_only_and_test_gives_a_verdict(
    app: Container, stack: LoopbackStack
) -> None:
    code, output = add(stack, "cli-ok", "--test", "--scope-days", "30", "--sync", "incidents")
    assert code == 0, output
    assert "OK: cli-ok" in output
    vault = stack.keyvault.secrets_snapshot()
    assert vault["itsm-cli-ok-password"] == stack.servicenow.password
    assert vault["itsm-cli-ok-client-secret"] == stack.servicenow.client_secret
    assert vault.get("itsm-cli-ok-refresh-token") not in (None, CLEARED_REFRESH_TOKEN)  # from the OAuth flow
    # this connection's secrets (the vault also holds other tests' ones, and cleared markers)
    vault = {name: value for name, value in vault.items() if name.startswith("itsm-cli-ok-")}
    code, shown = stack.cli("connections", "show", "cli-ok")
    assert code == 0
    definition = json.loads(shown)
    assert definition["sync_scope_days"] == 30
    assert definition["sync_data"] == ["incidents"]
    assert definition["create_configuration_items"] is False
    code, listed = stack.cli("connections", "list")
    assert "cli-ok" in listed
    for secret in (stack.servicenow.password, stack.servicenow.client_secret, *vault.values()):
        assert secret not in shown
        assert secret not in listed
        assert secret not in output
    entity = next(iter(app.tables.table("Connections").list_entities()))
    assert not {str(v) for v in entity.values()} & set(vault.values())


def test_refused_credentials_are_reported_then_fixed_with_reauthorise(
    app: Container, stack: LoopbackStack
) -> None:
    code, output = add(stack, "cli-bad", "--test", "--keep-on-failure", password="not-the-password")
    assert code == 1
    assert "FAILED: cli-bad" in output
    assert "kept connection cli-bad and its secrets (--keep-on-failure)" in output
    assert "re-authorise" in output
    assert "not-the-password" not in output
    snow = stack.servicenow
    code, output = stack.cli(
        "connections", "reauthorise", "cli-bad", "--secrets-stdin", "--test",
        stdin=f"{snow.client_secret}\n{snow.password}\n",
    )  # fmt: skip
    assert code == 0, output
    assert "OK: cli-bad" in output
    assert stack.keyvault.secrets_snapshot()["itsm-cli-bad-password"] == snow.password


def test_reauthorise_clears_the_refresh_token_and_the_rotated_ones_are_stored_again(
    app: Container, stack: LoopbackStack
) -> None:
    snow = stack.servicenow
    assert add(stack, "cli-rotate", "--test")[0] == 0
    secret = "itsm-cli-rotate-refresh-token"
    first = stack.keyvault.secrets_snapshot()[secret]

    code, output = stack.cli(
        "connections", "reauthorise", "cli-rotate", "--secrets-stdin",
        stdin=f"{snow.client_secret}\n{snow.password}\n",
    )  # fmt: skip

    assert code == 0, output
    # cleared with a new version, not deleted: a soft-deleted name refuses every write for 90 days
    assert stack.keyvault.secrets_snapshot()[secret] == CLEARED_REFRESH_TOKEN
    assert secret not in stack.keyvault.deleted_names()
    assert StoredRefreshToken(app.secrets, secret).load() is None

    # the next call signs in with the password grant and writes the new refresh token back
    assert stack.cli("connections", "test", "cli-rotate")[0] == 0
    second = stack.keyvault.secrets_snapshot()[secret]
    assert second not in (first, CLEARED_REFRESH_TOKEN)
    # an expired access token is renewed with the refresh grant, which rotates the refresh token
    snow.expire_access_tokens()
    assert stack.cli("connections", "test", "cli-rotate")[0] == 0
    third = stack.keyvault.secrets_snapshot()[secret]
    assert third not in (first, second, CLEARED_REFRESH_TOKEN)

    # a cold start with the password changed at the instance can only sign in with the stored token
    app.forget_connector("cli-rotate")
    snow.expire_access_tokens()
    snow.add_user(snow.username, "changed-" + uuid.uuid4().hex)
    try:
        code, output = stack.cli("connections", "test", "cli-rotate")
    finally:
        snow.add_user(snow.username, snow.password)
    assert code == 0, output
    assert stack.keyvault.secrets_snapshot()[secret] not in (first, second, third)


def test_remove_deletes_the_connection_and_its_secrets(app: Container, stack: LoopbackStack) -> None:
    assert add(stack, "cli-gone")[0] == 0
    code, output = stack.cli("connections", "remove", "cli-gone")
    assert code == 0, output
    assert not [name for name in stack.keyvault.secrets_snapshot() if name.startswith("itsm-cli-gone-")]
    code, output = stack.cli("connections", "show", "cli-gone")
    assert code == 1
    assert "no ITSM connection named 'cli-gone'" in output


def test_a_removed_connection_can_be_added_again_under_the_same_name(
    app: Container, stack: LoopbackStack
) -> None:
    assert add(stack, "cli-again", "--test")[0] == 0
    assert stack.cli("connections", "remove", "cli-again")[0] == 0
    assert "itsm-cli-again-password" in stack.keyvault.deleted_names()  # soft-deleted, recoverable

    code, output = add(stack, "cli-again", "--test")

    assert code == 0, output
    assert "OK: cli-again" in output
    vault = stack.keyvault.secrets_snapshot()
    assert vault["itsm-cli-again-password"] == stack.servicenow.password
    assert vault["itsm-cli-again-client-secret"] == stack.servicenow.client_secret
    assert vault["itsm-cli-again-refresh-token"] != CLEARED_REFRESH_TOKEN  # written by the OAuth flow
    assert not [name for name in stack.keyvault.deleted_names() if name.startswith("itsm-cli-again-")]


def test_a_name_that_differs_only_in_case_is_refused_because_it_would_share_the_secrets(
    app: Container, stack: LoopbackStack
) -> None:
    assert add(stack, "cli-case")[0] == 0

    code, output = add(stack, "CLI-Case", password="another-password")

    assert code == 1
    assert "'cli-case'" in output
    assert "differ only in case" in output
    assert "another-password" not in output
    assert stack.keyvault.secrets_snapshot()["itsm-cli-case-password"] == stack.servicenow.password
    assert [c.name for c in app.connections.list() if c.name.lower() == "cli-case"] == ["cli-case"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--url", "http://example.service-now.com"), "must be an https:// URL"),
        (("--url", "https://itsm.contoso.com"), "private instance"),
        (("--scope-days", "121"), "--scope-days"),
        (("--sync", "incidents,problems"), "--sync item 2"),
        (("--severity-map", "Sev0=4/1"), "--severity-map"),
        (("--type", "nosuchproduct"), "invalid choice"),
    ],
)
def test_invalid_connections_are_refused_with_the_field_named(
    app: Container, stack: LoopbackStack, options: tuple[str, ...], message: str
) -> None:
    base = {"--type": "servicenow", "--url": "https://dev1.service-now.com", "--scope-days": "15"}
    overrides = dict(zip(options[::2], options[1::2], strict=True))
    argv = [item for pair in (base | overrides).items() for item in pair]
    code, output = stack.cli(
        "connections", "add", "cli-invalid", *argv, "--user", "u", "--client-id", "c", "--secrets-stdin",
        stdin="client-secret-value\npassword-value\n",
    )  # fmt: skip
    assert code == 2, output
    assert message in output
    assert "password-value" not in output
    assert not [n for n in stack.keyvault.secrets_snapshot() if n.startswith("itsm-cli-invalid-")]


def test_secrets_are_never_read_from_the_command_line(app: Container, stack: LoopbackStack) -> None:
    code, output = stack.cli(
        "connections", "add", "cli-argv", "--type", "servicenow", "--url", "https://dev1.service-now.com",
        "--user", "u", "--client-id", "c",
    )  # fmt: skip
    assert code == 2
    assert "no client secret given" in output
