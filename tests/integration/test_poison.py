"""Isolation on the send path: a message that cannot be built or delivered fails
(or is deferred) alone with its reason, and a journal that cannot be written stops
the worker cleanly without resending anything. Real MariaDB, real SMTP servers,
real role processes; the only injected fault is a DeliveryPool subclass that raises
(an exception escaping deliver() is a bug, which no real relay can provoke)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from sendsystem import stats
from sendsystem.compose import newsletter_zdict
from sendsystem.delivery import DeliveryPool, Envelope, Ready, Result
from sendsystem.merge import compress
from sendsystem.roles.send_worker import SendWorker
from sendsystem.runner import RunOptions
from tests.harness.env import Env
from tests.harness.helpers import (
    make_newsletter,
    mounted_tmpfs,
    sql,
    states,
    stop_all,
    wait_exit,
    wait_for,
)
from tests.harness.smtp_server import SmtpServer
from tests.integration.test_sending import relay_config, run_pipeline_once


def sort_all(env: Env) -> None:
    procs = [env.spawn("sort-balancer", "--once", "--name", "sb"),
             env.spawn("sort-worker", "--once", "--name", "sw")]
    for p in procs:
        assert wait_exit(p, 90) == 0


def send_once(env: Env, log_name: str = "tw") -> int:
    """send-balancer and send-worker with --once; the worker's exit status."""
    balancer = env.spawn("send-balancer", "--once", "--name", "tb")
    worker = env.spawn("send-worker", "--once", "--name", "tw", log_name=log_name)
    code = wait_exit(worker, 120)
    assert wait_exit(balancer, 60) == 0
    return code


def message_rows(env: Env, nid: int) -> dict[str, dict[str, object]]:
    rows = sql(env, "SELECT m.id, s.email, m.state, m.reply_code, m.reply, m.detail, m.body, "
                    "m.batch_id, m.attempts FROM messages m JOIN subscribers s "
                    "ON s.id = m.subscriber_id WHERE m.newsletter_id = %s", (nid,))
    return {str(r["email"]): r for r in rows}


def zdict_of(env: Env, nid: int) -> bytes:
    row = env.db.fetchone("newsletter_get", {"id": nid})
    assert row is not None
    return newsletter_zdict(row)  # the stored one, as the send worker reads it


def set_body(env: Env, message_id: object, body: bytes) -> None:
    sql(env, "UPDATE messages SET body = %s WHERE id = %s", (body, message_id))


# -- a message that cannot be built fails alone ----------------------------------------


def test_corrupt_body_among_300_fails_alone_and_the_worker_goes_on(env: Env) -> None:
    n = 300
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, n)
        sort_all(env)
        assert states(env, nid) == {"merged": n}
        victim = message_rows(env, nid)["user150@example.com"]
        # Cut the stored zlib stream in half, as a torn write or bad restore would.
        sql(env, "UPDATE messages SET body = LEFT(body, LENGTH(body) DIV 2) WHERE id = %s",
            (victim["id"],))
        assert send_once(env) == 0
        counts = srv.count_by_recipient()
    assert len(counts) == n - 1 and set(counts.values()) == {1}
    assert "user150@example.com" not in counts
    assert states(env, nid) == {"sent": n - 1, "failed": 1}
    row = message_rows(env, nid)["user150@example.com"]
    assert row["state"] == "failed" and row["reply_code"] == 0 and row["body"] is None
    assert str(row["reply"]).startswith("cannot build message: stored body is corrupt (zlib: ")
    log = (env.tmp / "tw.log").read_text()
    assert "Traceback" not in log
    assert log.count(f"message {victim['id']} failed: cannot build message") == 1
    # What the operator sees in `stats`.
    facts = stats.newsletter_stats(env.db, nid)
    assert {"code": 0, "reply": row["reply"], "count": 1} in facts["replies"]
    assert facts["failures"] == [{"reason": row["reply"], "count": 1}]
    code, out, err = env.cli("stats", str(nid))
    assert code == 0, err
    assert "Why messages failed" in out and "stored body is corrupt" in out


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_finalize_dkim_and_address_refusals_fail_alone(env: Env) -> None:
    key = env.tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                   capture_output=True)
    with SmtpServer() as srv:
        env.configure(sending={"relays": f"127.0.0.1:{srv.port}"},
                      dkim={"domain": "example.com", "selector": "news", "key_file": str(key)})
        nid = make_newsletter(env, 10)
        sort_all(env)
        rows = message_rows(env, nid)
        zdict = zdict_of(env, nid)
        # Decompresses fine but is no message: finalize refuses it.
        set_body(env, rows["user0@example.com"]["id"], compress(b"not a message\r\n", zdict))
        # A message finalize accepts but DKIM cannot sign (no From).
        set_body(env, rows["user1@example.com"]["id"],
                 compress(b"X-Note: no From header\r\n\r\nbody\r\n", zdict))
        # An address that would smuggle a second RCPT TO: refused by the pool.
        sql(env, "UPDATE subscribers SET email = %s WHERE email = 'user2@example.com'",
            ("user2@example.com\r\nRCPT TO:<evil@example.com>",))
        assert send_once(env) == 0
        counts = srv.count_by_recipient()
    assert counts == {f"user{i}@example.com": 1 for i in range(3, 10)}
    assert states(env, nid) == {"sent": 7, "failed": 3}
    rows = message_rows(env, nid)
    assert str(rows["user0@example.com"]["reply"]).startswith(
        "cannot build message: refused by finalize: the stored message has no header block")
    assert rows["user1@example.com"]["reply"] == \
        "cannot build message: DKIM signing failed: a DKIM-signed message needs a From header"
    bad = rows["user2@example.com\r\nRCPT TO:<evil@example.com>"]
    assert str(bad["reply"]).startswith("RCPT TO: ") and bad["state"] == "failed"
    assert "Traceback" not in (env.tmp / "tw.log").read_text()


