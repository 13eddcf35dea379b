"""``make demo``'s product tour: one alert reaching Cherwell, Provance (Dataverse) and SCSM (Cireson).

Called from ``tests/demo.py``'s ``main()`` inside its running stack and app. Starts each product's
loopback server here (HTTPS with the stack's throwaway CA; Provance's Dataverse trusts the stack's
Entra ID), adds a connection of each with the operator's CLI (secrets on stdin, into Key Vault),
posts one fired alert per connection to the webhook function, delivers it through the queue
function, and prints the incident number the product shows. Everything started here is stopped
on the way out, whatever happens.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import function_app
from shared_code.bootstrap import Container
from tests.hostsim import FunctionHost
from tests.loopback import cherwell as cherwell_loopback
from tests.loopback import provance as provance_loopback
from tests.loopback import scsm as scsm_loopback
from tests.loopback.stack import LoopbackStack

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alerts"
ALERTS = "/subscriptions/00000000-0000-0000-0000-000000000000/providers/Microsoft.AlertsManagement/alerts"


@dataclass(frozen=True)
class ProductDemo:
    """One product: the CLI options of its connection, what goes on stdin, and how to read back
    the incident the product holds (number and title) by the connector's work item id."""

    connection: str
    title: str
    options: list[str]
    stdin: str
    shown: Callable[[str], tuple[str, str]]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _payload(rule: str, fired: datetime) -> bytes:
    payload: dict[str, Any] = json.loads((FIXTURES / "metric_fired.json").read_text())
    essentials = payload["data"]["essentials"]
    essentials["alertId"] = f"{ALERTS}/{uuid.uuid4()}"
    essentials["alertRule"] = rule
    essentials["firedDateTime"] = fired.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return json.dumps(payload).encode()


def _cherwell(things: ExitStack) -> ProductDemo:
    server = things.enter_context(cherwell_loopback.CherwellLoopback())

    def shown(rec_id: str) -> tuple[str, str]:
        record = server.record("Incident", rec_id) or {}
        return record.get("IncidentID", "?"), record.get("ShortDescription", "")

    return ProductDemo(
        "cw-demo",
        f"Cherwell {server.url}",
        ["--type", "cherwell", "--url", server.url, "--user", cherwell_loopback.DEFAULT_USERNAME,
         "--client-id", cherwell_loopback.DEFAULT_CLIENT_ID, "--secrets-stdin"],
        f"{cherwell_loopback.DEFAULT_PASSWORD}\n",
        shown,
    )  # fmt: skip


def _provance(things: ExitStack, stack: LoopbackStack) -> ProductDemo:
    server = provance_loopback.DataverseLoopback(stack.entra).start()
    things.callback(server.stop)
    provance_loopback.register_app(server)
    account = server.add_account("Contoso (demo)")

    def shown(record_id: str) -> tuple[str, str]:
        row = server.record("incident", record_id) or {}
        return str(row.get("ticketnumber", "?")), str(row.get("title", ""))

    return ProductDemo(
        "pv-demo",
        f"Provance (Dataverse) {server.url}",
        [*provance_loopback.connection_options(server, account), "--sync", "incidents"],
        f"{provance_loopback.PROVANCE_APP_SECRET}\n",
        shown,
    )


def _scsm(things: ExitStack) -> ProductDemo:
    server = things.enter_context(scsm_loopback.ScsmLoopback())

    def shown(base_id: str) -> tuple[str, str]:
        obj = server.object(scsm_loopback.INCIDENT, base_id) or {}
        return str(obj.get("Id", "?")), str(obj.get("Title", ""))

    return ProductDemo(
        "scsm-demo",
        f"SCSM (Cireson portal) {server.url}",
        ["--type", "scsm", "--url", server.url, "--user", server.username, "--secrets-stdin"],
        f"{server.password}\n",
        shown,
    )


def run_products_demo(stack: LoopbackStack, container: Container) -> None:
    """One fired alert per product connection, through the webhook and the queue function."""
    started = time.perf_counter()
    _say()
    _say("== 9. The other products: one alert each to Cherwell, Provance and SCSM " + "=" * 15)
    host = FunctionHost(function_app.app, stack.queues())
    fired = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    with ExitStack() as things:
        products = [_cherwell(things), _provance(things, stack), _scsm(things)]
        for product in products:
            _say(f"-- {product.title}")
            code, output = stack.cli(
                "connections", "add", product.connection, *product.options, "--test",
                stdin=product.stdin,
            )  # fmt: skip
            kind = product.options[1]
            _say(f"$ python -m shared_code connections add {product.connection} --type {kind} ... --test")
            for line in output.rstrip().splitlines():
                _say(f"  {line}")
            if code != 0:
                raise SystemExit(f"connections add {product.connection} failed")
            call = host.http(
                "receive_alert",
                "POST",
                f"http://localhost:7071/api/alerts/{product.connection}",
                body=_payload(f"CPU high ({product.connection})", fired),
                headers={"Content-Type": "application/json"},
                route_params={"connection": product.connection},
            )
            _say(f"POST /api/alerts/{product.connection} -> {call.status} {json.dumps(call.json())}")
            host.drain("deliver_alert", max_rounds=20)
            delivery = container.deliveries.get(product.connection, str(call.json().get("deliveryId", "")))
            status = delivery.status.value if delivery is not None else "missing"
            [correlation] = container.correlations.list(product.connection)
            number, title = product.shown(correlation.work_item_id)
            _say(f"delivery {status}; the product shows incident {number}: {title!r}")
            if number != correlation.work_item_number:
                raise SystemExit(
                    f"{product.connection}: the product shows {number}, "
                    f"the correlation row {correlation.work_item_number}"
                )
    _say(f"(three products, three incidents; their loopbacks stopped; {time.perf_counter() - started:.1f}s)")
