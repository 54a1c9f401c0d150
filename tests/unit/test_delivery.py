"""How the send worker reads an SMTP reply (delivery.classify_reply, pure). The
DeliveryPool against real SMTP servers is in tests/integration/test_delivery.py."""

from __future__ import annotations

import pytest

from sendsystem.delivery import Outcome, classify_reply


@pytest.mark.parametrize(("code", "text", "expected"), [
    (250, "2.0.0 Ok: queued as X", (Outcome.SENT, False)),
    (251, "User not local; will forward", (Outcome.SENT, False)),
    (421, "4.3.2 Service shutting down", (Outcome.DEFERRED, False)),
    (450, "4.2.0 Mailbox unavailable", (Outcome.DEFERRED, False)),
    (451, "4.3.0 try later", (Outcome.DEFERRED, False)),
    (452, "4.2.2 Mailbox full", (Outcome.DEFERRED, False)),
    (0, "timeout", (Outcome.DEFERRED, False)),
    (354, "odd", (Outcome.DEFERRED, False)),
    (550, "5.1.1 User unknown", (Outcome.FAILED, True)),
    (550, "5.1.10 Recipient address has null MX", (Outcome.FAILED, True)),
    (553, "5.1.3 Bad recipient address syntax", (Outcome.FAILED, True)),
    (553, "5.1.8 Sender address rejected: domain not found", (Outcome.FAILED, False)),
    (550, "5.2.1 Mailbox disabled", (Outcome.FAILED, True)),
    (552, "5.2.2 Mailbox full", (Outcome.DEFERRED, False)),
    (552, "Requested mail action aborted: exceeded storage allocation",
     (Outcome.DEFERRED, False)),
    (552, "5.3.4 Message too big", (Outcome.FAILED, False)),
    (550, "5.7.1 Policy", (Outcome.FAILED, False)),
    (550, "5.7.1 Service unavailable; client host blocked", (Outcome.FAILED, False)),
    (554, "5.7.1 Relay access denied", (Outcome.FAILED, False)),
    (550, "Requested action not taken: user unknown", (Outcome.FAILED, True)),
    (550, "No such user here", (Outcome.FAILED, True)),
    (551, "User not local; please try <x@y>", (Outcome.FAILED, True)),
    (550, "Message blocked: user unknown to spam policy", (Outcome.FAILED, False)),
    (550, "Mailbox unavailable", (Outcome.FAILED, False)),
    (554, "Transaction failed", (Outcome.FAILED, False)),
])
def test_classify_reply(code: int, text: str, expected: tuple[Outcome, bool]) -> None:
    assert classify_reply(code, text) == expected
