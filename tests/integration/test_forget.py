"""`sendsystem subscriber forget EMAIL` on a real database after a real send: no row of
any table holds the address afterwards (every text column of every table is
scanned), the lists' statistics stay the same, a pending message is cancelled,
one a worker holds is waited for, reports arriving later are stored without
the address, and the person is never mailed again until `block remove`."""

from __future__ import annotations

import email
import email.policy
import json
from typing import Any

import pytest

from sendsystem import admin, forget, liststats, retention
from sendsystem.bounce import recipients
from sendsystem.bounce.intake import process
from sendsystem.tokens import UnsubscribeTarget, verify_unsubscribe_token
from sendsystem.unsubscribe.service import UnsubscribeService
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter, sql
from tests.harness.smtp_server import SmtpServer
from tests.integration.test_intake import dsn, send_newsletter
from tests.integration.test_sending import relay_config, run_pipeline_once

WHO = "user1@example.com"
TEXT_TYPES = ("char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum", "set",
              "json")


def rows_with(env: Env, needle: str) -> dict[str, int]:
    """Every (table.column) of the test database with a row containing ``needle``
    (case-insensitive), from information_schema: nothing is assumed about the schema."""
    columns = sql(env, "SELECT table_name AS t, column_name AS c FROM information_schema.columns "
                       "WHERE table_schema = DATABASE() AND data_type IN %s", (TEXT_TYPES,))
    found = {}
    for col in columns:
        n = sql(env, f"SELECT COUNT(*) AS n FROM `{col['t']}` "
                     f"WHERE LOWER(`{col['c']}`) LIKE %s", (f"%{needle.lower()}%",))[0]["n"]
        if n:
            found[f"{col['t']}.{col['c']}"] = int(n)
    return found


def list_facts(env: Env, name: str) -> dict[str, Any]:
    facts = liststats.list_stats(env.db, name)
    facts.pop("generated_at")
    return facts


