"""The SendingSystem end to end with real processes, a real database and real
SMTP servers (aiosmtpd in-process): replies and states, retries, headers,
VERP, relays, SIGKILL recovery, DKIM, purge, auto-pause."""

from __future__ import annotations

import email
import email.policy
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import dkim
import pytest

from sendsystem import admin, stats
from sendsystem.tokens import (
    SignedMessage,
    decode_message_id,
    decode_verp,
    verify_unsubscribe_token,
)
from tests.harness.env import Env
from tests.harness.helpers import make_newsletter, sql, states, stop_all, wait_exit, wait_for
from tests.harness.smtp_server import SmtpServer


def relay_config(env: Env, *servers: SmtpServer | str, **sending: object) -> None:
    relays = ", ".join(s if isinstance(s, str) else f"127.0.0.1:{s.port}" for s in servers)
    env.configure(sending={"relays": relays, "relay_backoff_min": 0.5,
                           "relay_backoff_max": 2, **sending})


def run_pipeline_once(env: Env, timeout: float = 90) -> None:
    procs = [env.spawn("sort-balancer", "--once", "--name", "sb"),
             env.spawn("sort-worker", "--once", "--name", "sw"),
             env.spawn("send-balancer", "--once", "--name", "tb"),
             env.spawn("send-worker", "--once", "--name", "tw")]
    for p in procs:
        assert wait_exit(p, timeout) == 0


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def test_replies_states_retries_headers_and_verp(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv)
        srv.rule("user1@example.com", "550 5.1.1 <user1@example.com>: User unknown")
        srv.rule("user2@example.com", "550 5.7.1 Message rejected by policy")
        srv.rule("user3@example.com", "451 4.3.0 Try again later", times=1)
        nid = make_newsletter(env, 8)
        # user1 is on another customer's list too: the SMTP-time bounce ends only this one.
        admin.create_list(env.db, "other", "Other <other@example.com>")
        (env.tmp / "other.csv").write_text("email\nuser1@example.com\n", encoding="utf-8")
        admin.import_csv(env.db, "other", env.tmp / "other.csv")
        run_pipeline_once(env)
        # The deferred one comes back after retry_min (1 s): run again.
        wait_for(lambda: sql(env, "SELECT next_attempt_at <= NOW(6) AS due FROM messages "
                                  "WHERE state = 'deferred'")[0]["due"], 5, "retry due")
        run_pipeline_once(env)
        received = srv.messages
    assert states(env, nid) == {"sent": 6, "failed": 2}
    rows = {r["email"]: r for r in sql(
        env, "SELECT s.email, s.status, m.state, m.reply_code, m.reply, m.attempts, m.deferrals,"
             " m.body, m.message_id, m.id FROM messages m JOIN subscribers s "
             "ON s.id = m.subscriber_id")}
    assert rows["user1@example.com"]["state"] == "failed"
    assert rows["user1@example.com"]["status"] == "bounced"  # 5.1.x blames the address
    assert rows["user2@example.com"]["status"] == "active"   # 5.7.x is about us
    assert rows["user3@example.com"]["state"] == "sent"
    assert (rows["user3@example.com"]["attempts"], rows["user3@example.com"]["deferrals"]) \
        == (2, 1)
    assert rows["user0@example.com"]["reply"].startswith("250")
    assert all(r["body"] is None for r in rows.values())  # purged when final
    bounces = sql(env, "SELECT email, kind, status, verified, evidence, newsletter_id "
                       "FROM bounces")
    # Our relay's reply on our connection is first-hand evidence: it acts.
    assert bounces == [{"email": "user1@example.com", "kind": "hard", "status": "5.1.1",
                        "verified": 1, "evidence": "smtp", "newsletter_id": nid}]
    assert [r["status"] for r in sql(env, "SELECT s.status FROM subscribers s JOIN lists l "
                                          "ON l.id = s.list_id WHERE l.name = 'other'")] \
        == ["active"]

    assert Counter(r for m in received for r in m.rcpt_tos) == {
        f"user{i}@example.com": 1 for i in (0, 3, 4, 5, 6, 7)}
    secret = env.config.secret()
    for m in received:
        assert len(m.rcpt_tos) == 1
        msg = parse(m.data)
        rcpt = m.rcpt_tos[0]
        assert msg["To"] == rcpt
        assert msg["Precedence"] == "bulk"
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert "list" in msg["List-Id"] and msg["Date"]
        lu = msg["List-Unsubscribe"]
        assert "<https://lists.test.example/unsubscribe/" in lu and "<mailto:unsub" in lu
        token = lu.split("/unsubscribe/", 1)[1].split(">", 1)[0]
        assert verify_unsubscribe_token(secret, token) is not None
        mid = decode_verp(secret, m.mail_from, "bounces.test.example")
        assert mid is not None and rows[rcpt]["id"] == mid
        assert msg["Message-ID"] == rows[rcpt]["message_id"]
        assert decode_message_id(secret, msg["Message-ID"]) == SignedMessage(mid, nid)
        assert msg.get_body(("html",)) is not None and msg.get_body(("plain",)) is not None
    # A forged VERP address does not decode.
    assert decode_verp(secret, "b1-aaaaaaaaaaaaaaaa@bounces.test.example") is None

    facts = stats.newsletter_stats(env.db, nid)
    assert facts["counts"]["sent"] == 6 and facts["counts"]["failed"] == 2
    assert facts["deferrals"] == 1
    assert {r["code"] for r in facts["replies"]} == {250, 550}
    assert facts["bounces"]["hard"] == 1
    assert admin.get_newsletter(env.db, nid)["state"] == "done"


