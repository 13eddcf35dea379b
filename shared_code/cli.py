"""The operator's command line: the same services as the Functions app, without the host.

    python -m shared_code connections add|list|show|test|reauthorise|remove
    python -m shared_code alerts list|show|redrive
    python -m shared_code sync run [--connection NAME] [--type incidents|change_requests]
    python -m shared_code maps sources add|list|show|remove|test; maps import|show|export-scom

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
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from pydantic import SecretStr

from shared_code import netsafety
from shared_code.alerts.intake import DELIVERY_ID
from shared_code.bootstrap import Container, get_container
from shared_code.domain.alert import Severity
from shared_code.domain.connection import CONNECTION_NAME, ConnectionBase, CorrelationMode, secret_name
from shared_code.domain.delivery import Delivery, DeliveryStatus
from shared_code.domain.mapsources import MapSourceDefinition, MapSourceKind
from shared_code.domain.workitem import SeverityMapping, WorkItemType
from shared_code.errors import AlreadyExistsError, ConnectorAppError, InvalidInputError, NotFoundError, shown
from shared_code.maps.importer import ImportOutcome, ImportProgress
from shared_code.maps.scom import render_management_pack, version_from_time
from shared_code.maps.views import ViewFormat, render_view
from shared_code.mapsources.migrate_csv import DEFAULT_MAX_BYTES as MIGRATE_CSV_MAX_BYTES
from shared_code.mapsources.migrate_csv import parse_migrate_csv
from shared_code.mapsources.registry import build_map_source
from shared_code.products import PRODUCTS, parse_connection, product_of
from shared_code.secrets import StoredRefreshToken
from shared_code.workitems.engine import SyncOutcome, SyncProgress, SyncResult

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
            "username": args.user or "",
            "sync_data": parse_sync_data(args.sync),
            "sync_scope_days": args.scope_days,
            "create_configuration_items": args.create_ci,
            "correlation": args.correlation,
            "auto_resolve": args.auto_resolve,
            "note_interval_minutes": args.note_interval_minutes,
            "reopen_window_hours": args.reopen_window_hours,
            "assignment_group": args.assignment_group or "",
            "caller": args.caller or "",
            "close_azure_alerts": args.close_azure_alerts,
            "default_severity": args.default_severity,
            "secure_webhook_app_id": args.secure_webhook_app_id or "",
            "secure_webhook_tenant_id": args.secure_webhook_tenant_id or "",
            "secure_webhook_app_id_uri": args.secure_webhook_app_id_uri or "",
        }
        if args.severity_map:
            data["severity_map"] = parse_severity_map(args.severity_map)
        data |= product_options(args)
        connection = parse_connection(data, FLAG_OF_FIELD | product_flags())
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
        refresh_token = product_of(connection.partner_type).rotating_refresh_token(connection)
        if refresh_token:
            # a refresh token left by an earlier connection of this name belongs to other credentials
            StoredRefreshToken(container.secrets, refresh_token).clear()
        container.forget_connector(connection.name)  # one cached under this name holds other credentials
        container.connections.add(connection)
        self.say(f"added connection {connection.name} ({connection.partner_type}, {connection.server_url})")
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

    def _check_destination(self, connection: ConnectionBase, container: Container) -> None:
        """Refuse an instance whose name resolves to an address the app never calls
        (UnsafeAddressError). A ServiceNow cloud instance's name is checked when the app connects."""
        if not connection.model_dump().get("private_instance", True):
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

    def _roll_back(self, container: Container, connection: ConnectionBase) -> None:
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

    def _read_secrets(self, connection: ConnectionBase, args: argparse.Namespace) -> dict[str, SecretStr]:
        wanted = [
            (secret_name(connection.name, spec.purpose), spec.label, spec.flag)
            for spec in connection.secret_specs()
            if spec.flag
        ]
        stdin_lines = iter(self.stdin.read().splitlines()) if args.secrets_stdin else None
        result: dict[str, SecretStr] = {}
        for vault_name, label, flag in wanted:
            env_name = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
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
                    f"no {label} given: use --secrets-stdin, {flag} VAR or run in a terminal to be prompted"
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
            auth = str(c.model_dump(mode="json").get("auth_method", "-"))
            self.say(f"{c.name:<20} {c.partner_type:<11} {auth:<6} {sync:<26} {c.server_url}")
        return EXIT_OK

    def connections_show(self, args: argparse.Namespace) -> int:
        connection = self.container.connections.get(args.name)
        data = connection.model_dump(mode="json")
        data["secret_names"] = list(connection.secret_names)
        self.say(json.dumps(data, indent=2))
        return EXIT_OK

    def connections_test(self, args: argparse.Namespace) -> int:
        return self._test(self.container.connections.get(args.name))

    def _test(self, connection: ConnectionBase) -> int:
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
        refresh_token = product_of(connection.partner_type).rotating_refresh_token(connection)
        if refresh_token:
            # the old refresh token belongs to the old credentials: start again with the password grant.
            # Cleared, not deleted: a soft-deleted secret could not take the next token for 90 days
            StoredRefreshToken(container.secrets, refresh_token).clear()
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

    # -- dependency maps -----------------------------------------------------------------------

    def maps_sources_add(self, args: argparse.Namespace) -> int:
        customer_ids = list(args.customer_id or [])
        workspaces = [
            {"resource_id": rid, "customer_id": customer_ids[i] if i < len(customer_ids) else ""}
            for i, rid in enumerate(args.workspace or [])
        ]
        group: dict[str, Any] = {"kind": "computers", "computers": list(args.server or [])}
        if args.machine_group:
            group = {"kind": "machineGroup", "machine_group": args.machine_group}
        elif args.resource_group:
            group = {"kind": "resourceGroup", "scope": args.resource_group}
        elif args.subscription:
            group = {"kind": "subscription", "scope": args.subscription}
        definition = MapSourceDefinition.parse(
            {
                "name": args.name,
                "kind": args.kind,
                "workspaces": workspaces,
                "group": group,
                "enabled": not args.disabled,
                "timeout_seconds": args.timeout_seconds,
                "window_minutes": args.window_minutes,
            }
        )
        self.container.map_sources.add(definition)
        self.say(
            f"added map source {definition.name} ({definition.kind.value}, {len(workspaces)} workspace(s))"
        )
        return self._maps_test(definition) if args.test else EXIT_OK

    def maps_sources_list(self, args: argparse.Namespace) -> int:
        definitions = self.container.map_sources.list()
        if not definitions:
            self.say("no map sources (see: maps sources add)")
        for d in definitions:
            state = "enabled" if d.enabled else "disabled"
            self.say(
                f"{d.name}\t{d.kind.value}\t{state}\t{d.group.kind.value}\twindow {d.window_minutes} min"
            )
        return EXIT_OK

    def maps_sources_show(self, args: argparse.Namespace) -> int:
        self.say(self.container.map_sources.get(args.name).model_dump_json(indent=2))
        return EXIT_OK

    def maps_sources_remove(self, args: argparse.Namespace) -> int:
        self.container.map_sources.remove(args.name)
        self.say(f"removed map source {args.name} (its imported maps stay until re-imported)")
        return EXIT_OK

    def maps_sources_test(self, args: argparse.Namespace) -> int:
        return self._maps_test(self.container.map_sources.get(args.name))

    def _maps_test(self, definition: MapSourceDefinition) -> int:
        container = self.container
        source = build_map_source(definition, container.map_source_deps)
        try:
            summary = source.check()
        except ConnectorAppError as exc:
            self.say(f"FAILED: {definition.name}: {exc}")
            return EXIT_FAILED
        finally:
            source.close()
        self.say(f"OK: {definition.name}: {summary}")
        return EXIT_OK

    def maps_import(self, args: argparse.Namespace) -> int:
        progress = _MapProgressLine(self.out) if self.out.isatty() else None
        results = self.container.map_importer.run(
            source=args.source, servers=args.server or None, trigger="cli", progress=progress
        )
        if progress is not None:
            progress.clear()
        if not results:
            self.say("no enabled map source (see: maps sources add)")
            return EXIT_OK
        for result in results:
            counts = ", ".join(f"{value} {name}" for name, value in result.counts.items())
            self.say(f"{result.source}: {result.outcome.value}, {counts}, {result.duration_seconds:.1f}s")
            if result.error:
                self.say(f"    {result.error}")
            for server, why in sorted(result.errors.items()):
                self.say(f"    {server}: {why}")
        return EXIT_FAILED if any(r.outcome is ImportOutcome.FAILED for r in results) else EXIT_OK

    def maps_import_csv(self, args: argparse.Namespace) -> int:
        """An Azure Migrate dependency export, for estates with no workspace data at all."""
        try:
            with open(args.file, "rb") as handle:
                data = handle.read(MIGRATE_CSV_MAX_BYTES + 1)
        except OSError as exc:
            raise InvalidInputError(
                f"cannot read {args.file}: {exc.strerror or type(exc).__name__}"
            ) from None
        container = self.container
        server_maps = parse_migrate_csv(
            data, imported_at=container.clock(), source=args.source, servers=args.server or None
        )
        result = container.map_importer.run_export(
            args.source, server_maps, servers=args.server or None, trigger="cli"
        )
        counts = ", ".join(f"{value} {name}" for name, value in result.counts.items())
        self.say(f"{result.source}: {result.outcome.value}, {counts}, {result.duration_seconds:.1f}s")
        if result.error:
            self.say(f"    {result.error}")
        for server, why in sorted(result.errors.items()):
            self.say(f"    {server}: {why}")
        return EXIT_FAILED if result.outcome is ImportOutcome.FAILED else EXIT_OK

    def maps_show(self, args: argparse.Namespace) -> int:
        maps = self.container.maps
        listing = maps.find(args.server)
        server_map = maps.load(listing.server) if listing is not None else None
        if server_map is None:
            reason = f" (last import failed: {listing.last_error})" if listing and listing.last_error else ""
            raise NotFoundError(f"no dependency map of {args.server!r}{reason}")
        self.say(render_view(server_map, args.format).body)
        return EXIT_OK

    def maps_export_scom(self, args: argparse.Namespace) -> int:
        maps = self.container.maps
        loaded = [maps.load(listing.server) for listing in maps.listings()]
        server_maps = sorted((m for m in loaded if m is not None), key=lambda m: m.server.lower())
        if not server_maps:
            raise NotFoundError("no dependency map is imported yet (see: maps import)")
        newest = max(m.imported_at for m in server_maps)
        pack = render_management_pack(server_maps, version=version_from_time(newest))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as handle:
                handle.write(pack)
            self.say(f"wrote a management pack of {len(server_maps)} server(s) to {args.out}")
        else:
            self.out.write(pack)
        return EXIT_OK


