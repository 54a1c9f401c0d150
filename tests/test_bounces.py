"""Bounce classification against realistic sample messages in tests/data/bounces."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem.bounces import (
    BounceKind,
    BounceReport,
    classify,
    enhanced_status,
    enhanced_status_class,
    failure_kind,
)
from sendsystem.signing import unsubscribe_token, verp_address

DATA = Path(__file__).parent / "data" / "bounces"
# The VERP addresses and the token in the sample files were made with this secret.
SECRET = b"test-secret-for-bounce-samples"
DOMAIN = "bounces.example.com"
UNSUB = "unsubscribe@bounces.example.com"
TOKEN = "39u.7.dwBurP5i28X19HZb0Lovyw"


def run(name: str, **kw: str) -> BounceReport:
    raw = (DATA / name).read_bytes()
    return classify(raw, secret=SECRET, envelope_domain=DOMAIN, unsubscribe_address=UNSUB, **kw)


def mid(n: int, stamp: str) -> tuple[str, ...]:
    return (f"<{n}.{stamp}@lists.example.com>",)


# name, kind, status, recipients, verp id, original Message-IDs
CASES = [
    ("postfix_user_unknown.eml", BounceKind.HARD, "5.1.1", ("nobody@example.org",), 1001,
     mid(1001, "20240514080309")),
    ("exim_failed.eml", BounceKind.HARD, "5.1.1", ("gone@example.net",), 1002,
     mid(1002, "20240514080400")),
    ("postfix_delayed.eml", BounceKind.SOFT, "4.4.1", ("slow@example.com",), 1003,
     mid(1003, "20240514080510")),
    ("mailbox_full.eml", BounceKind.SOFT, "5.2.2", ("full@example.dk",), 1004,
     mid(1004, "20240514080559")),
    ("exchange_online.eml", BounceKind.HARD, "5.1.10", ("someone@contoso.com",), 1005,
     mid(1005, "20240514080701")),
    ("exchange_legacy.eml", BounceKind.HARD, "5.1.1", ("bob@example.com",), 1008, ()),
    ("ooo_english.eml", BounceKind.AUTOREPLY, None, (), 1006, ()),
    ("ooo_danish.eml", BounceKind.AUTOREPLY, None, (), 1009, ()),
    ("arf_abuse.eml", BounceKind.COMPLAINT, None, ("reader@example.net",), 1007,
     mid(1007, "20240514081059")),
    ("dsn_to_from_address.eml", BounceKind.HARD, "5.1.1", ("former@example.co.uk",), None,
     mid(1010, "20240514081201")),
    ("forged_verp.eml", BounceKind.HARD, "5.1.1", ("nobody@example.org",), None,
     mid(1011, "20240514080309")),
    ("personal_reply.eml", BounceKind.NOT_BOUNCE, None, (), None, ()),
    ("garbage.eml", BounceKind.NOT_BOUNCE, None, (), None, ()),
    ("unsubscribe_mailto.eml", BounceKind.UNSUBSCRIBE, None, (), None, ()),
]


@pytest.mark.parametrize(("name", "kind", "status", "recipients", "verp", "ids"), CASES,
                         ids=[c[0] for c in CASES])
def test_samples(name: str, kind: BounceKind, status: str | None, recipients: tuple[str, ...],
                 verp: int | None, ids: tuple[str, ...]) -> None:
    report = run(name)
    assert report.kind is kind
    assert report.status == status
    assert report.recipients == recipients
    assert report.verp_message_id == verp
    assert report.original_message_ids == ids
    assert report.diagnostic
    assert "\n" not in report.diagnostic and "\r" not in report.diagnostic
    assert len(report.diagnostic) <= 1000


def test_every_sample_has_a_case() -> None:
    assert {p.name for p in DATA.glob("*.eml")} == {c[0] for c in CASES}


def test_sample_verp_addresses_match_the_secret() -> None:
    # Guards the fixtures: the files must hold real VERP addresses for these ids.
    for n in (1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009):
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
