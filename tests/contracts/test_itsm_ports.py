"""Port contract suites: every implementation of an ITSM port passes the same tests.

A new product adds one entry to ``IMPLEMENTATIONS`` (a factory that returns its ``ConnectorPorts``
against its loopback server) and nothing else; the fake used by the alert processor's unit tests
runs here too, so the fake cannot drift from what real products do.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from pydantic import SecretStr

from shared_code.domain.sync import SyncCursor
from shared_code.domain.workitem import IncidentDraft, WorkItemState, WorkItemType
from shared_code.httpretry import RetryPolicy
from shared_code.itsm.cherwell.settings import CherwellConnection
from shared_code.itsm.provance.settings import ProvanceConnection
from shared_code.itsm.scsm.settings import ScsmConnection
from shared_code.itsm.servicenow.auth import ServiceNowOAuth
from shared_code.itsm.servicenow.connector import ServiceNowConnector
from shared_code.itsm.servicenow.events import EventWriter
from shared_code.ports.itsm import ConnectorPorts
from shared_code.products import build_connector
from tests.fakes.itsm import FakeItsm
from tests.loopback import cherwell as cherwell_loopback
from tests.loopback import provance as provance_loopback
from tests.loopback import scsm as scsm_loopback
from tests.loopback.entra import EntraLoopback
from tests.loopback.servicenow import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_PASSWORD,
    DEFAULT_USERNAME,
    ServiceNowLoopback,
)
from tests.loopback.tls import loopback_tls


class _TokenStore:
    def __init__(self) -> None:
        self.token: str | None = None

    def load(self) -> str | None:
        return self.token

    def save(self, token: str) -> None:
        self.token = token


class _Secrets:
    """The secret store the registry reads a connection's password or client secret from."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = {name: SecretStr(value) for name, value in values.items()}

    def get(self, name: str) -> SecretStr | None:
        return self.values.get(name)

    def set(self, name: str, value: SecretStr) -> None:
        self.values[name] = value

    def delete(self, name: str) -> None:
        self.values.pop(name, None)


class Seeder:
    """How a contract test puts changed work items into the product behind the port."""

    def __init__(self, add: Callable[[int, datetime, datetime], None] | None) -> None:
        self.add = add


def _servicenow_connector(stack: ExitStack) -> tuple[ServiceNowLoopback, ServiceNowConnector]:
    snow = stack.enter_context(ServiceNowLoopback())
    client = stack.enter_context(httpx.Client(verify=loopback_tls().client_context(), timeout=10))
    auth = ServiceNowOAuth(
        f"{snow.url}/oauth_token.do",
        client_id=DEFAULT_CLIENT_ID,
        client_secret=SecretStr(DEFAULT_CLIENT_SECRET),
        username=DEFAULT_USERNAME,
        password=lambda: SecretStr(DEFAULT_PASSWORD),
        refresh_token_store=_TokenStore(),
        connection_name="contract",
    )
    policy = RetryPolicy(sleep=lambda _s: None, jitter=lambda cap: 0.0)
    connector = ServiceNowConnector("contract", snow.url, client, auth, retry=policy)
    snow.seed_cis(["contract-vm-1"])
    return snow, connector


def servicenow(stack: ExitStack) -> tuple[ConnectorPorts, Seeder]:
    snow, connector = _servicenow_connector(stack)

    def add(count: int, start: datetime, end: datetime) -> None:
        snow.seed_work_items("incident", count, start=start, end=end)

    return (
        ConnectorPorts(
            product="ServiceNow",
            check=connector.check,
            close=connector.close,
            incidents=connector,
            changes=connector,
            configuration_items=connector,
        ),
        Seeder(add),
    )


def servicenow_events(stack: ExitStack) -> tuple[ConnectorPorts, Seeder]:
    """ServiceNow with the work item type ``event``: the alert path's writer is Event Management
    (the lifecycle fits: resolve is a clearing event that closes the em_alert, reopen a new event
    within the active interval), the sync still reads incidents."""
    snow, connector = _servicenow_connector(stack)
    events = EventWriter(connector, event_class="contract")

    def add(count: int, start: datetime, end: datetime) -> None:
        snow.seed_work_items("incident", count, start=start, end=end)

    return (
        ConnectorPorts(
            product="ServiceNow",
            check=events.check,
            close=events.close,
            incidents=events,
            changes=connector,
            configuration_items=connector,
        ),
        Seeder(add),
    )


