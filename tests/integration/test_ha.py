"""The database host list and the balancer lease, on the test MariaDB.

The Galera cluster itself is exercised in tests/cluster/test_galera.py; these are
the mechanics underneath, against the machine's server: connecting past a
dead node, moving on when a connection dies, giving up when every node is
down, and the lease (take, renew, fence, release).
"""

from __future__ import annotations

import time
from dataclasses import replace

import pymysql
import pytest

from sendsystem.config import DatabaseConfig
from sendsystem.db import Database
from sendsystem.errors import DatabaseUnavailable
from sendsystem.roles.balancer import LeaseLost
from sendsystem.roles.sort_balancer import SortBalancer
from sendsystem.runner import RunOptions
from tests.harness.cluster import free_port
from tests.harness.env import Env, server_settings
from tests.harness.helpers import sql


def _hosts(env: Env, *hosts: str) -> DatabaseConfig:
    return replace(env.config.database, host=", ".join(hosts), connect_timeout=1.0)


def test_first_node_down_connects_to_the_next(env: Env) -> None:
    s = server_settings()
    dead = f"127.0.0.1:{free_port()}"
    db = Database(_hosts(env, dead, f"{s['host']}:{s['port']}"), retry_for=2)
    try:
        assert db.fetchval("db_now") is not None
        assert db.node_name == f"{s['host']}:{s['port']}"
        assert not db.galera
    finally:
        db.close()


def test_lost_connection_moves_on_to_the_next_node(env: Env) -> None:
    """Two names for the one server stand for two nodes: kill the connection
    (as a dying node does) and the next statement runs on the other one."""
    s = server_settings()
    first, second = f"{s['host']}:{s['port']}", f"localhost:{s['port']}"
    db = Database(_hosts(env, first, second), retry_for=5)
    try:
        victim = db.connection_id()
        assert db.node_name == first
        sql(env, f"KILL CONNECTION {int(victim)}")
        started = time.monotonic()
        assert db.connection_id() != victim
        assert db.node_name == second
        assert db.reconnects == 1
        # No back-off when another node is there to try.
        assert time.monotonic() - started < 1.0
        sql(env, f"KILL CONNECTION {int(db.connection_id())}")
        db.fetchval("db_now")
        assert db.node_name == first  # round robin
    finally:
        db.close()


def test_every_node_down_gives_up_naming_them(env: Env) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    db = Database(_hosts(env, *dead), retry_for=0.5)
    with pytest.raises(DatabaseUnavailable, match="unreachable") as caught:
        db.fetchval("db_now")
    assert all(d in str(caught.value) for d in dead)


def _balancer(env: Env, name: str, worker_id: int) -> SortBalancer:
    b = SortBalancer(env.config, RunOptions(name=name))
    b.worker_id = worker_id
    b.setup()
    return b


def _lease(env: Env) -> dict[str, object]:
    return sql(env, "SELECT holder, epoch, TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) "
                    "/ 1e6 AS left_s FROM leases WHERE kind = 'sort'")[0]


def test_lease_is_exclusive_renewed_and_fences_the_loser(env: Env) -> None:
    a, b = _balancer(env, "a", 101), _balancer(env, "b", 102)
    timeout = env.config.balancer.heartbeat_timeout
    try:
        assert a.hold_lease() and a.epoch == 1
        lease = _lease(env)
        assert lease["holder"] == 101 and timeout - 1 < float(lease["left_s"]) <= timeout
        assert not b.hold_lease()
        assert b.lease_left is not None and timeout - 1 < b.lease_left <= timeout
        assert a.hold_lease()  # renewed, same epoch
        assert a.epoch == 1

        # a stalls past its expiry; b takes over with a new epoch.
        sql(env, "UPDATE leases SET expires_at = NOW(6) - INTERVAL 1 SECOND "
                 "WHERE kind = 'sort'")
        assert b.hold_lease() and b.epoch == 2
        # a wakes up: its renewal and anything it would assign are refused.
        with pytest.raises(LeaseLost):
            a._new_batch(worker_id=1, newsletter_id=1, n=10)
        assert sql(env, "SELECT COUNT(*) AS n FROM batches")[0]["n"] == 0
        assert not a.hold_lease() and not a.active
        assert a.work() == 0

        # b shuts down: the lease is free at once.
        b.shutdown()
        assert _lease(env)["holder"] is None
        assert a.hold_lease() and a.epoch == 3
    finally:
        a.db.close()
        b.db.close()