def test_attachments_are_stored_once_and_arrive_intact(env: Env) -> None:
    pdf = env.tmp / "brochure.pdf"
    pdf.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 40)
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, 5, attachments=(pdf,))
        run_pipeline_once(env)
        received = srv.messages
    assert sql(env, "SELECT COUNT(*) AS n FROM attachments")[0]["n"] == 1
    assert states(env, nid) == {"sent": 5}
    for m in received:
        msg = parse(m.data)
        assert msg.get_content_type() == "multipart/mixed"
        att = next(msg.iter_attachments())
        assert att.get_filename() == "brochure.pdf"
        assert att.get_content() == pdf.read_bytes()


def test_two_relays_one_down(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, "127.0.0.1:9", srv)  # port 9: nothing listens
        nid = make_newsletter(env, 40)
        run_pipeline_once(env)
        assert len(srv.messages) == 40
    assert states(env, nid) == {"sent": 40}


def test_relay_421_defers_then_delivers(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv)
        srv.rule("user2@example.com", "421 4.3.2 Service shutting down", times=1)
        nid = make_newsletter(env, 10)
        run_pipeline_once(env)
        deadline = time.monotonic() + 30
        while states(env, nid) != {"sent": 10} and time.monotonic() < deadline:
            time.sleep(1)
            run_pipeline_once(env)
        assert Counter(r for m in srv.messages for r in m.rcpt_tos) == {
            f"user{i}@example.com": 1 for i in range(10)}
    assert states(env, nid) == {"sent": 10}