class _MapProgressLine:
    """One redrawn line per source on a terminal: servers done of the group."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.width = 0

    def __call__(self, event: ImportProgress) -> None:
        text = f"{event.source}: {event.done:,}/{event.total:,} servers ({event.server[:40]})"
        self.out.write("\r" + text.ljust(self.width))
        self.width = len(text)
        self.out.flush()

    def clear(self) -> None:
        if self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()


class _ProgressLine:
    """Redraws one status line per connection and type on a terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.width = 0

    def __call__(self, event: SyncProgress) -> None:
        where = f", up to {event.watermark.updated_at:%Y-%m-%d %H:%M:%S}" if event.watermark else ""
        rejected = f", {event.rejected:,} skipped" if event.rejected else ""
        text = (
            f"{event.connection} {event.item_type.sync_name}: {event.synced:,} rows in {event.pages:,} pages"
            f"{rejected}{where}"
        )
        self.out.write("\r" + text.ljust(self.width))
        self.width = len(text)
        if event.done:
            self.out.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.out.flush()


def describe(result: SyncResult) -> str:
    parts = [f"{result.connection} {result.item_type.sync_name}: {result.outcome.value}"]
    if result.outcome is not SyncOutcome.SKIPPED:
        parts.append(f"{result.synced:,} synced, {result.rejected:,} skipped rows, {result.pages:,} pages")
        if result.correlations_updated or result.alerts_closed:
            parts.append(
                f"{result.correlations_updated} correlations updated, {result.alerts_closed} alerts closed"
            )
        parts.append(f"{result.duration_seconds:.1f}s")
    text = ", ".join(parts)
    if result.outcome is SyncOutcome.INCOMPLETE:
        text += " (time budget reached; run again to continue)"
    if result.error:
        text += f"\n    {result.error}"
    return text


