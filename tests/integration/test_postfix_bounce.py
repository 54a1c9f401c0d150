"""Genuine DSNs from a real Postfix, run privately on loopback, through the intake.

A throw-away Postfix instance (its own main.cf/master.cf, queue and data
directories in a temp dir, smtpd on a free 127.0.0.1 port) accepts our
messages and produces real bounces:

* ``users.test.example`` is a local domain with no users: local(8) bounces
  with 5.1.1 "unknown user" (hard).
* ``soft.test.example`` is relayed to an ``smtp-sink`` that answers
  ``452 4.2.2 Mailbox full``; ``maximal_queue_lifetime = 0`` makes Postfix
  return it after the first attempt (a soft failure).
* Bounces for our envelope domain go to a Maildir through virtual(8), the
  cron set-up; the intake reads them with ``bounce scan`` or ``bounce
  receive`` (what the pipe set-up runs).

Postfix's pipe(8) is not used here: it refuses to run commands as root, and
this sandbox's interpreter lives under /root (mode 0700), which no other
user can execute. The production pipe set-up is in the README.
"""

from __future__ import annotations

import os
import pwd
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import pytest

from tests.harness.env import Env
from tests.harness.postfix import (
    SMTP_SINK,
    PostfixUnavailable,
    closed_port,
    private_postfix,
    wait_for_port,
    why_not,
)
from tests.integration.test_bounce_cli import run_cli
from tests.integration.test_intake import Sent, bounce_rows, send_newsletter, state

ENVELOPE_DOMAIN = "bounces.test.example"  # as in tests/harness/env.py

# After tests/harness/postfix.py's MAIN_CF_BASE.
MAIN_CF = """\
myhostname = mx.test.example
mydomain = test.example
myorigin = $myhostname
mydestination = users.test.example
# Accept every local address in SMTP so that local(8) bounces unknown users
# with a DSN (a RCPT-time 550 would produce no bounce message at all).
local_recipient_maps =
alias_maps =
alias_database =
relay_domains =
transport_maps = inline:{{ soft.test.example=smtp:[127.0.0.1]:{sink_port} }}
virtual_mailbox_domains = {envelope_domain}
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
maximal_queue_lifetime = 0
bounce_queue_lifetime = 0
"""


@dataclass(frozen=True)
class PrivatePostfix:
    port: int
    box: Path  # the Maildir our bounces arrive in
    log: Path

    def maillog(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no maillog)"


