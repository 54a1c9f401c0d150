"""The role lifecycle with real processes: lock, registration, heartbeat,
disable, signals, schema checks."""

from __future__ import annotations

import signal
import time

import pymysql
import pytest

from sendsystem import stats
from sendsystem.config import load_config
from sendsystem.db import Database
from sendsystem.db.database import SCHEMA_VERSION
from sendsystem.errors import SchemaError
from tests.harness.env import Env, server_settings, write_config
from tests.harness.helpers import sql, wait_exit, wait_for, worker_row


def test_second_copy_exits_zero_at_once(env: Env) -> None:
    first = env.spawn("sort-worker", "--name", "w1", log_name="first")
    try:
        wait_for(lambda: (worker_row(env, "w1", "sort") or {}).get("state") == "running", 15,
                 "first worker running")
        started = time.monotonic()
        code, _, err = env.cli("sort-worker", "--name", "w1")
        assert code == 0
        assert "already runs" in err
        assert time.monotonic() - started < 10
        # A different --name is a different instance with its own lock.
        other = env.spawn("sort-worker", "--name", "w2", log_name="second")
        wait_for(lambda: (worker_row(env, "w2", "sort") or {}).get("state") == "running", 15,
                 "second instance running")
        other.send_signal(signal.SIGTERM)
        assert wait_exit(other, 10) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        assert wait_exit(first, 10) == 0


def test_registration_heartbeat_and_reuse_of_row(env: Env) -> None:
    proc = env.spawn("send-worker", "--name", "s1")
    try:
        row = wait_for(lambda: worker_row(env, "s1", "send"), 15, "registration")
        first_beat = wait_for(lambda: (worker_row(env, "s1", "send") or {}).get("heartbeat_at"),
                              5, "heartbeat")
        wait_for(lambda: worker_row(env, "s1", "send")["heartbeat_at"] > first_beat, 5,
                 "a later heartbeat")
        assert row["pid"] == proc.pid and row["enabled"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, 10) == 0
    assert worker_row(env, "s1", "send")["state"] == "stopped"
    code, _, _ = env.cli("send-worker", "--name", "s1", "--max-runtime", "0.5")
    assert code == 0
    assert len(sql(env, "SELECT id FROM workers WHERE name = 's1'")) == 1


def test_disable_stops_within_a_heartbeat_and_restart_stays_off(env: Env) -> None:
    proc = env.spawn("sort-worker", "--name", "w1")
    row = wait_for(lambda: worker_row(env, "w1", "sort"), 15, "registration")
    wait_for(lambda: worker_row(env, "w1", "sort")["state"] == "running", 10, "running")
    code, out, _ = env.cli("workers", "disable", str(row["id"]))
    assert code == 0 and "disabled" in out
    disabled_at = time.monotonic()
    assert wait_exit(proc, 10) == 0
    # heartbeat_interval is 0.5 s in tests; allow for process exit.
    assert time.monotonic() - disabled_at < 0.5 + 2.0
    assert worker_row(env, "w1", "sort")["state"] == "stopped"
    started = time.monotonic()
    code, _, err = env.cli("sort-worker", "--name", "w1")
    assert code == 0 and "disabled" in err
    assert time.monotonic() - started < 10
    assert worker_row(env, "w1", "sort")["enabled"] == 0
    code, _, _ = env.cli("workers", "enable", "w1")
    assert code == 0
    code, _, _ = env.cli("sort-worker", "--name", "w1", "--max-runtime", "0.5")
    assert code == 0


def test_sigterm_stops_gracefully(env: Env) -> None:
    proc = env.spawn("sort-balancer", "--name", "b1")
    wait_for(lambda: (worker_row(env, "b1", "sort-balancer") or {}).get("state") == "running",
             15, "balancer running")
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, 10) == 0
    assert worker_row(env, "b1", "sort-balancer")["state"] == "stopped"


@pytest.mark.parametrize("name", ["a b", "../x", ".hidden", "x" * 65, "caf\u00e9", "",
                                  "s1\n"])
