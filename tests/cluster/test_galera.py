"""The highly available database, proved on a private 3-node Galera cluster.

Every Galera test lives in this one module so a developer can run it alone:
``.venv/bin/pytest -s -q tests/cluster/test_galera.py``. The cluster (tests/harness/cluster.py,
:class:`Galera`) is three ``mariadbd`` processes on loopback with Debian's
galera-4 provider; `make test` installs galera-4 and rsync, so this runs in CI.
It is skipped, saying why, only when the provider is not installed.

The scenario: 20,000 recipients, two sort and two send balancers and two
workers of each kind spread over the nodes (each process's host list starts
with a different node); one node, holding both active balancers and one
worker of each kind, is SIGKILLed mid-send and left down. The newsletter must
finish while it is down, with nothing lost (counted at the SMTP sink) and
duplicates within the in-flight window of the send workers that lost their
node; at no moment may two balancers of one kind be active (sampled twice a
second through a surviving node). Then the node is restarted, rejoins
(IST), and nothing changes.

Test settings: heartbeat_timeout (= the lease) 8 s. A SIGKILLed Galera node
stalls every commit in the cluster until the others declare it gone
(evs.suspect_timeout, 3 s in the harness, 5 s by default): every heartbeat is
that much older afterwards, so heartbeat_timeout must exceed the stall by a
margin, or the balancer would reclaim the batches of live workers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.harness.cluster import Cluster, Galera, SmtpSink, account, galera_missing
from tests.harness.helpers import make_newsletter, wait_for

pytestmark = pytest.mark.slow

RECIPIENTS = 20_000
HEARTBEAT_TIMEOUT = 8.0
SMALL_HTML = "<p>Hej {{ first_name }} fra {{ city }}</p>"
BALANCER_ROLES = ("sort-balancer", "send-balancer")


@pytest.fixture(scope="module")
def galera(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Galera]:
    missing = galera_missing()
    if missing:
        pytest.skip(f"Galera tests need the galera-4 provider: {missing}")
    cluster = Galera()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(keep_logs=tmp_path_factory.mktemp("galera-logs"))


@dataclass
class Sampler:
    """Looks at workers and leases through a live node twice a second, in a thread.

    Records every violation of "at most one active balancer per kind": a kind
    with two valid lease holders (impossible by construction: one row), or
    two balancers of one kind reporting `running` with a fresh heartbeat.
    """

    galera: Galera
    db_name: str
    timeout: float
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    holders: list[tuple[float, str, int | None, int]] = field(default_factory=list)
    nodes: dict[str, list[tuple[float, str | None, float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.errors = [e.replace("\n", " ")[:200] for e in self.errors]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except (pymysql.err.MySQLError, RuntimeError) as exc:
                self.errors.append(f"{time.monotonic():.1f}: {exc}")
            self._stop.wait(0.5)

    def sample(self) -> None:
        # Through the nodes that stay up (a restarting node answers before it
        # has rejoined, and refuses queries until then).
        conn = self.galera.nodes[2].connect(self.db_name)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT kind, holder, epoch, expires_at >= NOW(6) AS valid "
                            "FROM leases")
                leases = list(cur.fetchall())
                cur.execute("SELECT id, role, name, state, db_node, "
                            "TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(6)) / 1e6 AS age "
                            "FROM workers")
                workers = list(cur.fetchall())
        finally:
            conn.close()
        now = time.monotonic()
        self.samples += 1
        valid = Counter(r["kind"] for r in leases if r["holder"] is not None and r["valid"])
        for kind, n in valid.items():
            if n > 1:
                self.violations.append(f"{now:.1f}: {n} valid {kind} leases")
        for r in leases:
            holder = int(r["holder"]) if r["holder"] is not None and r["valid"] else None
            last = [h for h in self.holders if h[1] == r["kind"]]
            if not last or last[-1][2:] != (holder, int(r["epoch"])):
                self.holders.append((now, r["kind"], holder, int(r["epoch"])))
        active = Counter(r["role"] for r in workers if r["role"] in BALANCER_ROLES
                         and r["state"] == "running" and float(r["age"]) <= self.timeout)
        for role, n in active.items():
            if n > 1:
                names = [r["name"] for r in workers if r["role"] == role
                         and r["state"] == "running" and float(r["age"]) <= self.timeout]
                self.violations.append(f"{now:.1f}: {role} active on {names}")
        for r in workers:
            key = f"{r['role']}/{r['name']}"
            self.nodes.setdefault(key, []).append((now, r["db_node"], float(r["age"])))

    def moved_at(self, key: str, away_from: str, after: float) -> float | None:
        """When ``key`` first heartbeated (fresh) from a node other than ``away_from``."""
        for at, node, age in self.nodes.get(key, []):
            if at > after and node not in (None, away_from) and age < 1.0:
                return at - after
        return None


def _status_json(cluster: Cluster) -> dict[str, Any]:
    code, out, err = cluster.cli("status", "--json", timeout=60)
    assert code == 0, err
    return dict(json.loads(out))


def _count(logs: str, pattern: str) -> int:
    return len(re.findall(pattern, logs))


def test_node_sigkilled_mid_send_loses_nothing_and_rejoins(galera: Galera,
                                                          tmp_path: Path) -> None:
    n = RECIPIENTS
    with SmtpSink() as sink:
        cluster = Cluster(galera, tmp_path)
        try:
            _run_scenario(galera, cluster, sink, n)
        finally:
            cluster.close()


def _run_scenario(galera: Galera, cluster: Cluster, sink: SmtpSink, n: int) -> None:
    cluster.use_relays(sink)
    cluster.configure(balancer={"heartbeat_timeout": HEARTBEAT_TIMEOUT})
    victim = galera.nodes[0]
    nid = make_newsletter(cluster.env, n, html=SMALL_HTML, text=None)

    def on(node: int) -> dict[str, str]:
        return {"SENDSYSTEM_DB_HOST": galera.host_list(node)}
    started = time.monotonic()
    # Both first balancers start on the victim's node and become active.
    for role in BALANCER_ROLES:
        cluster.spawn(role, "a", env=on(0))
    for role in BALANCER_ROLES:
        wait_for(lambda role=role: (cluster.worker(role, "a") or {}).get("state") == "running",
                 30, f"{role} a active")
    cluster.spawn("sort-balancer", "b", env=on(1))
    cluster.spawn("send-balancer", "b", env=on(2))
    cluster.spawn("sort-worker", "w1", env=on(0))
    cluster.spawn("sort-worker", "w2", env=on(1))
    cluster.spawn("send-worker", "w1", env=on(2))
    cluster.spawn("send-worker", "w2", env=on(0))
    on_victim = ["sort-balancer/a", "send-balancer/a", "sort/w1", "send/w2"]
    send_workers_on_victim = 1

    sampler = Sampler(galera, cluster.db_name, HEARTBEAT_TIMEOUT)
    sampler.start()
    try:
        wait_for(lambda: sink.messages >= n // 4, 240, "a quarter delivered", 0.1)
        before = _status_json(cluster)
        victim.kill()
        killed = time.monotonic()
        at_kill = sink.messages
        wait_for(lambda: cluster.finished(nid), 300, "every message final", 0.5)
        finished = time.monotonic()
        during = _status_json(cluster)
        assert not victim.running, "the newsletter must finish while the node is down"
        alive = {f"{p.command}/{p.name}": p.alive() for p in cluster.procs}
        states_down = cluster.states(nid)
        delivered_down = sink.messages

        # The node comes back: it rejoins (IST from a surviving donor).
        restarted = time.monotonic()
        victim.start()
        rejoin = time.monotonic() - restarted
        time.sleep(3)
        conn = victim.connect(cluster.db_name)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT state, COUNT(*) AS n FROM messages WHERE newsletter_id = %s"
                            " GROUP BY state", (nid,))
                states_rejoined = {r["state"]: int(r["n"]) for r in cur.fetchall()}
        finally:
            conn.close()
        states_after = cluster.states(nid)
        delivered_after = sink.messages
    finally:
        sampler.stop()
    cluster.stop()
    acc = account(cluster, nid, sink)
    logs = cluster.logs()
    transfer = victim.state_transfer()

    moved = {key: sampler.moved_at(key, victim.address, killed) for key in on_victim}
    takeovers = [(round(at - killed, 2), kind, holder, epoch)
                 for at, kind, holder, epoch in sampler.holders if at > killed]
    retries = {
        "statement retries (1213/1205)": _count(logs, r"lock conflict \("),
        "unit-of-work retries": _count(logs, r"the unit of work is retried"),
        "of which wsrep certification": _count(logs, r"wsrep aborted|WSREP"),
        "lease conflicts": _count(logs, r"lease not taken"),
        "node switches": _count(logs, r"database: now on node"),
    }
    window = cluster.config.sending.connections * len(cluster.config.sending.relays)
    bound = window * send_workers_on_victim
    print(f"\n[galera] {n} recipients; node {victim.name} ({victim.address}) SIGKILLed at "
          f"{at_kill} deliveries, {killed - started:.1f}s into the run; newsletter final "
          f"{finished - killed:.1f}s after the kill, run {finished - started:.1f}s in all "
          f"({n / (finished - started):.0f} msgs/s incl. start-up)")
    print(f"[galera] processes on the killed node heartbeating from another node after "
          f"{ {k: None if v is None else round(v, 2) for k, v in moved.items()} }s")
    print(f"[galera] lease changes after the kill (s, kind, holder, epoch): {takeovers}")
    print(f"[galera] {sampler.samples} samples, violations {sampler.violations}, sampler "
          f"errors {sampler.errors[:3]}{'...' if len(sampler.errors) > 3 else ''} "
          f"({len(sampler.errors)}); retries {retries}")
    print(f"[galera] rejoin ({transfer}) {rejoin:.1f}s; states while down {states_down}, "
          f"after rejoin {states_after}, on the rejoined node {states_rejoined}; deliveries "
          f"{delivered_down} -> {delivered_after}")
    print(f"[galera] lost {acc.lost}, duplicates {acc.duplicates} (bound {bound} = window "
          f"{window} x {send_workers_on_victim} send worker on the node)")

    assert all(alive.values()), f"a process died: {alive}\n{logs[-5000:]}"
    assert acc.lost == 0 and acc.strangers == 0
    assert acc.delivered - acc.duplicates == n
    assert acc.duplicates <= bound
    assert sampler.samples >= 10 and not sampler.violations, sampler.violations
    assert all(v is not None for v in moved.values()), f"stuck on the dead node: {moved}"
    for facts in (before, during):
        holders = {k: v["holder"] for k, v in facts["leases"].items()}
        assert set(holders) == {"sort", "send"}
        active = [w for w in facts["workers"] if w.get("active")]
        assert len(active) <= 2 and all(w["db_node"] for w in facts["workers"]
                                        if w["state"] != "stopped")
    assert states_rejoined == states_after == states_down
    assert delivered_after == delivered_down
    # Kept counts == COUNT(*) by state (and the rest), on every node: the
    # triggers' writes replicate with the rows, also to the node that rejoined.
    for node in galera.nodes:
        cluster.assert_kept_counts(node.address)