def test_forget_leaves_no_row_with_the_address(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv)
        srv.rule(WHO, f"550 5.1.1 <{WHO}>: Recipient address rejected: User unknown")
        news = make_newsletter(env, 6, list_name="news")
        for name, members in (("other", ["user1", "user2"]), ("third", ["user1", "user3"])):
            admin.create_list(env.db, name, f"{name} <{name}@example.com>")
            (env.tmp / f"{name}.csv").write_text(
                "email,first_name,city\n"
                + "".join(f"{m}@example.com,Navn {m},Odense\n" for m in members),
                encoding="utf-8")
            admin.import_csv(env.db, name, env.tmp / f"{name}.csv")
        other = admin.enqueue(env.db, "other", "t")[0]
        run_pipeline_once(env)
        # The mail carries an unsubscribe token that names its newsletter.
        for m in srv.messages:
            msg = email.message_from_bytes(m.data, policy=email.policy.default)
            token = str(msg["List-Unsubscribe"]).split("/unsubscribe/", 1)[1].split(">", 1)[0]
            target = verify_unsubscribe_token(env.config.secret(), token)
            assert target is not None and target.newsletter_id in (news, other)
    assert WHO not in {m.rcpt_tos[0] for m in srv.messages}
    # The relay's refusal is in the message rows, the bounces and the history of two lists.
    assert rows_with(env, WHO).keys() >= {"messages.reply", "bounces.email", "bounces.diagnostic",
                                           "subscribers.email"}
    # Old data: the news newsletter is purged, its summary keeps the top replies.
    sql(env, "UPDATE newsletters SET finished_at = TIMESTAMPADD(DAY, -100, NOW(6)) "
             "WHERE id = %s", (news,))
    retention.purge(env.db, retention.Options(older_than=90 * 86400, pause=0, sleep_coef=0))
    assert "newsletter_summaries.facts" in rows_with(env, WHO)
    # A pending message (list "third"), an unverified report naming the address in
    # another case, a plain blocklist entry, a relay's last error.
    third = admin.enqueue(env.db, "third", "t")[0]
    recipients.store_unverified(env.db, kind="hard", email="User1@Example.COM",
                                diagnostic="550 <User1@Example.COM> unknown; fwd user1@old.example")
    admin.block_add(env.db, WHO, "complaint")
    sql(env, "INSERT INTO relay_health (relay, worker_id, health, last_error, updated_at) "
             "VALUES ('r1', 1, 'ok', %s, NOW(6))", (f"550 5.1.1 <{WHO}>: User unknown",))
    # Opens and clicks of theirs and a neighbour's; tracked links with a merge field.
    for who in (WHO, "user2@example.com"):
        mid = sql(env, "SELECT m.id FROM messages m JOIN subscribers s ON s.id = m.subscriber_id "
                       "WHERE s.email = %s AND m.newsletter_id = %s", (who, other))[0]["id"]
        sql(env, "INSERT INTO tracking_events (hit, newsletter_id, message_id, kind, at) "
                 "VALUES (UNHEX(MD5(UUID())), %s, %s, 'open', NOW(6))", (other, mid))
        sql(env, "INSERT INTO tracking_unique (newsletter_id, kind, message_id, hits, human_hits, "
                 "first_at, last_at) VALUES (%s, 'open', %s, 1, 1, NOW(6), NOW(6))", (other, mid))
    links = {1: "https://shop.example/?who=User1%40Example.com&x=1",
             2: f"https://shop.example/p/{WHO}", 3: "https://shop.example/?who=user2%40example.com"}
    for idx, url in links.items():
        sql(env, "INSERT INTO newsletter_links (newsletter_id, idx, url) VALUES (%s, %s, %s)",
            (other, idx, url))

    before = {name: list_facts(env, name) for name in ("news", "other", "third")}
    scan = rows_with(env, WHO)

    code, out, err = env.cli("subscriber", "forget", "User1@example.com", "--dry-run")
    assert code == 0, err
    assert "would forget user1@example.com: 3 subscription(s), 1 of them active" in out.lower()
    assert "1 pending message(s) to cancel" in out and "Nothing was changed" in out
    assert rows_with(env, WHO) == scan

    code, out, err = env.cli("subscriber", "forget", "User1@example.com", "--chunk-size", "1")
    assert code == 0, err
    assert "forgot user1@example.com: 3 subscription(s), 1 of them active" in out.lower()
    assert "1 pending message(s) cancelled" in out
    assert rows_with(env, WHO) == {}
    assert rows_with(env, "user1%40example.com") == {}
    assert rows_with(env, "user1@old.example") == {}  # their forwarding address, in their row
    assert [r["url"] for r in sql(env, "SELECT url FROM newsletter_links ORDER BY idx")] == [
        "https://shop.example/?who=[forgotten]&x=1", "https://shop.example/p/[forgotten]",
        links[3]]
    for table in ("tracking_events", "tracking_unique"):  # theirs went, the neighbour's stay
        assert sql(env, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] == 1
    assert rows_with(env, "Navn user1") == {} and rows_with(env, "Bruger 1") == {}
    # Only the salted hash of the address is left, in the blocklist.
    assert [r["reason"] for r in sql(env, "SELECT reason FROM blocklist "
                                          "WHERE pattern LIKE 'sha256:%%'")] == ["erasure request"]
    ids = [r["id"] for r in sql(env, "SELECT id FROM subscribers "
                                     "WHERE email LIKE 'forgotten-%%@forgotten.invalid'")]
    assert len(ids) == 3
    assert sql(env, "SELECT COUNT(*) AS n FROM messages WHERE subscriber_id IN %s "
                    "AND body IS NOT NULL", (ids,))[0]["n"] == 0
    assert sql(env, "SELECT state FROM messages WHERE subscriber_id IN %s AND newsletter_id = %s",
               (ids, third)) == [{"state": "cancelled"}]
    assert sql(env, "SELECT COUNT(*) AS n FROM subscriber_events WHERE subscriber_id IN %s",
               (ids,))[0]["n"] == 0

    # The counts stay; on "third", where they were active, they left: an erasure request.
    # Their opens and clicks are the one thing that goes (forget.py's docstring).
    after = {name: list_facts(env, name) for name in ("news", "other", "third")}
    opens = [n.pop("unique_opens") for facts in (before, after)
             for n in facts["other"]["newsletters"]]
    assert opens == [2, 1]
    assert after["news"] == before["news"] and after["other"] == before["other"]
    assert after["third"]["now"]["active"] == before["third"]["now"]["active"] - 1
    assert after["third"]["now"]["unsubscribed"] == before["third"]["now"]["unsubscribed"] + 1
    assert {"status": "unsubscribed", "reason": "erasure request", "count": 1} in \
        after["third"]["left_by_reason"]

    # Again: nothing left to do, and it says so.
    code, out, err = env.cli("subscriber", "forget", WHO)
    assert code == 0 and "0 subscription(s)" in out, err
    assert rows_with(env, WHO) == {}

    # A list that imports them again cannot mail them; `block remove` lifts that.
    (env.tmp / "again.csv").write_text(f"email,first_name,city\n{WHO},Igen,Vejle\n",
                                       encoding="utf-8")
    admin.import_csv(env.db, "third", env.tmp / "again.csv")
    with SmtpServer() as srv:
        relay_config(env, srv)
        again = admin.enqueue(env.db, "third", "t")[0]
        run_pipeline_once(env)
        assert WHO not in {m.rcpt_tos[0] for m in srv.messages}
        assert {m.rcpt_tos[0] for m in srv.messages} == {"user3@example.com"}
    assert sql(env, "SELECT m.detail FROM messages m JOIN subscribers s ON s.id = m.subscriber_id "
                    "WHERE m.newsletter_id = %s AND s.email = %s", (again, WHO)) == [
        {"detail": "address or domain blocked"}]
    code, out, err = env.cli("block", "remove", WHO)
    assert code == 0 and "Unblocked" in out, err
    assert sql(env, "SELECT COUNT(*) AS n FROM blocklist")[0]["n"] == 0