def sync_run(
    container: Container,
    connection: str | None,
    item_types: Sequence[str] | None,
    out: IO[str],
    isatty: bool,
) -> int:
    """Run the sync for one or every connection; 1 when any connection and type failed."""
    types = WorkItemType.parse_many(item_types)
    engine = container.sync_engine
    progress = _ProgressLine(out) if isatty else None
    results = engine.run(connection, types, progress, trigger="cli")
    if not results:
        print("no connection syncs work items (see: connections add --sync)", file=out)
        return EXIT_OK
    for result in results:
        print(describe(result), file=out)
    return EXIT_FAILED if any(r.outcome is SyncOutcome.FAILED for r in results) else EXIT_OK


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


FLAG_OF_FIELD = {
    "name": "NAME",
    "partner_type": "--type",
    "server_url": "--url",
    "username": "--user",
    "sync_data": "--sync",
    "sync_scope_days": "--scope-days",
    "create_configuration_items": "--create-ci",
    "correlation": "--correlation",
    "auto_resolve": "--no-auto-resolve",
    "note_interval_minutes": "--note-interval-minutes",
    "reopen_window_hours": "--reopen-window-hours",
    "assignment_group": "--assignment-group",
    "caller": "--caller",
    "severity_map": "--severity-map",
    "default_severity": "--default-severity",
    "close_azure_alerts": "--close-azure-alerts",
    "secure_webhook_app_id": "--secure-webhook-app-id",
    "secure_webhook_tenant_id": "--secure-webhook-tenant-id",
    "secure_webhook_app_id_uri": "--secure-webhook-app-id-uri",
}
"""The CLI flag of each common connection field, so validation errors name what the operator typed."""


