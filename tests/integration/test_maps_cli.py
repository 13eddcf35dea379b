"""``maps sources ...``, ``maps import``, ``maps show`` and ``maps export-scom`` through the CLI,
against the loopback Log Analytics and Azurite."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from shared_code.bootstrap import Container
from tests.loopback.loganalytics import seed_vminsights
from tests.loopback.stack import LoopbackStack

RESOURCE_ID = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg-maps"
    "/providers/Microsoft.OperationalInsights/workspaces/ws-cli"
)


def test_sources_import_show_and_export(app: Container, stack: LoopbackStack, tmp_path: Path) -> None:
    assert stack.loganalytics is not None
    customer_id = str(uuid.uuid4())
    stack.loganalytics.add_workspace(customer_id)
    seeded = seed_vminsights(
        stack.loganalytics, customer_id, servers=2, connections=6, now=datetime.now(UTC), prefix="cli"
    )
    code, output = stack.cli(
        "maps", "sources", "add", "vmi-cli", "--kind", "vminsights", "--workspace", RESOURCE_ID,
        "--customer-id", customer_id, "--server", seeded[0].computer, "--window-minutes", "90", "--test",
    )  # fmt: skip
    assert code == 0, output
    assert "OK: vmi-cli" in output
    code, listed = stack.cli("maps", "sources", "list")
    assert "vmi-cli" in listed
    assert "window 90 min" in listed
    code, shown = stack.cli("maps", "sources", "show", "vmi-cli")
    assert json.loads(shown)["group"]["computers"] == [seeded[0].computer]

    code, output = stack.cli("maps", "import")
    assert code == 0, output
    assert "vmi-cli: ok, 1 imported" in output
    code, output = stack.cli("maps", "import", "--source", "vmi-cli")
    assert "0 imported, 1 unchanged" in output

    code, shown = stack.cli("maps", "show", seeded[0].computer.upper())
    assert code == 0, shown
    assert json.loads(shown)["server"] == seeded[0].computer
    code, mermaid = stack.cli("maps", "show", seeded[0].machine_id, "--format", "mermaid")
    assert code == 0
    assert mermaid.lstrip().startswith(("graph", "flowchart", "%%"))
    code, missing = stack.cli("maps", "show", "nobody")
    assert code == 1
    assert "no dependency map of 'nobody'" in missing

    out = tmp_path / "pack.xml"
    code, output = stack.cli("maps", "export-scom", "--out", str(out))
    assert code == 0, output
    assert ET.parse(out).getroot().tag == "ManagementPack"

    code, output = stack.cli("maps", "sources", "remove", "vmi-cli")
    assert code == 0
    code, output = stack.cli("maps", "sources", "show", "vmi-cli")
    assert code == 1
    assert "no map source named 'vmi-cli'" in output


def test_bad_definitions_are_refused_by_field(app: Container, stack: LoopbackStack) -> None:
    code, output = stack.cli("maps", "sources", "add", "bad", "--kind", "vminsights", "--workspace", "/nope")
    assert code == 2
    assert "workspaces.0.resource_id" in output
    code, output = stack.cli(
        "maps", "sources", "add", "sm", "--kind", "servicemap", "--workspace", RESOURCE_ID,
        "--server", "web-01", "--window-minutes", "120",
    )  # fmt: skip
    assert code == 2
    assert "at most 60" in output


MIGRATE_HEADER = (
    "Timeslot,Source server name,Source IP,Source application,Source process,Destination server name,"
    "Destination IP,Destination application,Destination process,Destination port"
)


def test_an_azure_migrate_export_is_imported_through_the_cli(
    app: Container, stack: LoopbackStack, tmp_path: Path
) -> None:
    slot = "2024-05-01 10:00:00 - 2024-05-01 11:00:00"
    rows = [
        f"{slot},web01,10.0.0.1,IIS,w3wp.exe,sql01,10.0.0.2,SQL Server,sqlservr.exe,1433",
        f"{slot},app01,10.0.0.3,Java,java.exe,web01,10.0.0.1,IIS,w3wp.exe,443",
    ]
    export = tmp_path / "dependencies.csv"
    export.write_text("\ufeff" + "\r\n".join([MIGRATE_HEADER, *rows]) + "\r\n", encoding="utf-8")
    code, output = stack.cli("maps", "sources", "add", "migrate-cli", "--kind", "migrate")
    assert code == 0, output
    code, output = stack.cli("maps", "import-csv", str(export), "--source", "migrate-cli")
    assert code == 0, output
    assert "migrate-cli: ok, 3 imported" in output
    code, shown = stack.cli("maps", "show", "web01")
    assert code == 0, shown
    body = json.loads(shown)
    assert body["source"] == "migrate-cli"
    names = {node["name"] for node in body["nodes"]}
    assert {"web01", "sql01", "app01"} <= names
    assert any(edge["port"] == 1433 and edge["direction"] == "outbound" for edge in body["edges"])
    assert any(edge["port"] == 443 and edge["direction"] == "inbound" for edge in body["edges"])

    code, output = stack.cli("maps", "import-csv", str(export), "--source", "migrate-cli")
    assert "0 imported, 3 unchanged" in output  # the same export again writes nothing new
    code, output = stack.cli("maps", "import-csv", str(export), "--source", "migrate-cli", "--server", "db99")
    assert code == 1
    assert "db99" in output
    broken = tmp_path / "broken.csv"
    broken.write_text(MIGRATE_HEADER + "\r\n" + "2024-05-01,web01,10.0.0.1\r\n", encoding="utf-8")
    code, output = stack.cli("maps", "import-csv", str(broken), "--source", "migrate-cli")
    assert code == 2
    assert "line 2" in output
    code, output = stack.cli("maps", "import-csv", str(tmp_path / "missing.csv"), "--source", "migrate-cli")
    assert code == 2
    assert "cannot read" in output
    code, output = stack.cli("maps", "import", "--source", "migrate-cli")
    assert code == 2
    assert "import its CSV export with the CLI" in output
