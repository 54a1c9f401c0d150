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
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import pytest

from tests.harness.env import Env
from tests.integration.test_bounce_cli import closed_port, run_cli
from tests.integration.test_intake import Sent, bounce_rows, send_newsletter, state

POSTFIX = Path("/usr/sbin/postfix")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
DAEMONS = Path("/usr/lib/postfix/sbin")
ENVELOPE_DOMAIN = "bounces.test.example"  # as in tests/harness/env.py

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
daemon_directory = {daemons}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.test.example
mydomain = test.example
myorigin = $myhostname
mynetworks = 127.0.0.0/8
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
smtputf8_enable = no
biff = no
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
"""

# Only what this test needs, and no chroot (a private instance has no chroot tree).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
local     unix  - n n -  - local
virtual   unix  - n n -  - virtual
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
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


def _why_not() -> str | None:
    if not (POSTFIX.exists() and SMTP_SINK.exists() and DAEMONS.is_dir()):
        return "Postfix is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user"
    return None


def _wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def postfix() -> Iterator[PrivatePostfix]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # A short path: Postfix's UNIX sockets live under the queue directory.
    base = Path(tempfile.mkdtemp(prefix="sspf-", dir="/tmp"))
    base.chmod(0o755)  # the postfix user must reach the queue directory
    conf = base / "conf"
    conf.mkdir()
    (base / "queue").mkdir()
    (base / "data").mkdir()
    shutil.chown(base / "data", "postfix")
    nobody = pwd.getpwnam("nobody")
    (base / "mail").mkdir()
    os.chown(base / "mail", nobody.pw_uid, nobody.pw_gid)
    port, sink_port = closed_port(), closed_port()
    (conf / "main.cf").write_text(MAIN_CF.format(
        base=base, daemons=DAEMONS, sink_port=sink_port, envelope_domain=ENVELOPE_DOMAIN,
        uid=nobody.pw_uid, gid=nobody.pw_gid))
    (conf / "master.cf").write_text(MASTER_CF.format(port=port))
    sink = subprocess.Popen([str(SMTP_SINK), "-u", "nobody", "-r", "rcpt",
                             "-b", "452 4.2.2 Mailbox full", f"127.0.0.1:{sink_port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    instance = PrivatePostfix(port, base / "mail" / "box", base / "maillog")
    if not _wait_for_port(sink_port, 10):
        sink.kill()
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"smtp-sink did not start (exit status {sink.poll()})")
    started = subprocess.run([str(POSTFIX), "-c", str(conf), "start"], capture_output=True,
                             text=True, timeout=60)
    try:
        if started.returncode != 0 or not _wait_for_port(port, 15):
            pytest.skip(f"could not start a private Postfix: exit {started.returncode} "
                        f"{started.stderr.strip()} {instance.maillog()}")
        yield instance
    finally:
        subprocess.run([str(POSTFIX), "-c", str(conf), "stop"], capture_output=True, timeout=60)
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


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