def _tls_client(stack: ExitStack) -> httpx.Client:
    return stack.enter_context(httpx.Client(verify=loopback_tls().client_context(), timeout=10))


def cherwell(stack: ExitStack) -> tuple[ConnectorPorts, Seeder]:
    """Built by the product registry, as the app builds it; the CI is a ConfigServer record."""
    server = stack.enter_context(cherwell_loopback.CherwellLoopback())
    server.insert_record("ConfigServer", FriendlyName="contract-vm-1")
    connection = CherwellConnection.model_validate(
        {
            "name": "contract-cw",
            "server_url": server.url,
            "username": cherwell_loopback.DEFAULT_USERNAME,
            "client_id": cherwell_loopback.DEFAULT_CLIENT_ID,
        }
    )
    secrets = _Secrets({connection.password_secret_name: cherwell_loopback.DEFAULT_PASSWORD})
    ports = build_connector(connection, secrets, _tls_client(stack))

    def add(count: int, start: datetime, end: datetime) -> None:
        server.seed_work_items("Incident", count, start=start, end=end)

    return ports, Seeder(add)


def provance(stack: ExitStack) -> tuple[ConnectorPorts, Seeder]:
    """Dataverse behind the loopback Entra; the registry's credential trusts the loopback CA the way
    the app's does (``TLS_CA_BUNDLE``). Provance offers no CI lookup (its CMDB tables are site-specific)."""
    entra = stack.enter_context(EntraLoopback())
    server = provance_loopback.DataverseLoopback(entra).start()
    stack.callback(server.stop)
    provance_loopback.register_app(server)
    for name in provance_loopback.PEOPLE:
        server.add_user(name)
    account = server.add_account("Contoso contract")
    environment = stack.enter_context(pytest.MonkeyPatch.context())
    environment.setenv("TLS_CA_BUNDLE", loopback_tls().ca_bundle_path)
    connection = ProvanceConnection.model_validate(
        {
            "name": "contract-pv",
            "server_url": server.url,
            "username": provance_loopback.PROVANCE_APP_ID,
            "tenant_id": entra.tenant_id,
            "authority_host": entra.url,
            "private_instance": True,
            "customer": f"accounts({account})",
        }
    )
    secrets = _Secrets({connection.client_secret_name: provance_loopback.PROVANCE_APP_SECRET})
    ports = build_connector(connection, secrets, _tls_client(stack))

    def add(count: int, start: datetime, end: datetime) -> None:
        server.seed(connection.incident_table, count, start=start, end=end)

    return ports, Seeder(add)


def scsm(stack: ExitStack) -> tuple[ConnectorPorts, Seeder]:
    """The Cireson portal over SCSM; the CI is an active Windows computer the portal knows."""
    server = stack.enter_context(scsm_loopback.ScsmLoopback())
    server.add_ci("contract-vm-1")
    connection = ScsmConnection(name="contract-scsm", server_url=server.url, username=server.username)
    secrets = _Secrets({connection.password_secret_name: server.password})
    ports = build_connector(connection, secrets, _tls_client(stack))

    def add(count: int, start: datetime, end: datetime) -> None:
        server.seed_work_items(scsm_loopback.INCIDENT, count, start=start, end=end)

    return ports, Seeder(add)


def fake(stack: ExitStack) -> tuple[ConnectorPorts, Seeder]:
    itsm = FakeItsm()
    itsm.cis["contract-vm-1"] = "ci-1"
    return itsm.ports(), Seeder(None)