def test_sigkill_mid_batch_then_restart_loses_nothing(env: Env) -> None:
    n = 400
    with SmtpServer() as srv:
        relay_config(env, srv, connections=4)
        nid = make_newsletter(env, n, html="<p>{{ first_name }}</p>", text=None)
        sort = [env.spawn("sort-balancer", "--once", "--name", "sb"),
                env.spawn("sort-worker", "--once", "--name", "sw")]
        for p in sort:
            assert wait_exit(p, 60) == 0
        balancer = env.spawn("send-balancer", "--name", "tb")
        worker = env.spawn("send-worker", "--name", "tw", "--max-rate", "100", log_name="tw1")
        try:
            wait_for(lambda: len(srv.messages) >= 150, 30, "sending under way")
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            received_at_kill = len(srv.messages)
            sent_in_db = states(env, nid).get("sent", 0)
            time.sleep(1)  # "cron" restarts it
            worker = env.spawn("send-worker", "--name", "tw", log_name="tw2")
            wait_for(lambda: states(env, nid) == {"sent": n}, 60, "all sent", 0.3)
        finally:
            stop_all(balancer, worker)
        counts = Counter(r for m in srv.messages for r in m.rcpt_tos)
    assert set(counts) == {f"user{i}@example.com" for i in range(n)}
    duplicates = sum(c - 1 for c in counts.values())
    print(f"\nkilled after {received_at_kill} accepted ({sent_in_db} marked sent in the DB); "
          f"duplicates after restart: {duplicates} (in-flight window: 4 connections)")
    assert duplicates <= 4
    log = (env.tmp / "tw2.log").read_text()
    assert "replayed" in log or sent_in_db == received_at_kill


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_dkim_signature_verifies_with_dkimpy(env: Env) -> None:
    key = env.tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                   capture_output=True)
    from sendsystem.dkim import DkimSigner
    record = DkimSigner.from_file("example.com", "news", key).dns_txt_record().encode()
    with SmtpServer() as srv:
        relay_config(env, srv)
        env.configure(sending={"relays": f"127.0.0.1:{srv.port}"},
                      dkim={"domain": "example.com", "selector": "news", "key_file": str(key)})
        make_newsletter(env, 3)
        run_pipeline_once(env)
        received = srv.messages
    assert len(received) == 3
    for m in received:
        assert m.data.startswith(b"DKIM-Signature:")
        assert dkim.verify(m.data, dnsfunc=lambda name, timeout=5: record)


def test_failure_rate_pauses_the_newsletter(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv, failure_pause_min=10, failure_pause_ratio=0.5)
        nid = make_newsletter(env, 400)
        # The first 150 to go out (messages go in subscriber id order) are refused.
        for row in sql(env, "SELECT email FROM subscribers ORDER BY id LIMIT 150"):
            srv.rule(row["email"], "554 5.7.1 Blacklisted sender")
        procs = [env.spawn("sort-balancer", "--once", "--name", "sb"),
                 env.spawn("sort-worker", "--once", "--name", "sw")]
        for p in procs:
            assert wait_exit(p, 60) == 0
        balancer = env.spawn("send-balancer", "--name", "tb")
        worker = env.spawn("send-worker", "--name", "tw", "--max-rate", "40")
        try:
            wait_for(lambda: admin.get_newsletter(env.db, nid)["state"] == "paused", 30,
                     "auto-pause")
        finally:
            stop_all(balancer, worker)
    facts = stats.newsletter_stats(env.db, nid)
    assert "paused automatically" in facts["pause_reason"]
    assert facts["counts"]["merged"] > 0  # the rest waits for an admin


def test_unsubscribed_after_merge_is_skipped_at_send(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, 4)
        procs = [env.spawn("sort-balancer", "--once", "--name", "sb"),
                 env.spawn("sort-worker", "--once", "--name", "sw")]
        for p in procs:
            assert wait_exit(p, 60) == 0
        assert states(env, nid) == {"merged": 4}
        sql(env, "UPDATE subscribers SET status = 'bounced' WHERE email = 'user0@example.com'")
        admin.block_add(env.db, "user1@example.com")
        run_pipeline_once(env)
        assert sorted(r for m in srv.messages for r in m.rcpt_tos) == [
            "user2@example.com", "user3@example.com"]
    assert states(env, nid) == {"sent": 2, "skipped": 2}


def test_journal_dir_unwritable_is_a_clear_error(env: Env, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env.configure(paths={"journal_dir": blocker / "sub"})
    code, _, err = env.cli("send-worker", "--once", "--name", "x")
    assert code == 1 and "journal" in err.lower()
