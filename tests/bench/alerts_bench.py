"""Alert-path benchmark: webhook-to-incident overhead against plain clients, and an alert storm.

    .venv/bin/python -m tests.bench.alerts_bench [--iterations 200] [--alerts 10000] [--problems 100]
                                                 [--processes 2] [--workers 6]

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
* ``alerts.cpu_ms_per_incident`` / ``alerts.cpu_ms_per_coalesced``: median CPU of the app's process
  (``time.process_time``; the loopback servers run elsewhere) from the webhook call to the return of
  ``deliver_alert``, for an alert that creates an incident (the overhead alerts), and for a re-fire
  of one open problem that is only counted (``--iterations`` of them after the overhead run, each
  checked to have ended ``coalesced``). Targets: <= 12 and <= 5.
* ``alerts.overhead_ratio_realistic``: the overhead ratio again (``--realistic-iterations`` pairs)
  with a region's latency injected: 5 ms per Table Storage call (``tests/bench/latency.py``, a
  delaying TCP proxy in front of Azurite, for the app and the raw path alike), 150 ms per
  ServiceNow API call (the loopback's ``delay_seconds``), and a CI that is not in the CMDB (so a
  connector that looked it up before every create would pay a ServiceNow round trip). Target: <= 1.15.
* ``alerts.storm_alerts_per_s``: notifications (firings + resolutions) over the wall time from the
  first webhook call until the Azurite queue is empty after the resolutions.
* ``alerts.storm_alerts_per_cpu_s``: notifications per CPU second of the app in all worker
  processes: the thread CPU inside the webhook and ``deliver_alert`` calls (the host's queue work,
  send / receive / delete, is not the app's and goes to stderr with the whole processes' CPU).
  Target: >= 100.
* ``alerts.storm_peak_rss_mb``: the largest ``VmHWM`` of the storm's worker processes.
* ``alerts.speed_index`` / ``alerts.load_avg``: the machine's speed and load (``tests/bench/machine.py``).

A missed target is said on stderr (``MISSED ...``) and the process exits 1.

The storm runs ``--processes`` worker processes (default 2) of ``--workers`` threads each, as a
scaled-out host: each sends its share of the webhooks, its output message going to the real
Azurite queue, and takes messages from that queue for ``deliver_alert`` (see ``QueueWorker``). The
firings go first; once the queue is empty the resolutions follow (a resolution minutes later, as
in life, not racing the firings of its own problem through the queue).

Layout. This process is the lab: it runs ``LoopbackStack`` (Azurite in its own Node process, the
loopback Entra ID, Key Vault and ServiceNow as threads here) and counts what reached ServiceNow and
the tables. The app runs in child processes that play the Functions host (``--role overhead`` and
``--role storm``): they get ``stack.app_environment()`` as their environment, so ``function_app.app``
builds its real clients against the stack exactly as it would in Azure. The loopback servers thus
do not share the app's interpreter (its GIL), and the storm's peak RSS is the app's own.

The queue hop of the overhead figures: the message ``receive_alert`` writes to its queue output
binding is handed straight to ``deliver_alert`` as a ``func.QueueMessage`` (hostsim
``send_outputs=False`` + ``call_queue``), not sent through the Azurite queue: the queue is the
Functions host's transport (its polling latency is not the app's work). In the storm a delivery
that raises is made visible again after 1 s (host.json says 30 s) with its dequeue count raised, up
to ``maxDequeueCount`` (5), then counted as poisoned, as the host would do.

Variants (not the figures of record; the checks still apply): ``--servicenow-delay 0.5`` makes every
ServiceNow API call slow as a real instance's; ``--correlation per-rule --cis 20`` makes each
problem one rule firing on 20 resources; ``--problems 1`` is a storm on one hot problem.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import queue
import random
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

from tests.bench.machine import Targets, peak_rss_mb, print_machine

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "alerts" / "metric_fired.json"

OVERHEAD_CONNECTION = "bench-overhead"
STORM_CONNECTION = "bench-storm"
OVERHEAD_CI = "vm-bench-01"
MISSING_CI = "vm-not-in-cmdb-01"
"""The realistic overhead run's CI: not in the CMDB, as for many alerts (a CI the connector may
not create), so every create is asked whether it must look the CI up again."""
REALISTIC_TABLE_DELAY = 0.005
REALISTIC_SERVICENOW_DELAY = 0.150
REALISTIC_RATIO_TARGET = 1.15
STORM_TAG = "storm-rule-"
OVERHEAD_TAG = "overhead-rule-"
RAW_TAG = "raw-rule-"
RAW_TABLE = "BenchRawAlerts"
MAX_DEQUEUE_COUNT = 5  # host.json extensions.queues.maxDequeueCount
REDELIVERY_PAUSE_S = 0.5  # stands in for the host's visibility timeout before a retry
RATIO_TARGET = 1.3
WRITES_PER_PROBLEM = 3
CPU_MS_INCIDENT_TARGET = 12.0
CPU_MS_COALESCED_TARGET = 5.0
STORM_PER_CPU_S_TARGET = 100.0

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

    def run(self, index: int, body: bytes, ci: str = OVERHEAD_CI) -> None:
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
                "short_description": f"[{alert['severity']}] {alert['alertRule']} on {ci}",
                "description": f"{alert['description']}\n\n{json.dumps(alert, indent=1)}",
                "impact": "2",
                "urgency": "2",
                "cmdb_ci": ci,
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


def role_overhead(
    iterations: int, warmup: int, ci: str = OVERHEAD_CI, coalesced: bool = True
) -> dict[str, Any]:
    payloads = Payloads()
    app = AppHost()
    raw = RawPath()
    created = probe_creates(OVERHEAD_CONNECTION)
    t0 = datetime.now(UTC) - timedelta(minutes=5)
    raw_times: list[float] = []
    to_incident: list[float] = []
    to_return: list[float] = []
    incident_cpu: list[float] = []

    def body(tag: str, index: int) -> bytes:
        return payloads.body(
            rule=f"{tag}{index:05d}",
            ci=ci,
            alert_id=str(uuid.uuid4()),
            fired_at=t0 + timedelta(milliseconds=index),
        )

    try:
        for index in range(warmup + iterations):
            raw_body = body(RAW_TAG, index)
            start = time.perf_counter()
            raw.run(index, raw_body, ci)
            raw_elapsed = time.perf_counter() - start

            our_body = body(OVERHEAD_TAG, index)
            creates_before = len(created)
            cpu_start = time.process_time()
            start = time.perf_counter()
            message = app.webhook(OVERHEAD_CONNECTION, our_body)
            if message is None:
                raise RuntimeError("a new alert was taken for a duplicate: nothing was queued")
            app.deliver(message)
            returned = time.perf_counter()
            cpu = time.process_time() - cpu_start
            if len(created) != creates_before + 1:
                raise RuntimeError(
                    f"alert {index} made {len(created) - creates_before} incident creates, not 1"
                )
            if index >= warmup:
                raw_times.append(raw_elapsed)
                to_incident.append(created[-1] - start)
                to_return.append(returned - start)
                incident_cpu.append(cpu)
        coalesced_cpu = coalesced_cpu_s(app, payloads, t0, iterations) if coalesced else [0.0]
    finally:
        raw.close()
    return {
        "cpu_ms_per_incident": _median_ms(incident_cpu),
        "cpu_ms_per_coalesced": _median_ms(coalesced_cpu),
        "raw_ms": _median_ms(raw_times),
        "ours_ms": _median_ms(to_incident),
        "ours_return_ms": _median_ms(to_return),
        "raw_p90_ms": _percentile_ms(raw_times, 0.9),
        "ours_p90_ms": _percentile_ms(to_incident, 0.9),
        "ratio": statistics.median(to_incident) / statistics.median(raw_times),
        "ratio_return": statistics.median(to_return) / statistics.median(raw_times),
        "samples": len(to_incident),
    }


def coalesced_cpu_s(app: AppHost, payloads: Payloads, t0: datetime, iterations: int) -> list[float]:
    """CPU seconds of this process (the app) per re-fire of one open problem that is only counted:
    the webhook and the delivery, each checked afterwards (untimed) to have ended ``coalesced``."""
    from shared_code.bootstrap import get_container
    from shared_code.domain.delivery import DeliveryStatus

    deliveries = get_container().deliveries
    alert_id = str(uuid.uuid4())

    def refire(index: int) -> tuple[str, float]:
        body = payloads.body(
            rule=f"{OVERHEAD_TAG}coalesce",
            ci=OVERHEAD_CI,
            alert_id=alert_id,
            fired_at=t0 + timedelta(seconds=1, milliseconds=index),
        )
        cpu_start = time.process_time()
        message = app.webhook(OVERHEAD_CONNECTION, body)
        if message is None:
            raise RuntimeError("a new firing was taken for a duplicate: nothing was queued")
        app.deliver(message)
        return json.loads(message)["deliveryId"], time.process_time() - cpu_start

    refire(0)  # opens the problem (its incident, a note time): every later firing is counted
    samples: list[float] = []
    for index in range(1, iterations + 1):
        delivery_id, cpu = refire(index)
        done = deliveries.get(OVERHEAD_CONNECTION, delivery_id)
        if (
            done is None
            or done.status is not DeliveryStatus.DELIVERED
            or not done.outcome.startswith("coalesced")
        ):
            raise RuntimeError(
                f"re-fire {index} was not coalesced: {done.outcome if done else 'no delivery'}"
            )
        samples.append(cpu)
    return samples


@dataclass(frozen=True)
class Notification:
    problem: int
    ci: int
    alert_id: str
    fired_at: datetime
    resolved_at: datetime | None = None


def storm_plan(
    alerts: int, problems: int, cis: int, base: datetime, seed: int = 20261101
) -> list[Notification]:
    """``alerts`` firings spread over ``problems`` keys within one minute, shuffled; then one
    resolution per problem. Each problem is one alert that keeps notifying (a distinct fired time
    per notification, so each is a new delivery): the problem resolves when that alert does."""
    rng = random.Random(seed)
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


class QueueWorker:
    """One worker process of the storm, as the Functions host runs the app: webhook calls, and
    queue-triggered deliveries fed from the real Azurite queue (a poller takes up to 32 messages a
    receive while fewer than 16 wait, as host.json's batch size; a message is deleted after its
    delivery returns, made visible again 1 s after one that raised, and counted as poisoned after
    ``MAX_DEQUEUE_COUNT`` attempts). The host's own queue work (send, receive, delete) is not the
    app's CPU: ``app_cpu_s`` sums the thread CPU inside the function calls only, ``process_cpu_s``
    is the whole process, plumbing included."""

    def __init__(self, app: AppHost, payloads: Payloads, workers: int) -> None:
        from azure.storage.queue import QueueClient

        from shared_code.state.queues import ALERT_QUEUE

        self.app = app
        self.payloads = payloads
        self.workers = workers
        self.queue = QueueClient.from_connection_string(os.environ["AzureWebJobsStorage"], ALERT_QUEUE)  # noqa: SIM112 - the app setting
        self.local: queue.Queue[Any] = queue.Queue()
        self.stats = StormStats()
        self.app_cpu_s = 0.0
        self.stop = threading.Event()
        self.take = threading.Lock()
        self.pending: Iterator[Notification] = iter(())
        self.sent = 0

    def _add_cpu(self, seconds: float) -> None:
        with self.stats.lock:
            self.app_cpu_s += seconds

    def poll(self) -> None:
        idle = 0.05
        while not self.stop.is_set():
            if self.local.qsize() >= 16:
                time.sleep(0.01)
                continue
            batch = list(
                self.queue.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=30)
            )
            for message in batch:
                self.local.put(message)
            if batch:
                idle = 0.05
            else:
                time.sleep(idle)
                idle = min(idle * 2, 1.0)

    def deliver(self, message: Any) -> None:
        dequeue_count = message.dequeue_count or 1
        cpu, start = time.thread_time(), time.perf_counter()
        try:
            self.app.deliver(message.content, dequeue_count)
        except Exception as exc:  # the host logs it and delivers the message again later
            self._add_cpu(time.thread_time() - cpu)
            with self.stats.lock:
                self.stats.redeliveries[type(exc).__name__] += 1
                if len(self.stats.redelivery_causes) < 5:
                    self.stats.redelivery_causes.append(f"{exc} (dequeue count {dequeue_count})")
            if dequeue_count >= MAX_DEQUEUE_COUNT:
                with self.stats.lock:
                    self.stats.poisoned += 1
                self.queue.delete_message(message)
            else:
                self.queue.update_message(message, visibility_timeout=1)
            return
        self._add_cpu(time.thread_time() - cpu)
        with self.stats.lock:
            self.stats.deliver_s.append(time.perf_counter() - start)
        self.queue.delete_message(message)

    def webhook(self, item: Notification) -> None:
        body = self.payloads.body(
            rule=f"{STORM_TAG}{item.problem:03d}",
            ci=f"vm-storm-{item.problem:03d}-{item.ci:02d}",
            alert_id=item.alert_id,
            fired_at=item.fired_at,
            resolved_at=item.resolved_at,
        )
        cpu, start = time.thread_time(), time.perf_counter()
        message = self.app.webhook(STORM_CONNECTION, body)
        self._add_cpu(time.thread_time() - cpu)
        with self.stats.lock:
            self.stats.webhook_s.append(time.perf_counter() - start)
        if message is None:
            with self.stats.lock:
                self.stats.duplicates += 1
            return
        self.queue.send_message(message)  # the host's output binding

    def work(self) -> None:
        while not self.stop.is_set():
            try:
                try:
                    self.deliver(self.local.get_nowait())
                    continue
                except queue.Empty:
                    pass
                with self.take:
                    item = next(self.pending, None)
                if item is not None:
                    try:
                        self.webhook(item)
                    finally:  # a failed webhook call is taken too (its error is counted below)
                        with self.take:
                            self.sent += 1
                    continue
                try:
                    self.deliver(self.local.get(timeout=0.2))
                except queue.Empty:
                    continue
            except Exception as exc:
                with self.stats.lock:
                    self.stats.errors.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.poll, name="storm-poller", daemon=True)]
        threads += [
            threading.Thread(target=self.work, name=f"storm-{n}", daemon=True) for n in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        return threads


def role_storm(args: argparse.Namespace) -> dict[str, Any]:
    """A storm worker process: READY once warm, then ``fire`` / ``resolve`` (its share of each
    phase, answered ``SENT <phase>`` once its webhooks are done) and ``stop`` on stdin."""
    from shared_code.bootstrap import get_container

    payloads = Payloads()
    app = AppHost()
    # warm-up, outside the measurement: tables created, connection cached, OAuth token fetched
    container = get_container()
    connection = container.connections.get(STORM_CONNECTION)
    container.connector_for(connection).check()
    _ = container.correlations, container.deliveries, container.alert_delivery
    races = probe_races()

    plan = storm_plan(args.alerts, args.problems, args.cis, datetime.fromisoformat(args.storm_base))
    mine = [item for index, item in enumerate(plan) if index % args.processes == args.worker_index]
    phases = {
        "fire": [item for item in mine if item.resolved_at is None],
        "resolve": [item for item in mine if item.resolved_at is not None],
    }
    worker = QueueWorker(app, payloads, args.workers)
    rss_before = peak_rss_mb()
    print("READY", flush=True)
    threads: list[threading.Thread] = []
    cpu_start = time.process_time()
    for line in sys.stdin:
        command = line.strip()
        if command == "stop":
            break
        if not threads:
            cpu_start = time.process_time()
            threads = worker.start()
        items = phases[command]
        with worker.take:
            worker.sent = 0
            worker.pending = iter(items)
        deadline = time.monotonic() + 900
        while True:
            with worker.take:
                if worker.sent >= len(items):
                    break
            if time.monotonic() > deadline:  # bounded: a stuck sender must not hang the benchmark
                raise RuntimeError(f"the storm's {command} webhooks were not all sent in 15 minutes")
            time.sleep(0.02)
        print(f"SENT {command}", flush=True)
    worker.stop.set()
    for thread in threads:
        thread.join(timeout=30)
    stats = worker.stats
    return {
        "app_cpu_s": worker.app_cpu_s,
        "process_cpu_s": time.process_time() - cpu_start,
        "notifications": len(mine),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_storm_mb": rss_before,
        "webhook_s": stats.webhook_s,
        "deliver_s": stats.deliver_s,
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
        result = role_overhead(args.iterations, args.warmup, args.ci, coalesced=not args.no_coalesced)
    else:
        result = role_storm(args)
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


def spawn(role: str, env: dict[str, str], args: argparse.Namespace, *extra: str) -> dict[str, Any]:
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
        *extra,
    ]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=1200, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {role} run failed with exit code {done.returncode}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return dict(json.loads(lines[-1]))


def storm_argv(args: argparse.Namespace, index: int, base: datetime) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.bench.alerts_bench",
        "--role",
        "storm",
        "--alerts",
        str(args.alerts),
        "--problems",
        str(args.problems),
        "--workers",
        str(args.workers),
        "--cis",
        str(args.cis),
        "--processes",
        str(args.processes),
        "--worker-index",
        str(index),
        "--storm-base",
        base.isoformat(),
    ]


def run_storm(stack: Any, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """``--processes`` worker processes over the real Azurite queue: the firings, the queue drained
    (every message deleted: delivered or poisoned), then the resolutions, drained too."""
    from shared_code.state.queues import ALERT_QUEUE

    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    alert_queue = stack.queues().get_queue_client(ALERT_QUEUE)
    with contextlib.suppress(Exception):
        alert_queue.create_queue()
    procs = [
        subprocess.Popen(
            storm_argv(args, index, base),
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for index in range(args.processes)
    ]
    try:

        def expect(proc: subprocess.Popen[str], line: str) -> None:
            assert proc.stdout is not None
            got = proc.stdout.readline().strip()
            if got != line:
                raise RuntimeError(f"a storm worker answered {got!r}, not {line!r} (exit code {proc.poll()})")

        def command(text: str) -> None:
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(text + "\n")
                proc.stdin.flush()

        for proc in procs:
            expect(proc, "READY")
        start = time.perf_counter()
        for phase in ("fire", "resolve"):
            command(phase)
            for proc in procs:
                expect(proc, f"SENT {phase}")
            deadline = time.monotonic() + 900
            while alert_queue.get_queue_properties().approximate_message_count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the storm's {phase} messages were not all taken in 15 minutes")
                time.sleep(0.1)
        wall = time.perf_counter() - start
        command("stop")
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"a storm worker failed with exit code {proc.returncode}")
            reports.append(json.loads([line for line in out.splitlines() if line.strip()][-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    webhook = [t for r in reports for t in r["webhook_s"]]
    deliver = [t for r in reports for t in r["deliver_s"]]
    notifications = sum(r["notifications"] for r in reports)
    app_cpu = sum(r["app_cpu_s"] for r in reports)
    return {
        "app_cpu_s": app_cpu,
        "process_cpu_s": sum(r["process_cpu_s"] for r in reports),
        "notifications": notifications,
        "wall_s": wall,
        "alerts_per_s": notifications / wall,
        "alerts_per_cpu_s": notifications / app_cpu,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
        "rss_before_storm_mb": max(r["rss_before_storm_mb"] for r in reports),
        "webhook_median_ms": _median_ms(webhook) if webhook else 0.0,
        "webhook_p99_ms": _percentile_ms(webhook, 0.99) if webhook else 0.0,
        "deliver_median_ms": _median_ms(deliver) if deliver else 0.0,
        "deliver_p99_ms": _percentile_ms(deliver, 0.99) if deliver else 0.0,
        "redeliveries": dict(sum((Counter(r["redeliveries"]) for r in reports), Counter())),
        "redelivery_causes": [c for r in reports for c in r["redelivery_causes"]][:5],
        "correlation_writes": dict(sum((Counter(r["correlation_writes"]) for r in reports), Counter())),
        "poisoned": sum(r["poisoned"] for r in reports),
        "duplicates": sum(r["duplicates"] for r in reports),
        "errors": [e for r in reports for e in r["errors"]][:20],
        "error_count": sum(r["error_count"] for r in reports),
    }


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


def realistic_overhead(
    stack: Any, env: dict[str, str], args: argparse.Namespace, targets: Targets, failures: list[str]
) -> dict[str, str]:
    """The overhead run again with a region's latency: 5 ms per table call (a delaying proxy in
    front of Azurite), 150 ms per ServiceNow call, and a CI that is not in the CMDB."""
    from tests.bench.latency import DelayProxy

    log(
        f"realistic overhead: {args.warmup // 4 + 1} warm-up + {args.realistic_iterations} pairs, "
        f"{REALISTIC_TABLE_DELAY * 1000:.0f} ms per table call, "
        f"{REALISTIC_SERVICENOW_DELAY * 1000:.0f} ms per ServiceNow call, "
        f"CI {MISSING_CI!r} not in the CMDB ..."
    )
    with DelayProxy(stack.azurite.table_port, REALISTIC_TABLE_DELAY) as proxy:
        slow_env = dict(env)
        slow_env["AzureWebJobsStorage"] = env["AzureWebJobsStorage"].replace(
            f":{stack.azurite.table_port}/", f":{proxy.port}/"
        )
        if slow_env["AzureWebJobsStorage"] == env["AzureWebJobsStorage"]:
            raise RuntimeError("the storage connection string names no table endpoint to delay")
        stack.servicenow.delay_seconds = REALISTIC_SERVICENOW_DELAY
        try:
            run_args = argparse.Namespace(**{**vars(args), "iterations": args.realistic_iterations})
            run_args.warmup = args.warmup // 4 + 1
            result = spawn("overhead", slow_env, run_args, "--ci", MISSING_CI, "--no-coalesced")
        finally:
            stack.servicenow.delay_seconds = 0.0
    log(
        f"realistic overhead: raw median {result['raw_ms']:.1f} ms (p90 {result['raw_p90_ms']:.1f}); ours to "
        f"the incident {result['ours_ms']:.1f} ms (p90 {result['ours_p90_ms']:.1f}); to the return of "
        f"deliver_alert {result['ours_return_ms']:.1f} ms (ratio {result['ratio_return']:.3f}); "
        f"{result['samples']} samples"
    )
    if stack.servicenow.find("cmdb_ci", name=MISSING_CI):
        failures.append(
            f"realistic overhead: {MISSING_CI} was created in the CMDB; the run measured a found CI"
        )
    targets.check("alerts.overhead_ratio_realistic", result["ratio"], "<=", REALISTIC_RATIO_TARGET)
    return {"alerts.overhead_ratio_realistic": f"{result['ratio']:.3f}"}


def lab(args: argparse.Namespace) -> int:
    from tests.loopback.stack import LoopbackStack

    failures: list[str] = []
    figures: dict[str, str] = {}
    targets = Targets()
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
            # one incident per alert, plus the coalesce phase's one problem (its re-fires are counted)
            expected = args.warmup + args.iterations + 1
            o = overhead
            log(
                f"overhead: raw median {o['raw_ms']:.2f} ms (p90 {o['raw_p90_ms']:.2f}); ours to the "
                f"incident created {o['ours_ms']:.2f} ms (p90 {o['ours_p90_ms']:.2f}); ours to the return of "
                f"deliver_alert (delivery and correlation recorded) {o['ours_return_ms']:.2f} ms, ratio "
                f"{o['ratio_return']:.3f}; {o['samples']} samples; {made} incidents"
            )
            statuses, _ = delivery_statuses(stack, OVERHEAD_CONNECTION)
            if made != expected or statuses.get("delivered", 0) != expected + args.iterations:
                failures.append(
                    f"overhead: expected {expected} incidents and delivered alerts, "
                    f"found {made} incidents and deliveries {dict(statuses)}"
                )
            figures["alerts.overhead_ratio"] = f"{overhead['ratio']:.3f}"
            figures["alerts.cpu_ms_per_incident"] = f"{overhead['cpu_ms_per_incident']:.2f}"
            figures["alerts.cpu_ms_per_coalesced"] = f"{overhead['cpu_ms_per_coalesced']:.2f}"
            if overhead["ratio"] > RATIO_TARGET:
                log(f"overhead: ratio {overhead['ratio']:.3f} is over the target {RATIO_TARGET}")
            targets.check(
                "alerts.cpu_ms_per_incident", overhead["cpu_ms_per_incident"], "<=", CPU_MS_INCIDENT_TARGET
            )
            targets.check(
                "alerts.cpu_ms_per_coalesced", overhead["cpu_ms_per_coalesced"], "<=", CPU_MS_COALESCED_TARGET
            )

        if args.realistic_iterations > 0:
            figures |= realistic_overhead(stack, env, args, targets, failures)

        if args.alerts > 0:
            log(
                f"storm: {args.alerts} firings over {args.problems} problems, then {args.problems} "
                f"resolutions, {args.workers} workers ..."
            )
            stack.servicenow.reset_request_log()
            stack.servicenow.delay_seconds = args.servicenow_delay
            lab_cpu, azurite_cpu = time.process_time(), process_cpu_s(stack.azurite.pid)
            storm = run_storm(stack, env, args)
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
                f"storm: CPU seconds: app (inside its functions, {args.processes} processes) "
                f"{storm['app_cpu_s']:.1f}, the worker processes in all (queue plumbing included) "
                f"{storm['process_cpu_s']:.1f}, Azurite {azurite_cpu:.1f}, "
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
            figures["alerts.storm_alerts_per_cpu_s"] = f"{storm['alerts_per_cpu_s']:.1f}"
            figures["alerts.storm_peak_rss_mb"] = f"{storm['peak_rss_mb']:.1f}"
            targets.check(
                "alerts.storm_alerts_per_cpu_s", storm["alerts_per_cpu_s"], ">=", STORM_PER_CPU_S_TARGET
            )
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
    print_machine("alerts")
    for failure in failures:
        log(f"FAILED {failure}")
    return 1 if failures or targets.missed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.alerts_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--iterations", type=int, default=200, help="measured raw/ours pairs (0: skip)")
    parser.add_argument("--warmup", type=int, default=20, help="pairs run first and not measured")
    parser.add_argument("--alerts", type=int, default=10_000, help="storm firings (0: skip the storm)")
    parser.add_argument("--problems", type=int, default=100, help="storm correlation keys")
    parser.add_argument("--workers", type=int, default=6, help="storm worker threads per process")
    parser.add_argument("--processes", type=int, default=2, help="storm worker processes")
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--storm-base", default="", help=argparse.SUPPRESS)
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
    parser.add_argument(
        "--realistic-iterations",
        type=int,
        default=40,
        help="measured pairs with injected latency and a CI missing from the CMDB (0: skip)",
    )
    parser.add_argument("--role", choices=("overhead", "storm"), help=argparse.SUPPRESS)
    parser.add_argument("--ci", default=OVERHEAD_CI, help=argparse.SUPPRESS)
    parser.add_argument("--no-coalesced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return run_role(args)
    return lab(args)


if __name__ == "__main__":
    sys.exit(main())
