"""The bounce intake against a real MariaDB: evidence, classification, thresholds.

Fixture data goes in through the admin API; messages are moved to `sent`
with a raw connection (test set-up only; product code never does that).
The sample files carry VERP addresses, signed Message-IDs and tokens made
with the sample secret of test_bounces.py; tests swap in the ones this
run's secret makes for real messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from sendsystem import admin, stats
from sendsystem.bounce.classify import BounceKind
from sendsystem.bounce.intake import Action, IntakeOutcome, process
from sendsystem.tokens import message_id_header, unsubscribe_token, verp_address
from tests.harness.env import Env
from tests.harness.helpers import sql as raw_sql

DATA = Path(__file__).resolve().parents[1] / "data" / "bounces"
SAMPLE_SECRET = b"test-secret-for-bounce-samples"  # as in test_bounces.py
SAMPLE_DOMAIN = "bounces.example.com"


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


def send_newsletter(env: Env, emails: list[str], list_name: str = "news") -> list[Sent]:
    """A list with these subscribers and one newsletter whose messages are all `sent`;
    their messages in the order of ``emails``."""
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
        header = message_id_header(secret, row["id"], nid, domain)
        raw_sql(env, "UPDATE messages SET state = 'sent', finished_at = NOW(6), message_id = %s "
                     "WHERE id = %s", (header, row["id"]))
        out.append(Sent(row["id"], nid, row["subscriber_id"], row["list_id"], row["email"],
                        header, verp_address(secret, row["id"], domain),
                        unsubscribe_token(secret, row["subscriber_id"], row["list_id"])))
    # In the order given (an import numbers new subscribers in address order).
    order = [e.lower() for e in emails]
    return sorted(out, key=lambda s: (order.index(s.email.lower())
                                      if s.email.lower() in order else len(order), s.id))


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
    return raw_sql(env, "SELECT newsletter_id, message_id, subscriber_id, email, kind, verified, "
                        "evidence, status, diagnostic FROM bounces ORDER BY id")


def sample(name: str, sent: Sent, n: int, *, list_id: int = 7, subscriber_id: int = 4242,
           verp_to: str | None = None) -> bytes:
    """A sample file with its message n's signed identifiers swapped for ``sent``'s."""
    raw = (DATA / name).read_text(encoding="utf-8")
    raw = raw.replace(message_id_header(SAMPLE_SECRET, n, 3, SAMPLE_DOMAIN), sent.message_id)
    raw = raw.replace(unsubscribe_token(SAMPLE_SECRET, subscriber_id, list_id), sent.token)
    raw = raw.replace(verp_address(SAMPLE_SECRET, n, SAMPLE_DOMAIN), verp_to or sent.verp)
    return raw.encode()


def statuses(env: Env, email: str) -> list[str]:
    """The address's status on every list, in list order."""
    return [r["status"] for r in raw_sql(env, "SELECT status FROM subscribers WHERE email = %s "
                                              "ORDER BY list_id", (email,))]


def blocked(env: Env) -> list[str]:
    return [r["pattern"] for r in raw_sql(env, "SELECT pattern FROM blocklist ORDER BY id")]


def assert_changed_nothing(env: Env, outcome: IntakeOutcome, *sent: Sent) -> None:
    """Stored unverified; every list of the address active, nothing blocked, states kept."""
    assert outcome.action is Action.UNVERIFIED and outcome.needs_human
    assert outcome.message_id is None and not outcome.status_changed
    [row] = bounce_rows(env)
    assert row["verified"] == 0 and row["evidence"] is None
    assert row["message_id"] is None and row["subscriber_id"] is None
    for s in sent:
        assert set(statuses(env, s.email)) == {"active"}
        assert state(env, s) == ("sent", "active")
    assert blocked(env) == []
    # stats counts it apart, not as a bounce or complaint.
    facts = stats.newsletter_stats(env.db, sent[0].newsletter_id)
    assert facts["bounces"]["unverified"] == 1
    assert facts["bounces"]["unverified_kinds"] == {str(outcome.kind): 1}
    assert (facts["bounces"]["hard"], facts["bounces"]["soft"],
            facts["bounces"]["complaint"]) == (0, 0, 0)
    assert facts["bounce_rate"] == 0.0 and facts["complaint_rate"] == 0.0


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


FULL = "smtp; 552 5.2.2 <{rcpt}>: Mailbox full"


