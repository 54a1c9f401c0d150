"""Fencing with real processes: a send worker cut off from the database.

Two send workers, each with its own relay (so every delivery is attributable),
one balancer; the victim's database traffic goes through a TcpProxy
(tests/harness/proxy.py) that the test cuts (connections closed, new ones refused) or
blackholes (connections stay open, every byte is dropped) for longer than
``heartbeat_timeout`` while the victim's relay stays up, then heals. The
balancer reclaims the victim's batches and the peer delivers them; the victim
must stop handing messages to its relay before that (self-fencing) and must
not resume the reclaimed rows after the heal.

Also here: the journal replay after a SIGKILL while outcomes are only in the
journal (the outcome writer is held on a row lock, as in scenario 7b).
Figures are printed (run with -s).
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.harness.cluster import Cluster, MariaDB, SmtpSink, account
from tests.harness.helpers import make_newsletter, wait_for
from tests.harness.proxy import TcpProxy

pytestmark = pytest.mark.slow

SMALL_HTML = "<p>Hej {{ first_name }} fra {{ city }}</p>"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*", re.MULTILINE)


@pytest.fixture
def cluster(cluster: Cluster) -> Cluster:
    """The tier's cluster (tests/cluster/conftest.py), with a short read timeout."""
    # A blackholed query is given up after 2 s (the default is 10 s).
    cluster.configure(database={"read_timeout": 2})
    return cluster


def _logged_at(log: str, text: str) -> float | None:
    """Wall-clock time of the first log line containing ``text``."""
    for line in log.splitlines():
        if text in line:
            found = LOG_TIME.match(line)
            if found:
                return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _victim_batches_assigned(cluster: Cluster, worker_id: int) -> int:
    return int(cluster.sql("SELECT COUNT(*) AS n FROM batches WHERE worker_id = %s AND "
                           "state = 'assigned'", (worker_id,))[0]["n"])


@pytest.mark.parametrize("fault", ["cut", "blackhole"])
def test_partitioned_send_worker_fences_itself_and_never_resumes_reclaimed_rows(
        cluster: Cluster, mariadb: MariaDB, fault: str) -> None:
    n = 3000
    b = cluster.config.balancer
    limit = b.heartbeat_timeout / 2
    with SmtpSink() as victim_relay, SmtpSink() as peer_relay, \
            TcpProxy("127.0.0.1", mariadb.port) as proxy:
        cluster.use_relays(peer_relay)
        # Small backlogs: the reclaimed rows reach the peer within the partition.
        cluster.configure(balancer={"horizon_seconds": 3})
        window = cluster.config.sending.connections  # one relay per worker
        nid = make_newsletter(cluster.env, n, html=SMALL_HTML, text=None)
        cluster.merge_all(nid)
        victim_config = cluster.variant(
            "victim", database={"port": proxy.port},
            sending={"relays": str(victim_relay.relay)})
        cluster.spawn("send-balancer", "b")
        victim = cluster.spawn("send-worker", "victim", "--max-rate", "120",
                               config=victim_config)
        cluster.spawn("send-worker", "peer", "--max-rate", "120")
        wait_for(lambda: victim_relay.messages >= 300
                 and cluster.backlog("send-worker", "victim") >= 50,
                 60, "the victim sending with a batch in hand", 0.02)
        victim_id = int(cluster.worker("send-worker", "victim")["id"])  # type: ignore[index]
        held = cluster.backlog("send-worker", "victim")

        cut_at = time.time()
        proxy.cut() if fault == "cut" else proxy.blackhole()
        wait_for(lambda: _victim_batches_assigned(cluster, victim_id) == 0, 30,
                 "the victim's batches reclaimed", 0.05)
        reclaimed_at = time.time()
        time.sleep(max(0.0, cut_at + 2 * b.heartbeat_timeout + 2 - time.time()))
        heal_at = time.time()
        proxy.heal()

        wait_for(lambda: cluster.finished(nid), 90, "all final", 0.3)
        victim_alive = victim.alive()
        cluster.stop()
        acc = account(cluster, nid, victim_relay, peer_relay)
        log = victim.log()
        fenced_at = _logged_at(log, "self-fenced")
        lifted_at = _logged_at(log, "fence lifted")
        by_victim = victim_relay.accepted_at
        before_cut = sum(t < cut_at for t in by_victim)
        cut_to_fence = sum(cut_at <= t < (fenced_at or heal_at) for t in by_victim)
        during_fence = sum((fenced_at or cut_at) <= t < heal_at for t in by_victim)
        after_heal = sum(t >= heal_at for t in by_victim)
        print(f"\n[fencing {fault}] {n} recipients, victim held {held} at the cut; "
              f"self-fenced {((fenced_at or 0) - cut_at):.2f}s after the cut (limit "
              f"{limit:g}s); batches reclaimed {reclaimed_at - cut_at:.2f}s after the cut "
              f"(timeout {b.heartbeat_timeout:g}s); healed after {heal_at - cut_at:.1f}s, "
              f"fence lifted {((lifted_at or 0) - heal_at):.2f}s after the heal; victim "
              f"deliveries: {before_cut} before the cut, {cut_to_fence} cut->fence, "
              f"{during_fence} during the fence, {after_heal} after the heal; lost "
              f"{acc.lost}, duplicates {acc.duplicates} (window {window})")
        assert victim_alive, log[-3000:]
        assert acc.lost == 0 and acc.strangers == 0, cluster.logs()[-6000:]
        assert acc.duplicates <= window
        assert fenced_at is not None, log[-3000:]
        assert fenced_at - cut_at <= limit + 0.5
        assert reclaimed_at > fenced_at
        assert during_fence == 0
        # Whatever was on the wire at the cut finished within a moment of it.
        assert not [t for t in by_victim if cut_at + 1.0 <= t < heal_at]
        assert "were reclaimed while it was cut off" in log
        assert lifted_at is not None and lifted_at >= heal_at
        cluster.assert_kept_counts()  # kept counts == COUNT(*) by state, and the rest