def _product_fields() -> Iterator[tuple[str, str, Any, str]]:
    """(field, flag, field info, product title) of every product's own fields that have a flag."""
    common = set(ConnectionBase.model_fields)
    for product in PRODUCTS.values():
        for field_name, info in product.settings.model_fields.items():
            extra = info.json_schema_extra
            flag = extra.get("cli") if isinstance(extra, dict) else None
            if field_name not in common and isinstance(flag, str):
                yield field_name, flag, info, product.title


def product_flags() -> dict[str, str]:
    return {field_name: flag for field_name, flag, _, _ in _product_fields()}


def add_product_options(parser: argparse.ArgumentParser) -> None:
    """Each product's own connection fields as options, built from its connection model."""
    seen: dict[str, list[str]] = {}
    infos: dict[str, Any] = {}
    for _, flag, info, title in _product_fields():
        seen.setdefault(flag, []).append(title)
        infos.setdefault(flag, info)
    for flag, titles in seen.items():
        info = infos[flag]
        what = f"{info.description or ''} ({', '.join(titles)})".strip()
        kind = info.annotation
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=what)
        elif isinstance(kind, type) and issubclass(kind, StrEnum):
            choices = [member.value for member in kind]
            parser.add_argument(flag, choices=choices, default=None, help=f"{what}; default {info.default}")
        else:
            shown = f"; default {info.default!r}" if info.default not in (None, "") else ""
            parser.add_argument(flag, type=int if kind is int else str, default=None, help=what + shown)


def product_options(args: argparse.Namespace) -> dict[str, Any]:
    """The product options the operator gave (the rest take the product model's defaults)."""
    values: dict[str, Any] = {}
    for field_name, flag, _, _ in _product_fields():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if value is not None:
            values[field_name] = value
    return values


def add_secret_options(parser: argparse.ArgumentParser) -> None:
    """Where secrets come from: never argv (shell history, process lists)."""
    parser.add_argument(
        "--secrets-stdin", action="store_true", help="read client secret then password from stdin"
    )
    parser.add_argument(
        "--client-secret-env", metavar="VAR", help="read the client secret from this env variable"
    )
    parser.add_argument("--password-env", metavar="VAR", help="read the password from this env variable")


class UsageError(Exception):
    """argparse refused the command line (its message names the option)."""