def _hold(env: Env, message_id: int) -> None:
    """Make a send worker hold the message, as if it were sending it now."""
    worker = env.db.insert("worker_register", {"host": "h", "role": "send", "name": "w",
                                               "pid": 1, "db_node": None})
    batch = env.db.insert("batch_insert", {"role": "send", "worker": worker, "newsletter": 1})
    sql(env, "UPDATE messages SET state = 'merged', batch_id = %s WHERE id = %s",
        (batch, message_id))


def test_a_message_a_worker_holds_is_waited_for(env: Env) -> None:
    a = send_newsletter(env, ["held@example.org", "other@example.org"])[0]
    sql(env, "UPDATE messages SET state = 'queued', finished_at = NULL WHERE id = %s", (a.id,))
    _hold(env, a.id)
    with pytest.raises(forget.StillInFlight, match="run `sendsystem subscriber forget` again"):
        forget.forget(env.db, a.email, wait=0.2)
    # Nobody mails them any more, but nothing is erased until the message is let go.
    assert sql(env, "SELECT status, email FROM subscribers WHERE id = %s", (a.subscriber_id,)) \
        == [{"status": "unsubscribed", "email": a.email}]
    code, _out, err = env.cli("subscriber", "forget", a.email, "--wait", "0.2")
    assert code == 75 and "being handled by a worker" in err
    # The worker hands it back (or sends it); forget then finishes.
    sql(env, "UPDATE messages SET batch_id = NULL WHERE id = %s", (a.id,))
    report = forget.forget(env.db, a.email, wait=0.2)
    assert (report.subscriptions, report.ended, report.cancelled) == (1, 0, 1)
    assert rows_with(env, a.email) == {}
    assert [(e["from_status"], e["to_status"], e["reason"], e["subscriber_id"])
            for e in sql(env, "SELECT * FROM subscriber_events")] == [
        ("active", "unsubscribed", "erasure request", None)]


def test_reports_arriving_later_are_stored_without_the_address(env: Env) -> None:
    a, b = send_newsletter(env, ["late@example.org", "stays@example.org"])
    forget.forget(env.db, a.email)
    # A DSN for the message sent before: it counts against the (anonymised) subscription.
    outcome = process(env.db, env.config, dsn(a.verp, a.email), a.verp)
    assert outcome.action == "recorded"
    # A report that only names the address: unverified, and without it.
    unverified = process(env.db, env.config, dsn("bounces@bounces.test.example", a.email))
    assert unverified.action == "unverified"
    # Another subscriber's report keeps its address.
    process(env.db, env.config, dsn(b.verp, b.email), b.verp)
    assert rows_with(env, a.email) == {}
    kinds = sql(env, "SELECT kind, verified, email, diagnostic FROM bounces ORDER BY id")
    assert [(k["kind"], k["verified"], k["email"]) for k in kinds] == [
        ("hard", 1, None), ("hard", 0, None), ("hard", 1, b.email)]
    assert "[forgotten]" in kinds[0]["diagnostic"]
    # An old unsubscribe link of theirs shows no placeholder address.
    service = UnsubscribeService(env.config.database)
    try:
        seen = service.lookup(UnsubscribeTarget(a.subscriber_id, a.list_id))
    finally:
        service.close()
    assert (seen.ok, seen.email) == (False, None)
    assert json.loads(env.cli("list", "stats", "news", "--json")[1])["now"]["total"] == 2


def test_odd_addresses_are_matched_literally_by_the_database(env: Env) -> None:
    """The address becomes a PCRE for REGEXP_REPLACE: its +, ', {, }, = and dots are
    literal, case does not matter, and a longer address around it is someone else's."""
    odd = "a.b+c'd{x}=y@example.com"
    send_newsletter(env, [odd, f"z{odd}"])
    sql(env, "INSERT INTO relay_health (relay, worker_id, health, last_error, updated_at) "
             "VALUES ('r1', 1, 'ok', %s, NOW(6))",
        (f"550 <{odd.upper()}> and <z{odd}> and <a.b+c'd{{x}}=y@example.com.dk>",))
    forget.forget(env.db, odd)
    assert sql(env, "SELECT last_error FROM relay_health")[0]["last_error"] == \
        f"550 <[forgotten]> and <z{odd}> and <a.b+c'd{{x}}=y@example.com.dk>"
    assert [r["email"] for r in sql(env, "SELECT email FROM subscribers ORDER BY id")] == \
        ["forgotten-1@forgotten.invalid", f"z{odd}"]
