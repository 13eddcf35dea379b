"""Dependency maps in the ServiceNow CMDB through the Identification and Reconciliation API.

The connector's ``DependencyCmdb`` against the loopback instance's IRE endpoint (real HTTP, TLS,
Basic auth), then the whole path: a CLI-added connection with create-CI on, a VM Insights import
through the registered timer, relationships in the loopback CMDB, and a second import that
creates nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from pydantic import SecretStr

import function_app
from shared_code.bootstrap import Container
from shared_code.domain.cmdb import Dependency
from shared_code.domain.mapsources import MapSourceDefinition
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.servicenow.auth import ServiceNowBasicAuth
from shared_code.itsm.servicenow.cmdb import MAX_ITEMS_PER_CALL, ServiceNowDependencyCmdb, payloads
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from tests.hostsim import FunctionHost
from tests.loopback.loganalytics import seed_vminsights
from tests.loopback.servicenow import DEFAULT_PASSWORD, DEFAULT_USERNAME, ServiceNowLoopback
from tests.loopback.stack import LoopbackStack
from tests.loopback.tls import loopback_tls

DATA_SOURCE = "AzureMonitorITSM"


@pytest.fixture
def snow() -> Iterator[ServiceNowLoopback]:
    with ServiceNowLoopback() as server:
        yield server


@pytest.fixture
def cmdb(snow: ServiceNowLoopback) -> Iterator[ServiceNowDependencyCmdb]:
    with httpx.Client(verify=loopback_tls().client_context(), timeout=10) as http:
        connector = ServiceNowConnector(
            "sn-cmdb",
            snow.url,
            http,
            ServiceNowBasicAuth(DEFAULT_USERNAME, lambda: SecretStr(DEFAULT_PASSWORD)),
            retry=RetryPolicy(sleep=lambda _s: None),
        )
        yield ServiceNowDependencyCmdb(connector, DATA_SOURCE)


def test_publish_creates_cis_and_relationships_once(
    snow: ServiceNowLoopback, cmdb: ServiceNowDependencyCmdb
) -> None:
    snow.register_data_source(DATA_SOURCE)
    existing = snow.seed_cis(["DB-01"])  # known to the CMDB already, under another case
    dependencies = [
        Dependency("web-01", "app-01", 443, "10.0.0.1", "10.0.0.2"),
        Dependency("app-01", "db-01", 1433, "10.0.0.2", "10.0.0.3"),
        Dependency("web-01", "app-01", 8443),  # the same pair again: one relationship
    ]
    first = cmdb.publish_dependencies(["web-01", "app-01", "lonely-01"], dependencies)
    assert first.errors == ()
    assert first.new_items == 3  # web-01, app-01, lonely-01; db-01 was identified
    assert first.new_relations == 2
    assert snow.relationships() == [("app-01", "db-01"), ("web-01", "app-01")]
    # identified, not duplicated: the one CI, reconciled to the map's values
    assert [r["sys_id"] for r in snow.find("cmdb_ci_server", name="db-01")] == existing
    assert snow.find("cmdb_ci_server", name="db-01")[0]["ip_address"] == "10.0.0.3"
    app = snow.find("cmdb_ci_server", name="app-01")[0]
    assert app["ip_address"] == "10.0.0.2"
    assert app["discovery_source"] == DATA_SOURCE

    cis_before = snow.count("cmdb_ci")
    again = cmdb.publish_dependencies(["web-01", "app-01", "lonely-01"], dependencies)
    assert (again.new_items, again.new_relations, again.errors) == (0, 0, ())
    assert snow.count("cmdb_ci") == cis_before
    assert snow.count("cmdb_rel_ci") == 2


def test_a_server_renamed_is_identified_by_its_address(
    snow: ServiceNowLoopback, cmdb: ServiceNowDependencyCmdb
) -> None:
    snow.register_data_source(DATA_SOURCE)
    snow.insert_record("cmdb_ci_server", name="old-name", ip_address="10.9.9.9")
    result = cmdb.publish_dependencies([], [Dependency("web-02", "new-name", 80, "", "10.9.9.9")])
    assert result.new_items == 1  # web-02 only
    assert snow.count("cmdb_ci_server") == 2
    assert snow.relationships() == [("web-02", "new-name")]


def test_refusals_inside_the_200_answer_are_read(
    snow: ServiceNowLoopback, cmdb: ServiceNowDependencyCmdb
) -> None:
    # the data source was never registered: the instance answers 200 with an error per item
    result = cmdb.publish_dependencies(["web-03"], [Dependency("web-03", "db-03", 5432)])
    assert (result.new_items, result.new_relations) == (0, 0)
    assert len(result.errors) == 3  # two CIs and the relationship
    assert all("Invalid data source" in error for error in result.errors)
    assert "CI web-03" in result.errors[0]
    assert "web-03 depends on db-03" in result.errors[2]
    assert snow.count("cmdb_ci") == 0
    assert snow.relationships() == []


def test_a_transient_failure_is_retried(snow: ServiceNowLoopback, cmdb: ServiceNowDependencyCmdb) -> None:
    snow.register_data_source(DATA_SOURCE)
    snow.fail_next(1, 503, 0, "identifyreconcile")
    result = cmdb.publish_dependencies([], [Dependency("web-04", "db-04", 5432)])
    assert (result.new_items, result.new_relations, result.errors) == (2, 1, ())
    assert [m for m, p, _ in snow.requests if "identifyreconcile" in p] == ["POST", "POST"]


def test_payloads_are_cut_with_both_ends_of_each_relationship() -> None:
    dependencies = [Dependency(f"s{i:03d}", f"s{i + 1:03d}", 443) for i in range(250)]
    cut = list(payloads([f"s{i:03d}" for i in range(260)], dependencies))
    assert all(len(p.items) <= MAX_ITEMS_PER_CALL for p in cut)
    names = set()
    relations = 0
    for payload in cut:
        for relation in payload.relations:
            assert 0 <= relation["parent"] < len(payload.items)
            assert 0 <= relation["child"] < len(payload.items)
        relations += len(payload.relations)
        names |= {n.lower() for n in payload.names}
        assert len({n.lower() for n in payload.names}) == len(payload.names)  # no duplicate item
    assert relations == 250
    assert names == {f"s{i:03d}" for i in range(260)}


RESOURCE_ID = (
    "/subscriptions/00000000-0000-4000-8000-000000000001/resourceGroups/rg-maps"
    "/providers/Microsoft.OperationalInsights/workspaces/ws-cmdb"
)


def test_import_publishes_the_maps_to_create_ci_connections_once(
    app: Container, stack: LoopbackStack
) -> None:
    assert stack.loganalytics is not None
    stack.servicenow.register_data_source("MapsE2E")
    stack.add_servicenow_connection("sn-cmdb", "--create-ci", "--cmdb-data-source", "MapsE2E")
    stack.add_servicenow_connection("sn-plain")  # create-CI off: not published to
    customer_id = str(uuid.uuid4())
    stack.loganalytics.add_workspace(customer_id)
    prefix = f"c{uuid.uuid4().hex[:6]}"
    seeded = seed_vminsights(
        stack.loganalytics, customer_id, servers=3, connections=8, now=datetime.now(UTC), prefix=prefix
    )
    app.map_sources.add(
        MapSourceDefinition.model_validate(
            {
                "name": "vmi",
                "kind": "vminsights",
                "workspaces": [{"resource_id": RESOURCE_ID, "customer_id": customer_id}],
                "group": {"kind": "computers", "computers": [s.computer for s in seeded]},
            }
        )
    )
    host = FunctionHost(function_app.app)
    host.timer("maps_import_timer")
    [run] = list(app.map_importer._runs.list("maps"))  # type: ignore[attr-defined]
    assert run.outcome == "ok", run.detail
    ours = [pair for pair in stack.servicenow.relationships() if pair[0].startswith(prefix)]
    # each seeded server talks to two others of the three (outbound to peers)
    expected = {(s.computer, p.computer) for i, s in enumerate(seeded) for p in seeded if p is not s}
    assert set(ours) == expected
    assert run.counts["cisCreated"] == 3
    assert run.counts["relationsCreated"] == len(expected)

    cis = stack.servicenow.count("cmdb_ci")
    rels = stack.servicenow.count("cmdb_rel_ci")
    host.timer("maps_import_timer")
    runs = sorted(app.map_importer._runs.list("maps"), key=lambda r: r.started_at)  # type: ignore[attr-defined]
    assert runs[-1].counts["cisCreated"] == 0
    assert runs[-1].counts["relationsCreated"] == 0
    assert stack.servicenow.count("cmdb_ci") == cis
    assert stack.servicenow.count("cmdb_rel_ci") == rels
