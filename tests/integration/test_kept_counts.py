"""Kept counts (sendsystem/keptcounts.py, migration 011) on a real database.

Every integration test already ends with `keptcounts.verify() == []` (the env
fixture); here: one newsletter through every kind of change (sort, skip,
send, defer, fail, bounce, retry-failed, cancel, purge) with the invariant and
the stats checked against the rows after each step; the rows are not read at
all by stats, status and metrics; `counts verify` names a difference and
`--repair` puts it right; a schema 12 database with messages is backfilled;
folding the slots changes no number.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from typing import Any

import pymysql
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sendsystem import admin, keptcounts, monitoring, retention, stats
from sendsystem.bounce.recipients import record_bounce
from sendsystem.config import load_config
from sendsystem.db import SCHEMA_VERSION, Database
from tests.harness.env import Env, server_settings, write_config
from tests.harness.helpers import make_newsletter, sql, states
from tests.harness.smtp_server import SmtpServer
from tests.integration.test_sending import relay_config, run_pipeline_once


def _rows_facts(env: Env, nid: int) -> dict[str, Any]:
    """What stats shows, counted from the message rows with GROUP BY (as before 011)."""
    rows = sql(env, "SELECT m.state, m.reply_code, m.deferrals, m.detail, m.reply, "
                    "sw.name AS sorter, tw.name AS sender FROM messages m "
                    "LEFT JOIN workers sw ON sw.id = m.sort_worker_id "
                    "LEFT JOIN workers tw ON tw.id = m.send_worker_id "
                    "WHERE m.newsletter_id = %s", (nid,))
    return {
        "counts": Counter(r["state"] for r in rows),
        "replies": Counter(r["reply_code"] for r in rows if r["reply_code"] is not None),
        "failures": Counter(r["reply"] or r["detail"] or "(no reason recorded)"
                            for r in rows if r["state"] == "failed"),
        "deferrals": sum(r["deferrals"] for r in rows),
        "sort": Counter(r["sorter"] for r in rows if r["sorter"]),
        "send": Counter(r["sender"] for r in rows
                        if r["sender"] and r["state"] in ("sent", "failed", "bounced")),
    }


def _check(env: Env, nid: int) -> dict[str, Any]:
    """The invariant, and stats (from the kept tables) equal to a count of the rows."""
    assert keptcounts.verify(env.db) == []
    facts = stats.newsletter_stats(env.db, nid)
    want = _rows_facts(env, nid)
    assert {k: v for k, v in facts["counts"].items() if v} == dict(want["counts"])
    assert {r["code"]: r["count"] for r in facts["replies"]} == dict(want["replies"])
    assert {r["reason"]: r["count"] for r in facts["failures"]} == dict(want["failures"])
    assert facts["deferrals"] == want["deferrals"]
    assert {w["name"]: w["messages"] for w in facts["workers"] if w["role"] == "sort"} \
        == dict(want["sort"])
    assert {w["name"]: w["messages"] for w in facts["workers"] if w["role"] == "send"} \
        == dict(want["send"])
    delivered = want["counts"]["sent"] + want["counts"]["bounced"]
    assert sum(r["sent"] for r in facts["timeline"]) == delivered
    assert sum(r["sent"] for r in facts["timeline_detail"]["rows"]) == delivered
    return facts


def test_counts_follow_every_change_of_a_newsletter(env: Env) -> None:
    with SmtpServer() as srv:
        # The deferred message waits for this test (not for the clock): the
        # first run must end with it deferred, however slow the machine.
        relay_config(env, srv, retry_min=600, retry_max=600)
        srv.rule("user1@example.com", "550 5.1.1 <user1@example.com>: User unknown")
        srv.rule("user2@example.com", "554 5.7.1 Rejected by policy")
        srv.rule("user3@example.com", "451 4.3.0 Try again later", times=1)
        nid = make_newsletter(env, 12)
        _check(env, nid)  # released: 12 queued, counted by the release itself
        assert states(env, nid) == {"queued": 12}
        admin.block_add(env.db, "user4@example.com")  # skipped by the sort worker
        run_pipeline_once(env)
        facts = _check(env, nid)
        assert facts["counts"]["deferred"] == 1 and facts["counts"]["skipped"] == 1
        assert facts["counts"]["failed"] == 2 and facts["deferrals"] == 1
        # Each worker wrote its counts into its own slot: its worker id.
        slots = {int(r["slot"]) for r in sql(env, "SELECT slot FROM kept_counts "
                                                 "WHERE newsletter_id = %s", (nid,))}
        ids = {r["name"]: int(r["id"]) % keptcounts.SLOTS for r in sql(
            env, "SELECT id, name FROM workers WHERE role IN ('sort', 'send')")}
        assert {ids["sw"], ids["tw"]} <= slots, (ids, slots)
        sql(env, "UPDATE messages SET next_attempt_at = NOW(6) WHERE state = 'deferred'")
        run_pipeline_once(env)
        facts = _check(env, nid)
        assert facts["counts"]["sent"] == 9 and facts["state"] == "done"

        # A bounce turns a sent message bounced: still delivered in the timeline.
        mid = sql(env, "SELECT m.id, m.subscriber_id FROM messages m JOIN subscribers s "
                       "ON s.id = m.subscriber_id WHERE s.email = 'user5@example.com'")[0]
        record_bounce(env.db, env.config.bounce, email="user5@example.com", kind="hard",
                      evidence="verp", message_id=int(mid["id"]),
                      subscriber_id=int(mid["subscriber_id"]))
        facts = _check(env, nid)
        assert facts["counts"]["bounced"] == 1 and facts["counts"]["sent"] == 8

        # retry-failed: the policy refusal goes back to queued (user1 bounced: not).
        assert admin.retry_failed(env.db, nid) == 1
        facts = _check(env, nid)
        assert facts["counts"]["queued"] == 1 and facts["counts"]["failed"] == 1
        srv.clear_rules()
        run_pipeline_once(env)
        facts = _check(env, nid)
        assert facts["counts"]["sent"] == 9 and facts["counts"]["failed"] == 1

        # Another newsletter of the same list (user1 and user5 bounced: 10 active),
        # cancelled before it is sent.
        other = make_newsletter(env, 12)
        assert admin.cancel(env.db, other) == 10
        facts = _check(env, other)
        assert facts["counts"]["cancelled"] == 10

    # Purge: the summary comes from the kept tables; the counts follow the deletes.
    sql(env, "UPDATE newsletters SET finished_at = TIMESTAMPADD(DAY, -100, NOW(6))")
    before = stats.newsletter_stats(env.db, nid)
    done = retention.purge(env.db, retention.Options(older_than=90 * 86400, chunk=5, pause=0))
    assert sorted(p.newsletter_id for p in done) == sorted([nid, other])
    assert keptcounts.verify(env.db) == []
    after = stats.newsletter_stats(env.db, nid)
    assert after.pop("purged_at") and {**before, "purged_at": None} == {**after,
                                                                        "purged_at": None}
    for table in ("kept_counts", "kept_timeline", "kept_sort_workers", "kept_failures"):
        assert sql(env, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] == 0, table


def _metrics(env: Env) -> dict[str, float]:
    """The message metrics (by newsletter and state, deliveries, deferrals)."""
    from prometheus_client import generate_latest
    reg = monitoring.registry(env.db, env.config)
    out = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        if family.name in ("sendsystem_newsletter_messages", "sendsystem_deliveries",
                           "sendsystem_deferrals", "sendsystem_up"):
            for s in family.samples:
                out[f"{s.name}{sorted(s.labels.items())}"] = s.value
    return out


def test_stats_status_and_metrics_read_no_message_row(env: Env) -> None:
    """With the messages table out of the way, the reports still answer, the same."""
    with SmtpServer() as srv:
        relay_config(env, srv)
        srv.rule("user1@example.com", "550 5.1.1 <user1@example.com>: User unknown")
        nid = make_newsletter(env, 6)
        run_pipeline_once(env)
    facts = stats.newsletter_stats(env.db, nid)
    status = stats.status(env.db, 3.0)
    metrics = _metrics(env)
    assert metrics["sendsystem_deliveries_total[('outcome', 'sent')]"] == 5
    sql(env, "RENAME TABLE messages TO messages_away")
    try:
        assert stats.newsletter_stats(env.db, nid) == facts
        again = stats.status(env.db, 3.0)
        assert again["newsletters"] == status["newsletters"]
        assert _metrics(env) == metrics
    finally:
        sql(env, "RENAME TABLE messages_away TO messages")
    assert facts["counts"]["sent"] == 5 and facts["counts"]["failed"] == 1


def test_verify_names_a_difference_and_repair_puts_it_right(env: Env) -> None:
    nid = make_newsletter(env, 5)
    code, out, err = env.cli("counts", "verify", str(nid))
    assert code == 0 and "agree" in out, (out, err)
    # Rows that came in behind the kept counts' back, and a counter gone wrong.
    sql(env, "INSERT INTO subscribers (list_id, email, domain, fields) "
             "SELECT list_id, 'extra@example.com', 'example.com', '{}' FROM subscribers LIMIT 1")
    sql(env, "INSERT INTO messages (newsletter_id, subscriber_id, state, deferrals) "
             "SELECT %s, id, 'deferred', 3 FROM subscribers WHERE email = 'extra@example.com'",
        (nid,))
    sql(env, "UPDATE kept_counts SET n = n + 2 WHERE newsletter_id = %s AND state = 'queued'",
        (nid,))
    found = keptcounts.verify(env.db, nid)
    assert {(d.what, d.key, d.kept, d.actual) for d in found} == {
        ("counts", "queued no reply", 7, 5), ("counts", "deferred no reply", 0, 1),
        ("deferrals", "deferred no reply", 0, 3)}
    code, out, err = env.cli("counts", "verify")
    assert code == 1, (out, err)
    assert f"newsletter {nid} counts queued no reply: kept 7, rows 5" in out
    assert "--repair" in err
    code, out, err = env.cli("counts", "verify", "--repair")
    assert code == 0, (out, err)
    assert f"newsletter {nid}: kept counts rebuilt from 6 message rows" in out
    assert keptcounts.verify(env.db) == []
    assert stats.counts(env.db, nid)["deferred"] == 1
    code, out, err = env.cli("counts", "verify", "999")
    assert code == 1 and "no newsletter 999" in err


def _connection(env: Env) -> pymysql.connections.Connection:
    return pymysql.connect(**server_settings(),  # type: ignore[arg-type]
                           database=env.config.database.name, autocommit=True)


def test_folding_the_slots_changes_no_number(env: Env) -> None:
    """Two connections (two slots) move messages; compact() folds them exactly."""
    nid = make_newsletter(env, 20)
    conns = [_connection(env), _connection(env)]
    try:
        ids = [c.thread_id() for c in conns]
        assert ids[0] % keptcounts.SLOTS != ids[1] % keptcounts.SLOTS, ids
        for conn, (frm, to, n) in zip((conns[0], conns[1], conns[1]),
                                      (("queued", "merged", 8), ("queued", "merged", 5),
                                       ("merged", "sent", 4)), strict=True):
            with conn.cursor() as cur:
                cur.execute("UPDATE messages SET state = %s, merged_at = COALESCE(merged_at, "
                            "NOW(6)), finished_at = IF(%s = 'sent', NOW(6), NULL), "
                            "reply_code = IF(%s = 'sent', 250, NULL) WHERE newsletter_id = %s "
                            "AND state = %s ORDER BY id LIMIT %s", (to, to, to, nid, frm, n))
    finally:
        for c in conns:
            c.close()
    slots = sql(env, "SELECT COUNT(DISTINCT slot) AS n FROM kept_counts WHERE newsletter_id = %s",
                (nid,))[0]["n"]
    assert slots >= 2
    before = stats.newsletter_stats(env.db, nid)
    assert (before["counts"]["queued"], before["counts"]["merged"], before["counts"]["sent"]) \
        == (7, 9, 4)
    assert keptcounts.compact(env.db, nid)
    rows = sql(env, "SELECT state, reply_code, slot, n FROM kept_counts WHERE newsletter_id = %s",
               (nid,))
    assert {r["slot"] for r in rows} == {0}
    assert len(rows) == len({(r["state"], r["reply_code"]) for r in rows})
    assert stats.newsletter_stats(env.db, nid) == before
    assert keptcounts.verify(env.db) == []


def test_upgrade_from_12_backfills_the_kept_tables(tmp_path: Any) -> None:
    name = f"ss_kept_{tmp_path.name[-8:]}".replace("-", "_")
    path = write_config(tmp_path / "config.ini", name)
    db = Database(load_config(path).database)
    conn = pymysql.connect(**server_settings(), autocommit=True)  # type: ignore[arg-type]
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        assert db.init_schema(up_to=13) == (0, 13)
        with conn.cursor() as cur:
            cur.execute(f"USE `{name}`")
            cur.execute("INSERT INTO lists (name, from_name, from_address) "
                        "VALUES ('l', 'L', 'l@x')")
            cur.execute("INSERT INTO templates (name, subject, html) VALUES ('t', 's', 'h')")
            cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, state) "
                        "VALUES (1, 1, 's', 'h', 'running')")
            cur.execute("INSERT INTO workers (host, role, name) VALUES ('h', 'sort', 'a'), "
                        "('h', 'send', 'b')")
            cur.execute("INSERT INTO messages (newsletter_id, subscriber_id, state, sort_worker_id,"
                        " send_worker_id, merged_at, finished_at, reply_code, reply, deferrals, "
                        "detail) SELECT 1, seq, ELT(1 + seq MOD 5, 'queued', 'merged', 'sent', "
                        "'failed', 'deferred'), IF(seq MOD 5 > 0, 1, NULL), "
                        "IF(seq MOD 5 > 1, 2, NULL), IF(seq MOD 5 > 0, NOW(6), NULL), "
                        "IF(seq MOD 5 IN (2, 3), TIMESTAMPADD(SECOND, -seq, NOW(6)), NULL), "
                        "IF(seq MOD 5 > 1, ELT(seq MOD 5 - 1, 250, 550, 421), NULL), "
                        "IF(seq MOD 5 = 3, CONCAT('550 no ', seq MOD 2), NULL), "
                        "IF(seq MOD 5 = 4, 2, 0), NULL FROM seq_1_to_100")
        assert db.init_schema() == (13, SCHEMA_VERSION)
        assert keptcounts.verify(db) == []
        assert stats.counts(db, 1) == {"queued": 20, "merged": 20, "sent": 20, "deferred": 20,
                                       "failed": 20, "skipped": 0, "bounced": 0,
                                       "cancelled": 0}
        facts = stats.message_facts(db, 1)
        assert facts["deferrals"] == 40
        assert {r["reason"]: r["count"] for r in facts["failures"]} == {"550 no 0": 10,
                                                                       "550 no 1": 10}
        assert sum(r["sent"] for r in facts["timeline"]) == 20
        assert json.dumps(facts)  # JSON-ready
    finally:
        db.close()
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@pytest.mark.parametrize("span", [100, 1_000, 10_000, 100_000, 400_000, 5_000_000])
def test_timeline_of_any_length_from_the_kept_rows(env: Env, span: int) -> None:
    """Deliveries spread over `span` seconds: the per-minute timeline and the detail
    (its bucket chosen from the span, read from the coarsest kept rows that fit)
    equal a count of the rows."""
    nid = make_newsletter(env, 40)
    for name in ("w1", "w2"):
        sql(env, "INSERT INTO workers (host, role, name) VALUES ('h', 'send', %s)", (name,))
    workers = {int(r["id"]): r["name"] for r in sql(env, "SELECT id, name FROM workers")}
    ids = [int(r["id"]) for r in sql(env, "SELECT id FROM messages WHERE newsletter_id = %s "
                                          "ORDER BY id", (nid,))]
    for i, mid in enumerate(ids):
        offset = span * i / (len(ids) - 1) + 0.25  # ends exactly `span` s after it starts
        sql(env, "UPDATE messages SET state = IF(%s MOD 7 = 3, 'failed', 'sent'), "
                 "send_worker_id = %s, finished_at = TIMESTAMPADD(MICROSECOND, %s, "
                 "TIMESTAMPADD(DAY, -100, '2026-11-30 12:00:00')) WHERE id = %s",
            (i, sorted(workers)[i % 2], int(offset * 1e6), mid))
    rows = sql(env, "SELECT m.finished_at AS at, w.name FROM messages m JOIN workers w "
                    "ON w.id = m.send_worker_id WHERE m.newsletter_id = %s AND m.state = 'sent'",
               (nid,))
    facts = stats.newsletter_stats(env.db, nid)
    seconds = [r["at"].replace(microsecond=0) for r in rows]
    bucket = stats.timeline_bucket((max(seconds) - min(seconds)).total_seconds())
    start = stats.bucket_start(min(seconds), bucket)
    want = Counter(((s - start).total_seconds() // bucket, r["name"])
                   for s, r in zip(seconds, rows, strict=True))
    detail = facts["timeline_detail"]
    assert detail["bucket_seconds"] == bucket
    assert {((datetime.fromisoformat(r["at"]) - start).total_seconds() // bucket, r["worker"]):
            r["sent"] for r in detail["rows"]} == dict(want)
    minutes = Counter((r["at"].strftime("%Y-%m-%dT%H:%M"), r["name"]) for r in rows)
    assert {(r["minute"], r["worker"]): r["sent"] for r in facts["timeline"]} == dict(minutes)
    assert {w["name"]: w["messages"] for w in facts["workers"] if w["role"] == "send"} \
        == dict(Counter(workers[int(r["send_worker_id"])] for r in sql(
            env, "SELECT send_worker_id FROM messages WHERE newsletter_id = %s", (nid,))))
