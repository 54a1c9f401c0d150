"""What flufl.bounce's corpus taught the classifier (bench/bounce_corpus.py).

Each test is a synthetic message written for it, in the shape of corpus
samples SendSystem once got wrong (named in the test); no corpus file is copied.
"""

from __future__ import annotations

import base64
import quopri

import pytest

from sendsystem.bounce.classify import BounceKind, BounceReport, classify

SECRET = b"test-secret-for-bounce-shapes"
DOMAIN = "bounces.example.com"
ORIGINAL = ("From: News <news@lists.example.com>\nTo: reader@example.net\n"
            "Subject: This week\nMessage-ID: <42.7.ss@bounces.example.com>\n")


def run(raw: str | bytes) -> BounceReport:
    data = raw.encode() if isinstance(raw, str) else raw
    return classify(data, secret=SECRET, envelope_domain=DOMAIN)


def dsn(fields: str, *, text: str = "Your message could not be delivered.\n",
        cte: str | None = None, report_type: str = "; report-type=delivery-status",
        sender: str = "From: Mail Delivery System <Mailer-Daemon@mx.example.org>\n") -> str:
    """A multipart/report with ``fields`` as the delivery-status part."""
    body = fields
    encoding = ""
    if cte == "base64":
        body = base64.encodebytes(fields.encode()).decode()
    elif cte == "quoted-printable":
        body = quopri.encodestring(fields.encode()).decode()
    if cte:
        encoding = f"Content-Transfer-Encoding: {cte}\n"
    return (f"Return-Path: <>\n{sender}To: b1-x@bounces.example.com\n"
            "Subject: Mail delivery failed: returning message to sender\nMIME-Version: 1.0\n"
            f'Content-Type: multipart/report{report_type}; boundary="B"\n\n'
            f"--B\nContent-Type: text/plain\n\n{text}\n"
            f"--B\nContent-Type: message/delivery-status\n{encoding}\n{body}\n"
            f"--B\nContent-Type: text/rfc822-headers\n\n{ORIGINAL}\n--B--\n")


PER_MESSAGE = "Reporting-MTA: dns; mx.example.org\n\n"


def test_exim_generic_status_with_gmail_spam_block_is_blocked() -> None:
    # simple_42: Exim writes Status 5.0.0; the remote's 550-5.7.1 is in the diagnostic.
    report = run(dsn(PER_MESSAGE + "Action: failed\nFinal-Recipient: rfc822;reader@gmail.example\n"
                     "Status: 5.0.0\nRemote-MTA: dns; gmail-smtp-in.example\n"
                     "Diagnostic-Code: smtp; 550-5.7.1 [192.0.2.1      12] Our system has "
                     "detected that this message is\n 550-5.7.1 likely unsolicited mail.\n"))
    assert report.kind is BounceKind.BLOCKED
    assert report.status == "5.7.1"
    assert report.recipients == ("reader@gmail.example",)


@pytest.mark.parametrize("reply", [
    "550 Message rejected: sender IP blacklisted",
    "554 Your message was blocked",
    "550 Rejected as spam",
    "550 Unsolicited bulk mail is not accepted",
])
def test_policy_wording_without_a_code_is_never_hard(reply: str) -> None:
    report = run(dsn(PER_MESSAGE + "Final-Recipient: rfc822; reader@example.net\nAction: failed\n"
                     f"Status: 5.0.0\nDiagnostic-Code: smtp; {reply}\n"))
    assert report.kind is BounceKind.BLOCKED


def test_original_recipient_is_the_address_we_sent_to() -> None:
    # dsn_01 / dsn_04: the final recipient is where an alias led, not our subscriber.
    report = run(dsn(PER_MESSAGE + "Action: failed\nStatus: 5.0.0\n"
                     "Original-recipient: rfc822;reader@example.net\n"
                     "Final-recipient: rfc822;R.EADER@mailhost.example.net\n"))
    assert report.recipients == ("reader@example.net",)
    assert report.kind is BounceKind.HARD


def test_status_comment_and_bare_reply_code_in_the_status_field() -> None:
    # dsn_01: "Status: 5.0.0 (recipient reached disk quota)"; dsn_03: "Status: 553 ...size".
    full = run(dsn(PER_MESSAGE + "Action: failed\n"
                   "Status: 5.0.0 (recipient reached disk quota)\n"
                   "Original-recipient: rfc822;reader@example.net\n"))
    assert (full.kind, full.status) == (BounceKind.SOFT, "5.0.0")
    big = run(dsn(PER_MESSAGE + "Final-Recipient: rfc822;reader@example.net\nAction: failure\n"
                  "Status: 553 Exceeded maximum inbound message size\n"))
    assert (big.kind, big.status) == (BounceKind.SOFT, "5.0.0")
    assert "maximum inbound message size" in big.diagnostic