def test_bad_name_is_refused_before_registration(env: Env, name: str) -> None:
    """Refused as a usage error before any lock or row exists (it used to be mapped to
    '_', so "a b" and "a_b" shared one lock file, or refused by the journal later)."""
    code, _, err = env.cli("send-worker", "--once", "--name", name)
    assert code == 2, err
    assert "--name" in err and "letters, digits, '-', '_' and '.'" in err
    assert "Traceback" not in err
    assert sql(env, "SELECT id FROM workers") == []
    assert not (env.config.paths.lock_dir.exists() and any(env.config.paths.lock_dir.iterdir()))


def test_longest_allowed_name_runs(env: Env) -> None:
    name = "n.1-_" + "x" * 59
    code, _, err = env.cli("sort-worker", "--once", "--name", name)
    assert code == 0, err
    assert worker_row(env, name, "sort") is not None
    assert (env.config.paths.lock_dir / f"sort-{name}.lock").exists()


@pytest.mark.parametrize("role", ["sort-worker", "send-worker"])
def test_short_secret_stops_a_worker_before_registration(env: Env, role: str) -> None:
    env.configure(unsubscribe={"secret": "x" * 31})
    code, _, err = env.cli(role, "--once", "--name", "w1")
    assert code == 1, err
    assert "at least 32 characters" in err and "Traceback" not in err
    assert "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'" in err
    assert sql(env, "SELECT id FROM workers") == []


def test_unknown_worker_is_a_user_error(env: Env) -> None:
    code, _, err = env.cli("workers", "disable", "nobody")
    assert code == 1 and "no worker" in err


@pytest.fixture
def scratch_db(tmp_path):  # type: ignore[no-untyped-def]
    """A database of its own, for tests that change the schema."""
    name = f"ss_scratch_{int(time.time() * 1000) % 10**9}"
    path = write_config(tmp_path / "config.ini", name)
    yield path, name
    conn = pymysql.connect(**server_settings())  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def test_schema_upgrade_from_previous_version(scratch_db) -> None:  # type: ignore[no-untyped-def]
    path, _ = scratch_db
    config = load_config(path)
    db = Database(config.database)
    assert db.init_schema(up_to=1) == (0, 1)
    with pytest.raises(SchemaError, match=r"version 1.*db init"):
        db.check_schema_version()
    db.execute("list_insert", {"name": "old", "from_name": "Old", "from_address": "o@example.com"})
    assert db.init_schema() == (1, SCHEMA_VERSION)
    assert db.init_schema() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert db.check_schema_version() == SCHEMA_VERSION
    assert db.fetchone("list_by_name", {"name": "old"}) is not None
    db.prepare(["send_mark_deferred", "stats_deferrals"])


def test_schema_upgrade_2_to_3_keeps_bounces(scratch_db) -> None:  # type: ignore[no-untyped-def]
    """v3 (evidence): earlier bounces that acted stay counted; unknown ones become unverified."""
    path, name = scratch_db
    config = load_config(path)
    db = Database(config.database)
    assert db.init_schema(up_to=2) == (0, 2)
    conn = pymysql.connect(**server_settings(), database=name, autocommit=True)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute("INSERT INTO lists (name, from_name, from_address) VALUES ('l', 'L', 'l@x')")
        cur.execute("INSERT INTO templates (name, subject, html) VALUES ('t', 's', 'h')")
        cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, state) "
                    "VALUES (1, 1, 's', 'h', 'done')")
        cur.execute("INSERT INTO subscribers (list_id, email, domain, fields, status) "
                    "VALUES (1, 'a@x.example', 'x.example', '{}', 'bounced')")
        cur.execute("INSERT INTO messages (newsletter_id, subscriber_id, state, message_id) "
                    "VALUES (1, 1, 'bounced', '<1.1.ss@b.example>')")
        cur.execute("INSERT INTO bounces (message_id, subscriber_id, email, kind, status) VALUES "
                    "(1, 1, 'a@x.example', 'hard', '5.1.1'), "
                    "(NULL, NULL, 'z@x.example', 'unknown', '5.1.1'), "
                    "(NULL, NULL, 'q@x.example', 'unsubscribe', NULL)")
    assert db.init_schema() == (2, SCHEMA_VERSION)
    assert db.init_schema() == (SCHEMA_VERSION, SCHEMA_VERSION)
    assert db.check_schema_version() == SCHEMA_VERSION
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("SELECT newsletter_id, message_id, kind, verified, evidence FROM bounces "
                    "ORDER BY id")
        rows = cur.fetchall()
        cur.execute("SELECT status FROM subscribers")
        assert cur.fetchall() == [{"status": "bounced"}]
    conn.close()
    assert rows == [
        {"newsletter_id": 1, "message_id": 1, "kind": "hard", "verified": 1, "evidence": None},
        {"newsletter_id": None, "message_id": None, "kind": "unknown", "verified": 0,
         "evidence": None},
        {"newsletter_id": None, "message_id": None, "kind": "unsubscribe", "verified": 0,
         "evidence": None},
    ]
    facts = stats.newsletter_bounces(db, 1)
    assert (facts["hard"], facts["blocked"], facts["unverified"]) == (1, 0, 0)
    db.prepare(["bounce_insert", "bounce_tally_subscriber", "stats_bounces",
                "bounces_unverified_recent"])