def test_a_restarted_holder_takes_its_own_lease_back(env: Env) -> None:
    """Same worker row (same host/role/name; the file lock says the old process
    is gone): no need to wait for the expiry, and the epoch moves on."""
    old = _balancer(env, "a", 101)
    try:
        assert old.hold_lease()
        new = _balancer(env, "a", 101)
        try:
            assert new.hold_lease() and new.epoch == old.epoch + 1
            with pytest.raises(LeaseLost):  # the old epoch assigns nothing
                old._new_batch(worker_id=1, newsletter_id=1, n=10)
        finally:
            new.db.close()
    finally:
        old.db.close()


def test_status_json_shows_lease_holders_and_db_nodes(env: Env) -> None:
    from sendsystem.stats import status
    env.db.fetchval("db_now")  # connected: node_name is known (a role PREPAREs first)
    ids = {name: env.db.insert("worker_register", {"host": "srv", "role": "sort-balancer",
                                                   "name": name, "pid": 1,
                                                   "db_node": env.db.node_name})
           for name in ("a", "b")}
    a, b = _balancer(env, "a", ids["a"]), _balancer(env, "b", ids["b"])
    try:
        assert a.hold_lease() and not b.hold_lease()
        facts = status(env.db, env.config.balancer.heartbeat_timeout)
    finally:
        a.db.close()
        b.db.close()
    assert facts["leases"]["sort"]["holder"] == ids["a"]
    assert facts["leases"]["sort"]["holder_name"] == "a"
    assert facts["leases"]["send"]["holder"] is None
    active = {w["name"]: w["active"] for w in facts["workers"]}
    assert active == {"a": True, "b": False}
    assert {w["db_node"] for w in facts["workers"]} == {env.db.node_name}


def test_no_leases_row_is_seeded_again(env: Env) -> None:
    sql(env, "DELETE FROM leases")
    a = _balancer(env, "a", 101)
    try:
        assert a.hold_lease()
    finally:
        a.db.close()
    with pytest.raises(pymysql.err.IntegrityError):
        sql(env, "INSERT INTO leases (kind) VALUES ('sort')")


def test_a_client_hung_inside_a_transaction_loses_its_locks(env: Env) -> None:
    """The server drops a connection idle in a transaction (idle_transaction_timeout),
    so a balancer that hangs mid-assignment does not hold the lease row for hours
    (without it, the standby's take waits out innodb_lock_wait_timeout, 50 s, again
    and again)."""
    config = replace(env.config.database, idle_transaction_timeout=1.0)
    hung = Database(config, retry_for=2)
    standby = Database(config, retry_for=2)
    lease = {"kind": "sort", "length_us": 60_000_000}
    try:
        hung.execute("lease_seed", {"kind": "sort"})
        with pytest.raises(DatabaseUnavailable), hung.transaction():
            assert hung.execute("lease_take", {**lease, "holder": 5}) == 1
            # The hung client does nothing more; the standby's take waits on
            # the row lock until the server drops the hung connection.
            started = time.monotonic()
            assert standby.execute("lease_take", {**lease, "holder": 9}) == 1
            waited = time.monotonic() - started
            hung.fetchval("db_now")
        assert 0.5 <= waited <= 5.0
        assert _lease(env)["holder"] == 9
    finally:
        hung.close()
        standby.close()
