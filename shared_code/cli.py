"""The operator's command line: the same services as the Functions app, without the host.

    python -m shared_code connections add|list|show|test|reauthorise|remove
    python -m shared_code alerts list|show|redrive
    python -m shared_code sync run [--connection NAME] [--type incidents|change_requests]

Secrets are never taken from argv (it leaks into shell history and process lists): they are read
from a prompt without echo, from standard input (``--secrets-stdin``), or from an environment
variable named on the command line (``--password-env`` / ``--client-secret-env``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from shared_code import netsafety
from shared_code.alerts.intake import DELIVERY_ID
from shared_code.alerts.signal import Severity
from shared_code.bootstrap import Container, get_container
from shared_code.connections import CONNECTION_NAME, AuthMethod, Connection, PartnerType, secret_name
from shared_code.errors import AlreadyExistsError, ConnectorAppError, InvalidInputError, shown
from shared_code.itsm.base import SeverityMapping
from shared_code.itsm.registry import SUPPORTED_PARTNERS
from shared_code.secrets import StoredRefreshToken
from shared_code.state.deliveries import Delivery, DeliveryStatus
from shared_code.workitems.commands import sync_run

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Cli:
    """Commands over a container; output goes to ``out`` so tests and the demo can read it."""

    def __init__(
        self,
        container_factory: Callable[[], Container] = get_container,
        out: IO[str] | None = None,
        stdin: IO[str] | None = None,
        environ: dict[str, str] | None = None,
        err: IO[str] | None = None,
    ) -> None:
        self._container_factory = container_factory
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.stdin = stdin or sys.stdin
        self.environ = environ if environ is not None else dict(os.environ)

    @property
    def container(self) -> Container:
        return self._container_factory()

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    # -- connections ---------------------------------------------------------------------------

    def connections_add(self, args: argparse.Namespace) -> int:
        data: dict[str, Any] = {
            "name": args.name,
            "partner_type": args.type,
            "server_url": args.url,
            "private_instance": args.private_instance,
            "auth_method": args.auth,
            "client_id": args.client_id or "",
            "username": args.user or "",
            "sync_data": parse_sync_data(args.sync),
            "sync_scope_days": args.scope_days,
            "create_configuration_items": args.create_ci,
            "correlation": args.correlation,
            "auto_resolve": args.auto_resolve,
            "note_interval_minutes": args.note_interval_minutes,
            "reopen_window_hours": args.reopen_window_hours,
            "close_code": args.close_code,
            "assignment_group": args.assignment_group or "",
            "caller": args.caller or "",
            "close_azure_alerts": args.close_azure_alerts,
            "default_severity": args.default_severity,
        }
        if args.severity_map:
            data["severity_map"] = parse_severity_map(args.severity_map)
        connection = Connection.parse(data)
        if connection.partner_type not in SUPPORTED_PARTNERS:
            supported = ", ".join(sorted(p.value for p in SUPPORTED_PARTNERS))
            raise InvalidInputError(
                f"partner type {connection.partner_type.value!r} is not supported yet ({supported})"
            )
        container = self.container
        self._check_destination(connection, container)
        secrets = self._read_secrets(connection, args)
        try:
            container.connections.get(connection.name)
        except ConnectorAppError:
            pass
        else:
            raise AlreadyExistsError(f"a connection named {connection.name!r} exists; remove it first")
        twin = next(
            (c.name for c in container.connections.list() if c.name.lower() == connection.name.lower()), None
        )
        if twin is not None:
            raise AlreadyExistsError(
                f"a connection named {twin!r} exists, and names that differ only in case would share "
                f"its Key Vault secrets ({secret_name(twin, '...')}): choose another name"
            )
        for name, value in secrets.items():
            container.secrets.set(name, value)
        if connection.auth_method is AuthMethod.OAUTH:
            # a refresh token left by an earlier connection of this name belongs to other credentials
            StoredRefreshToken(container.secrets, connection.refresh_token_secret_name).clear()
        container.forget_connector(connection.name)  # one cached under this name holds other credentials
        container.connections.add(connection)
        self.say(
            f"added connection {connection.name} ({connection.partner_type.value}, {connection.server_url})"
        )
        self.say(f"secrets stored in Key Vault as: {', '.join(sorted(secrets))}")
        if not args.test:
            return EXIT_OK
        code = self._test(connection)
        if code == EXIT_OK:
            return code
        name = connection.name
        if args.keep_on_failure:
            self.say(
                f"kept connection {name} and its secrets (--keep-on-failure): fix the credentials with "
                f"'connections reauthorise {name}', or remove it with 'connections remove {name}'"
            )
        else:
            self._roll_back(container, connection)
        return code

    def _check_destination(self, connection: Connection, container: Container) -> None:
        """Refuse a private instance whose name resolves to an address the app never calls
        (UnsafeAddressError). A cloud instance's name is checked when the app connects to it."""
        if not connection.private_instance:
            return
        parts = urlsplit(connection.server_url)
        host = parts.hostname or ""
        try:
            netsafety.check_destination(
                host, parts.port or 443, allow_loopback=container.settings.allow_loopback_instances
            )
        except OSError as exc:  # a private name may resolve only where the app runs
            self.say(
                f"note: {host} does not resolve from here ({exc.strerror or type(exc).__name__}); "
                "the app checks the address again on every connection"
            )

    def _roll_back(self, container: Container, connection: Connection) -> None:
        """Undo an add whose test failed: the connection row and the secrets it stored."""
        name = connection.name
        try:
            container.connections.remove(name)
            container.forget_connector(name)
            for secret in connection.secret_names:
                container.secrets.delete(secret)
        except ConnectorAppError as exc:
            self.say(
                f"the test failed and removing connection {name} again failed too ({exc}): "
                f"remove it with 'connections remove {name}'"
            )
            return
        self.say(
            f"removed connection {name} and its secrets again because the test failed "
            "(add --keep-on-failure to keep them for 'connections reauthorise')"
        )

    def _read_secrets(self, connection: Connection, args: argparse.Namespace) -> dict[str, SecretStr]:
        wanted: list[tuple[str, str, str | None]] = []
        if connection.auth_method is AuthMethod.OAUTH:
            wanted.append((connection.client_secret_name, "client secret", args.client_secret_env))
        wanted.append((connection.password_secret_name, "password", args.password_env))
        stdin_lines = iter(self.stdin.read().splitlines()) if args.secrets_stdin else None
        result: dict[str, SecretStr] = {}
        for vault_name, label, env_name in wanted:
            value: str | None
            if env_name:
                value = self.environ.get(env_name)
                if not value:
                    raise InvalidInputError(
                        f"environment variable {env_name} (the {label}) is empty or unset"
                    )
            elif stdin_lines is not None:
                value = next(stdin_lines, None)
                if not value:
                    raise InvalidInputError(
                        f"standard input ended before the {label}: give one secret per line"
                    )
            elif self.stdin.isatty():
                value = getpass.getpass(f"{connection.name} {label}: ")
            else:
                raise InvalidInputError(
                    f"no {label} given: use --secrets-stdin, --{label.split()[-1]}-env "
                    "or run in a terminal to be prompted"
                )
            if not value.strip():
                raise InvalidInputError(f"the {label} is empty")
            result[vault_name] = SecretStr(value.strip())
        return result

    def connections_list(self, args: argparse.Namespace) -> int:
        connections = self.container.connections.list()
        if args.json:
            self.say(json.dumps([c.model_dump(mode="json") for c in connections], indent=2))
            return EXIT_OK
        if not connections:
            self.say("no connections; add one with: connections add NAME --type servicenow --url ...")
            return EXIT_OK
        self.say(f"{'NAME':<20} {'TYPE':<11} {'AUTH':<6} {'SYNC':<26} URL")
        for c in connections:
            sync = ",".join(sorted(s.value for s in c.sync_data)) or "-"
            self.say(
                f"{c.name:<20} {c.partner_type.value:<11} {c.auth_method.value:<6} {sync:<26} {c.server_url}"
            )
        return EXIT_OK

    def connections_show(self, args: argparse.Namespace) -> int:
        connection = self.container.connections.get(args.name)
        data = connection.model_dump(mode="json")
        data["secret_names"] = list(connection.secret_names)
        self.say(json.dumps(data, indent=2))
        return EXIT_OK

    def connections_test(self, args: argparse.Namespace) -> int:
        return self._test(self.container.connections.get(args.name))

    def _test(self, connection: Connection) -> int:
        try:
            verdict = self.container.connector_for(connection).check()
        except ConnectorAppError as exc:
            self.say(f"FAILED: {connection.name}: {exc}")
            return EXIT_FAILED
        self.say(f"OK: {connection.name}: {verdict}")
        return EXIT_OK

    def connections_reauthorise(self, args: argparse.Namespace) -> int:
        """New client secret and password for a connection whose credentials were refused."""
        container = self.container
        connection = container.connections.get(args.name)
        secrets = self._read_secrets(connection, args)
        for name, value in secrets.items():
            container.secrets.set(name, value)
        if connection.auth_method is AuthMethod.OAUTH:
            # the old refresh token belongs to the old credentials: start again with the password grant.
            # Cleared, not deleted: a soft-deleted secret could not take the next token for 90 days
            StoredRefreshToken(container.secrets, connection.refresh_token_secret_name).clear()
        container.forget_connector(connection.name)
        self.say(f"stored new credentials of {connection.name} in Key Vault: {', '.join(sorted(secrets))}")
        return self._test(connection) if args.test else EXIT_OK

    def connections_remove(self, args: argparse.Namespace) -> int:
        container = self.container
        connection = container.connections.get(args.name)
        container.connections.remove(connection.name)
        container.forget_connector(connection.name)
        if not args.keep_secrets:
            for name in connection.secret_names:
                container.secrets.delete(name)
        self.say(f"removed connection {connection.name}" + ("" if args.keep_secrets else " and its secrets"))
        return EXIT_OK

    # -- alerts --------------------------------------------------------------------------------

    def alerts_list(self, args: argparse.Namespace) -> int:
        status = DeliveryStatus(args.status) if args.status else None
        rows = list(
            self.container.deliveries.list(connection=args.connection, status=status, limit=args.limit)
        )
        rows.sort(key=lambda d: d.received_at, reverse=True)
        if args.json:
            self.say(json.dumps([delivery_summary(d) for d in rows], indent=2, default=str))
            return EXIT_OK
        if not rows:
            self.say("no deliveries match")
            return EXIT_OK
        self.say(f"{'DELIVERY':<32} {'CONNECTION':<14} {'STATUS':<9} {'TRIES':>5} {'WORK ITEM':<12} ALERT")
        for d in rows:
            self.say(
                f"{d.delivery_id:<32} {d.connection:<14} {d.status.value:<9} {d.attempts:>5} "
                f"{d.work_item_number or '-':<12} {d.signal.condition.value} {d.signal.rule}"
            )
            if d.last_error and d.status is not DeliveryStatus.DELIVERED:
                self.say(f"    last error: {d.last_error[:300]}")
        return EXIT_OK

    def alerts_show(self, args: argparse.Namespace) -> int:
        found = (
            self.container.deliveries.get(args.connection, args.delivery_id)
            if DELIVERY_ID.match(args.delivery_id) and CONNECTION_NAME.match(args.connection)
            else None
        )
        if found is None:
            self.say(f"no delivery {shown(args.delivery_id)} on connection {shown(args.connection)}")
            return EXIT_FAILED
        self.say(json.dumps(delivery_summary(found), indent=2, default=str))
        return EXIT_OK

    def alerts_redrive(self, args: argparse.Namespace) -> int:
        results = list(
            self.container.alert_delivery.redrive(
                connection=args.connection,
                status=DeliveryStatus(args.status),
                delivery_ids=args.id or None,
                limit=args.limit,
            )
        )
        if not results:
            self.say("nothing to redrive")
            return EXIT_OK
        failed = unreachable = 0
        for redriven in results:
            d = redriven.delivery
            if redriven.storage_error:
                unreachable += 1
                self.say(f"{d.delivery_id} not redriven: {redriven.storage_error[:300]}")
                continue
            failed += d.status is DeliveryStatus.FAILED
            detail = d.work_item_number or d.last_error[:200]
            self.say(f"{d.delivery_id} {d.status.value}: {d.outcome or ''} {detail}".rstrip())
        delivered = len(results) - failed - unreachable
        summary = f"redrove {len(results)}: {delivered} delivered, {failed} failed"
        if unreachable:
            summary += (
                f", {unreachable} not redriven (storage failed for them: run the redrive again "
                "once the storage account answers)"
            )
        self.say(summary)
        return EXIT_FAILED if failed or unreachable else EXIT_OK

    # -- sync ----------------------------------------------------------------------------------

    def sync_run(self, args: argparse.Namespace) -> int:
        return sync_run(self.container, args.connection, args.type, self.out, self.out.isatty())