def test_schema_upgrade_v4_to_v5_adds_leases_and_db_node(scratch_db) -> None:  # type: ignore[no-untyped-def]
    path, name = scratch_db
    db = Database(load_config(path).database)
    assert db.init_schema(up_to=4) == (0, 4)
    conn = pymysql.connect(**server_settings(), database=name)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute("INSERT INTO workers (host, role, name) VALUES ('h', 'sort-balancer', 'old')")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match=r"version 4.*db init"):
        db.check_schema_version()
    assert db.init_schema(up_to=5) == (4, 5)
    assert db.init_schema() == (5, SCHEMA_VERSION)
    assert db.check_schema_version() == SCHEMA_VERSION
    db.prepare(["worker_heartbeat", "workers_all", "lease_take", "lease_renew", "leases_all"])
    assert [r["kind"] for r in db.fetchall("leases_all")] == ["send", "sort"]
    assert [r["db_node"] for r in db.fetchall("workers_all")] == [None]


def test_schema_upgrade_v5_to_v6_keeps_newsletters(scratch_db) -> None:  # type: ignore[no-untyped-def]
    """Version 6 (render limits) adds newsletters.zdict/render_failures; old rows keep
    working: no stored dictionary (the send worker derives it as before), no streak."""
    path, name = scratch_db
    db = Database(load_config(path).database)
    assert db.init_schema(up_to=5) == (0, 5)
    lid = db.insert("list_insert", {"name": "old", "from_name": "Old",
                                    "from_address": "o@example.com"})
    conn = pymysql.connect(**server_settings(), database=name, autocommit=True)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute("INSERT INTO templates (name, subject, html) VALUES ('t', 's', '<p>x</p>')")
        cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, state, "
                    "pause_reason) VALUES (%s, LAST_INSERT_ID(), 's', '<p>{{ x }}</p>', "
                    "'paused', 'by hand')", (lid,))
    conn.close()
    with pytest.raises(SchemaError, match=r"version 5.*db init"):
        db.check_schema_version()
    assert db.init_schema(up_to=6) == (5, 6)
    assert db.init_schema() == (6, SCHEMA_VERSION)  # and on to 7 (fencing)
    assert db.check_schema_version() == SCHEMA_VERSION
    row = db.fetchone("newsletter_get", {"id": 1})
    assert row is not None
    assert (row["html"], row["state"], row["pause_reason"]) == ("<p>{{ x }}</p>", "paused",
                                                                "by hand")
    assert row["zdict"] is None and row["render_failures"] == 0
    db.prepare(["newsletter_set_zdict", "newsletter_render_state", "batch_hand_back_messages"])
    assert db.execute("newsletter_set_zdict", {"id": 1, "zdict": b"z"}) == 1
    assert db.execute("newsletter_set_zdict", {"id": 1, "zdict": b"other"}) == 0
    assert db.fetchval("newsletter_zdict", {"id": 1}) == b"z"

def test_prepare_fails_at_start_on_a_wrong_schema(scratch_db) -> None:  # type: ignore[no-untyped-def]
    path, name = scratch_db
    config = load_config(path)
    Database(config.database).init_schema()
    conn = pymysql.connect(**server_settings(), database=name)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute("ALTER TABLE messages DROP COLUMN detail")
    conn.close()
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(path),
                           "sort-worker", "--once", "--name", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "sort_" in proc.stderr and "does not match" in proc.stderr
    assert "db init" in proc.stderr