class _DefaultsShown(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where X says something (not None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argparse parser that reports usage errors to the caller instead of exiting the process,
    and shows every option's default in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsShown)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message[:300]}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m shared_code", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    groups = parser.add_subparsers(dest="group", required=True)

    conn = groups.add_parser("connections", help="ITSM connections").add_subparsers(
        dest="command", required=True
    )
    add = conn.add_parser(
        "add",
        help="add a connection (secrets go to Key Vault)",
    )
    add.add_argument("name", help="1-50 letters, digits and dashes; part of the webhook URL")
    add.add_argument("--type", required=True, choices=sorted(PRODUCTS), help="the ITSM product")
    add.add_argument("--url", required=True, help="https base URL of the instance")
    add.add_argument("--user", required=True, help="integration user name")
    add.add_argument(
        "--sync",
        default="incidents,change_requests",
        help="what the sync reads: incidents,change_requests or none",
    )
    add.add_argument(
        "--scope-days", type=int, default=15, help="the first sync reaches this far back (1-120)"
    )
    add.add_argument(
        "--create-ci", action="store_true", help="create missing configuration items in the CMDB"
    )
    add.add_argument(
        "--correlation",
        default="per-rule-and-ci",
        choices=[mode.value for mode in CorrelationMode],
        help="what one work item stands for: one alert, one rule on one resource, or one rule",
    )
    add.add_argument(
        "--no-auto-resolve",
        dest="auto_resolve",
        action="store_false",
        help="leave the work item open when its alert resolves (a note is still written)",
    )
    add.add_argument(
        "--note-interval-minutes", type=int, default=15, help="at most one re-fire note per interval (0-1440)"
    )
    add.add_argument(
        "--reopen-window-hours",
        type=int,
        default=24,
        help="a re-fire within this window reopens the resolved work item instead of a new one (0-720)",
    )
    add.add_argument("--assignment-group", help="assignment group of new work items")
    add.add_argument("--caller", help="caller (opened for) of new work items")
    add.add_argument(
        "--severity-map",
        help="impact/urgency per severity, e.g. Sev0=1/1,Sev1=1/2,Sev2=2/2,Sev3=2/3,Sev4=3/3",
    )
    add.add_argument(
        "--close-azure-alerts", action="store_true", help="close the Azure alert when resolved in ITSM"
    )
    add_product_options(add)
    add.add_argument(
        "--default-severity",
        default="Sev3",
        choices=[s.value for s in Severity],
        help="severity of alerts that carry none, e.g. budget alerts (default: %(default)s)",
    )
    add.add_argument(
        "--secure-webhook-app-id",
        metavar="CLIENT_ID",
        help="require action-group secure webhook tokens for this app",
    )
    add.add_argument("--secure-webhook-tenant-id", metavar="TENANT_ID", help="the app registration's tenant")
    add.add_argument("--secure-webhook-app-id-uri", metavar="URI", help="its Application ID URI (v1 tokens)")
    add_secret_options(add)
    add.add_argument("--test", action="store_true", help="test the connection after adding it")
    add.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="with --test: keep the connection and its secrets when the test fails (default: remove them)",
    )
    lst = conn.add_parser("list", help="list connections")
    lst.add_argument("--json", action="store_true", help="print JSON (every field) instead of a table")
    for verb, text in (("show", "show one connection"), ("test", "make an authenticated call")):
        conn.add_parser(verb, help=text).add_argument("name", help="the connection's name")
    reauth = conn.add_parser(
        "reauthorise", help="store a new client secret and password (after 're-authorise' errors)"
    )
    reauth.add_argument("name", help="the connection's name")
    add_secret_options(reauth)
    reauth.add_argument("--test", action="store_true", help="test the connection afterwards")
    rm = conn.add_parser("remove", help="remove a connection and its secrets")
    rm.add_argument("name", help="the connection's name")
    rm.add_argument(
        "--keep-secrets", action="store_true", help="leave its secrets in Key Vault (to add it again)"
    )

    alerts = groups.add_parser("alerts", help="alert deliveries").add_subparsers(
        dest="command", required=True
    )
    al = alerts.add_parser("list", help="list deliveries")
    al.add_argument("--connection", help="only this connection's deliveries")
    al.add_argument(
        "--status", choices=[s.value for s in DeliveryStatus], help="only deliveries in this state"
    )
    al.add_argument("--limit", type=int, default=200, help="at most this many rows")
    al.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = alerts.add_parser("show", help="show one delivery")
    show.add_argument("connection", help="the connection's name")
    show.add_argument("delivery_id", help="the id the webhook answered (deliveryId)")
    rd = alerts.add_parser("redrive", help="deliver failed (or stuck pending) alerts again")
    rd.add_argument("--connection", help="only this connection's deliveries")
    rd.add_argument("--id", action="append", help="a delivery id (repeatable; needs --connection)")
    rd.add_argument(
        "--status", default="failed", choices=["failed", "pending"], help="which deliveries to send again"
    )
    rd.add_argument("--limit", type=int, default=500, help="at most this many")

    sync = groups.add_parser("sync", help="work-item sync").add_subparsers(dest="command", required=True)
    run = sync.add_parser("run", help="sync incidents and change requests now")
    run.add_argument("--connection", help="only this connection (default: every connection that syncs)")
    run.add_argument(
        "--type",
        action="append",
        choices=["incidents", "change_requests"],
        help="only this work item type (repeatable; default: what the connection syncs)",
    )

    maps = groups.add_parser("maps", help="dependency maps").add_subparsers(dest="command", required=True)
    srcs = maps.add_parser("sources", help="map source definitions").add_subparsers(
        dest="subcommand", required=True
    )
    sadd = srcs.add_parser("add", help="add a map source")
    sadd.add_argument("name", help="1-50 letters, digits and dashes")
    sadd.add_argument(
        "--kind",
        required=True,
        choices=[k.value for k in MapSourceKind],
        help="where the maps come from: VM Insights Map tables, the Service Map API, VNet flow logs, "
        "or Azure Migrate dependency exports (imported with 'maps import-csv')",
    )
    sadd.add_argument("--workspace", action="append", help="workspace resource id (repeatable)")
    sadd.add_argument("--customer-id", action="append", help="its workspace ID (GUID), in --workspace order")
    sadd.add_argument("--server", action="append", help="computer name (repeatable)")
    sadd.add_argument("--machine-group", help="a Service Map machine group (servicemap only)")
    sadd.add_argument("--resource-group", help="/subscriptions/{id}/resourceGroups/{group}")
    sadd.add_argument("--subscription", help="/subscriptions/{id}")
    sadd.add_argument(
        "--window-minutes",
        type=int,
        default=60,
        help="time window of each import (at most 60 for servicemap)",
    )
    sadd.add_argument(
        "--timeout-seconds", type=int, default=120, help="timeout of each request to the source"
    )
    sadd.add_argument("--disabled", action="store_true", help="add it without importing on the timer")
    sadd.add_argument("--test", action="store_true", help="check access after adding")
    srcs.add_parser("list", help="list map sources")
    for verb, text in (
        ("show", "show a map source"),
        ("remove", "remove a map source"),
        ("test", "check access"),
    ):
        srcs.add_parser(verb, help=text).add_argument("name", help="the map source's name")
    imp = maps.add_parser("import", help="import dependency maps now")
    imp.add_argument("--source", help="only this source (default: every enabled one)")
    imp.add_argument("--server", action="append", help="only this computer name or machine id (repeatable)")
    csv_import = maps.add_parser("import-csv", help="import an Azure Migrate dependency export (CSV)")
    csv_import.add_argument("file", help="the CSV file Azure Migrate's dependency analysis exported")
    csv_import.add_argument("--source", required=True, help="a map source of kind migrate")
    csv_import.add_argument(
        "--server", action="append", help="only this server of the export (repeatable; default: all)"
    )
    show = maps.add_parser("show", help="print one server's map")
    show.add_argument("server", help="computer name (any case) or the source's machine id")
    show.add_argument("--format", default="json", choices=[f.value for f in ViewFormat], help="what to print")
    scom = maps.add_parser("export-scom", help="write a SCOM management pack of every mapped server")
    scom.add_argument("--out", help="file to write (default: standard output)")
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
    ("maps", "sources add"): Cli.maps_sources_add,
    ("maps", "sources list"): Cli.maps_sources_list,
    ("maps", "sources show"): Cli.maps_sources_show,
    ("maps", "sources remove"): Cli.maps_sources_remove,
    ("maps", "sources test"): Cli.maps_sources_test,
    ("maps", "import"): Cli.maps_import,
    ("maps", "import-csv"): Cli.maps_import_csv,
    ("maps", "show"): Cli.maps_show,
    ("maps", "export-scom"): Cli.maps_export_scom,
}


def main(argv: Sequence[str] | None = None, cli: Cli | None = None) -> int:
    cli = cli or Cli()
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc} (see --help)", file=cli.err)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        command = (
            args.command if getattr(args, "subcommand", None) is None else f"{args.command} {args.subcommand}"
        )
        return COMMANDS[(args.group, command)](cli, args)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=cli.err)
        return EXIT_USAGE
    except ConnectorAppError as exc:
        print(f"error: {exc}", file=cli.err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=cli.err)
        return EXIT_FAILED