FIELDS = (PER_MESSAGE + "Original-Recipient: rfc822;reader@example.net\n"
          "Final-Recipient: rfc822;reader@example.net\nAction: failed\nStatus: 5.1.1\n"
          "Diagnostic-Code: smtp; 550 5.1.1 <reader@example.net>: Recipient address rejected: "
          "User unknown in local recipient table; see https://help.example.net/?code=550\n")


@pytest.mark.parametrize("cte", ["base64", "quoted-printable", None])
def test_encoded_delivery_status_part_is_read(cte: str | None) -> None:
    report = run(dsn(FIELDS, cte=cte))
    assert (report.kind, report.status) == (BounceKind.HARD, "5.1.1")
    assert report.recipients == ("reader@example.net",)
    # Quoted-printable soft line breaks and =3D are undone, the whole reason is kept.
    assert report.diagnostic.endswith("local recipient table; see https://help.example.net/"
                                      "?code=550")


def test_bounce_without_from_is_still_read() -> None:
    # simple_13 / simple_31: no From header, an empty delivery-status part, the address in prose.
    raw = dsn("Reporting-MTA: dns; mx.example.org\n", sender="", report_type="",
              text="Delivery to the following recipients failed permanently:\n\n"
                   "   * reader@example.net\n")
    report = run(raw)
    assert report.recipients == ("reader@example.net",)
    assert report.kind is BounceKind.HARD
    assert report.sender is None


def qmail(reason: str, newsletter: str = "Hello") -> str:
    return ("Return-Path: <>\nFrom: MAILER-DAEMON@mail.example.net\n"
            "To: b1-x@bounces.example.com\nSubject: failure notice\n\n"
            "Your mail message to the following address(es) could not be delivered. This\n"
            "is a permanent error. If you are still having difficulty, please contact\n"
            "Customer Support at 480-624-2500.\n\n"
            f"<reader@example.net>:\n{reason}\n\n"
            f"--- Below this line is a copy of the message.\n\n{ORIGINAL}\n{newsletter}\n")


def test_qmail_reason_after_the_address_and_no_phone_number_status() -> None:
    # qmail_07: the support line's phone number read as reply "480-", the reason was missed.
    report = run(qmail("child status 100...The e-mail message could not be delivered because "
                       "the user's mailfolder is full."))
    assert report.recipients == ("reader@example.net",)
    assert report.kind is BounceKind.SOFT
    assert report.status is None
    assert "mailfolder is full" in report.diagnostic


def test_returned_newsletter_words_do_not_make_a_block() -> None:
    # Only the lines naming the address are read: our own footer is not a reason.
    report = run(qmail("Sorry, no mailbox here by that name.",
                       newsletter="Read our privacy policy. Blocked pop-ups? Spam folder?"))
    assert report.kind is BounceKind.HARD


@pytest.mark.parametrize(("fields", "kind"), [
    # dsn_02: gave up after the maximum time: the mailbox may exist.
    ("Action: failed\nStatus: 4.4.7\nDiagnostic-Code: X-Unix; Reason 1 (Unable-To-Transfer); "
     "Diagnostic 5 (Maximum-Time-Expired)\n", BounceKind.SOFT),
    # A rate limit while still retrying is about us, not about the reader.
    ("Action: delayed\nStatus: 4.7.0\nDiagnostic-Code: smtp; 421 4.7.0 Try again later, "
     "closing connection (rate limit)\n", BounceKind.BLOCKED),
    # sendmail_01: a mail loop is no rate limit, though it says "too many".
    ("Action: failed\nStatus: 5.0.0\nDiagnostic-Code: smtp; 554 Too many hops 26 (25 max)\n",
     BounceKind.HARD),
])
def test_expiry_rate_limit_and_loop(fields: str, kind: BounceKind) -> None:
    report = run(dsn(PER_MESSAGE + "Final-Recipient: rfc822; reader@example.net\n" + fields))
    assert report.kind is kind


def test_blocked_recipient_does_not_hide_a_hard_one() -> None:
    # Two recipients in one report: the more severe verdict is reported, with its address.
    report = run(dsn(PER_MESSAGE
                     + "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.7.1\n\n"
                     + "Final-Recipient: rfc822; b@example.net\nAction: failed\nStatus: 5.1.1\n"))
    assert (report.kind, report.recipients) == (BounceKind.HARD, ("b@example.net",))
