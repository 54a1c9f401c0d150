"""`sendsystem list stats` on a real database: every path that changes a subscriber's
status writes its history event in the same transaction (web unsubscribe, one-click,
mailto, bounce, complaint by mail and by webhook, an admin); the weekly series,
the per-newsletter rates and the trend from controlled timestamps; the JSON
shape; the HTML report stands alone; migration 013 backfills the history."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pymysql
import pytest

from sendsystem import admin, liststats
from sendsystem.bounce import recipients
from sendsystem.bounce.intake import process
from sendsystem.config import load_config
from sendsystem.db import SCHEMA_VERSION, Database
from sendsystem.tokens import unsubscribe_token
from sendsystem.unsubscribe.app import make_wsgi_server
from sendsystem.unsubscribe.service import UnsubscribeService, unsubscribe_wsgi_app
from tests.harness.env import Env, server_settings, write_config
from tests.harness.helpers import sql
from tests.integration.test_intake import Sent, send_newsletter
from tests.integration.test_unsubscribe_db import ONE_CLICK, request


@pytest.fixture
def server(env: Env) -> Iterator[str]:
    service = UnsubscribeService(env.config.database)
    httpd = make_wsgi_server(unsubscribe_wsgi_app(env.config, service), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/unsubscribe/"
    httpd.shutdown()
    httpd.server_close()
    service.close()


def events(env: Env) -> list[dict[str, Any]]:
    return sql(env, "SELECT e.list_id, e.subscriber_id, s.email, e.from_status, e.to_status, "
                    "e.reason, e.newsletter_id FROM subscriber_events e "
                    "LEFT JOIN subscribers s ON s.id = e.subscriber_id ORDER BY e.id")


def event_of(env: Env, email: str) -> list[tuple[str, str, str, int | None]]:
    return [(e["from_status"], e["to_status"], e["reason"], e["newsletter_id"])
            for e in events(env) if e["email"] == email]


def test_every_status_change_writes_its_event(env: Env, server: str) -> None:
    emails = [f"u{i}@example.org" for i in range(8)]
    sent = {s.email: s for s in send_newsletter(env, emails)}
    nid = sent["u0@example.org"].newsletter_id
    secret = env.config.secret()
    limits = env.config.bounce

    # One-click (RFC 8058) with a token that names the newsletter.
    u0 = sent["u0@example.org"]
    token = unsubscribe_token(secret, u0.subscriber_id, u0.list_id, nid)
    assert request(server + token, ONE_CLICK)[0] == 200
    assert request(server + token, ONE_CLICK)[0] == 200  # idempotent: one event
    # Our confirmation page's form, with an old token (no newsletter in it).
    u1 = sent["u1@example.org"]
    assert request(server + u1.token, b"confirm=yes")[0] == 200
    # A mailto unsubscribe with a token that names the newsletter.
    u2 = sent["u2@example.org"]
    raw = (f"From: u2@example.org\r\nTo: {env.config.unsubscribe.mailto}\r\n"
           f"Subject: unsubscribe {unsubscribe_token(secret, u2.subscriber_id, u2.list_id, nid)}"
           f"\r\nMessage-ID: <x2@example.org>\r\n\r\n\r\n").encode()
    assert process(env.db, env.config, raw).action == "unsubscribed"
    # A hard bounce (hard_limit is 1 in the tests) and a complaint by mail and by webhook.
    u3, u4, u5 = sent["u3@example.org"], sent["u4@example.org"], sent["u5@example.org"]
    assert recipients.record_bounce_once(env.db, limits, email=u3.email, kind="hard",
                                         evidence="verp", message_id=u3.id,
                                         subscriber_id=u3.subscriber_id,
                                         status="5.1.1").status_changed
    assert recipients.record_complaint(env.db, limits, email=u4.email, evidence="message-id",
                                       message_id=u4.id, subscriber_id=u4.subscriber_id
                                       ).status_changed
    assert recipients.record_complaint(env.db, limits, email=u5.email, evidence="webhook",
                                       message_id=u5.id, subscriber_id=u5.subscriber_id
                                       ).status_changed
    # The bounced one complains too: bounced -> complained (not a second leave).
    assert recipients.record_complaint(env.db, limits, email=u3.email, evidence="verp",
                                       message_id=u3.id, subscriber_id=u3.subscriber_id
                                       ).status_changed
    # An admin.
    code, out, err = env.cli("subscriber", "unsubscribe", "u6@example.org", "--list", "news")
    assert code == 0 and "Unsubscribed" in out, err
    code, out, _ = env.cli("subscriber", "unsubscribe", "u6@example.org", "--list", "news")
    assert code == 0 and "not active" in out

    assert event_of(env, "u0@example.org") == [
        ("active", "unsubscribed", "List-Unsubscribe one-click", nid)]
    assert event_of(env, "u1@example.org") == [("active", "unsubscribed", "unsubscribe link",
                                                 None)]
    assert event_of(env, "u2@example.org") == [("active", "unsubscribed", "unsubscribe email",
                                                 nid)]
    assert event_of(env, "u3@example.org") == [
        ("active", "bounced", "hard bounce 5.1.1", nid),
        ("bounced", "complained", "complaint (ARF)", nid)]
    assert event_of(env, "u4@example.org") == [("active", "complained", "complaint (ARF)", nid)]
    assert event_of(env, "u5@example.org") == [("active", "complained", "complaint (webhook)",
                                                 nid)]
    assert event_of(env, "u6@example.org") == [("active", "unsubscribed", "admin", None)]
    assert event_of(env, "u7@example.org") == []
    # Every status that is not active has its history (nothing changed without an event).
    facts = liststats.list_stats(env.db, "news", verify=True)
    assert facts["now"] == {"active": 1, "unsubscribed": 4, "bounced": 0, "complained": 3,
                            "total": 8, "blocked": 0}
    assert all("disagree" not in n for n in facts["notes"])
    assert facts["unattributed_unsubscribes"] == 2  # the old-token form and the admin


def test_scope_address_bounce_writes_an_event_per_subscription(env: Env) -> None:
    a = send_newsletter(env, ["both@example.org", "x@example.org"], "one")[0]
    send_newsletter(env, ["both@example.org"], "two")
    limits = dataclasses.replace(env.config.bounce, scope="address")
    assert recipients.record_bounce(env.db, limits, email=a.email, kind="hard", evidence="smtp",
                                    message_id=a.id, subscriber_id=a.subscriber_id,
                                    status="5.1.1")
    rows = [(e["list_id"], e["to_status"], e["reason"], e["newsletter_id"])
            for e in events(env)]
    two = admin.get_list(env.db, "two")["id"]
    # The newsletter is named only on the list it was sent for.
    assert rows == [(a.list_id, "bounced", "hard bounce 5.1.1", a.newsletter_id),
                    (two, "bounced", "hard bounce 5.1.1", None)]


# ----------------------------------------------------------------- the weekly series

def _at(monday: datetime, week: int, hour: int = 10) -> datetime:
    """Tuesday ``hour``:00 of the week ``week`` weeks from the current one."""
    return monday + timedelta(weeks=week, days=1, hours=hour)


def _arrange(env: Env) -> tuple[dict[str, Sent], list[int], datetime]:
    """Ten subscribers, three newsletters and history at controlled times (see the plan
    in the test below)."""
    emails = [f"s{i}@example.org" for i in range(1, 11)]
    emails[6] = "s7@other.example"
    letters = [send_newsletter(env, emails, "weekly") for _ in range(3)]
    nids = [batch[0].newsletter_id for batch in letters]
    a, b, c = ({s.email: s for s in batch} for batch in letters)
    limits = env.config.bounce
    recipients.unsubscribe(env.db, a["s2@example.org"].subscriber_id, a["s2@example.org"].list_id,
                           via="List-Unsubscribe one-click", newsletter_id=nids[0])
    for who in ("s3@example.org", "s5@example.org"):
        m = b[who]
        recipients.record_bounce_once(env.db, limits, email=who, kind="hard", evidence="verp",
                                      message_id=m.id, subscriber_id=m.subscriber_id,
                                      status="5.1.1")
    m = c["s5@example.org"]
    recipients.record_complaint(env.db, limits, email=m.email, evidence="message-id",
                                message_id=m.id, subscriber_id=m.subscriber_id)
    m = c["s4@example.org"]
    recipients.record_complaint(env.db, limits, email=m.email, evidence="webhook",
                                message_id=m.id, subscriber_id=m.subscriber_id)
    assert env.cli("subscriber", "unsubscribe", "s1@example.org", "--list", "weekly")[0] == 0
    admin.block_add(env.db, "s6@example.org")
    admin.block_add(env.db, "@other.example")

    now = sql(env, "SELECT NOW(6) AS now")[0]["now"]
    monday = datetime.combine(liststats.week_start(now), datetime.min.time())
    created = {"s1@example.org": -42, "s2@example.org": -5, "s3@example.org": -5,
               "s4@example.org": -5, "s5@example.org": -5, "s6@example.org": -5,
               "s7@other.example": -3, "s8@example.org": -3, "s9@example.org": 0,
               "s10@example.org": 0}
    for email, week in created.items():
        sql(env, "UPDATE subscribers SET created_at = %s WHERE email = %s",
            (_at(monday, week, 8), email))
    moves = [("s1@example.org", "unsubscribed", -41), ("s2@example.org", "unsubscribed", -4),
             ("s3@example.org", "bounced", -3), ("s5@example.org", "bounced", -2),
             ("s5@example.org", "complained", -1), ("s4@example.org", "complained", -1)]
    for email, to, week in moves:
        sql(env, "UPDATE subscriber_events e JOIN subscribers s ON s.id = e.subscriber_id "
                 "SET e.at = %s WHERE s.email = %s AND e.to_status = %s",
            (_at(monday, week), email, to))
    for nid, week in zip(nids, (-4, -3, -1), strict=True):
        sql(env, "UPDATE newsletters SET released_at = %s, finished_at = %s, state = 'done' "
                 "WHERE id = %s", (_at(monday, week, 7), _at(monday, week, 9), nid))
    sql(env, "UPDATE newsletters SET subject = %s, track = 'opens' WHERE id = %s",
        ('<script>alert("x")</script> & <b>news</b>', nids[2]))
    # Opens of the last one: two people (one of them twice), one mail-privacy proxy.
    for who, human in [("s6@example.org", 2), ("s7@other.example", 1),
                       ("s8@example.org", 0)]:
        sql(env, "INSERT INTO tracking_unique (newsletter_id, kind, message_id, link_idx, hits, "
                 "human_hits, first_at, last_at, verdict) VALUES (%s, 'open', %s, 0, %s, %s, "
                 "NOW(6), NOW(6), %s)", (nids[2], c[who].id, max(human, 1), human,
                                         0 if human else 2))
    return a, nids, monday


def test_weekly_series_rates_trend_json_text_and_html(env: Env) -> None:
    _a, nids, monday = _arrange(env)
    html_file = env.tmp / "list.html"
    code, out, err = env.cli("list", "stats", "weekly", "--json", "--weeks", "6", "--verify",
                             "--html", str(html_file))
    assert code == 0, err
    facts = json.loads(out)

    assert set(facts) == {"list", "generated_at", "weeks_start", "now", "weeks",
                          "left_by_reason", "unattributed_unsubscribes", "newsletters",
                          "trend", "notes"}
    assert facts["list"]["name"] == "weekly"
    assert facts["now"] == {"active": 5, "unsubscribed": 2, "bounced": 1, "complained": 2,
                            "total": 10, "blocked": 2}
    weeks = facts["weeks"]
    assert [w["week"] for w in weeks] == [
        (monday + timedelta(weeks=k)).date().isoformat() for k in range(-5, 1)]
    table = [(w["active"], w["unsubscribed"], w["bounced"], w["complained"], w["joined"],
              w["left"]) for w in weeks]
    assert table == [
        (5, 1, 0, 0, 5, 0),   # -5: five join; s1 joined and left before the window
        (4, 2, 0, 0, 0, 1),   # -4: s2 one-click
        (5, 2, 1, 0, 2, 1),   # -3: two join, s3 hard bounce
        (4, 2, 2, 0, 0, 1),   # -2: s5 hard bounce
        (3, 2, 1, 2, 0, 1),   # -1: s4 complains (a leave), s5 bounced -> complained (not one)
        (5, 2, 1, 2, 2, 0),   # this week: two join
    ]
    assert weeks[1]["left_by_reason"] == {"List-Unsubscribe one-click": 1}
    assert weeks[4]["left_by_reason"] == {"complaint (webhook)": 1}
    assert weeks[4]["left_by_status"] == {"complained": 1}
    assert facts["left_by_reason"] == [
        {"status": "bounced", "reason": "hard bounce 5.1.1", "count": 2},
        {"status": "complained", "reason": "complaint (webhook)", "count": 1},
        {"status": "unsubscribed", "reason": "List-Unsubscribe one-click", "count": 1}]
    assert facts["unattributed_unsubscribes"] == 0  # the admin's was before these weeks
    assert len(facts["notes"]) == 1 and "snapshot" in facts["notes"][0]

    letters = facts["newsletters"]
    assert [n["id"] for n in letters] == nids  # oldest first
    assert [n["delivered"] for n in letters] == [10, 10, 10]
    assert [(n["bounce_rate"], n["complaint_rate"], n["unsubscribe_rate"]) for n in letters] \
        == [(0.0, 0.0, 0.1), (0.2, 0.0, 0.0), (0.0, 0.2, 0.0)]
    assert letters[0]["sent_at"] == _at(monday, -4, 7).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert letters[2]["change_vs_previous"] == {"bounce_rate": -0.1, "complaint_rate": 0.2,
                                                "unsubscribe_rate": -0.05}
    assert letters[0]["change_vs_previous"]["bounce_rate"] is None
    assert [(n["tracked"], n["open_rate"], n["click_rate"]) for n in letters] == [
        ([], None, None), ([], None, None), (["opens"], 0.2, None)]
    assert (letters[2]["unique_opens"], letters[2]["machine_opens"]) == (2, 1)
    trend = facts["trend"]
    assert {k: v["direction"] for k, v in trend.items()} == {
        "bounce_rate": "steady", "complaint_rate": "rising", "unsubscribe_rate": "falling"}
    assert trend["complaint_rate"] == {"latest": 0.2, "previous_mean": 0.0, "change": 0.2,
                                       "slope_per_newsletter": 0.1, "newsletters": 3,
                                       "direction": "rising"}

    page = html_file.read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert not re.search(r"https?://", page), "no network references"
    assert "default-src 'none'" in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;news&lt;/b&gt;" \
        in page
    assert page.count('class="series"') == 4  # one area per status
    assert page.count('class="point"') == 9  # three rates x three newsletters
    assert 'data-kind="joined"' in page and 'data-kind="complained"' in page

    code, text, err = env.cli("list", "stats", "weekly", "--weeks", "6")
    assert code == 0, err
    for heading in ("Subscribers at each week's end", "Why they left", "Newsletters", "Trend"):
        assert heading in text
    assert "<script>" in text  # plain text, cleaned of control characters, not escaped
    assert "hard bounce 5.1.1" in text and "rising" in text
    assert "OPENS" in text and "20.0%" in text


def test_list_stats_of_an_unknown_or_empty_list(env: Env) -> None:
    code, _out, err = env.cli("list", "stats", "nope")
    assert code == 1 and "no list named 'nope'" in err
    admin.create_list(env.db, "empty", "E <e@example.com>")
    facts = liststats.list_stats(env.db, "empty", weeks=3)
    assert facts["now"]["total"] == 0 and len(facts["weeks"]) == 3
    assert facts["newsletters"] == [] and facts["trend"]["bounce_rate"]["direction"] == "unknown"
    code, out, err = env.cli("list", "stats", "empty", "--html", str(env.tmp / "e.html"))
    assert code == 0 and "No newsletter has been sent" in out, err


def test_purged_newsletter_keeps_its_row(env: Env) -> None:
    """A purged newsletter's counts come from its summary, as in `stats`."""
    sent = send_newsletter(env, ["p1@example.org", "p2@example.org"], "purged")
    nid = sent[0].newsletter_id
    sql(env, "UPDATE newsletters SET state = 'done', track = 'opens,clicks', "
             "finished_at = TIMESTAMPADD(DAY, -100, NOW(6)) WHERE id = %s", (nid,))
    for kind, days in (("open", 99), ("click", 1)):  # one folded into the summary, one live
        sql(env, "INSERT INTO tracking_unique (newsletter_id, kind, message_id, hits, "
                 "human_hits, first_at, last_at) VALUES (%s, %s, %s, 1, 1, "
                 "TIMESTAMPADD(DAY, -%s, NOW(6)), TIMESTAMPADD(DAY, -%s, NOW(6)))",
            (nid, kind, sent[0].id, days, days))
    before = liststats.list_stats(env.db, "purged")["newsletters"]
    assert env.cli("purge", "--older-than", "90d", "--pause", "0")[0] == 0
    assert sql(env, "SELECT COUNT(*) AS n FROM messages WHERE newsletter_id = %s",
               (nid,))[0]["n"] == 0
    assert sql(env, "SELECT kind FROM tracking_unique") == [{"kind": "click"}]
    assert liststats.list_stats(env.db, "purged")["newsletters"] == before
    assert (before[0]["delivered"], before[0]["open_rate"], before[0]["click_rate"]) == \
        (2, 0.5, 0.5)


