"""A real Postfix relay that requires STARTTLS (a private instance on loopback, as in
test_postfix_bounce.py), with a certificate from the test's own CA. Postfix relays on
to an aiosmtpd server, where the messages are counted."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sendsystem.config import Relay
from sendsystem.delivery import Outcome
from tests.harness.smtp_server import SmtpServer
from tests.harness.tls_certs import TestCA
from tests.integration.test_bounce_cli import closed_port
from tests.integration.test_postfix_bounce import (
    DAEMONS,
    MASTER_CF,
    POSTFIX,
    _wait_for_port,
    _why_not,
)
from tests.integration.test_relays import deliver, envelope

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
daemon_directory = {daemons}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = relay.test.example
mydomain = test.example
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{final_port}
smtp_tls_security_level = none
# The relay requires STARTTLS before MAIL FROM (RFC 3207 "encrypt").
smtpd_tls_security_level = encrypt
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_loglevel = 1
smtputf8_enable = no
biff = no
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
"""


@dataclass(frozen=True)
class TlsPostfix:
    port: int
    log: Path
    final: SmtpServer
    ca: TestCA

    def maillog(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return "(no maillog)"


@pytest.fixture(scope="module")
def tls_postfix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostfix]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    ca = TestCA(tmp_path_factory.mktemp("pfca"))
    leaf = ca.leaf("postfix", ("127.0.0.1", "relay.test.example"))
    base = Path(tempfile.mkdtemp(prefix="sspt-", dir="/tmp"))
    base.chmod(0o755)
    conf = base / "conf"
    conf.mkdir()
    (base / "queue").mkdir()
    (base / "data").mkdir()
    shutil.chown(base / "data", "postfix")
    port = closed_port()
    final = SmtpServer().start()
    (conf / "main.cf").write_text(MAIN_CF.format(
        base=base, daemons=DAEMONS, final_port=final.port, cert=leaf.cert, key=leaf.key))
    (conf / "master.cf").write_text(MASTER_CF.format(port=port)
                                    + "tlsmgr    unix  - - n 1000? 1 tlsmgr\n")
    started = subprocess.run([str(POSTFIX), "-c", str(conf), "start"], capture_output=True,
                             text=True, timeout=60)
    instance = TlsPostfix(port, base / "maillog", final, ca)
    try:
        if started.returncode != 0 or not _wait_for_port(port, 15):
            pytest.skip(f"could not start a private Postfix: exit {started.returncode} "
                        f"{started.stderr.strip()} {instance.maillog()[-2000:]}")
        yield instance
    finally:
        subprocess.run([str(POSTFIX), "-c", str(conf), "stop"], capture_output=True, timeout=60)
        final.stop()
        shutil.rmtree(base, ignore_errors=True)



def test_postfix_starttls_relay(tls_postfix: TlsPostfix) -> None:
    relay = Relay("127.0.0.1", tls_postfix.port, name="postfix", tls="starttls",
                  ca_file=tls_postfix.ca.path)
    results, status = deliver([relay], [envelope(i) for i in range(10)])
    assert [r.outcome for r in results] == [Outcome.SENT] * 10, tls_postfix.maillog()[-3000:]
    assert all(r.reply.startswith("250 2.0.0 Ok: queued as") for r in results)
    deadline = time.monotonic() + 30
    while len(tls_postfix.final.messages) < 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(r for m in tls_postfix.final.messages for r in m.rcpt_tos) == \
        sorted(f"r{i}@example.com" for i in range(10))
    log = tls_postfix.maillog()
    assert "TLS connection established from" in log, log[-2000:]
    assert status[0]["health"] == "ok"


def test_postfix_refuses_clear_text_and_the_relay_is_set_aside(tls_postfix: TlsPostfix
                                                                ) -> None:
    before = len(tls_postfix.final.messages)
    # A named relay with tls = none where the relay requires STARTTLS: Postfix answers
    # "530 5.7.0 Must issue a STARTTLS command first" at MAIL FROM: set aside, deferred.
    relay = Relay("127.0.0.1", tls_postfix.port, name="clear", tls="none")
    results, status = deliver([relay], [envelope(100 + i) for i in range(3)])
    assert {r.outcome for r in results} == {Outcome.DEFERRED}
    assert status[0]["health"] == "set aside"
    assert "STARTTLS" in str(status[0]["last_error"])
    time.sleep(1)
    assert len(tls_postfix.final.messages) == before
