"""``make demo``: the connector's main jobs end to end on the embedded default, then a clean stop.

Starts Azurite (in memory, free ports) and loopback Entra ID, Key Vault, ServiceNow, Logs
Ingestion and Alerts Management (HTTPS with a throwaway CA), points the app settings at them,
and then does what an operator and Azure Monitor would do:

1. adds a ServiceNow connection with the CLI (secrets go to Key Vault) and tests it;
2. posts a fired alert to the webhook function (three times, as action groups retry), a re-fire
   of the same problem and its resolution, delivering each through the queue function;
3. an engineer resolves a second alert's incident in ServiceNow;
4. runs the work-item sync with the CLI: incidents and change requests go to the WorkItems table
   and Log Analytics, and the Azure alert behind the incident resolved in ServiceNow is closed;
5. imports the dependency maps of a few servers from the loopback Log Analytics (VM Insights Map
   tables) with the CLI, writes one server's diagram and the SCOM management pack to files,
   shows the relationships published to the ServiceNow CMDB, and an incident that carries its
   server's map.

Every call goes through the functions registered in ``function_app.app`` or the CLI, over real
HTTP(S) to the loopback servers. Nothing is left running afterwards.
"""

from __future__ import annotations

import json
import sys
import tempfile
import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import function_app
from shared_code.bootstrap import Container
from shared_code.domain.workitem import WorkItemType
from shared_code.state import workitems as workitems_table
from shared_code.state.workitems import WorkItemRepository
from tests.demo_products import run_products_demo
from tests.hostsim import FunctionHost
from tests.loopback.loganalytics import seed_vminsights
from tests.loopback.stack import LOGS_STREAM, LoopbackStack

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "alerts"
CONNECTION = "sn-demo"
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
ALERTS = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.AlertsManagement/alerts"
MAP_WORKSPACE = "7d0c5a1e-0000-4000-8000-00000000d3e0"
MAP_WORKSPACE_ID = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-demo"
    "/providers/Microsoft.OperationalInsights/workspaces/ws-demo"
)
CMDB_CONNECTION = "sn-cmdb"
DATA_SOURCE = "AzureMonitorITSM"
STATES = {"1": "New", "2": "In Progress", "3": "On Hold", "6": "Resolved", "7": "Closed"}


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text} " + "=" * max(0, 86 - len(text)))


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def alert_payload(
    fixture: str, *, alert_guid: str, fired: datetime, resolved: datetime | None = None
) -> bytes:
    """A fixture payload made current: its own alert id and fired/resolved times."""
    payload: dict[str, Any] = json.loads((FIXTURES / fixture).read_text())
    essentials = payload["data"]["essentials"]
    essentials["alertId"] = f"{ALERTS}/{alert_guid}"
    essentials["firedDateTime"] = iso(fired)
    if resolved is not None:
        essentials["resolvedDateTime"] = iso(resolved)
    return json.dumps(payload).encode()