def test_journal_replay_after_sigkill_resends_nothing(cluster: Cluster) -> None:
    """SIGKILL while the relay's 250s are only in the journal (the outcome
    writer waits on a row lock), restart: the replay writes them, the sink sees
    no resend."""
    n = 600
    with SmtpSink() as sink:
        cluster.use_relays(sink)
        nid = make_newsletter(cluster.env, n, html=SMALL_HTML, text=None)
        cluster.merge_all(nid)
        cluster.spawn("send-balancer", "b")
        worker = cluster.spawn("send-worker", "w", "--max-rate", "100")
        wait_for(lambda: sink.messages >= 100 and cluster.backlog("send-worker", "w") >= 50,
                 30, "sending under way with a batch in hand", 0.02)
        blocker, _thread = cluster.block_outcome_writes(
            nid, "the outcome writer waiting on the row lock")
        time.sleep(0.3)  # the worker's window fills; nothing more goes out
        journaled = sum(len(p.read_text().splitlines())
                        for p in (cluster.tmp / "journal").glob("send-w*.journal"))
        at_kill = sink.messages
        worker.kill()
        blocker.rollback()
        blocker.close()
        restarted = cluster.spawn("send-worker", "w", "--max-rate", "100")
        wait_for(lambda: cluster.finished(nid), 60, "all final", 0.3)
        cluster.stop()
        acc = account(cluster, nid, sink)
        found = re.search(r"replayed (\d+) journal entries", restarted.log())
        replayed = int(found.group(1)) if found else 0
        print(f"\n[journal replay] killed at {at_kill} deliveries with {journaled} journal "
              f"lines; replayed {replayed} entries on restart; lost {acc.lost}, "
              f"duplicates {acc.duplicates}")
        assert replayed >= 1 and replayed == journaled
        assert acc.lost == 0 and acc.strangers == 0
        assert acc.duplicates == 0
        cluster.assert_kept_counts()  # kept counts == COUNT(*) by state, and the rest
