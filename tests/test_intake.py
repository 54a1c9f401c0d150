"""The bounce intake against a real MariaDB: attribution, classification, thresholds.

Fixture data goes in through the admin API; messages are moved to `sent`
with a raw connection (test set-up only; product code never does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pymysql
import pytest

from sendsystem import admin, stats
from sendsystem.bounces import BounceKind
from sendsystem.intake import Action, process
from sendsystem.roles.send_worker import message_id_header
from sendsystem.signing import unsubscribe_token, verp_address
from tests.conftest import Env, server_settings

DATA = Path(__file__).parent / "data" / "bounces"


@dataclass(frozen=True)
class Sent:
    id: int
    newsletter_id: int
    subscriber_id: int
    list_id: int
    email: str
    message_id: str  # the Message-ID header we sent
    verp: str  # the envelope sender we sent from
    token: str  # the unsubscribe token in its headers


def raw_sql(env: Env, sql: str, params: Any = None) -> list[dict[str, Any]]:
    conn = pymysql.connect(**server_settings(), database=env.config.database.name,  # type: ignore[arg-type]
                           cursorclass=pymysql.cursors.DictCursor, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def send_newsletter(env: Env, emails: list[str], list_name: str = "news") -> list[Sent]:
    """A list with these subscribers and one newsletter whose messages are all `sent`."""
    db = env.db
    if db.fetchone("list_by_name", {"name": list_name}) is None:
        admin.create_list(db, list_name, "News <news@lists.test.example>")
    csv_file = env.tmp / f"{list_name}.csv"
    csv_file.write_text("email,name\n" + "".join(f"{e},N\n" for e in emails), encoding="utf-8")
    admin.import_csv(db, list_name, csv_file)
    html = env.tmp / "t.html"
    html.write_text("<p>Hello {{ name }}</p>", encoding="utf-8")
    admin.add_template(db, "t", "Hello", html, None)
    nid, _created = admin.enqueue(db, list_name, "t")
    domain = env.config.sending.envelope_domain
    secret = env.config.secret()
    out = []
    for row in raw_sql(env, "SELECT m.id, m.subscriber_id, s.email, s.list_id FROM messages m "
                            "JOIN subscribers s ON s.id = m.subscriber_id "
                            "WHERE m.newsletter_id = %s ORDER BY m.id", (nid,)):
        header = message_id_header(row["id"], nid, domain)
        raw_sql(env, "UPDATE messages SET state = 'sent', finished_at = NOW(6), message_id = %s "
                     "WHERE id = %s", (header, row["id"]))
        out.append(Sent(row["id"], nid, row["subscriber_id"], row["list_id"], row["email"],
                        header, verp_address(secret, row["id"], domain),
                        unsubscribe_token(secret, row["subscriber_id"], row["list_id"])))
    return out


def dsn(to: str, recipient: str, *, action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown",
        message_id: str | None = None, sender: str | None = None) -> bytes:
    """A Postfix-style RFC 3464 report, addressed to ``to`` (a VERP address, or not)."""
    diag = diagnostic.format(rcpt=recipient)
    original = (f"From: News <news@lists.test.example>\nTo: {recipient}\nSubject: Hello\n"
                + (f"Message-ID: {message_id}\n" if message_id else ""))
    text = f"""Return-Path: <>
Delivered-To: {to}
Date: {formatdate()}
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
Subject: {"Delayed Mail (still being retried)" if action == "delayed" else "Undelivered Mail"}
To: {to}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"

--BOUNDARY
Content-Type: text/plain; charset=us-ascii

<{recipient}>: {diag}

--BOUNDARY
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
X-Postfix-Sender: rfc822; {sender or to}

Final-Recipient: rfc822; {recipient}
Action: {action}
Status: {status}
Diagnostic-Code: {diag}

--BOUNDARY
Content-Type: text/rfc822-headers

