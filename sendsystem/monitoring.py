"""What the ops team's monitoring reads: Prometheus metrics and a Nagios-style check.

Metrics: a custom prometheus_client Collector that reads the database at
scrape time, registered in a CollectorRegistry built for the command (no
process-global registry, no state kept between scrapes). Every value is a
row count or a column the roles already write, so any host with database
access can export the whole cluster, and counters survive restarts of the
exporter and of the roles: ``sendsystem_deliveries_total`` *is* the number of
message rows in each final state. (The per-relay counters come from what each
live send worker reports in ``relay_health`` and start again at 0 when that
worker restarts; Prometheus' ``rate()`` handles counter resets.)

Label cardinality is bounded by design: workers (name, role, host), relays,
balancer kinds, message states and bounce kinds are small sets; newsletters
appear only while running; no label ever names a recipient. When the database
cannot be reached the scrape still answers, with ``sendsystem_up 0`` only, so
a textfile or a scrape says "down" instead of going stale.

Check: :func:`gather` reads the facts, :func:`evaluate` (pure) turns them and
the thresholds into a status and ONE output line with performance data, as
the Monitoring Plugins development guidelines describe. The default rate
thresholds: complaints from Gmail's and Yahoo's 2024 bulk-sender rules
(keep the spam rate below 0.1 %, never reach 0.3 %); bounces from Amazon SES'
published guidance (keep below 2 %; accounts are reviewed at 5 %).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from . import stats as stats_mod
from .config import CheckConfig, Config
from .db import Database
from .errors import SendSystemError
from .states import MESSAGE_STATES, worker_alive, worker_dead

log = logging.getLogger(__name__)

PREFIX = "sendsystem"
WORKER_STATES = ("starting", "running", "standby", "stopping", "stopped", "dead")
ROLES = ("sort", "send", "sort-balancer", "send-balancer")
KINDS = ("sort", "send")
OUTCOMES = ("sent", "bounced", "failed", "skipped", "cancelled")
RELAY_HEALTH = ("ok", "slowed", "quota reached", "set aside", "unknown")
BOUNCE_KINDS = ("hard", "soft", "blocked", "complaint", "autoreply", "unsubscribe", "unknown")


# ---------------------------------------------------------------- metrics


class SendSystemCollector:
    """Reads the database at every scrape. One connection, used by one scrape at a time
    (prometheus_client's server answers each request in its own thread)."""

    def __init__(self, db: Database, config: Config) -> None:
        self.db = db
        self.config = config
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                metrics = list(self._collect())
                up = 1.0
            except SendSystemError as exc:  # unreachable, or a schema that does not match
                log.warning("metrics: %s", exc)
                metrics, up = [], 0.0
        yield GaugeMetricFamily(f"{PREFIX}_up", "1 when the database answered this scrape",
                                value=up)
        yield from metrics

    def _collect(self) -> Iterator[Metric]:
        db = self.db
        timeout = self.config.balancer.heartbeat_timeout
        rows = db.fetchall("workers_all")
        by_state = GaugeMetricFamily(f"{PREFIX}_workers", "Workers by role and state "
                                     "(dead: no heartbeat within heartbeat_timeout, never "
                                     "said it stopped)", labels=["role", "state"])
        disabled = GaugeMetricFamily(f"{PREFIX}_workers_disabled",
                                     "Workers an operator disabled", labels=["role"])
        labels = ["worker", "role", "host"]
        up = GaugeMetricFamily(f"{PREFIX}_worker_up", "1 while the worker's heartbeat is "
                               "fresh and it has not stopped", labels=labels)
        rate = GaugeMetricFamily(f"{PREFIX}_worker_rate", "Messages per second the worker "
                                 "last reported", labels=labels)
        backlog = GaugeMetricFamily(f"{PREFIX}_worker_backlog", "Messages assigned to the "
                                    "worker and not yet done", labels=labels)
        age = GaugeMetricFamily(f"{PREFIX}_worker_heartbeat_age_seconds", "Seconds since "
                                "the worker's last heartbeat (database clock)", labels=labels)
        counts = {(role, state): 0 for role in ROLES for state in WORKER_STATES}
        off = dict.fromkeys(ROLES, 0)
        names: dict[int, tuple[str, str]] = {}
        alive_ids = set()
        for w in rows:
            hb = None if w["heartbeat_age"] is None else float(w["heartbeat_age"])
            alive = worker_alive(w["state"], hb, timeout)
            state = "dead" if worker_dead(w["state"], alive) else str(w["state"])
            role = str(w["role"])
            counts[(role, state)] = counts.get((role, state), 0) + 1
            if not int(w["enabled"]):
                off[role] = off.get(role, 0) + 1
            values = [str(w["name"]), role, str(w["host"])]
            names[int(w["id"])] = (str(w["name"]), str(w["host"]))
            if alive:
                alive_ids.add(int(w["id"]))
            up.add_metric(values, 1.0 if alive else 0.0)
            rate.add_metric(values, float(w["rate"] or 0.0))
            backlog.add_metric(values, float(w["backlog"]))
            if hb is not None:
                age.add_metric(values, hb)
        for (role, state), n in sorted(counts.items()):
            by_state.add_metric([role, state], n)
        for role, n in sorted(off.items()):
            disabled.add_metric([role], n)
        yield from (by_state, disabled, up, rate, backlog, age)

        holder = GaugeMetricFamily(f"{PREFIX}_balancer_lease_holder", "1 for the worker "
                                   "holding the balancer lease of its kind (unexpired)",
                                   labels=["kind", "worker", "host"])
        live = GaugeMetricFamily(f"{PREFIX}_balancer_live", "1 when the lease of the kind "
                                 "is held by a balancer with a live heartbeat", labels=["kind"])
        epoch = CounterMetricFamily(f"{PREFIX}_balancer_lease_takeovers", "Times the lease "
                                    "of the kind was taken (its epoch)", labels=["kind"])
        leases = stats_mod.leases(db)
        for kind in sorted(set(KINDS) | set(leases)):
            lease = leases.get(kind, {})
            held_by = lease.get("holder")
            if held_by is not None:
                holder.add_metric([kind, str(lease["holder_name"]), str(lease["holder_host"])],
                                  1.0)
            live.add_metric([kind], 1.0 if held_by in alive_ids else 0.0)
            epoch.add_metric([kind], float(lease.get("epoch", 0)))
        yield from (holder, live, epoch)

        messages = GaugeMetricFamily(f"{PREFIX}_newsletter_messages", "Messages of each "
                                     "running newsletter by state", labels=["newsletter", "state"])
        found: dict[int, dict[str, int]] = {}
        for r in db.fetchall("metrics_running_counts"):
            found.setdefault(int(r["newsletter_id"]), {})[str(r["state"])] = int(r["n"])
        for nid in sorted(found):
            for state in MESSAGE_STATES:
                messages.add_metric([str(nid), str(state)], found[nid].get(state, 0))
        yield messages

        deliveries = CounterMetricFamily(f"{PREFIX}_deliveries", "Messages by final outcome "
                                         "(rows in the database)", labels=["outcome"])
        deferrals = CounterMetricFamily(f"{PREFIX}_deferrals", "Temporary failures "
                                        "(4xx, timeouts) the messages went through")
        outcome = dict.fromkeys(OUTCOMES, 0)
        deferred = 0
        for r in db.fetchall("metrics_deliveries"):
            if r["state"] in outcome:
                outcome[r["state"]] = int(r["n"])
            deferred += int(r["deferrals"])
        purged = db.fetchone("metrics_purged_deliveries") or {}
        for name in OUTCOMES:
            outcome[name] += int(purged.get(name) or 0)
        deferred += int(purged.get("deferrals") or 0)
        for name in OUTCOMES:
            deliveries.add_metric([name], outcome[name])
        deferrals.add_metric([], deferred)
        yield from (deliveries, deferrals)

        yield from self._relays(timeout)

        verified = CounterMetricFamily(f"{PREFIX}_bounces", "Bounce and complaint reports "
                                       "with signed evidence, by kind", labels=["kind"])
        unverified = CounterMetricFamily(f"{PREFIX}_unverified_reports", "Reports without "
                                         "signed evidence (they changed nothing), by the kind "
                                         "they claimed", labels=["kind"])
        tally = {(k, v): 0 for k in BOUNCE_KINDS for v in (0, 1)}
        for r in db.fetchall("metrics_bounces"):
            key = (str(r["kind"]), int(r["verified"]))
            tally[key] = tally.get(key, 0) + int(r["n"])
        for (kind, v), n in sorted(tally.items()):
            (verified if v else unverified).add_metric([kind], n)
        yield from (verified, unverified)

    def _relays(self, timeout: float) -> Iterator[Metric]:
        relays = self.config.sending.relays
        health = GaugeMetricFamily(f"{PREFIX}_relay_health", "1 for the relay's current "
                                   "health (the worst any live send worker reports)",
                                   labels=["relay", "group", "health"])
        rate = GaugeMetricFamily(f"{PREFIX}_relay_rate", "Messages per second to the relay "
                                 "(live send workers, last 10 s)", labels=["relay"])
        quota = GaugeMetricFamily(f"{PREFIX}_relay_quota_used_today", "Messages counted "
                                  "against the relay's daily_quota today", labels=["relay"])
        per_worker = CounterMetricFamily(f"{PREFIX}_relay_deliveries", "Outcomes at the relay "
                                         "since each live send worker started",
                                         labels=["relay", "worker", "outcome"])
        for r in stats_mod.relays(self.db, relays, timeout) if relays else []:
            for h in RELAY_HEALTH:
                health.add_metric([r["relay"], r["group"], h], 1.0 if r["health"] == h else 0.0)
            rate.add_metric([r["relay"]], float(r["rate"]))
            if r["quota_used_today"] is not None:
                quota.add_metric([r["relay"]], float(r["quota_used_today"]))
        for r in self.db.fetchall("relay_health_all", {"timeout": timeout}):
            for name in ("sent", "deferred", "failed"):
                per_worker.add_metric([str(r["relay"]), str(r["worker"]), name], int(r[name]))
        yield from (health, rate, quota, per_worker)


def registry(db: Database, config: Config) -> CollectorRegistry:
    """A registry of its own holding only SendSystem's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SendSystemCollector(db, config))
    return reg


# ------------------------------------------------------------------ check

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")


@dataclass(frozen=True)
class Worker:
    name: str
    host: str
    role: str
    state: str
    enabled: bool
    alive: bool


@dataclass(frozen=True)
class Running:
    newsletter: int
    pending: int
    idle_seconds: float


@dataclass(frozen=True)
class LastFinished:
    newsletter: int
    delivered: int
    bounces: int  # verified hard + soft
    complaints: int  # verified


@dataclass(frozen=True)
class Facts:
    """Everything `check` judges, read from the database in one go."""

    live_balancers: dict[str, bool]  # kind -> a live worker holds its lease
    workers: list[Worker] = field(default_factory=list)
    running: list[Running] = field(default_factory=list)
    deferred: int = 0
    deferred_oldest_seconds: float = 0.0
    last: LastFinished | None = None


@dataclass(frozen=True)
class Result:
    status: int
    line: str


def gather(db: Database, heartbeat_timeout: float) -> Facts:
    workers = []
    alive_ids = set()
    for w in db.fetchall("workers_all"):
        hb = None if w["heartbeat_age"] is None else float(w["heartbeat_age"])
        alive = worker_alive(w["state"], hb, heartbeat_timeout)
        if alive:
            alive_ids.add(int(w["id"]))
        workers.append(Worker(str(w["name"]), str(w["host"]), str(w["role"]), str(w["state"]),
                              bool(w["enabled"]), alive))
    leases = stats_mod.leases(db)
    live = {kind: leases.get(kind, {}).get("holder") in alive_ids for kind in KINDS}
    running = [Running(int(r["id"]), int(r["pending"]), float(r["idle_seconds"] or 0.0))
               for r in db.fetchall("check_running")]
    d = db.fetchone("check_deferred") or {}
    last = None
    nid = db.fetchval("check_last_finished")
    if nid is not None:
        c = stats_mod.counts(db, int(nid))
        b = stats_mod.newsletter_bounces(db, int(nid))
        last = LastFinished(int(nid), c["sent"] + c["bounced"], int(b["hard"]) + int(b["soft"]),
                            int(b["complaint"]))
    return Facts(live, workers, running, int(d.get("n") or 0),
                 float(d.get("oldest_seconds") or 0.0), last)


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _level(value: float, warn: float, crit: float) -> int:
    return CRITICAL if value >= crit else WARNING if value >= warn else OK


def evaluate(facts: Facts, t: CheckConfig) -> Result:
    """The status and the one line (problems worst first, then perfdata)."""
    problems: list[tuple[int, str]] = []
    for kind in KINDS:
        if not facts.live_balancers.get(kind, False):
            problems.append((CRITICAL, f"no live {kind} balancer"))
    stalled = [r for r in facts.running if r.pending and r.idle_seconds >= t.stall_minutes * 60]
    for r in stalled:
        problems.append((CRITICAL, f"newsletter {r.newsletter} stalled: {r.pending} "
                             f"pending, nothing moved for {r.idle_seconds / 60:.0f} min"))
    dead = [w for w in facts.workers if worker_dead(w.state, w.alive)]
    disabled = [w for w in facts.workers if not w.enabled]
    if dead:
        problems.append((WARNING, f"{len(dead)} dead worker(s): "
                         + ", ".join(f"{w.name}@{w.host}" for w in dead)))
    if disabled:
        problems.append((WARNING, f"{len(disabled)} disabled worker(s): "
                         + ", ".join(f"{w.name}@{w.host}" for w in disabled)))
    if facts.deferred and facts.deferred_oldest_seconds >= t.deferred_minutes * 60:
        problems.append((WARNING, f"{facts.deferred} deferred, oldest waiting "
                         f"{facts.deferred_oldest_seconds / 60:.0f} min"))
    bounce_rate = complaint_rate = 0.0
    if facts.last is not None:
        last = facts.last
        bounce_rate = _pct(last.bounces, last.delivered)
        complaint_rate = _pct(last.complaints, last.delivered)
        if last.delivered >= t.min_delivered:
            level = _level(complaint_rate, t.complaint_warn, t.complaint_crit)
            if level:
                problems.append((level, f"newsletter {last.newsletter} complaint rate "
                                 f"{complaint_rate:.2f}% (limit {t.complaint_warn:g}/"
                                 f"{t.complaint_crit:g}%)"))
            level = _level(bounce_rate, t.bounce_warn, t.bounce_crit)
            if level:
                problems.append((level, f"newsletter {last.newsletter} bounce rate "
                                 f"{bounce_rate:.2f}% (limit {t.bounce_warn:g}/"
                                 f"{t.bounce_crit:g}%)"))
    status = max((p[0] for p in problems), default=OK)
    if problems:
        summary = "; ".join(text for _, text in sorted(problems, key=lambda p: -p[0]))
    else:
        alive = sum(w.alive for w in facts.workers)
        summary = (f"balancers live, {alive} workers alive, "
                   f"{len(facts.running)} newsletter(s) running")
    perf = [
        f"workers_alive={sum(w.alive for w in facts.workers)}",
        f"workers_dead={len(dead)};1",
        f"workers_disabled={len(disabled)};1",
        f"balancers_live={sum(facts.live_balancers.get(k, False) for k in KINDS)}"
        f";;{len(KINDS)}:",
        f"running={len(facts.running)}",
        f"stalled={len(stalled)};;1",
        f"deferred={facts.deferred}",
        f"deferred_oldest={facts.deferred_oldest_seconds:.0f}s;{t.deferred_minutes * 60:.0f}",
        f"bounce_rate={bounce_rate:.3f}%;{t.bounce_warn:g};{t.bounce_crit:g};0;100",
        f"complaint_rate={complaint_rate:.3f}%;{t.complaint_warn:g};{t.complaint_crit:g};0;100",
    ]
    return Result(status, f"SENDSYSTEM {STATUS_NAMES[status]} - {summary} | {' '.join(perf)}")


def unknown(reason: str) -> Result:
    return Result(UNKNOWN, f"SENDSYSTEM UNKNOWN - {reason}")


def critical(reason: str) -> Result:
    return Result(CRITICAL, f"SENDSYSTEM CRITICAL - {reason}")