# ----------------------------------------------------------------- migration 013

@pytest.fixture
def scratch_db(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    name = f"ss_liststats_{int(time.time() * 1000) % 10**9}"
    yield write_config(tmp_path / "config.ini", name), name
    conn = pymysql.connect(**server_settings())  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def test_migration_backfills_history(scratch_db: tuple[Path, str]) -> None:
    path, name = scratch_db
    db = Database(load_config(path).database)
    assert db.init_schema(up_to=10) == (0, 10)
    conn = pymysql.connect(**server_settings(), database=name,  # type: ignore[arg-type]
                           autocommit=True)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO lists (id, name, from_name, from_address) "
                    "VALUES (1, 'old', 'Old', 'o@example.com')")
        cur.execute("INSERT INTO templates (id, name, subject, html) VALUES (1, 't', 's', 'h')")
        cur.execute("INSERT INTO newsletters (id, list_id, template_id, subject, html, state) "
                    "VALUES (7, 1, 1, 's', 'h', 'done')")
        for sid, status in enumerate(("active", "unsubscribed", "bounced", "complained"), 1):
            cur.execute("INSERT INTO subscribers (id, list_id, email, domain, fields, status, "
                        "created_at, updated_at) VALUES (%s, 1, %s, 'example.com', '{}', %s, "
                        "'2024-01-01', '2024-03-01')", (sid, f"{status}@example.com", status))
        cur.execute("INSERT INTO bounces (newsletter_id, subscriber_id, email, kind, verified, "
                    "evidence, received_at) VALUES (7, 3, 'bounced@example.com', 'hard', 1, "
                    "'verp', '2024-02-10 12:00:00')")
    assert db.init_schema() == (10, SCHEMA_VERSION)
    with conn.cursor() as cur:
        cur.execute("SELECT subscriber_id, at, from_status, to_status, reason, newsletter_id "
                    "FROM subscriber_events ORDER BY subscriber_id")
        rows = cur.fetchall()
    conn.close()
    assert rows == (
        (2, datetime(2024, 3, 1), "active", "unsubscribed", "before history (schema 13)", None),
        (3, datetime(2024, 2, 10, 12), "active", "bounced", "before history (schema 13)", 7),
        (4, datetime(2024, 3, 1), "active", "complained", "before history (schema 13)", None))
    db.prepare(["liststats_joins_by_week", "liststats_events_by_week", "subscriber_event_insert",
                "sort_batch_messages", "send_batch_messages", "newsletter_retry_failed"])
    facts = liststats.list_stats(db, "old", weeks=200, verify=True)
    assert facts["now"] == {"active": 1, "unsubscribed": 1, "bounced": 1, "complained": 1,
                            "total": 4, "blocked": 0}
    assert all("disagree" not in n for n in facts["notes"])
    db.close()