{original}
--BOUNDARY--
"""
    return text.replace("\n", "\r\n").encode()


def bounce_rows(env: Env) -> list[dict[str, Any]]:
    return raw_sql(env, "SELECT message_id, subscriber_id, email, kind, status, diagnostic "
                        "FROM bounces ORDER BY id")


def state(env: Env, sent: Sent) -> tuple[str, str]:
    row = raw_sql(env, "SELECT m.state, s.status FROM messages m JOIN subscribers s "
                       "ON s.id = m.subscriber_id WHERE m.id = %s", (sent.id,))[0]
    return row["state"], row["status"]


def test_hard_bounce_via_verp(env: Env) -> None:
    a, b = send_newsletter(env, ["gone@example.org", "fine@example.org"])
    outcome = process(env.db, env.config, dsn(a.verp, a.email), a.verp)
    assert outcome.action is Action.RECORDED and outcome.kind is BounceKind.HARD
    assert (outcome.message_id, outcome.via, outcome.status_changed) == (a.id, "verp", True)
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "active")
    [row] = bounce_rows(env)
    assert (row["message_id"], row["subscriber_id"], row["kind"], row["status"]) == \
        (a.id, a.subscriber_id, "hard", "5.1.1")
    assert "User unknown" in row["diagnostic"]


def test_same_bounce_twice_counts_once(env: Env) -> None:
    """The MTA re-delivers a bounce after exit 75: stored and counted once."""
    env.configure(bounce={"hard_limit": 2})
    [a] = send_newsletter(env, ["gone@example.org"])
    first = process(env.db, env.config, dsn(a.verp, a.email))
    again = process(env.db, env.config, dsn(a.verp, a.email))
    assert first.action is Action.RECORDED and again.action is Action.DUPLICATE
    assert len(bounce_rows(env)) == 1
    assert state(env, a) == ("bounced", "active")  # one hard bounce < hard_limit 2


def test_soft_bounces_reach_threshold_within_window(env: Env) -> None:
    sent = [send_newsletter(env, ["full@example.dk"], list_name=f"l{i}")[0] for i in range(3)]
    full = "smtp; 552 5.2.2 <{rcpt}>: Mailbox full"
    results = [process(env.db, env.config, dsn(s.verp, s.email, status="5.2.2", diagnostic=full))
               for s in sent]
    assert [r.kind for r in results] == [BounceKind.SOFT] * 3
    assert [r.status_changed for r in results] == [False, False, True]
    # Soft bounces never mark the message bounced: it was not the address's fault.
    assert [state(env, s)[0] for s in sent] == ["sent"] * 3
    statuses = raw_sql(env, "SELECT status FROM subscribers WHERE email = 'full@example.dk'")
    assert {r["status"] for r in statuses} == {"bounced"}


def test_soft_bounces_outside_window_do_not_count(env: Env) -> None:
    sent = [send_newsletter(env, ["full@example.dk"], list_name=f"l{i}")[0] for i in range(3)]
    for s in sent[:2]:
        process(env.db, env.config, dsn(s.verp, s.email, status="4.2.2"))
    raw_sql(env, "UPDATE bounces SET received_at = NOW(6) - INTERVAL 8 DAY")
    outcome = process(env.db, env.config, dsn(sent[2].verp, sent[2].email, status="4.2.2"))
    assert outcome.action is Action.RECORDED and not outcome.status_changed
    assert state(env, sent[2]) == ("sent", "active")


def test_delayed_is_soft_and_counted_once_per_message(env: Env) -> None:
    [a] = send_newsletter(env, ["slow@example.com"])
    delayed = dsn(a.verp, a.email, action="delayed", status="4.4.1",
                  diagnostic="X-Postfix; connect to mx.example.com: Connection timed out")
    first = process(env.db, env.config, delayed)
    second = process(env.db, env.config, delayed)  # Postfix warns more than once
    assert first.kind is BounceKind.SOFT and first.action is Action.RECORDED
    assert second.action is Action.DUPLICATE
    assert state(env, a) == ("sent", "active")
    assert [r["kind"] for r in bounce_rows(env)] == ["soft"]


def test_soft_then_hard_for_same_message(env: Env) -> None:
    [a] = send_newsletter(env, ["later@example.com"])
    process(env.db, env.config, dsn(a.verp, a.email, action="delayed", status="4.4.1"))
    outcome = process(env.db, env.config, dsn(a.verp, a.email))
    assert outcome.action is Action.RECORDED and outcome.kind is BounceKind.HARD
    assert state(env, a) == ("bounced", "bounced")


@pytest.mark.parametrize("name", ["ooo_english.eml", "ooo_danish.eml"])
def test_auto_reply_is_no_bounce(env: Env, name: str) -> None:
    [a] = send_newsletter(env, ["away@example.com"])
    raw = (DATA / name).read_text(encoding="utf-8")
    # Address the reply to our VERP sender, as an auto-responder replying to
    # Return-Path would.
    raw = raw.replace("Delivered-To:", f"Delivered-To: {a.verp}\nX-Old-Delivered-To:", 1)
    outcome = process(env.db, env.config, raw.encode(), a.verp)
    assert outcome.kind is BounceKind.AUTOREPLY and outcome.action is Action.RECORDED
    assert state(env, a) == ("sent", "active")
    assert [r["kind"] for r in bounce_rows(env)] == ["autoreply"]
    # Unattributable auto-replies are dropped: nothing stored.
    dropped = process(env.db, env.config, (DATA / name).read_bytes())
    assert dropped.action is Action.IGNORED and not dropped.needs_human
    assert len(bounce_rows(env)) == 1


def test_arf_complaint_unsubscribes_and_blocks(env: Env) -> None:
    a, b = send_newsletter(env, ["reader@example.net", "other@example.net"])
    raw = (DATA / "arf_abuse.eml").read_text(encoding="utf-8")
    raw = raw.replace("brz-e4ohdfea7hjgzn2n@bounces.example.com", a.verp)
    outcome = process(env.db, env.config, raw.encode())
    assert outcome.kind is BounceKind.COMPLAINT and outcome.action is Action.RECORDED
    assert (outcome.message_id, outcome.status_changed) == (a.id, True)
    assert state(env, a) == ("sent", "complained")
    assert state(env, b) == ("sent", "active")
    assert raw_sql(env, "SELECT pattern, reason FROM blocklist") == \
        [{"pattern": "reader@example.net", "reason": "complaint"}]
    assert [r["kind"] for r in bounce_rows(env)] == ["complaint"]
    # The sort and send workers' per-message check matches this subscriber.
    assert raw_sql(env, "SELECT COUNT(*) AS n FROM blocklist b JOIN subscribers s "
                        "ON b.pattern = s.email WHERE s.id = %s", (a.subscriber_id,))[0]["n"] == 1


def test_dsn_to_list_address_found_by_message_id(env: Env) -> None:
    """A broken MTA bounced to the From: address; the list owner forwards it to us."""
    a, _b = send_newsletter(env, ["former@example.co.uk", "stays@example.co.uk"])
    raw = dsn("news@lists.test.example", a.email, message_id=a.message_id,
              sender="news@lists.test.example")
    outcome = process(env.db, env.config, raw)
    assert (outcome.action, outcome.via, outcome.message_id) == (Action.RECORDED, "message-id",
                                                                 a.id)
    assert state(env, a) == ("bounced", "bounced")


def test_recipient_address_fallback_matches_recent_message(env: Env) -> None:
    """An old-style bounce with no DSN and no Message-ID: flufl.bounce finds the address."""
    [a] = send_newsletter(env, ["gone@example.net"])
    raw = (DATA / "exchange_legacy.eml").read_text(encoding="utf-8")
    raw = raw.replace("bob@example.com", a.email)
    outcome = process(env.db, env.config, raw.encode())
    assert (outcome.action, outcome.via, outcome.message_id) == (Action.RECORDED, "recipient",
                                                                 a.id)


def test_forged_verp_is_ignored(env: Env) -> None:
    [a] = send_newsletter(env, ["target@example.org"])
    forged = a.verp.replace(a.verp.split("-")[1][:4], "aaaa")
    # Even with a genuine Message-ID and recipient inside, a forged VERP address
    # attributes nothing: the message is kept as 'unknown' for a human.
    outcome = process(env.db, env.config, dsn(forged, a.email, message_id=a.message_id), forged)
    assert outcome.action is Action.UNATTRIBUTED and outcome.forged and outcome.needs_human
    assert state(env, a) == ("sent", "active")
    [row] = bounce_rows(env)
    assert row["kind"] == "unknown" and row["message_id"] is None
    assert "forged VERP" in row["diagnostic"] and "[hard]" in row["diagnostic"]


def test_unattributable_bounce_kept_as_unknown(env: Env) -> None:
    send_newsletter(env, ["someone@example.org"])
    outcome = process(env.db, env.config, dsn("postmaster@lists.test.example",
                                               "stranger@example.org"))
    assert outcome.action is Action.UNATTRIBUTED and not outcome.forged
    [row] = bounce_rows(env)
    assert (row["kind"], row["email"], row["status"]) == ("unknown", "stranger@example.org",
                                                         "5.1.1")


@pytest.mark.parametrize("name", ["personal_reply.eml", "garbage.eml"])
def test_not_a_bounce(env: Env, name: str) -> None:
    [a] = send_newsletter(env, ["reader@example.org"])
    outcome = process(env.db, env.config, (DATA / name).read_bytes(), a.verp)
    assert outcome.kind is BounceKind.NOT_BOUNCE and outcome.action is Action.IGNORED
    assert outcome.needs_human  # a person may have written it
    assert bounce_rows(env) == []
    assert state(env, a) == ("sent", "active")


def test_mailto_unsubscribe(env: Env) -> None:
    a, b = send_newsletter(env, ["karen@example.org", "keep@example.org"])
    raw = (DATA / "unsubscribe_mailto.eml").read_text(encoding="utf-8")
    raw = raw.replace("39u.7.dwBurP5i28X19HZb0Lovyw", a.token)
    raw = raw.replace("unsubscribe@bounces.example.com", env.config.unsubscribe.mailto)
    outcome = process(env.db, env.config, raw.encode())
    assert (outcome.action, outcome.subscriber_id, outcome.status_changed) == \
        (Action.UNSUBSCRIBED, a.subscriber_id, True)
    assert state(env, a) == ("sent", "unsubscribed")
    assert state(env, b) == ("sent", "active")
    assert [r["kind"] for r in bounce_rows(env)] == ["unsubscribe"]
    again = process(env.db, env.config, raw.encode())
    assert again.action is Action.UNSUBSCRIBED and not again.status_changed


def test_mailto_unsubscribe_with_forged_token_needs_human(env: Env) -> None:
    a, = send_newsletter(env, ["karen@example.org"])
    forged = a.token[:-4] + ("AAAA" if not a.token.endswith("AAAA") else "BBBB")
    raw = (DATA / "unsubscribe_mailto.eml").read_text(encoding="utf-8")
    raw = raw.replace("39u.7.dwBurP5i28X19HZb0Lovyw", forged)
    raw = raw.replace("unsubscribe@bounces.example.com", env.config.unsubscribe.mailto)
    outcome = process(env.db, env.config, raw.encode())
    assert outcome.action is Action.UNATTRIBUTED and outcome.needs_human
    assert state(env, a) == ("sent", "active")


def test_hard_bounce_for_one_list_bounces_address_everywhere(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"], list_name="one")
    send_newsletter(env, ["gone@example.org"], list_name="two")
    process(env.db, env.config, dsn(a.verp, a.email))
    statuses = raw_sql(env, "SELECT status FROM subscribers WHERE email = 'gone@example.org'")
    assert [r["status"] for r in statuses] == ["bounced", "bounced"]


def test_policy_blocks_are_kept_and_never_counted(env: Env) -> None:
    """A spam block names our reputation, not the reader: stored as `blocked`, counted nowhere."""
    sent = [send_newsletter(env, ["reader@gmail.example"], list_name=f"l{i}")[0]
            for i in range(4)]
    block = "smtp; 550-5.7.1 Our system has detected that this message is likely unsolicited mail"
    results = [process(env.db, env.config, dsn(s.verp, s.email, status="5.0.0", diagnostic=block))
               for s in sent]  # 4 > soft_limit 3, with a generic Status as Exim writes it
    assert [(r.action, r.kind, r.status) for r in results] == \
        [(Action.RECORDED, BounceKind.BLOCKED, "5.7.1")] * 4
    assert not any(r.status_changed for r in results)
    assert [state(env, s) for s in sent] == [("sent", "active")] * 4
    assert [r["kind"] for r in bounce_rows(env)] == ["blocked"] * 4
    assert stats.newsletter_stats(env.db, sent[0].newsletter_id)["bounces"]["blocked"] == 1
