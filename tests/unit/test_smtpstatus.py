"""The one home of the reply rules: sendsystem.smtpstatus.read_reply (pure)."""

from __future__ import annotations

import pytest

from sendsystem.smtpstatus import Cause, enhanced_status, read_reply, status_from_reply


@pytest.mark.parametrize(("code", "text", "cause"), [
    (550, "5.1.1 <x@example.org>: Recipient address rejected: User unknown", Cause.ADDRESS),
    (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", Cause.ADDRESS),
    (553, "5.1.2 Domain does not exist", Cause.ADDRESS),
    (550, "5.2.1 The email account that you tried to reach is disabled", Cause.ADDRESS),
    (550, "No such user here", Cause.ADDRESS),
    (553, "5.1.8 Sender address rejected: Domain not found", Cause.POLICY),
    (550, "5.7.1 Service unavailable; client host blocked using Spamhaus", Cause.POLICY),
    (554, "5.7.26 Unauthenticated email is not accepted (DMARC)", Cause.POLICY),
    (550, "Message blocked: user unknown to spam policy", Cause.POLICY),
    (552, "5.2.2 Mailbox full", Cause.FULL),
    (550, "Mailbox quota exceeded", Cause.FULL),
    (552, "5.3.4 Message too big", Cause.SIZE),
    (554, "Transaction failed", Cause.OTHER),
    (554, "no such user", Cause.OTHER),  # "user unknown" wording counts on 550/551/553 only
    (550, "Mailbox unavailable", Cause.OTHER),
])
def test_smtp_reply_causes(code: int, text: str, cause: Cause) -> None:
    assert read_reply(text, code=code).cause is cause


@pytest.mark.parametrize("text", [
    "550 Message rejected: sender IP blacklisted",
    "550 Your message was blocked",
    "554 This message looks like spam",
    "550 likely unsolicited mail",
    "550 Sender is on a blocklist",
    "550 Rejected due to poor reputation",
])
def test_policy_wording_beats_a_generic_code(text: str) -> None:
    assert read_reply(text, status="5.0.0").cause is Cause.POLICY


def test_generic_status_gives_way_to_the_specific_code_in_the_text() -> None:
    # Exim's DSN for a Gmail spam block: Status 5.0.0, the remote said 5.7.1.
    reading = read_reply("550-5.7.1 [192.0.2.1 12] Our system has detected that this "
                         "message is 550-5.7.1 likely unsolicited mail.", status="5.0.0")
    assert reading == read_reply("550-5.7.1 likely unsolicited mail.", status="5.7.1")
    assert (reading.status, reading.cause) == ("5.7.1", Cause.POLICY)
    # A specific Status field is kept, and a code of the other class never replaces it.
    assert read_reply("550 5.1.1 user unknown", status="5.1.2").status == "5.1.2"
    assert read_reply("451 4.7.1 try later", status="5.0.0").status == "5.0.0"


def test_a_specific_code_beats_wording() -> None:
    # The server's own machine-readable verdict wins over words around it.
    assert read_reply("550 5.1.1 user unknown (blocked)", status="5.1.1").cause is Cause.ADDRESS


def test_host_names_are_not_wording() -> None:
    text = "host mx.spamexperts.example[192.0.2.7] said: 550 <u@blocked.example>: no such user"
    assert read_reply(text, status="5.0.0").cause is Cause.ADDRESS


@pytest.mark.parametrize(("text", "cause"), [
    ("554 Too many hops 26 (25 max)", Cause.OTHER),  # a loop, not a rate limit
    ("421 Too many connections from your IP", Cause.POLICY),
    ("Your account has expired", Cause.OTHER),  # a dead mailbox, not a give-up
    ("Delivery failed 20 attempts: u@example.com", Cause.EXPIRED),
    ("Reason 1 (Unable-To-Transfer); Diagnostic 5 (Maximum-Time-Expired)", Cause.EXPIRED),
    ("553 Exceeded maximum inbound message size", Cause.SIZE),
    ("child status 100...the user's mailfolder is full.", Cause.FULL),
])
def test_wording(text: str, cause: Cause) -> None:
    assert read_reply(text).cause is cause


def test_status_in_the_status_field_counts_with_its_words() -> None:
    assert read_reply("", status="5.0.0 (recipient reached disk quota)").cause is Cause.FULL
    reading = read_reply("", status="553 Exceeded maximum inbound message size")
    assert (reading.status, reading.cause) == ("5.0.0", Cause.SIZE)


@pytest.mark.parametrize(("text", "status"), [
    ("Customer Support at 480-624-2500.", None),  # a phone number is no reply code
    ("smtp; 550-5.7.1 likely unsolicited", "5.7.1"),
    ("said: 550 unknown user", "5.0.0"),
    ("(#4.4.1) I'm not going to try again", "4.4.1"),
    ("by mx.example (Exim 4.92.3) id 1", None),  # a version is no status
    ("at 10:03 from 198.51.100.7", None),
])
def test_status_from_reply(text: str, status: str | None) -> None:
    assert status_from_reply(text) == status


def test_enhanced_status_subjects_are_rfc3463() -> None:
    assert enhanced_status("5.1.10") == "5.1.10"
    assert enhanced_status("4.92.3") is None