def test_soft_bounces_reach_threshold_within_window(env: Env) -> None:
    """Three newsletters of one list: the third soft bounce ends that subscription only."""
    other = send_newsletter(env, ["full@example.dk"], list_name="other")[0]
    sent = [send_newsletter(env, ["full@example.dk"])[0] for _ in range(3)]
    results = [process(env.db, env.config, dsn(s.verp, s.email, status="5.2.2", diagnostic=FULL))
               for s in sent]
    assert [r.kind for r in results] == [BounceKind.SOFT] * 3
    assert [r.status_changed for r in results] == [False, False, True]
    # Soft bounces never mark the message bounced: it was not the address's fault.
    assert [state(env, s)[0] for s in sent] == ["sent"] * 3
    assert statuses(env, "full@example.dk") == ["active", "bounced"]  # lists other, news
    assert state(env, other) == ("sent", "active")


def test_soft_bounces_on_different_lists_count_apart(env: Env) -> None:
    """One customer's mail being refused (soft) does not add up against another's list."""
    sent = [send_newsletter(env, ["full@example.dk"], list_name=f"l{i}")[0] for i in range(3)]
    results = [process(env.db, env.config, dsn(s.verp, s.email, status="5.2.2", diagnostic=FULL))
               for s in sent]
    assert [r.status_changed for r in results] == [False, False, False]
    assert statuses(env, "full@example.dk") == ["active"] * 3
    # With scope = address they count together and end every subscription.
    truncate_bounces(env)
    env.configure(bounce={"scope": "address"})
    results = [process(env.db, env.config, dsn(s.verp, s.email, status="5.2.2", diagnostic=FULL))
               for s in sent]
    assert [r.status_changed for r in results] == [False, False, True]
    assert statuses(env, "full@example.dk") == ["bounced"] * 3


def truncate_bounces(env: Env) -> None:
    raw_sql(env, "DELETE FROM bounces")


def test_soft_bounces_outside_window_do_not_count(env: Env) -> None:
    sent = [send_newsletter(env, ["full@example.dk"])[0] for _ in range(3)]
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


def test_arf_complaint_ends_the_subscription_of_its_list(env: Env) -> None:
    a, b = send_newsletter(env, ["reader@example.net", "other@example.net"])
    [elsewhere] = send_newsletter(env, ["reader@example.net"], list_name="other")
    outcome = process(env.db, env.config, sample("arf_abuse.eml", a, 1007))
    assert outcome.kind is BounceKind.COMPLAINT and outcome.action is Action.RECORDED
    assert (outcome.message_id, outcome.status_changed, outcome.via) == (a.id, True, "verp")
    assert state(env, a) == ("sent", "complained")
    assert state(env, b) == ("sent", "active")
    # scope = list: another customer's list keeps the reader; nothing is blocked.
    assert state(env, elsewhere) == ("sent", "active")
    assert blocked(env) == []
    [row] = bounce_rows(env)
    assert (row["kind"], row["verified"], row["evidence"]) == ("complaint", 1, "verp")
    assert stats.newsletter_stats(env.db, a.newsletter_id)["bounces"]["complaint"] == 1


def test_arf_complaint_blocks_everywhere_with_scope_address(env: Env) -> None:
    env.configure(bounce={"scope": "address"})
    a, b = send_newsletter(env, ["reader@example.net", "other@example.net"])
    outcome = process(env.db, env.config, sample("arf_abuse.eml", a, 1007))
    assert (outcome.action, outcome.status_changed) == (Action.RECORDED, True)
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


# --- forged reports change nobody ---------------------------------------------------------


def test_address_only_dsn_changes_nobody(env: Env) -> None:
    """flufl.bounce finds a real subscriber's address, but nothing signed ties it to us."""
    [a] = send_newsletter(env, ["gone@example.net"])
    [b] = send_newsletter(env, ["gone@example.net"], list_name="other")
    raw = (DATA / "exchange_legacy.eml").read_text(encoding="utf-8")
    raw = raw.replace("bob@example.com", a.email)
    raw = raw.replace(verp_address(SAMPLE_SECRET, 1008, SAMPLE_DOMAIN), "bounces@lists.example")
    outcome = process(env.db, env.config, raw.encode())
    assert outcome.kind is BounceKind.HARD
    assert_changed_nothing(env, outcome, b, a)
    [row] = bounce_rows(env)
    assert (row["kind"], row["email"], row["newsletter_id"]) == ("hard", a.email,
                                                                  b.newsletter_id)
    assert "names an address only" in row["diagnostic"]


def test_dsn_quoting_real_address_and_no_message_id_changes_nobody(env: Env) -> None:
    [a] = send_newsletter(env, ["someone@example.org"])
    outcome = process(env.db, env.config, dsn("postmaster@lists.test.example", a.email))
    assert_changed_nothing(env, outcome, a)