def delivery_summary(d: Delivery) -> dict[str, Any]:
    return {
        "deliveryId": d.delivery_id,
        "connection": d.connection,
        "status": d.status.value,
        "attempts": d.attempts,
        "lastError": d.last_error,
        "outcome": d.outcome,
        "workItemNumber": d.work_item_number,
        "rule": d.signal.rule,
        "condition": d.signal.condition.value,
        "severity": d.signal.severity.value,
        "receivedAt": d.received_at,
        "updatedAt": d.updated_at,
    }


def parse_sync_data(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    return [part.strip().replace("-", "_") for part in text.split(",") if part.strip()]


def parse_severity_map(text: str) -> dict[str, dict[str, int]]:
    """``Sev0=1/1,Sev1=1/2`` -> impact/urgency per severity."""
    result: dict[str, dict[str, int]] = {}
    for item in text.split(","):
        try:
            severity, pair = item.split("=")
            impact, urgency = pair.split("/")
            mapping = SeverityMapping(impact=int(impact), urgency=int(urgency))
            result[Severity(severity.strip()).value] = mapping.model_dump()
        except ValueError:
            raise InvalidInputError(
                f"--severity-map item {item!r}: use SevN=IMPACT/URGENCY with values 1..3, e.g. Sev0=1/1"
            ) from None
    return result


def add_secret_options(parser: argparse.ArgumentParser) -> None:
    """Where secrets come from: never argv (shell history, process lists)."""
    parser.add_argument(
        "--secrets-stdin", action="store_true", help="read client secret then password from stdin"
    )
    parser.add_argument(
        "--client-secret-env", metavar="VAR", help="read the client secret from this env variable"
    )
    parser.add_argument("--password-env", metavar="VAR", help="read the password from this env variable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared_code", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    groups = parser.add_subparsers(dest="group", required=True)

    conn = groups.add_parser("connections", help="ITSM connections").add_subparsers(
        dest="command", required=True
    )
    add = conn.add_parser("add", help="add a connection (secrets go to Key Vault)")
    add.add_argument("name")
    add.add_argument("--type", required=True, choices=[p.value for p in PartnerType], help="partner type")
    add.add_argument("--url", required=True, help="https base URL of the instance")
    add.add_argument("--user", required=True, help="integration user name")
    add.add_argument("--client-id", help="OAuth client id (required for --auth oauth)")
    add.add_argument("--auth", default="oauth", choices=[a.value for a in AuthMethod])
    add.add_argument("--private-instance", action="store_true", help="allow a host outside *.service-now.com")
    add.add_argument("--sync", default="incidents,change_requests", help="incidents,change_requests or none")
    add.add_argument("--scope-days", type=int, default=15, help="first sync reaches this far back (1-120)")
    add.add_argument(
        "--create-ci", action="store_true", help="create missing configuration items in the CMDB"
    )
    add.add_argument(
        "--correlation", default="per-rule-and-ci", choices=["per-alert", "per-rule-and-ci", "per-rule"]
    )
    add.add_argument("--no-auto-resolve", dest="auto_resolve", action="store_false")
    add.add_argument(
        "--note-interval-minutes", type=int, default=15, help="at most one re-fire note per interval"
    )
    add.add_argument(
        "--reopen-window-hours", type=int, default=24, help="reopen instead of new within this window"
    )
    add.add_argument("--close-code", default="Solved (Permanently)")
    add.add_argument("--assignment-group")
    add.add_argument("--caller")
    add.add_argument(
        "--severity-map", help="e.g. Sev0=1/1,Sev1=1/2,Sev2=2/2,Sev3=2/3,Sev4=3/3 (impact/urgency)"
    )
    add.add_argument(
        "--close-azure-alerts", action="store_true", help="close the Azure alert when resolved in ITSM"
    )
    add.add_argument(
        "--default-severity",
        default="Sev3",
        choices=[s.value for s in Severity],
        help="severity of alerts that carry none, e.g. budget alerts (default: %(default)s)",
    )
    add_secret_options(add)
    add.add_argument("--test", action="store_true", help="test the connection after adding it")
    add.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="with --test: keep the connection and its secrets when the test fails (default: remove them)",
    )
    lst = conn.add_parser("list", help="list connections")
    lst.add_argument("--json", action="store_true")
    for verb, text in (("show", "show one connection"), ("test", "make an authenticated call")):
        conn.add_parser(verb, help=text).add_argument("name")
    reauth = conn.add_parser(
        "reauthorise", help="store a new client secret and password (after 're-authorise' errors)"
    )
    reauth.add_argument("name")
    add_secret_options(reauth)
    reauth.add_argument("--test", action="store_true", help="test the connection afterwards")
    rm = conn.add_parser("remove", help="remove a connection and its secrets")
    rm.add_argument("name")
    rm.add_argument("--keep-secrets", action="store_true")

    alerts = groups.add_parser("alerts", help="alert deliveries").add_subparsers(
        dest="command", required=True
    )
    al = alerts.add_parser("list", help="list deliveries")
    al.add_argument("--connection")
    al.add_argument("--status", choices=[s.value for s in DeliveryStatus])
    al.add_argument("--limit", type=int, default=200)
    al.add_argument("--json", action="store_true")
    show = alerts.add_parser("show", help="show one delivery")
    show.add_argument("connection")
    show.add_argument("delivery_id")
    rd = alerts.add_parser("redrive", help="deliver failed (or stuck pending) alerts again")
    rd.add_argument("--connection")
    rd.add_argument("--id", action="append", help="a delivery id (repeatable; needs --connection)")
    rd.add_argument("--status", default="failed", choices=["failed", "pending"])
    rd.add_argument("--limit", type=int, default=500)

    sync = groups.add_parser("sync", help="work-item sync").add_subparsers(dest="command", required=True)
    run = sync.add_parser("run", help="sync incidents and change requests now")
    run.add_argument("--connection", help="only this connection (default: every connection that syncs)")
    run.add_argument("--type", action="append", choices=["incidents", "change_requests"], help="repeatable")
    return parser


COMMANDS: dict[tuple[str, str], Callable[[Cli, argparse.Namespace], int]] = {
    ("connections", "add"): Cli.connections_add,
    ("connections", "list"): Cli.connections_list,
    ("connections", "show"): Cli.connections_show,
    ("connections", "test"): Cli.connections_test,
    ("connections", "reauthorise"): Cli.connections_reauthorise,
    ("connections", "remove"): Cli.connections_remove,
    ("alerts", "list"): Cli.alerts_list,
    ("alerts", "show"): Cli.alerts_show,
    ("alerts", "redrive"): Cli.alerts_redrive,
    ("sync", "run"): Cli.sync_run,
}


def main(argv: Sequence[str] | None = None, cli: Cli | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    cli = cli or Cli()
    try:
        return COMMANDS[(args.group, args.command)](cli, args)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=cli.err)
        return EXIT_USAGE
    except ConnectorAppError as exc:
        print(f"error: {exc}", file=cli.err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=cli.err)
        return EXIT_FAILED