def test_newsletter_whose_attachments_are_broken_fails_its_messages_only(env: Env) -> None:
    pdf = env.tmp / "program.pdf"
    pdf.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 20)
    with SmtpServer() as srv:
        relay_config(env, srv)
        corrupt = make_newsletter(env, 5, attachments=(pdf,))
        missing = make_newsletter(env, 5, attachments=(pdf,))
        fine = make_newsletter(env, 5)
        sort_all(env)
        att = sql(env, "SELECT id FROM attachments WHERE newsletter_id = %s", (corrupt,))[0]
        sql(env, "UPDATE attachments SET data = LEFT(data, 10) WHERE id = %s", (att["id"],))
        sql(env, "DELETE FROM attachments WHERE newsletter_id = %s", (missing,))
        assert send_once(env) == 0
        received = srv.messages
    assert len(received) == 5
    fine_ids = {email: r["id"] for email, r in message_rows(env, fine).items()}
    for m in received:  # every delivery is a message of the good newsletter
        assert f"Message-ID: <{fine_ids[m.rcpt_tos[0]]}.{fine}.".encode() in m.data
    assert states(env, fine) == {"sent": 5}
    assert states(env, corrupt) == {"failed": 5}
    assert states(env, missing) == {"failed": 5}
    size = pdf.stat().st_size
    assert {r["reply"] for r in message_rows(env, corrupt).values()} == {
        f"cannot build message: newsletter {corrupt}: attachment 'program.pdf' "
        f"(id {att['id']}) is corrupt: 10 bytes stored, {size} expected"}
    assert {r["reply"] for r in message_rows(env, missing).values()} == {
        "cannot build message: refused by finalize: the stored message expects attachments "
        "but its newsletter has none (attachment rows deleted?)"}
    assert "Traceback" not in (env.tmp / "tw.log").read_text()


def test_sort_worker_fails_a_row_with_corrupt_fields_alone(env: Env) -> None:
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, 6)
        sql(env, "UPDATE subscribers SET fields = '{not json' WHERE email = 'user1@example.com'")
        sql(env, "UPDATE subscribers SET fields = '[1, 2]' WHERE email = 'user2@example.com'")
        run_pipeline_once(env)  # every role exits 0
        counts = srv.count_by_recipient()
    assert counts == {f"user{i}@example.com": 1 for i in (0, 3, 4, 5)}
    assert states(env, nid) == {"sent": 4, "failed": 2}
    rows = message_rows(env, nid)
    assert str(rows["user1@example.com"]["detail"]).startswith(
        "subscriber fields are not valid JSON: JSONDecodeError: ")
    assert str(rows["user2@example.com"]["detail"]).startswith("cannot merge: TypeError: ")


# -- an exception escaping delivery is deferred, not dropped -----------------------------


class FaultyPool(DeliveryPool):
    """Raises for one recipient, as a bug in the delivery code would."""

    async def deliver(self, env: Envelope, ready: Ready | None = None) -> Result:
        if env.recipient == "user3@example.com":
            raise RuntimeError("injected fault")
        return await super().deliver(env, ready)


class FaultySendWorker(SendWorker):
    def make_pool(self) -> DeliveryPool:
        s = self.config.sending
        return FaultyPool(s.relays, connections=s.connections,
                          messages_per_connection=s.messages_per_connection, timeout=s.timeout)