class Demo:
    def __init__(self, stack: LoopbackStack, container: Container) -> None:
        self.stack = stack
        self.container = container
        self.host = FunctionHost(function_app.app, stack.queues())

    def cli(self, *argv: str, stdin: str = "") -> int:
        say(f"$ python -m shared_code {' '.join(argv)}")
        code, output = self.stack.cli(*argv, stdin=stdin)
        say(textwrap.indent(output.rstrip(), "  "))
        return code

    def post(self, body: bytes, label: str, connection: str = CONNECTION) -> str:
        call = self.host.http(
            "receive_alert",
            "POST",
            f"http://localhost:7071/api/alerts/{connection}",
            body=body,
            headers={"Content-Type": "application/json"},
            route_params={"connection": connection},
        )
        answer = call.json()
        say(f"POST /api/alerts/{connection} ({label}) -> {call.status} {json.dumps(answer)}")
        return str(answer.get("deliveryId", ""))

    def deliver(self) -> None:
        started = time.perf_counter()
        calls = self.host.drain("deliver_alert")
        say(f"deliver_alert ran {calls} time(s) from the queue in {time.perf_counter() - started:.2f}s")

    def delivery(self, delivery_id: str) -> None:
        call = self.host.http(
            "alert_status",
            "GET",
            f"http://localhost:7071/api/alerts/{CONNECTION}/{delivery_id}",
            route_params={"connection": CONNECTION, "delivery_id": delivery_id},
        )
        body = call.json()
        work_item = (body.get("workItem") or {}).get("number", "-")
        say(
            f"GET /api/alerts/{CONNECTION}/{delivery_id[:8]}... -> {call.status} status={body['status']} "
            f"attempts={body['attempts']} outcome={body['outcome']!r} work item={work_item}"
        )

    def incident(self, number: str) -> dict[str, str]:
        [record] = self.stack.servicenow.find("incident", number=number)
        return record

    def show_incident(self, number: str) -> None:
        rec = self.incident(number)
        say(
            f"{rec['number']}  state={STATES.get(rec['state'], rec['state'])}  priority={rec['priority']} "
            f"(impact {rec['impact']}, urgency {rec['urgency']})"
        )
        say(f"  short description: {rec['short_description']}")
        say(f"  correlation id:    {rec['correlation_id']}")
        if rec.get("close_code"):
            say(f"  close code:        {rec['close_code']}")
        say("  description:")
        say(textwrap.indent("\n".join(rec["description"].splitlines()[:12]), "    | "))
        notes = [e for e in self.stack.servicenow.journal(rec["sys_id"]) if e.get("element") == "work_notes"]
        say(f"  work notes ({len(notes)}):")
        for entry in notes:
            first, *rest = entry["value"].splitlines() or [""]
            say(f"    - [{entry['sys_created_on']}] {first}")
            for line in rest[:3]:
                say(f"      {line}")

    def run(self) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        snow = self.stack.servicenow

        heading("1. Add the ServiceNow connection (secrets go to Key Vault, never to a table)")
        code = self.cli(
            "connections", "add", CONNECTION, "--type", "servicenow", "--url", snow.url,
            "--private-instance", "--user", snow.username, "--client-id", snow.client_id,
            "--note-interval-minutes", "0", "--close-azure-alerts", "--scope-days", "30",
            "--secrets-stdin", "--test",
            stdin=f"{snow.client_secret}\n{snow.password}\n",
        )  # fmt: skip
        if code != 0:
            raise SystemExit("the connection test failed")
        say(f"Key Vault now holds: {', '.join(sorted(self.stack.keyvault.secrets_snapshot()))}")
        say("(the refresh token the instance issued was stored there by the OAuth flow)")

        heading("2. An alert fires; the action group's webhook retries it twice")
        cpu = str(uuid.uuid4())
        fired = alert_payload("metric_fired.json", alert_guid=cpu, fired=now - timedelta(minutes=12))
        first = self.post(fired, "fired")
        self.post(fired, "retry")
        self.post(fired, "retry")
        self.deliver()
        self.delivery(first)
        [row] = self.container.correlations.list(CONNECTION)
        number = row.work_item_number
        say(f"one incident for the problem {row.key_text!r}: {number}")

        heading("3. The same alert notifies again while the problem lasts")
        again = cpu
        refire = alert_payload("metric_fired.json", alert_guid=again, fired=now - timedelta(minutes=4))
        self.delivery(self.post(refire, "re-fired"))
        self.deliver()
        say(f"incidents in ServiceNow: {snow.count('incident')} (a work note was added to {number})")

        heading("4. Azure Monitor resolves the alert")
        resolved = alert_payload(
            "metric_resolved.json", alert_guid=again, fired=now - timedelta(minutes=4), resolved=now
        )
        resolution = self.post(resolved, "resolved")
        self.deliver()
        self.delivery(resolution)
        self.show_incident(number)

        heading("5. A second alert; an engineer resolves its incident in ServiceNow")
        heartbeat = str(uuid.uuid4())
        heartbeat_id = f"{ALERTS}/{heartbeat}"
        self.stack.alerts.add_alert(heartbeat_id, "New", alert_rule="Heartbeat missing")
        self.post(
            alert_payload("log_alerts_v2_fired.json", alert_guid=heartbeat, fired=now - timedelta(minutes=2)),
            "fired",
        )
        self.deliver()
        second = next(r for r in self.container.correlations.list(CONNECTION) if r.key != row.key)
        snow.seed_users(["Alice Smith"])
        snow.update_record(
            "incident",
            second.work_item_id,
            user="alice.smith",
            state="6",
            close_code="Solved (Work Around)",
            close_notes="Restarted the monitoring agent on the VM.",
        )
        say(
            f"{second.work_item_number} resolved in ServiceNow by alice.smith; "
            f"the Azure alert is still {self.stack.alerts.alert_state(heartbeat_id)}"
        )

        heading("6. Work-item sync: ServiceNow -> WorkItems table and Log Analytics (ServiceDesk_CL)")
        start, end = now - timedelta(days=20), now - timedelta(hours=1)
        snow.seed_work_items("incident", 40, start=start, end=end)
        snow.seed_work_items("change_request", 15, start=start, end=end)
        incidents, changes = snow.count("incident"), snow.count("change_request")
        say(f"ServiceNow holds {incidents} incidents and {changes} change requests")
        self.cli("sync", "run", "--connection", CONNECTION)
        stored = WorkItemRepository(self.container.tables.table(workitems_table.TABLE))
        for item_type in WorkItemType:
            rows = sum(1 for _ in stored.list(CONNECTION, item_type))
            say(f"WorkItems table, {item_type.value}: {rows} rows")
        records = self.stack.logs.records(LOGS_STREAM)
        say(f"Logs Ingestion received {len(records)} ServiceDesk_CL records; one of them:")
        sample = next(r for r in records if r["ServiceDeskId_s"] == second.work_item_number)
        keep = (
            "ServiceDeskId_s",
            "ServiceDeskWorkItemType_s",
            "IncidentState_s",
            "Title_s",
            "ResolvedBy_s",
            "Computer",
            "ResolvedDate_t",
        )
        say(textwrap.indent(json.dumps({k: sample.get(k) for k in keep}, indent=2), "  "))
        say(
            f"backward sync: the Azure alert behind {second.work_item_number} is now "
            f"{self.stack.alerts.alert_state(heartbeat_id)}"
        )

        heading("7. What the operator sees")
        self.cli("alerts", "list", "--connection", CONNECTION)
        say(
            f"ServiceNow API writes by the connector: {snow.write_count()} "
            "(2 incidents created, 1 re-fire note, 1 resolution) for 6 webhook calls"
        )
        self.maps(now)

    def maps(self, now: datetime) -> None:
        snow = self.stack.servicenow
        loganalytics = self.stack.loganalytics
        assert loganalytics is not None
        heading("8. Dependency maps: VM Insights -> Maps table, diagram, SCOM pack, CMDB, incidents")
        loganalytics.add_workspace(MAP_WORKSPACE)
        servers = seed_vminsights(
            loganalytics, MAP_WORKSPACE, servers=4, connections=12, now=now, prefix="vm-app"
        )
        say(f"Log Analytics holds VM Insights Map rows of {', '.join(s.computer for s in servers)}")
        snow.register_data_source(DATA_SOURCE)
        say(f"(a ServiceNow admin registered the discovery source {DATA_SOURCE!r} for this app)")
        code = self.cli(
            "connections", "add", CMDB_CONNECTION, "--type", "servicenow", "--url", snow.url,
            "--private-instance", "--user", snow.username, "--client-id", snow.client_id,
            "--create-ci", "--cmdb-data-source", DATA_SOURCE, "--secrets-stdin",
            stdin=f"{snow.client_secret}\n{snow.password}\n",
        )  # fmt: skip
        code |= self.cli(
            "maps", "sources", "add", "demo-vmi", "--kind", "vminsights",
            "--workspace", MAP_WORKSPACE_ID, "--customer-id", MAP_WORKSPACE,
            *[arg for s in servers for arg in ("--server", s.computer)],
        )  # fmt: skip
        cis_before = snow.count("cmdb_ci_server")
        code |= self.cli("maps", "import")
        if code != 0:
            raise SystemExit("the map import failed")
        out = Path(tempfile.gettempdir()) / "itsm-connector-demo"
        out.mkdir(exist_ok=True)
        server = servers[0].computer
        code, diagram = self.stack.cli("maps", "show", server, "--format", "html")
        if code != 0:
            raise SystemExit(f"maps show failed: {diagram}")
        page = out / f"{server}.html"
        page.write_text(diagram, encoding="utf-8")
        say(f"the dependency diagram of {server} (open it in a browser): {page.as_uri()}")
        pack = out / "ServiceMap.Servers.xml"
        self.cli("maps", "export-scom", "--out", str(pack))
        say(f"  {pack.as_uri()}")
        relationships = snow.relationships()
        new_cis = snow.count("cmdb_ci_server") - cis_before
        say(f"ServiceNow CMDB (IRE): {new_cis} new server CIs, {len(relationships)} relationships:")
        for parent, child in relationships:
            say(f"  {parent}  --Depends on::Used by-->  {child}")

        cpu = str(uuid.uuid4())
        fired = json.loads(
            alert_payload("metric_fired.json", alert_guid=cpu, fired=now - timedelta(minutes=1))
        )
        fired["data"]["essentials"]["configurationItems"] = [server]
        self.post(json.dumps(fired).encode(), "fired", connection=CMDB_CONNECTION)
        self.deliver()
        [row] = self.container.correlations.list(CMDB_CONNECTION)
        rec = self.incident(row.work_item_number)
        say(f"{row.work_item_number}, the incident for an alert on {server}, carries its map:")
        lines = rec["description"].splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("Dependency map of"))
        for line in lines[start : start + 4]:
            if line:
                say(f"  {line}")


def main() -> int:
    started = time.perf_counter()
    say("Starting Azurite and the loopback Entra ID, Key Vault, ServiceNow, Logs Ingestion and ARM...")
    with LoopbackStack() as stack:
        say(f"  Azurite tables {stack.azurite.table_endpoint}, queues {stack.azurite.queue_endpoint}")
        say(f"  ServiceNow {stack.servicenow.url}   Key Vault {stack.keyvault.vault_url}")
        say(f"  Entra ID {stack.entra.url}   Logs Ingestion {stack.logs.url}   ARM {stack.alerts.url}")
        with stack.app() as container:
            Demo(stack, container).run()
            run_products_demo(stack, container)
    heading("Done")
    say(f"Stopped everything the demo started ({time.perf_counter() - started:.1f}s in all).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