@pytest.mark.parametrize("how", ["old sequential format", "wrong HMAC", "other secret"])
def test_complaint_with_guessed_message_id_changes_nobody(env: Env, how: str) -> None:
    a, _b = send_newsletter(env, ["reader@example.net", "next@example.net"])
    [elsewhere] = send_newsletter(env, ["reader@example.net"], list_name="other")
    domain = env.config.sending.envelope_domain
    guessed = {
        "old sequential format": f"<{a.id}.{a.newsletter_id}.ss@{domain}>",
        "wrong HMAC": a.message_id[:-len(domain) - 6] + ("aaaa" if "aaaa" not in a.message_id
                                                         else "bbbb") + f"@{domain}>",
        "other secret": message_id_header(b"guess", a.id, a.newsletter_id, domain),
    }[how]
    assert guessed != a.message_id and guessed.count("@") == 1
    # No VERP anywhere: the feedback loop names our From address as the sender.
    raw = sample("arf_abuse.eml", a, 1007, verp_to="news@lists.test.example")
    raw = raw.replace(a.message_id.encode(), guessed.encode())
    raw = raw.replace(a.token.encode(), b"")
    outcome = process(env.db, env.config, raw)
    assert outcome.kind is BounceKind.COMPLAINT
    assert_changed_nothing(env, outcome, a, elsewhere)
    assert "not signed by us" in bounce_rows(env)[0]["diagnostic"]


@pytest.mark.parametrize("token", ["none", "forged"])
def test_complaint_to_the_unsubscribe_address_without_valid_token(env: Env, token: str) -> None:
    """A plain "stop spamming me" mail, and an ARF report, to the mailto address."""
    a, _b = send_newsletter(env, ["karen@example.org", "keep@example.org"])
    [elsewhere] = send_newsletter(env, ["karen@example.org"], list_name="other")
    bad = "" if token == "none" else a.token[:-4] + ("AAAA" if not a.token.endswith("AAAA")
                                                     else "BBBB")
    raw = (DATA / "unsubscribe_mailto.eml").read_text(encoding="utf-8")
    raw = raw.replace("39u.7.dwBurP5i28X19HZb0Lovyw", bad)
    raw = raw.replace("unsubscribe@bounces.example.com", env.config.unsubscribe.mailto)
    outcome = process(env.db, env.config, raw.encode())
    assert outcome.kind is BounceKind.UNSUBSCRIBE
    assert_changed_nothing(env, outcome, elsewhere, a)
    truncate_bounces(env)
    # An abuse report mailed to the unsubscribe address, quoting a guessed Message-ID.
    arf = sample("arf_abuse.eml", a, 1007, verp_to="news@lists.test.example")
    arf = arf.replace(a.message_id.encode(), f"<{a.id}.{a.newsletter_id}.ss@x.example>".encode())
    arf = arf.replace(a.token.encode(), bad.encode())
    arf = arf.replace(b"fbl@bounces.example.com", env.config.unsubscribe.mailto.encode())
    outcome = process(env.db, env.config, arf, env.config.unsubscribe.mailto)
    assert outcome.kind is BounceKind.COMPLAINT and outcome.action is Action.UNVERIFIED
    assert set(statuses(env, a.email)) == {"active"} and blocked(env) == []


def test_forged_verp_changes_nobody(env: Env) -> None:
    [a] = send_newsletter(env, ["target@example.org"])
    [elsewhere] = send_newsletter(env, ["target@example.org"], list_name="other")
    forged = a.verp.replace(a.verp.split("-")[1][:4], "aaaa")
    # Even with a genuine Message-ID and recipient inside, a forged VERP address
    # ties nothing: nothing else in the message is trusted.
    outcome = process(env.db, env.config, dsn(forged, a.email, message_id=a.message_id), forged)
    assert outcome.forged and outcome.kind is BounceKind.HARD
    assert_changed_nothing(env, outcome, a, elsewhere)
    [row] = bounce_rows(env)
    assert row["kind"] == "hard" and row["newsletter_id"] == a.newsletter_id
    assert "forged VERP" in row["diagnostic"] and "[unverified hard" in row["diagnostic"]


# --- genuine reports act ------------------------------------------------------------------


def test_dsn_without_verp_quoting_signed_message_id_acts(env: Env) -> None:
    """Gmail's DSN, forwarded to us without our envelope address: the Message-ID ties it."""
    a, b = send_newsletter(env, ["missing@gmail.example", "fine@gmail.example"])
    raw = sample("gmail_dsn.eml", a, 1015, verp_to="news@lists.test.example")
    assert a.verp.encode() not in raw and a.message_id.encode() in raw
    outcome = process(env.db, env.config, raw)
    assert (outcome.action, outcome.via, outcome.message_id) == (Action.RECORDED, "message-id",
                                                                 a.id)
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "active")
    [row] = bounce_rows(env)
    assert (row["verified"], row["evidence"], row["newsletter_id"]) == (1, "message-id",
                                                                        a.newsletter_id)