def test_completed_weeks_are_kept_and_only_new_ones_counted(env: Env) -> None:
    """The second report reads the kept counts of completed weeks; a row given a past
    time behind SendSystem's back is found by --verify and counted by --rebuild."""
    _a, _nids, monday = _arrange(env)
    first = liststats.list_stats(env.db, "weekly", weeks=6)
    now = sql(env, "SELECT NOW(6) AS now")[0]["now"]
    kept = sql(env, "SELECT until FROM list_stats_cache")[0]["until"]
    assert kept == liststats.week_start(now - liststats.CACHE_MARGIN)  # ended a day ago
    assert sql(env, "SELECT SUM(n) AS n FROM list_stats_weeks WHERE kind = 'join'")[0]["n"] == 8
    # The kept rows are what the next report reads: change one, and it shows.
    sql(env, "UPDATE list_stats_weeks SET n = n + 100 WHERE kind = 'join' "
             "AND week = %s", ((monday - timedelta(weeks=5)).date(),))
    second = liststats.list_stats(env.db, "weekly", weeks=6)
    assert second["weeks"][0]["joined"] == first["weeks"][0]["joined"] + 100
    # A new join this week is counted live.
    send_newsletter(env, ["new@example.org"], "weekly")
    assert liststats.list_stats(env.db, "weekly", weeks=6)["weeks"][-1]["joined"] == \
        first["weeks"][-1]["joined"] + 1
    # --verify says the history and the table disagree; --rebuild counts it anew.
    code, out, err = env.cli("list", "stats", "weekly", "--json", "--weeks", "6", "--verify")
    assert code == 0, err
    assert any("disagree by active -100" in n for n in json.loads(out)["notes"])
    code, out, err = env.cli("list", "stats", "weekly", "--json", "--weeks", "6", "--rebuild",
                             "--verify")
    assert code == 0, err
    rebuilt = json.loads(out)
    assert rebuilt["weeks"][0]["joined"] == first["weeks"][0]["joined"]
    assert rebuilt["now"]["total"] == 11 and len(rebuilt["notes"]) == 1
