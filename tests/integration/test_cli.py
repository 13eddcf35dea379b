"""The operator's CLI against the loopback stack: connections add / list / show / test /
reauthorise / remove, with secrets only ever in Key Vault."""

from __future__ import annotations

import json

import pytest

from shared_code.bootstrap import Container
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
    assert vault.get("itsm-cli-ok-refresh-token")  # written back by the OAuth flow
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
    code, output = add(stack, "cli-bad", "--test", password="not-the-password")
    assert code == 1
    assert "FAILED: cli-bad" in output
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


def test_remove_deletes_the_connection_and_its_secrets(app: Container, stack: LoopbackStack) -> None:
    assert add(stack, "cli-gone")[0] == 0
    code, output = stack.cli("connections", "remove", "cli-gone")
    assert code == 0, output
    assert not [name for name in stack.keyvault.secrets_snapshot() if name.startswith("itsm-cli-gone-")]
    code, output = stack.cli("connections", "show", "cli-gone")
    assert code == 1
    assert "no ITSM connection named 'cli-gone'" in output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--url", "http://example.service-now.com"), "must be an https:// URL"),
        (("--url", "https://itsm.contoso.com"), "private instance"),
        (("--scope-days", "121"), "sync_scope_days"),
        (("--sync", "incidents,problems"), "sync_data"),
        (("--severity-map", "Sev0=4/1"), "--severity-map"),
        (("--type", "cherwell"), "not supported yet"),
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