IMPLEMENTATIONS: dict[str, Callable[[ExitStack], tuple[ConnectorPorts, Seeder]]] = {
    "servicenow": servicenow,
    "servicenow-events": servicenow_events,
    "cherwell": cherwell,
    "provance": provance,
    "scsm": scsm,
    "fake": fake,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def product(request: pytest.FixtureRequest) -> Iterator[tuple[ConnectorPorts, Seeder]]:
    with ExitStack() as stack:
        ports, seeder = IMPLEMENTATIONS[request.param](stack)
        yield ports, seeder
        ports.close()


def draft(correlation_id: str) -> IncidentDraft:
    return IncidentDraft(
        short_description="Sev1 CPU high on contract-vm-1",
        description="Azure Monitor alert fired",
        impact=1,
        urgency=2,
        correlation_id=correlation_id,
        configuration_item="contract-vm-1",
    )


def test_check_describes_what_answered(product: tuple[ConnectorPorts, Seeder]) -> None:
    ports, _ = product
    assert ports.check().strip()


def test_an_incident_goes_through_its_lifecycle(product: tuple[ConnectorPorts, Seeder]) -> None:
    ports, _ = product
    writer = ports.require_incidents()
    correlation = f"azmon-{uuid.uuid4().hex[:16]}-g1"
    assert writer.find_by_correlation(correlation) is None
    ref = writer.create_incident(draft(correlation))
    assert ref.id
    assert ref.number
    found = writer.find_by_correlation(correlation)
    assert found is not None
    assert found.id == ref.id
    assert writer.get_state(ref) is WorkItemState.OPEN
    writer.add_note(ref, "fired again 3 times")
    writer.resolve(ref, "the alert resolved")
    assert writer.get_state(ref) is WorkItemState.RESOLVED
    assert writer.find_by_correlation(correlation) is None  # only open work items are found
    writer.reopen(ref, "fired again within the reopen window")
    assert writer.get_state(ref) is WorkItemState.OPEN


WITHOUT_CI_LOOKUP = {"provance"}
"""Products whose registry entry offers no ``configuration_items`` port (their CMDB is site-specific)."""


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_a_product_offers_ci_lookup_exactly_where_the_registry_says(name: str) -> None:
    with ExitStack() as stack:
        ports, _ = IMPLEMENTATIONS[name](stack)
        assert (ports.configuration_items is None) == (name in WITHOUT_CI_LOOKUP)
        ports.close()


@pytest.mark.parametrize("name", sorted(set(IMPLEMENTATIONS) - WITHOUT_CI_LOOKUP))
def test_configuration_items_are_found_by_name_and_unknown_ones_are_none(name: str) -> None:
    with ExitStack() as stack:
        ports, _ = IMPLEMENTATIONS[name](stack)
        assert ports.configuration_items is not None
        assert ports.configuration_items.ensure_configuration_item("contract-vm-1", create=False)
        assert (
            ports.configuration_items.ensure_configuration_item("no-such-ci-anywhere", create=False) is None
        )
        ports.close()


def test_the_change_feed_pages_in_keyset_order_without_gaps_or_repeats(
    product: tuple[ConnectorPorts, Seeder],
) -> None:
    ports, seeder = product
    if ports.changes is None or seeder.add is None:
        assert ports.changes is None or seeder.add is not None
        return  # no change feed: nothing to page (the registry says so)
    end = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    seeder.add(45, end - timedelta(days=2), end)
    cursor = SyncCursor(updated_at=end - timedelta(days=3))
    seen: list[str] = []
    last: datetime | None = None
    for _ in range(100):  # bounded: 45 rows in pages of 10
        page = ports.changes.fetch_changes(WorkItemType.INCIDENT, cursor, 10)
        for item in page.items:
            # ties on one update time follow the product's own keyset (the cursor's last_id is the
            # product's: a record id for most, Dataverse's row version for Provance), so only the
            # time order is common to all; gaps and repeats are caught by the count below
            assert last is None or item.updated_at >= last, "pages must follow updated_at order"
            last = item.updated_at
            assert cursor.updated_at <= item.updated_at <= page.next_cursor.updated_at
            seen.append(item.source_id)
            assert item.lifecycle is not None, "the product's mapping sets the normalised lifecycle"
        assert (page.next_cursor.updated_at, page.next_cursor.last_id) >= (cursor.updated_at, cursor.last_id)
        if page.items:
            assert page.next_cursor != cursor, "a page with rows moves the cursor past them"
        cursor = page.next_cursor
        if page.is_last:
            break
    else:
        pytest.fail("the change feed never reported its last page")
    assert len(seen) == len(set(seen)) >= 45, "every seeded row once, none twice"