def test_unexpected_delivery_error_defers_with_back_off_until_max_age(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with SmtpServer() as srv:
        relay_config(env, srv, retry_min=0.5, retry_max=1, max_age=3)
        nid = make_newsletter(env, 20)
        sort_all(env)
        balancer = env.spawn("send-balancer", "--name", "tb")
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        runs = 0
        try:
            deadline = time.monotonic() + 60
            while states(env, nid) != {"sent": 19, "failed": 1}:
                assert time.monotonic() < deadline, states(env, nid)
                worker = FaultySendWorker(env.config, RunOptions(name="tw", once=True))
                assert worker.run() == 0
                runs += 1
                time.sleep(0.2)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            stop_all(balancer)
        counts = srv.count_by_recipient()
    assert counts == {f"user{i}@example.com": 1 for i in range(20) if i != 3}
    row = message_rows(env, nid)["user3@example.com"]
    attempts = int(row["attempts"])  # type: ignore[call-overload]
    assert str(row["reply"]) == (f"gave up after {attempts} attempts: unexpected error in "
                                 "delivery: RuntimeError: injected fault (delivery status "
                                 "unknown)")
    # One traceback per attempt, each after a back-off: no tight loop.
    errors = [r for r in caplog.records if "unexpected error in delivery" in r.getMessage()]
    assert len(errors) == attempts and 2 <= attempts <= 10
    print(f"\ninjected delivery fault: {attempts} attempts over {runs} worker runs, then failed")


# -- a journal that cannot be written stops the worker cleanly ---------------------------


@pytest.fixture
def journal_tmpfs(env: Env) -> Iterator[Path]:
    """A small tmpfs mounted on the test's journal_dir (root only); always unmounted."""
    with mounted_tmpfs(env.config.paths.journal_dir, "size=256k,mode=0700") as directory:
        yield directory


class DiskFiller(threading.Thread):
    """Fills a file system and keeps taking every page freed on it until stopped, so the
    journal's next append after a truncate finds no space (ENOSPC)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.path = directory / "filler"
        self.halt = threading.Event()
        self.full = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self.halt.is_set():
                try:
                    os.write(fd, b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    self.full.set()
                    time.sleep(0.0005)
        finally:
            os.close(fd)


def test_full_journal_disk_mid_run_stops_the_worker_and_resends_nothing(
        env: Env, journal_tmpfs: Path) -> None:
    n = 600
    with SmtpServer() as srv:
        relay_config(env, srv)
        nid = make_newsletter(env, n, html="<p>{{ first_name }}</p>", text=None)
        sort_all(env)
        balancer = env.spawn("send-balancer", "--name", "tb")
        worker = env.spawn("send-worker", "--name", "tw", "--max-rate", "100", log_name="tw1")
        filler = DiskFiller(journal_tmpfs)
        fresh = None
        try:
            wait_for(lambda: len(srv.messages) >= 100, 30, "sending under way")
            filler.start()
            code = wait_exit(worker, 30)
            received_at_stop = srv.count_by_recipient()
            in_db = message_rows(env, nid)
            state_at_stop = sql(env, "SELECT state FROM workers WHERE name = 'tw' "
                                     "AND role = 'send'")[0]["state"]
            order = sql(env, "SELECT (SELECT MAX(finished_at) FROM messages WHERE state = "
                             "'sent') AS last_sent, (SELECT MIN(finished_at) FROM batches "
                             "WHERE state = 'reclaimed') AS handed_back")[0]
            filler.halt.set()
            filler.join()
            os.unlink(filler.path)
            # "cron" starts it again once the disk has room: it finishes the newsletter.
            fresh = env.spawn("send-worker", "--name", "tw", log_name="tw2")
            wait_for(lambda: states(env, nid) == {"sent": n}, 60, "all sent", 0.3)
        finally:
            filler.halt.set()
            stop_all(balancer, *([fresh] if fresh else []), worker)
        counts = srv.count_by_recipient()

    assert filler.full.is_set()
    assert code == 1
    log = (env.tmp / "tw1.log").read_text()
    assert "Traceback" not in log
    assert "No space left on device" in log
    assert f"Free disk space on the file system holding {journal_tmpfs}" in log
    assert "exits with status 1" in log
    # Everything the relay accepted is `sent` in the database, nothing went out twice,
    # the rest was handed back unassigned.
    assert 100 <= len(received_at_stop) < n
    assert set(received_at_stop.values()) == {1}
    by_state = Counter(str(r["state"]) for r in in_db.values())
    for email, row in in_db.items():
        if email in received_at_stop:
            assert row["state"] == "sent", (email, row["state"])
        else:
            assert row["state"] in ("merged", "deferred") and row["batch_id"] is None
    assert by_state["sent"] == len(received_at_stop)
    assert state_at_stop == "stopped"
    # Every accepted message reached the database before its batch was handed back.
    assert order["handed_back"] is not None and order["last_sent"] <= order["handed_back"]
    # Then: nothing lost, no duplicates.
    assert set(counts) == {f"user{i}@example.com" for i in range(n)}
    assert set(counts.values()) == {1}
    print(f"\njournal full after {len(received_at_stop)} accepted: worker exited {code}; "
          f"fresh worker finished {n - len(received_at_stop)}, 0 duplicates, 0 lost")
