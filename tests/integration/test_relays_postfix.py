"""A real Postfix relay that requires STARTTLS (a private instance on loopback, as in
test_postfix_bounce.py), with a certificate from the test's own CA. Postfix relays on
to an aiosmtpd server, where the messages are counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sendsystem.config import Relay
from sendsystem.delivery import Outcome
from tests.harness.postfix import PostfixUnavailable, private_postfix, why_not
from tests.harness.smtp_server import SmtpServer
from tests.harness.tls_certs import TestCA
from tests.integration.test_relays import deliver, envelope

# After tests/harness/postfix.py's MAIN_CF_BASE.
MAIN_CF = """\
myhostname = relay.test.example
mydomain = test.example
mydestination =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{final_port}
smtp_tls_security_level = none
# The relay requires STARTTLS before MAIL FROM (RFC 3207 "encrypt").
smtpd_tls_security_level = encrypt
smtpd_tls_chain_files = {key}, {cert}
smtpd_tls_loglevel = 1
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
    reason = why_not()
    if reason:
        pytest.skip(reason)
    ca = TestCA(tmp_path_factory.mktemp("pfca"))
    leaf = ca.leaf("postfix", ("127.0.0.1", "relay.test.example"))
    final = SmtpServer().start()
    try:
        with private_postfix(MAIN_CF, prefix="sspt-",
                             master_extra="tlsmgr    unix  - - n 1000? 1 tlsmgr\n",
                             final_port=final.port, cert=leaf.cert, key=leaf.key) as pf:
            yield TlsPostfix(pf.port, pf.log, final, ca)
    except PostfixUnavailable as exc:
        pytest.skip(str(exc))
    finally:
        final.stop()


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
