"""Alert-path benchmark: webhook-to-incident overhead against plain clients, and an alert storm.

    .venv/bin/python -m tests.bench.alerts_bench [--iterations 200] [--alerts 10000] [--problems 100]
                                                 [--workers 12]

Prints on stdout, one ``name: value`` line each (progress and context go to stderr):

* ``alerts.overhead_ratio``: median time from calling ``receive_alert`` (a real ``func.HttpRequest``
  through ``tests/hostsim.py``), through ``deliver_alert`` with the message it produced, to the
  incident existing in ServiceNow (the moment the app's connector has the answer to its incident
  POST), over the median time of the unavoidable work done raw in the same run (one Azure Table
  insert with a plain ``TableClient`` + one ``POST /api/now/table/incident`` with a plain ``httpx``
  client and a bearer token, ending when that POST is answered). Raw and ours alternate, each
  "ours" alert is a new problem, and a warm-up (tokens, connections, tables, the CI cache: the
  CI is in the CMDB) is left out. Target: <= 1.3. The ratio to ``deliver_alert``'s return, i.e.
  with the bookkeeping after the create (correlation row released, delivery recorded), goes to
  stderr beside it.
* ``alerts.storm_incidents`` / ``alerts.storm_itsm_writes``: ``--alerts`` firings over
  ``--problems`` correlation keys (per rule + CI, the default), fired within one minute and sent
  shuffled, then one resolution per problem; counted afterwards in the loopback ServiceNow
  (incidents of the storm; POST/PATCH/PUT on the Table API). Targets: exactly one incident per
  problem, at most 3 writes per problem. The process exits 1 when a target or a check fails.
* ``alerts.storm_alerts_per_s``: notifications (firings + resolutions) over the wall time from the
  first webhook call to the last delivery, ``--workers`` threads each calling the webhook and then
  the queue function, as a scaled-out host would.
* ``alerts.storm_peak_rss_mb``: ``ru_maxrss`` of the process that ran only the storm.

Layout. This process is the lab: it runs ``LoopbackStack`` (Azurite in its own Node process, the
loopback Entra ID, Key Vault and ServiceNow as threads here) and counts what reached ServiceNow and
the tables. The app runs in child processes that play the Functions host (``--role overhead`` and
``--role storm``): they get ``stack.app_environment()`` as their environment, so ``function_app.app``
builds its real clients against the stack exactly as it would in Azure. The loopback servers thus
do not share the app's interpreter (its GIL), and the storm's peak RSS is the app's own.

The queue hop: the message ``receive_alert`` writes to its queue output binding is handed straight
to ``deliver_alert`` as a ``func.QueueMessage`` (hostsim ``send_outputs=False`` + ``call_queue``),
not sent through the Azurite queue: the queue is the Functions host's transport (its polling
latency is not the app's work), and both figures are about the app. A delivery that raises is
redelivered with its dequeue count raised, up to host.json's ``maxDequeueCount`` (5), then counted
as poisoned, as the host would do.

Variants (not the figures of record; the checks still apply): ``--servicenow-delay 0.5`` makes every
ServiceNow API call slow as a real instance's; ``--correlation per-rule --cis 20`` makes each
problem one rule firing on 20 resources; ``--problems 1`` is a storm on one hot problem.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import resource
import ssl
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "alerts" / "metric_fired.json"

OVERHEAD_CONNECTION = "bench-overhead"
STORM_CONNECTION = "bench-storm"
OVERHEAD_CI = "vm-bench-01"
STORM_TAG = "storm-rule-"
OVERHEAD_TAG = "overhead-rule-"
RAW_TAG = "raw-rule-"
RAW_TABLE = "BenchRawAlerts"
MAX_DEQUEUE_COUNT = 5  # host.json extensions.queues.maxDequeueCount
REDELIVERY_PAUSE_S = 0.5  # stands in for the host's visibility timeout before a retry
RATIO_TARGET = 1.3
WRITES_PER_PROBLEM = 3

_ENV_SN = "BENCH_SN_"  # the raw client's ServiceNow URL and OAuth credentials, for the children


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- payloads --------------------------------------------------------------------------------------


class Payloads:
    """Common Alert Schema bodies made from the metric-alert fixture, one per notification."""

    def __init__(self) -> None:
        self._template: dict[str, Any] = json.loads(FIXTURE.read_text())

    def body(
        self,
        *,
        rule: str,
        ci: str,
        alert_id: str,
        fired_at: datetime,
        resolved_at: datetime | None = None,
    ) -> bytes:
        payload = copy.deepcopy(self._template)
        essentials = payload["data"]["essentials"]
        sub = "00000000-0000-0000-0000-000000000000"
        rule_id = (
            f"/subscriptions/{sub}/resourceGroups/rg-bench/providers/microsoft.insights/metricAlerts/{rule}"
        )
        essentials.update(
            {
                "alertId": f"/subscriptions/{sub}/providers/Microsoft.AlertsManagement/alerts/{alert_id}",
                "alertRule": rule,
                "alertRuleID": rule_id,
                "originAlertId": f"{sub}_rg-bench_microsoft.insights_metricAlerts_{rule}_{alert_id[:8]}",
                "configurationItems": [ci],
                "alertTargetIDs": [
                    f"/subscriptions/{sub}/resourcegroups/rg-bench/providers/microsoft.compute/virtualmachines/{ci}"
                ],
                "firedDateTime": _iso(fired_at),
                "monitorCondition": "Fired" if resolved_at is None else "Resolved",
            }
        )
        if resolved_at is not None:
            essentials["resolvedDateTime"] = _iso(resolved_at)
        return json.dumps(payload).encode()


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _percentile_ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


# -- the app's side (child processes) --------------------------------------------------------------


class AppHost:
    """``function_app.app`` behind hostsim, with the queue hop done in-process (see the docstring)."""

    def __init__(self) -> None:
        import function_app
        from tests.hostsim import FunctionHost

        self.host = FunctionHost(function_app.app)

    def webhook(self, connection: str, body: bytes) -> str | None:
        """Call ``receive_alert``; the queue message it produced (None for a recognised duplicate)."""
        call = self.host.http(
            "receive_alert",
            "POST",
            f"https://bench.azurewebsites.net/api/alerts/{connection}",
            body=body,
            headers={"Content-Type": "application/json"},
            route_params={"connection": connection},
            send_outputs=False,
        )
        if call.status != 202:
            raise RuntimeError(f"receive_alert answered {call.status}: {call.response.get_body()[:300]!r}")
        return call.outputs.get("delivery")

    def deliver(self, message: str, dequeue_count: int = 1) -> None:
        self.host.call_queue("deliver_alert", message, dequeue_count=dequeue_count)


def _raw_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=os.environ["TLS_CA_BUNDLE"])
    return context


class RawPath:
    """The same unavoidable work with plain clients: one Table insert, one incident POST."""

    def __init__(self) -> None:
        import httpx
        from azure.data.tables import TableServiceClient

        service = TableServiceClient.from_connection_string(os.environ["AzureWebJobsStorage"])  # noqa: SIM112 - the app setting
        service.create_table_if_not_exists(RAW_TABLE)
        self.table = service.get_table_client(RAW_TABLE)
        self.url = os.environ[_ENV_SN + "URL"]
        self.client = httpx.Client(verify=_raw_ssl_context(), timeout=10.0)
        token = self.client.post(
            f"{self.url}/oauth_token.do",
            data={
                "grant_type": "password",
                "client_id": os.environ[_ENV_SN + "CLIENT_ID"],
                "client_secret": os.environ[_ENV_SN + "CLIENT_SECRET"],
                "username": os.environ[_ENV_SN + "USERNAME"],
                "password": os.environ[_ENV_SN + "PASSWORD"],
            },
        )
        token.raise_for_status()
        self.headers = {
            "Authorization": f"Bearer {token.json()['access_token']}",
            "Accept": "application/json",
        }

    def run(self, index: int, body: bytes) -> None:
        alert = json.loads(body)["data"]["essentials"]
        self.table.create_entity(
            {
                "PartitionKey": f"raw-{index % 16:02d}",
                "RowKey": uuid.uuid4().hex,
                "Status": "pending",
                "ReceivedAt": datetime.now(UTC),
                "Alert": body.decode(),
            }
        )
        response = self.client.post(
            f"{self.url}/api/now/table/incident",
            params={"sysparm_fields": "sys_id,number", "sysparm_exclude_reference_link": "true"},
            headers=self.headers,
            json={
                "short_description": f"[{alert['severity']}] {alert['alertRule']} on {OVERHEAD_CI}",
                "description": f"{alert['description']}\n\n{json.dumps(alert, indent=1)}",
                "impact": "2",
                "urgency": "2",
                "cmdb_ci": OVERHEAD_CI,
                "correlation_id": f"raw-{alert['alertId'][-36:]}",
                "contact_type": "monitoring",
            },
        )
        if response.status_code != 201:
            raise RuntimeError(f"raw incident POST answered {response.status_code}: {response.text[:300]}")

    def close(self) -> None:
        self.client.close()
        self.table.close()


def probe_creates(connection_name: str) -> list[float]:
    """Record (``perf_counter``) when each incident create of the app's connector has returned.

    A measuring probe around the app's own connector instance (the one ``deliver_alert`` gets
    from the container's cache); nothing it does changes what the app does.
    """
    from shared_code.bootstrap import get_container

    container = get_container()
    connector = container.connector_for(container.connections.get(connection_name)).require_incidents()
    created: list[float] = []
    create = connector.create_incident

    def timed_create(draft: Any) -> Any:
        ref = create(draft)
        created.append(time.perf_counter())
        return ref

    setattr(connector, "create_incident", timed_create)  # noqa: B010 - an instance attribute, on purpose
    return created


def probe_races() -> Counter[str]:
    """Count the correlation writes that lost a race (conditional insert or ETag-matched replace)."""
    from shared_code.bootstrap import get_container
    from shared_code.errors import AlreadyExistsError, EtagConflict

    repo = get_container().correlations
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def counted(name: str) -> None:
        write = getattr(repo, name)

        def wrapper(row: Any) -> Any:
            try:
                result = write(row)
            except (EtagConflict, AlreadyExistsError):
                with lock:
                    counts[f"{name} lost"] += 1
                raise
            with lock:
                counts[name] += 1
            return result

        setattr(repo, name, wrapper)

    counted("insert")
    counted("replace")
    return counts


def role_overhead(iterations: int, warmup: int) -> dict[str, Any]:
    payloads = Payloads()
    app = AppHost()
    raw = RawPath()
    created = probe_creates(OVERHEAD_CONNECTION)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    raw_times: list[float] = []
    to_incident: list[float] = []
    to_return: list[float] = []

    def body(tag: str, index: int) -> bytes:
        return payloads.body(
            rule=f"{tag}{index:05d}",
            ci=OVERHEAD_CI,
            alert_id=str(uuid.uuid4()),
            fired_at=t0 + timedelta(milliseconds=index),
        )

    try:
        for index in range(warmup + iterations):
            raw_body = body(RAW_TAG, index)
            start = time.perf_counter()
            raw.run(index, raw_body)
            raw_elapsed = time.perf_counter() - start

            our_body = body(OVERHEAD_TAG, index)
            creates_before = len(created)
            start = time.perf_counter()
            message = app.webhook(OVERHEAD_CONNECTION, our_body)
            if message is None:
                raise RuntimeError("a new alert was taken for a duplicate: nothing was queued")
            app.deliver(message)
            returned = time.perf_counter()
            if len(created) != creates_before + 1:
                raise RuntimeError(
                    f"alert {index} made {len(created) - creates_before} incident creates, not 1"
                )
            if index >= warmup:
                raw_times.append(raw_elapsed)
                to_incident.append(created[-1] - start)
                to_return.append(returned - start)
    finally:
        raw.close()
    return {
        "raw_ms": _median_ms(raw_times),
        "ours_ms": _median_ms(to_incident),
        "ours_return_ms": _median_ms(to_return),
        "raw_p90_ms": _percentile_ms(raw_times, 0.9),
        "ours_p90_ms": _percentile_ms(to_incident, 0.9),
        "ratio": statistics.median(to_incident) / statistics.median(raw_times),
        "ratio_return": statistics.median(to_return) / statistics.median(raw_times),
        "samples": len(to_incident),
    }


@dataclass(frozen=True)
class Notification:
    problem: int
    ci: int
    alert_id: str
    fired_at: datetime
    resolved_at: datetime | None = None


def storm_plan(alerts: int, problems: int, cis: int = 1, seed: int = 20261101) -> list[Notification]:
    """``alerts`` firings spread over ``problems`` keys within one minute, shuffled; then one
    resolution per problem. Each problem is one alert that keeps notifying (a distinct fired time
    per notification, so each is a new delivery): the problem resolves when that alert does."""
    rng = random.Random(seed)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    alert_of = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(problems)]
    firings = [
        Notification(
            n % problems,
            (n // problems) % cis,
            alert_of[n % problems],
            base + timedelta(seconds=rng.uniform(0, 60)),
        )
        for n in range(alerts)
    ]
    rng.shuffle(firings)
    latest: dict[int, Notification] = {}
    for firing in firings:
        if firing.problem not in latest or firing.fired_at > latest[firing.problem].fired_at:
            latest[firing.problem] = firing
    resolutions = [
        Notification(p, latest[p].ci, latest[p].alert_id, latest[p].fired_at, base + timedelta(seconds=75))
        for p in sorted(latest)
    ]
    return firings + resolutions


class StormStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.webhook_s: list[float] = []
        self.deliver_s: list[float] = []
        self.redeliveries: Counter[str] = Counter()
        self.redelivery_causes: list[str] = []
        self.poisoned = 0
        self.duplicates = 0
        self.errors: list[str] = []


def role_storm(alerts: int, problems: int, workers: int, cis: int) -> dict[str, Any]:
    from shared_code.bootstrap import get_container

    payloads = Payloads()
    app = AppHost()
    # warm-up, outside the measurement: tables created, connection cached, OAuth token fetched
    container = get_container()
    connection = container.connections.get(STORM_CONNECTION)
    container.connector_for(connection).check()
    _ = container.correlations, container.deliveries, container.alert_delivery
    races = probe_races()

    plan = storm_plan(alerts, problems, cis)
    stats = StormStats()
    pending: Iterator[Notification] = iter(plan)
    take = threading.Lock()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def deliver(message: str) -> None:
        for dequeue_count in range(1, MAX_DEQUEUE_COUNT + 1):
            start = time.perf_counter()
            try:
                app.deliver(message, dequeue_count)
            except Exception as exc:  # the host logs it and delivers the message again later
                with stats.lock:
                    stats.redeliveries[type(exc).__name__] += 1
                    if len(stats.redelivery_causes) < 5:
                        stats.redelivery_causes.append(f"{exc} (dequeue count {dequeue_count})")
                time.sleep(REDELIVERY_PAUSE_S)
                continue
            with stats.lock:
                stats.deliver_s.append(time.perf_counter() - start)
            return
        with stats.lock:
            stats.poisoned += 1

    def worker() -> None:
        while True:
            with take:
                item = next(pending, None)
            if item is None:
                return
            body = payloads.body(
                rule=f"{STORM_TAG}{item.problem:03d}",
                ci=f"vm-storm-{item.problem:03d}-{item.ci:02d}",
                alert_id=item.alert_id,
                fired_at=item.fired_at,
                resolved_at=item.resolved_at,
            )
            try:
                start = time.perf_counter()
                message = app.webhook(STORM_CONNECTION, body)
                elapsed = time.perf_counter() - start
                with stats.lock:
                    stats.webhook_s.append(elapsed)
                if message is None:
                    with stats.lock:
                        stats.duplicates += 1
                    continue
                deliver(message)
            except Exception as exc:
                with stats.lock:
                    stats.errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, name=f"storm-{n}", daemon=True) for n in range(workers)]
    cpu_start = time.process_time()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {
        "cpu_s": cpu,
        "notifications": len(plan),
        "wall_s": wall,
        "alerts_per_s": len(plan) / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_storm_mb": rss_before,
        "webhook_median_ms": _median_ms(stats.webhook_s) if stats.webhook_s else 0.0,
        "webhook_p99_ms": _percentile_ms(stats.webhook_s, 0.99) if stats.webhook_s else 0.0,
        "deliver_median_ms": _median_ms(stats.deliver_s) if stats.deliver_s else 0.0,
        "deliver_p99_ms": _percentile_ms(stats.deliver_s, 0.99) if stats.deliver_s else 0.0,
        "redeliveries": dict(stats.redeliveries),
        "redelivery_causes": stats.redelivery_causes,
        "correlation_writes": dict(races),
        "poisoned": stats.poisoned,
        "duplicates": stats.duplicates,
        "errors": stats.errors[:20],
        "error_count": len(stats.errors),
    }


def run_role(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    if args.role == "overhead":
        result = role_overhead(args.iterations, args.warmup)
    else:
        result = role_storm(args.alerts, args.problems, args.workers, args.cis)
    print(json.dumps(result), flush=True)
    return 0


# -- the lab (this process) ------------------------------------------------------------------------


def child_environment(stack: Any) -> dict[str, str]:
    from tests.loopback.stack import FOREIGN_IDENTITY_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_IDENTITY_VARIABLES}
    env.update(stack.app_environment())
    snow = stack.servicenow
    env.update(
        {
            _ENV_SN + "URL": snow.url,
            _ENV_SN + "CLIENT_ID": snow.client_id,
            _ENV_SN + "CLIENT_SECRET": snow.client_secret,
            _ENV_SN + "USERNAME": snow.username,
            _ENV_SN + "PASSWORD": snow.password,
        }
    )
    return env


def spawn(role: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "tests.bench.alerts_bench",
        "--role",
        role,
        "--iterations",
        str(args.iterations),
        "--warmup",
        str(args.warmup),
        "--alerts",
        str(args.alerts),
        "--problems",
        str(args.problems),
        "--workers",
        str(args.workers),
        "--cis",
        str(args.cis),
    ]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=1200, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {role} run failed with exit code {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return dict(json.loads(lines[-1]))


def delivery_statuses(stack: Any, connection: str) -> tuple[Counter[str], Counter[str]]:
    """Status and outcome counts of one connection's rows in AlertDeliveries."""
    from azure.data.tables import TableServiceClient

    service = TableServiceClient.from_connection_string(stack.azurite.connection_string)
    statuses: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    with service.get_table_client(stack.table_prefix + "AlertDeliveries") as table:
        rows = table.query_entities(
            "Connection eq @c", parameters={"c": connection}, select=["Status", "Outcome"]
        )
        for row in rows:
            statuses[str(row["Status"])] += 1
            outcomes[str(row.get("Outcome", "")).split(":")[0] or "-"] += 1
    service.close()
    return statuses, outcomes


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``; 0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def incidents_tagged(stack: Any, tag: str) -> list[dict[str, str]]:
    return [r for r in stack.servicenow.records("incident") if tag in r.get("short_description", "")]