def test_missing_database_says_run_db_init(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write_config(tmp_path / "config.ini", "ss_does_not_exist_x")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(path), "status"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "db init" in proc.stderr


def test_schema_upgrade_v7_to_v8_adds_relay_groups_and_usage(scratch_db) -> None:  # type: ignore[no-untyped-def]
    """Version 8 (relays): lists keep their rows and get no group (the default one);
    the relay tables start empty."""
    path, _name = scratch_db
    db = Database(load_config(path).database)
    assert db.init_schema(up_to=7) == (0, 7)
    db.insert("list_insert", {"name": "old", "from_name": "Old", "from_address": "o@example.com"})
    with pytest.raises(SchemaError, match=r"version 7.*db init"):
        db.check_schema_version()
    assert db.init_schema() == (7, SCHEMA_VERSION)
    row = db.fetchone("list_by_name", {"name": "old"})
    assert row is not None and row["relay_group"] is None
    db.prepare(["list_set_relay_group", "relay_usage_all", "relay_claim"])
    assert db.execute("list_set_relay_group", {"name": "old", "group": "cust-a"}) == 1
    assert db.fetchone("list_by_name", {"name": "old"})["relay_group"] == "cust-a"  # type: ignore[index]
    assert db.fetchall("relay_usage_all") == []


def test_schema_upgrade_v8_to_v9_adds_webhook_evidence(scratch_db) -> None:  # type: ignore[no-untyped-def]
    """Version 9 (ESP webhooks): bounces keep their evidence; 'webhook' becomes storable."""
    path, name = scratch_db
    db = Database(load_config(path).database)
    assert db.init_schema(up_to=8) == (0, 8)
    conn = pymysql.connect(**server_settings(), database=name, autocommit=True)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute("INSERT INTO bounces (email, kind, verified, evidence) VALUES "
                    "('a@x.example', 'hard', 1, 'verp'), ('b@x.example', 'hard', 1, 'smtp')")
        with pytest.raises(pymysql.err.DataError):  # strict mode: not in the v8 ENUM
            cur.execute("INSERT INTO bounces (email, kind, verified, evidence) VALUES "
                        "('c@x.example', 'hard', 1, 'webhook')")
    with pytest.raises(SchemaError, match=r"version 8.*db init"):
        db.check_schema_version()
    assert db.init_schema() == (8, SCHEMA_VERSION)
    assert db.init_schema() == (SCHEMA_VERSION, SCHEMA_VERSION)
    db.prepare(["bounce_insert"])
    db.execute("bounce_insert", {"newsletter_id": None, "message_id": None,
                                 "subscriber_id": None, "email": "c@x.example", "kind": "hard",
                                 "verified": 1, "evidence": "webhook", "status": None,
                                 "diagnostic": None})
    with conn.cursor() as cur:
        cur.execute("SELECT email, evidence FROM bounces ORDER BY id")
        assert cur.fetchall() == (("a@x.example", "verp"), ("b@x.example", "smtp"),
                                  ("c@x.example", "webhook"))
    conn.close()


def test_schema_upgrade_v9_to_v10_adds_newsletter_summaries(scratch_db) -> None:  # type: ignore[no-untyped-def]
    """Version 10 (retention): the summaries table starts empty; stats of an
    existing newsletter still come from its rows."""
    path, _name = scratch_db
    db = Database(load_config(path).database)
    assert db.init_schema(up_to=9) == (0, 9)
    db.insert("list_insert", {"name": "old", "from_name": "Old", "from_address": "o@example.com"})
    with pytest.raises(SchemaError, match=r"version 9.*db init"):
        db.check_schema_version()
    assert db.init_schema() == (9, SCHEMA_VERSION)
    db.prepare(["summary_get", "summary_insert", "retention_candidates",
                "retention_delete_messages", "retention_delete_bounces", "stats_bounces_between"])
    assert db.fetchone("summary_get", {"id": 1}) is None
    assert db.fetchall("retention_candidates", {"cutoff": "2100-01-01"}) == []
