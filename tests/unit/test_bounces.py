"""Bounce classification against realistic sample messages in tests/data/bounces."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem.bounce.classify import (
    BounceKind,
    BounceReport,
    classify,
    enhanced_status,
    enhanced_status_class,
    failure_kind,
)
from sendsystem.tokens import (
    SignedMessage,
    message_id_header,
    unsubscribe_token,
    verp_address,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "bounces"
# The VERP addresses, signed Message-IDs (newsletter 3) and tokens in the
# sample files were made with this secret.
SECRET = b"test-secret-for-bounce-samples"
DOMAIN = "bounces.example.com"
UNSUB = "unsubscribe@bounces.example.com"
TOKEN = "39u.7.dwBurP5i28X19HZb0Lovyw"


def run(name: str, **kw: str) -> BounceReport:
    raw = (DATA / name).read_bytes()
    return classify(raw, secret=SECRET, envelope_domain=DOMAIN, unsubscribe_address=UNSUB, **kw)


def mid(n: int) -> tuple[str, ...]:
    return (message_id_header(SECRET, n, 3, DOMAIN),)


# name, kind, status, recipients, verp id, original Message-IDs, signed message id
CASES = [
    ("postfix_user_unknown.eml", BounceKind.HARD, "5.1.1", ("nobody@example.org",), 1001,
     mid(1001), 1001),
    ("exim_failed.eml", BounceKind.HARD, "5.1.1", ("gone@example.net",), 1002, mid(1002), 1002),
    ("postfix_delayed.eml", BounceKind.SOFT, "4.4.1", ("slow@example.com",), 1003, mid(1003),
     1003),
    ("mailbox_full.eml", BounceKind.SOFT, "5.2.2", ("full@example.dk",), 1004, mid(1004), 1004),
    # Exchange quotes the original in message/rfc822 and in In-Reply-To/References.
    ("exchange_online.eml", BounceKind.HARD, "5.1.10", ("someone@contoso.com",), 1005,
     mid(1005), 1005),
    ("exchange_legacy.eml", BounceKind.HARD, "5.1.1", ("bob@example.com",), 1008, (), None),
    ("gmail_dsn.eml", BounceKind.HARD, "5.1.1", ("missing@gmail.example",), 1015, mid(1015),
     1015),
    # An auto-reply quotes our Message-ID only in In-Reply-To.
    ("ooo_english.eml", BounceKind.AUTOREPLY, None, (), 1006, (), 1006),
    ("ooo_danish.eml", BounceKind.AUTOREPLY, None, (), 1009, (), None),
    ("arf_abuse.eml", BounceKind.COMPLAINT, None, ("reader@example.net",), 1007, mid(1007),
     1007),
    # Microsoft JMRP: recipient redacted, no envelope sender; Message-ID and token remain.
    ("arf_jmrp.eml", BounceKind.COMPLAINT, None, (), None, mid(1013), 1013),
    # Yahoo-style: the original's headers only (text/rfc822-headers).
    ("arf_yahoo_headers.eml", BounceKind.COMPLAINT, None, ("reader@yahoo.example",), None,
     mid(1014), 1014),
    ("dsn_to_from_address.eml", BounceKind.HARD, "5.1.1", ("former@example.co.uk",), None,
     mid(1010), 1010),
    ("forged_verp.eml", BounceKind.HARD, "5.1.1", ("nobody@example.org",), None, mid(1011),
     1011),
    ("personal_reply.eml", BounceKind.NOT_BOUNCE, None, (), None, (), 1012),
    ("garbage.eml", BounceKind.NOT_BOUNCE, None, (), None, (), None),
    ("unsubscribe_mailto.eml", BounceKind.UNSUBSCRIBE, None, (), None, (), None),
]


@pytest.mark.parametrize(("name", "kind", "status", "recipients", "verp", "ids", "signed"),
                         CASES, ids=[c[0] for c in CASES])
def test_samples(name: str, kind: BounceKind, status: str | None, recipients: tuple[str, ...],
                 verp: int | None, ids: tuple[str, ...], signed: int | None) -> None:
    report = run(name)
    assert report.kind is kind
    assert report.status == status
    assert report.recipients == recipients
    assert report.verp_message_id == verp
    assert report.original_message_ids == ids
    assert report.signed_message == (SignedMessage(signed, 3) if signed else None)
    assert report.diagnostic
    assert "\n" not in report.diagnostic and "\r" not in report.diagnostic
    assert len(report.diagnostic) <= 1000


def test_every_sample_has_a_case() -> None:
    assert {p.name for p in DATA.glob("*.eml")} == {c[0] for c in CASES}


def test_sample_verp_addresses_match_the_secret() -> None:
    # Guards the fixtures: the files must hold real VERP addresses for these ids.
    for n in (1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1015):
        local = verp_address(SECRET, n, DOMAIN).split("@")[0]
        assert any(local in p.read_text(errors="replace") for p in DATA.glob("*.eml")), n
    assert unsubscribe_token(SECRET, 4242, 7) == TOKEN


def test_diagnostics_are_the_remote_reasons() -> None:
    assert "User unknown in virtual mailbox table" in run("postfix_user_unknown.eml").diagnostic
    assert "RecipientNotFound" in run("exchange_online.eml").diagnostic
    assert "Connection timed out" in run("postfix_delayed.eml").diagnostic
    assert "Quota exceeded" in run("mailbox_full.eml").diagnostic
    assert "User unknown" in run("exim_failed.eml").diagnostic


def test_envelope_recipient_is_the_first_verp_candidate() -> None:
    # The From-address DSN has no VERP in its headers; the MTA's pipe argument can supply it.
    env = verp_address(SECRET, 77, DOMAIN)
    assert run("dsn_to_from_address.eml", envelope_recipient=env).verp_message_id == 77
    # ...and it wins over the headers.
    assert run("postfix_user_unknown.eml", envelope_recipient=env).verp_message_id == 77


def test_forged_envelope_recipient_is_ignored() -> None:
    forged = "b25-aaaaaaaaaaaaaaaa@bounces.example.com"
    report = run("dsn_to_from_address.eml", envelope_recipient=forged)
    assert report.verp_message_id is None
    # A genuine address of another domain is not ours either.
    other = verp_address(SECRET, 5, "elsewhere.example")
    assert run("dsn_to_from_address.eml", envelope_recipient=other).verp_message_id is None


def test_verp_from_wrong_secret_is_ignored() -> None:
    raw = (DATA / "postfix_user_unknown.eml").read_bytes()
    report = classify(raw, secret=b"another secret", envelope_domain=DOMAIN)
    assert report.kind is BounceKind.HARD
    assert report.verp_message_id is None


def test_unsubscribe_mail() -> None:
    report = run("unsubscribe_mailto.eml")
    assert report.unsubscribe_token == TOKEN
    assert report.sender == "karen@example.org"


def test_unsubscribe_by_envelope_recipient_and_token_in_body() -> None:
    raw = (f"From: Someone <someone@example.org>\nTo: undisclosed-recipients:;\n"
           f"Subject: please\n\nunsubscribe%20{TOKEN}\n").encode()
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN, unsubscribe_address=UNSUB,
                      envelope_recipient="Unsubscribe@bounces.example.com")
    assert report.kind is BounceKind.UNSUBSCRIBE
    assert report.unsubscribe_token == TOKEN


def test_unsubscribe_with_forged_or_missing_token() -> None:
    forged = TOKEN[:-4] + "AAAA"
    raw = (f"From: someone@example.org\nTo: {UNSUB}\nSubject: unsubscribe {forged}\n\n"
           "stop\n").encode()
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN, unsubscribe_address=UNSUB)
    assert report.kind is BounceKind.UNSUBSCRIBE
    assert report.unsubscribe_token is None
    assert report.sender == "someone@example.org"


def test_mail_to_unsubscribe_address_is_only_unsubscribe_when_configured() -> None:
    raw = (DATA / "unsubscribe_mailto.eml").read_bytes()
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
    assert report.kind is BounceKind.NOT_BOUNCE


def test_autoreply_markers() -> None:
    base = "From: a@example.org\nTo: news@lists.example.com\n"
    for headers in ("X-Autoreply: yes\nSubject: Re: news\n",
                    "Precedence: auto_reply\nSubject: Re: news\n",
                    "Subject: Out of Office: news\n",
                    "Subject: Autosvar: Nyhedsbrev\n"):
        raw = (base + headers + "\nI am away.\n").encode()
        report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
        assert report.kind is BounceKind.AUTOREPLY, headers


def test_arf_other_feedback_types_are_not_complaints() -> None:
    raw = (DATA / "arf_abuse.eml").read_bytes().replace(b"Feedback-Type: abuse",
                                                        b"Feedback-Type: not-spam")
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
    assert report.kind is BounceKind.NOT_BOUNCE
    assert "not-spam" in report.diagnostic


def test_arf_without_rcpt_to_uses_original_to() -> None:
    raw = (DATA / "arf_abuse.eml").read_bytes().replace(
        b"Original-Rcpt-To: <reader@example.net>\n", b"")
    assert classify(raw, secret=SECRET, envelope_domain=DOMAIN).recipients == (
        "reader@example.net",)


def test_unparsed_bounce_from_mailer_daemon_is_soft() -> None:
    raw = (b"Return-Path: <>\nFrom: MAILER-DAEMON@mx.example.org\nTo: x@bounces.example.com\n"
           b"Subject: Undelivered Mail Returned to Sender\n\nSomething odd happened.\n")
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
    assert report.kind is BounceKind.SOFT
    assert report.recipients == ()


def test_success_dsn_is_not_a_bounce() -> None:
    raw = (DATA / "postfix_user_unknown.eml").read_bytes().replace(
        b"Action: failed", b"Action: delivered")
    assert classify(raw, secret=SECRET, envelope_domain=DOMAIN).kind is BounceKind.NOT_BOUNCE


@pytest.mark.parametrize("raw", [
    b"",
    b"\x00\x01\x02\xff" * 100,
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\n\n--x\n",
    b"Content-Type: multipart/report; report-type=feedback-report\n\nno parts",
    b"From: a@b\nContent-Type: multipart/mixed; boundary=\"q\"\n\n--q\n"
    b"Content-Type: message/rfc822\n\n",
    b"From: =?x-unknown?q?broken?= <\nSubject: =?utf-8?b?###?=\n\n",
    b"Content-Type: message/delivery-status\nContent-Transfer-Encoding: base64\n\n@@@@\n",
])
def test_malformed_input_never_raises(raw: bytes) -> None:
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN, unsubscribe_address=UNSUB)
    assert report.kind in set(BounceKind)
    assert "\n" not in report.diagnostic


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(raw: bytes) -> None:
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN, unsubscribe_address=UNSUB)
    assert len(report.diagnostic) <= 1000


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=4000))
def test_corrupted_sample_never_raises(noise: bytes, at: int) -> None:
    raw = (DATA / "exchange_online.eml").read_bytes()
    classify(raw[:at] + noise + raw[at:], secret=SECRET, envelope_domain=DOMAIN)


def test_status_helpers() -> None:
    assert enhanced_status("smtp; 550 5.1.1 <x@y>: nope") == "5.1.1"
    assert enhanced_status("from 198.51.100.7 at 10:03") is None
    assert enhanced_status(None) is None
    assert enhanced_status_class("4.4.1") == 4
    assert enhanced_status_class("5.1.10") == 5
    assert enhanced_status_class("9.9.9") is None
    assert enhanced_status_class(None) is None
    assert failure_kind("5.1.1") is BounceKind.HARD
    assert failure_kind("5.2.2") is BounceKind.SOFT
    assert failure_kind("5.7.1", "blocked for spam") is BounceKind.BLOCKED
    assert failure_kind("5.0.0", "550 5.7.1 blocked for spam") is BounceKind.BLOCKED
    assert failure_kind("5.0.0", "mailbox full") is BounceKind.SOFT
    assert failure_kind("4.2.2") is BounceKind.SOFT
    assert failure_kind(None) is BounceKind.SOFT


def test_signed_message_id_from_wrong_secret_is_no_evidence() -> None:
    raw = (DATA / "dsn_to_from_address.eml").read_bytes()
    report = classify(raw, secret=b"another secret", envelope_domain=DOMAIN)
    assert report.kind is BounceKind.HARD and report.signed_message is None
    # What the Message-ID claims is kept (for counting), not trusted.
    assert report.claimed_newsletter_id == 3


@pytest.mark.parametrize("quoted", [
    "<1010.3.ss@bounces.example.com>",  # the old sequential format: guessable
    "<1010.3.aaaaaaaaaaaaaaaa@bounces.example.com>",  # our shape, wrong HMAC
])
def test_guessed_message_ids_are_claims_only(quoted: str) -> None:
    raw = (DATA / "arf_abuse.eml").read_bytes()
    raw = raw.replace(mid(1007)[0].encode(), quoted.encode())
    raw = raw.replace(verp_address(SECRET, 1007, DOMAIN).encode(), b"news@lists.example.com")
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
    assert report.kind is BounceKind.COMPLAINT
    assert (report.verp_message_id, report.signed_message) == (None, None)
    assert report.original_message_ids == (quoted,)
    assert report.claimed_newsletter_id == 3


def test_claimed_newsletter_only_for_our_domain() -> None:
    raw = (DATA / "dsn_to_from_address.eml").read_bytes().replace(
        mid(1010)[0].encode(), b"<1010.3.ss@elsewhere.example>")
    report = classify(raw, secret=SECRET, envelope_domain=DOMAIN)
    assert report.signed_message is None and report.claimed_newsletter_id is None


def test_arf_token_comes_from_the_originals_list_unsubscribe() -> None:
    assert run("arf_jmrp.eml").unsubscribe_token == unsubscribe_token(SECRET, 4243, 7)
    forged = run("arf_jmrp.eml").unsubscribe_token
    assert forged is not None
    raw = (DATA / "arf_jmrp.eml").read_bytes().replace(forged[-6:].encode(), b"AAAAAA")
    assert classify(raw, secret=SECRET, envelope_domain=DOMAIN).unsubscribe_token is None