def test_exchange_ndr_acts(env: Env) -> None:
    [a] = send_newsletter(env, ["someone@contoso.example"])
    outcome = process(env.db, env.config, sample("exchange_online.eml", a, 1005))
    assert (outcome.action, outcome.via) == (Action.RECORDED, "verp")
    assert state(env, a) == ("bounced", "bounced")
    # Without the VERP address, the Message-ID it quotes is enough.
    [c] = send_newsletter(env, ["someone@contoso.example"], list_name="other")
    outcome = process(env.db, env.config, sample("exchange_online.eml", c, 1005,
                                                 verp_to="news@lists.test.example"))
    assert (outcome.action, outcome.via, outcome.message_id) == (Action.RECORDED, "message-id",
                                                                 c.id)


@pytest.mark.parametrize(("name", "n"), [("arf_jmrp.eml", 1013), ("arf_yahoo_headers.eml", 1014)])
def test_feedback_loop_complaint_quoting_signed_message_id_acts(env: Env, name: str,
                                                               n: int) -> None:
    a, b = send_newsletter(env, ["reader@example.net", "other@example.net"])
    raw = sample(name, a, n, subscriber_id=4243 if name == "arf_jmrp.eml" else 4242)
    outcome = process(env.db, env.config, raw)
    assert (outcome.action, outcome.kind, outcome.via, outcome.message_id) == \
        (Action.RECORDED, BounceKind.COMPLAINT, "message-id", a.id)
    assert state(env, a) == ("sent", "complained")
    assert state(env, b) == ("sent", "active")
    facts = stats.newsletter_stats(env.db, a.newsletter_id)
    assert facts["bounces"]["complaint"] == 1 and facts["bounces"]["unverified"] == 0


def test_redacted_complaint_tied_by_list_unsubscribe_token(env: Env) -> None:
    """A feedback loop that strips the Message-ID too: the signed token names the reader."""
    a, b = send_newsletter(env, ["reader@example.net", "other@example.net"])
    raw = sample("arf_jmrp.eml", a, 1013, subscriber_id=4243)
    raw = raw.replace(f"Message-ID: {a.message_id}".encode(), b"X-Message-ID: redacted")
    outcome = process(env.db, env.config, raw)
    assert (outcome.action, outcome.via, outcome.subscriber_id) == (Action.RECORDED, "token",
                                                                    a.subscriber_id)
    assert state(env, a) == ("sent", "complained")
    assert state(env, b) == ("sent", "active")


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


def test_hard_bounce_acts_on_the_list_it_came_from(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"], list_name="one")
    [b] = send_newsletter(env, ["gone@example.org"], list_name="two")
    outcome = process(env.db, env.config, dsn(a.verp, a.email))
    assert outcome.status_changed
    assert statuses(env, "gone@example.org") == ["bounced", "active"]
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "active")


def test_hard_bounce_spreads_to_every_list_with_scope_address(env: Env) -> None:
    env.configure(bounce={"scope": "address"})
    [a] = send_newsletter(env, ["gone@example.org"], list_name="one")
    [b] = send_newsletter(env, ["gone@example.org"], list_name="two")
    process(env.db, env.config, dsn(a.verp, a.email))
    assert statuses(env, "gone@example.org") == ["bounced", "bounced"]
    assert state(env, b) == ("sent", "bounced")  # its message was not the one that bounced


def test_stats_and_status_show_unverified_reports_apart(env: Env) -> None:
    """`stats ID` (text, --json, --html) and `status` count unverified reports apart."""
    a, b = send_newsletter(env, ["gone@example.org", "forged@example.org"])
    process(env.db, env.config, dsn(a.verp, a.email))  # genuine: acts
    process(env.db, env.config, dsn("postmaster@lists.test.example", b.email))  # address only
    code, out, err = env.cli("stats", str(a.newsletter_id), "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["bounces"]["hard"] == 1  # the existing keys keep their meaning
    assert (facts["bounces"]["unverified"], facts["bounces"]["unverified_kinds"]) == \
        (1, {"hard": 1})
    assert facts["counts"]["bounced"] == 1
    code, out, err = env.cli("stats", str(a.newsletter_id))
    assert code == 0, err
    assert "unverified reports (no signed evidence, changed nothing): 1 (hard 1)" in out
    html_file = env.tmp / "report.html"
    code, _out, err = env.cli("stats", str(a.newsletter_id), "--html", str(html_file))
    assert code == 0, err
    assert "Unverified reports" in html_file.read_text(encoding="utf-8")
    code, out, err = env.cli("status", "--json")
    assert code == 0, err
    assert json.loads(out)["unverified_reports_24h"] == 1
    code, out, err = env.cli("status")
    assert code == 0, err
    assert "Unverified bounce/complaint reports, last 24 h: 1" in out


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