def lab(args: argparse.Namespace) -> int:
    from tests.loopback.stack import LoopbackStack

    failures: list[str] = []
    figures: dict[str, str] = {}
    stack = LoopbackStack()
    try:
        log("starting Azurite and the loopback Entra ID, Key Vault and ServiceNow ...")
        stack.start()
        with stack.app():
            stack.add_servicenow_connection(OVERHEAD_CONNECTION)
            stack.add_servicenow_connection(STORM_CONNECTION, "--correlation", args.correlation)
        stack.servicenow.seed_cis([OVERHEAD_CI])  # the overhead alerts' CI is in the CMDB
        env = child_environment(stack)

        if args.iterations > 0:
            log(f"overhead: {args.warmup} warm-up + {args.iterations} alternated raw/ours alerts ...")
            overhead = spawn("overhead", env, args)
            made = len(incidents_tagged(stack, OVERHEAD_TAG))
            expected = args.warmup + args.iterations
            o = overhead
            log(
                f"overhead: raw median {o['raw_ms']:.2f} ms (p90 {o['raw_p90_ms']:.2f}); ours to the "
                f"incident created {o['ours_ms']:.2f} ms (p90 {o['ours_p90_ms']:.2f}); ours to the return of "
                f"deliver_alert (delivery and correlation recorded) {o['ours_return_ms']:.2f} ms, ratio "
                f"{o['ratio_return']:.3f}; {o['samples']} samples; {made} incidents"
            )
            statuses, _ = delivery_statuses(stack, OVERHEAD_CONNECTION)
            if made != expected or statuses.get("delivered", 0) != expected:
                failures.append(
                    f"overhead: expected {expected} incidents and delivered alerts, "
                    f"found {made} incidents and deliveries {dict(statuses)}"
                )
            figures["alerts.overhead_ratio"] = f"{overhead['ratio']:.3f}"
            if overhead["ratio"] > RATIO_TARGET:
                log(f"overhead: ratio {overhead['ratio']:.3f} is over the target {RATIO_TARGET}")

        if args.alerts > 0:
            log(
                f"storm: {args.alerts} firings over {args.problems} problems, then {args.problems} "
                f"resolutions, {args.workers} workers ..."
            )
            stack.servicenow.reset_request_log()
            stack.servicenow.delay_seconds = args.servicenow_delay
            lab_cpu, azurite_cpu = time.process_time(), process_cpu_s(stack.azurite.pid)
            storm = spawn("storm", env, args)
            lab_cpu = time.process_time() - lab_cpu
            azurite_cpu = process_cpu_s(stack.azurite.pid) - azurite_cpu
            writes_by_method = Counter(
                method
                for method, path, _ in list(stack.servicenow.requests)
                if method in ("POST", "PATCH", "PUT") and path.startswith("/api/now/")
            )
            writes = stack.servicenow.write_count()
            incidents = incidents_tagged(stack, STORM_TAG)
            per_rule = args.correlation == "per-rule"
            problems = args.problems if per_rule else args.problems * args.cis
            per_problem = Counter(
                " ".join(r["short_description"].split()[1 : 2 if per_rule else 4]) for r in incidents
            )
            unresolved = [r["number"] for r in incidents if r.get("state") != "6"]
            statuses, outcomes = delivery_statuses(stack, STORM_CONNECTION)
            log(
                f"storm: {storm['notifications']} notifications in {storm['wall_s']:.1f} s; webhook median "
                f"{storm['webhook_median_ms']:.1f} ms (p99 {storm['webhook_p99_ms']:.1f}), delivery median "
                f"{storm['deliver_median_ms']:.1f} ms (p99 {storm['deliver_p99_ms']:.1f}); RSS before the "
                f"storm {storm['rss_before_storm_mb']:.0f} MB"
            )
            log(
                f"storm: CPU seconds: app (storm process) {storm['cpu_s']:.1f}, Azurite {azurite_cpu:.1f}, "
                f"loopback ServiceNow/Entra/Key Vault (this process) {lab_cpu:.1f}"
            )
            log(
                f"storm: ITSM writes {dict(writes_by_method)}; deliveries {dict(statuses)}; outcomes "
                f"{dict(outcomes)}; redeliveries {storm['redeliveries']}; poisoned {storm['poisoned']}; "
                f"duplicates {storm['duplicates']}; correlation writes {storm['correlation_writes']}"
            )
            for cause in storm["redelivery_causes"]:
                log(f"storm: redelivered after: {cause}")
            for error in storm["errors"]:
                log(f"storm: error: {error}")
            figures["alerts.storm_incidents"] = str(len(incidents))
            figures["alerts.storm_itsm_writes"] = str(writes)
            figures["alerts.storm_alerts_per_s"] = f"{storm['alerts_per_s']:.1f}"
            figures["alerts.storm_peak_rss_mb"] = f"{storm['peak_rss_mb']:.1f}"
            if len(incidents) != problems or len(per_problem) != problems:
                failures.append(
                    f"storm: {len(incidents)} incidents for {len(per_problem)} of {problems} problems"
                )
            if writes > WRITES_PER_PROBLEM * problems:
                failures.append(f"storm: {writes} ITSM writes, over {WRITES_PER_PROBLEM * problems}")
            if unresolved:
                failures.append(f"storm: {len(unresolved)} incidents not resolved, e.g. {unresolved[:3]}")
            if (
                statuses.get("delivered", 0) != storm["notifications"]
                or sum(statuses.values()) != storm["notifications"]
            ):
                failures.append(
                    f"storm: deliveries {dict(statuses)}, expected all {storm['notifications']} delivered"
                )
            if storm["poisoned"] or storm["error_count"]:
                failures.append(
                    f"storm: {storm['poisoned']} poisoned messages, {storm['error_count']} errors"
                )
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        stack.stop()
    for name, value in figures.items():
        print(f"{name}: {value}", flush=True)
    for failure in failures:
        log(f"FAILED {failure}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.alerts_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--iterations", type=int, default=200, help="measured raw/ours pairs (0: skip)")
    parser.add_argument("--warmup", type=int, default=20, help="pairs run first and not measured")
    parser.add_argument("--alerts", type=int, default=10_000, help="storm firings (0: skip the storm)")
    parser.add_argument("--problems", type=int, default=100, help="storm correlation keys")
    parser.add_argument("--workers", type=int, default=12, help="storm worker threads")
    parser.add_argument(
        "--correlation",
        default="per-rule-and-ci",
        choices=("per-rule-and-ci", "per-rule"),
        help="the storm connection's correlation (per-rule with --cis > 1: many resources, one rule)",
    )
    parser.add_argument(
        "--servicenow-delay",
        type=float,
        default=0.0,
        help="seconds the loopback ServiceNow takes per API call",
    )
    parser.add_argument("--cis", type=int, default=1, help="configuration items per storm problem")
    parser.add_argument("--role", choices=("overhead", "storm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return run_role(args)
    return lab(args)


if __name__ == "__main__":
    sys.exit(main())