@pytest.fixture(scope="module")
def postfix() -> Iterator[PrivatePostfix]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    nobody = pwd.getpwnam("nobody")
    sink_port = closed_port()

    def make_mail_dir(base: Path) -> None:
        (base / "mail").mkdir()
        os.chown(base / "mail", nobody.pw_uid, nobody.pw_gid)

    sink = subprocess.Popen([str(SMTP_SINK), "-u", "nobody", "-r", "rcpt",
                             "-b", "452 4.2.2 Mailbox full", f"127.0.0.1:{sink_port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_for_port(sink_port, 10):
            pytest.skip(f"smtp-sink did not start (exit status {sink.poll()})")
        try:
            with private_postfix(MAIN_CF, prepare=make_mail_dir, sink_port=sink_port,
                                 envelope_domain=ENVELOPE_DOMAIN, uid=nobody.pw_uid,
                                 gid=nobody.pw_gid) as pf:
                yield PrivatePostfix(pf.port, pf.base / "mail" / "box", pf.log)
        except PostfixUnavailable as exc:
            pytest.skip(str(exc))
    finally:
        sink.terminate()
        sink.wait(timeout=10)


def send_through(postfix: PrivatePostfix, sent: Sent, envelope_sender: str | None = None) -> None:
    """One newsletter message with our real headers, VERP envelope sender and all."""
    msg = EmailMessage()
    msg["From"] = "News <news@lists.test.example>"
    msg["To"] = sent.email
    msg["Subject"] = "Hello"
    msg["Date"] = formatdate()
    msg["Message-ID"] = sent.message_id
    msg["List-Unsubscribe"] = f"<https://lists.test.example/unsubscribe/{sent.token}>"
    msg.set_content("Hello from the test.\n")
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as smtp:
        refused = smtp.send_message(msg, from_addr=envelope_sender or sent.verp,
                                    to_addrs=[sent.email])
    assert refused == {}


def wait_for_bounce(postfix: PrivatePostfix, to: str, timeout: float = 15) -> Path:
    """The bounce Postfix delivered to ``to`` (a file in the Maildir's new/)."""
    deadline = time.monotonic() + timeout
    new = postfix.box / "new"
    while time.monotonic() < deadline:
        if new.is_dir():
            for path in new.iterdir():
                if to.lower().encode() in path.read_bytes().lower():
                    return path
        time.sleep(0.1)
    raise AssertionError(f"no bounce to {to} within {timeout}s; maillog:\n{postfix.maillog()}")


def test_unknown_local_user_bounce_through_scan(env: Env, postfix: PrivatePostfix) -> None:
    a, b = send_newsletter(env, ["nosuchuser@users.test.example", "other@users.test.example"])
    send_through(postfix, a)
    bounce = wait_for_bounce(postfix, a.verp)
    raw = bounce.read_bytes()
    assert b"report-type=delivery-status" in raw and b"Status: 5.1.1" in raw  # a genuine DSN
    code, out, err = run_cli(env, "bounce", "scan", str(postfix.box))
    assert code == 0, err
    assert out.startswith("1 processed, 0 moved to unknown"), out
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "active")
    [row] = bounce_rows(env)
    assert (row["message_id"], row["kind"], row["status"]) == (a.id, "hard", "5.1.1")
    assert (row["verified"], row["evidence"]) == (1, "verp")
    assert "unknown user" in row["diagnostic"]
    assert [p.name.split(":")[0] for p in (postfix.box / ".processed" / "cur").iterdir()] \
        == [bounce.name]


def test_remote_mailbox_full_through_receive(env: Env, postfix: PrivatePostfix) -> None:
    """A 452 from the remote server, returned by Postfix: soft, fed in as a pipe would."""
    [a] = send_newsletter(env, ["reader@soft.test.example"])
    send_through(postfix, a)
    bounce = wait_for_bounce(postfix, a.verp)
    code, out, err = run_cli(env, "bounce", "receive", "--recipient", a.verp,
                             stdin=bounce.read_bytes())
    assert code == 0, err
    assert out.startswith("recorded soft"), out
    assert state(env, a) == ("sent", "active")  # one soft bounce is below soft_limit
    [row] = bounce_rows(env)
    assert (row["message_id"], row["kind"], row["status"]) == (a.id, "soft", "4.2.2"), \
        row["diagnostic"]
    assert "Mailbox full" in row["diagnostic"]
    bounce.unlink()  # the pipe set-up keeps no file; leave the Maildir clean


def test_forged_verp_bounce_goes_to_unknown(env: Env, postfix: PrivatePostfix) -> None:
    [a] = send_newsletter(env, ["nosuchuser@users.test.example"])
    local, domain = a.verp.split("@")
    forged = f"{local[:-4]}{'aaaa' if not local.endswith('aaaa') else 'bbbb'}@{domain}"
    send_through(postfix, a, envelope_sender=forged)
    bounce = wait_for_bounce(postfix, forged)
    code, out, err = run_cli(env, "bounce", "scan", str(postfix.box))
    assert code == 0, err
    assert out.startswith("0 processed, 1 moved to unknown"), out
    assert state(env, a) == ("sent", "active")
    assert (postfix.box / ".unknown" / "new" / bounce.name).exists()
    [row] = bounce_rows(env)
    assert (row["kind"], row["verified"], row["message_id"]) == ("hard", 0, None)
    assert "forged VERP" in row["diagnostic"]


def test_genuine_dsn_without_verp_acts_only_by_signed_message_id(
        env: Env, postfix: PrivatePostfix) -> None:
    """Postfix returns our headers; with no VERP address, only a signed Message-ID ties it.

    The same genuine DSN for a message with an old sequential Message-ID is
    kept unverified: an outsider could have written that one.
    """
    a, b = send_newsletter(env, ["nosuchuser@users.test.example", "alsomissing@users.test.example"])
    owner = f"owner@{ENVELOPE_DOMAIN}"  # not a VERP address
    old = Sent(**{**b.__dict__, "message_id": f"<{b.id}.{b.newsletter_id}.ss@{ENVELOPE_DOMAIN}>"})
    for sent in (a, old):
        send_through(postfix, sent, envelope_sender=owner)
        bounce = wait_for_bounce(postfix, sent.message_id)
        assert b"Status: 5.1.1" in bounce.read_bytes()
        code, out, err = run_cli(env, "bounce", "receive", "--recipient", owner,
                                 stdin=bounce.read_bytes())
        bounce.unlink()
        assert code == 0, err
        if sent is a:
            assert out.startswith("recorded hard") and "via message-id" in out, out
        else:
            assert out.startswith("unverified hard"), out
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "active")
    rows = bounce_rows(env)
    assert [(r["message_id"], r["verified"], r["evidence"]) for r in rows] == \
        [(a.id, 1, "message-id"), (None, 0, None)]
    assert rows[1]["newsletter_id"] == b.newsletter_id  # counted against it, apart
