"""Signed identifiers (pure functions): the Message-ID our bounce evidence rests on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendsystem.tokens import (
    SignedMessage,
    claimed_newsletter,
    decode_message_id,
    decode_verp,
    message_id_header,
    verp_address,
)

SECRET = b"unit-test-secret"
DOMAIN = "bounces.example.com"


def test_message_id_is_deterministic_and_verifies() -> None:
    header = message_id_header(SECRET, 123, 45, DOMAIN)
    assert header == message_id_header(SECRET, 123, 45, DOMAIN)  # a retry keeps it
    assert header.startswith("<123.45.") and header.endswith(f"@{DOMAIN}>")
    assert decode_message_id(SECRET, header) == SignedMessage(123, 45)
    # Quoted without brackets, upper-cased by some system, or from another domain
    # (envelope_domain may change): still ours.
    assert decode_message_id(SECRET, header.strip("<>")) == SignedMessage(123, 45)
    assert decode_message_id(SECRET, header.upper()) == SignedMessage(123, 45)
    assert decode_message_id(SECRET, header.replace(DOMAIN, "new.example")) == \
        SignedMessage(123, 45)


def test_neighbours_differ_in_signature() -> None:
    sigs = {message_id_header(SECRET, n, 1, DOMAIN).split(".")[2] for n in range(1000)}
    assert len(sigs) == 1000


@pytest.mark.parametrize("tamper", [
    lambda h: h.replace("<123.", "<124."),  # a changed digit of the message id
    lambda h: h.replace(".45.", ".46."),  # ... of the newsletter id
    lambda h: h.replace("<123.", "<0123."),  # a non-canonical spelling
    lambda h: h[:12] + ("a" if h[12] != "a" else "b") + h[13:],  # a changed signature char
    lambda h: "<123.45.ss@bounces.example.com>",  # the old sequential format
    lambda h: h.replace(h.split(".")[2].split("@")[0], "a" * 16),
])
def test_tampered_message_id_fails(tamper) -> None:  # type: ignore[no-untyped-def]
    header = message_id_header(SECRET, 123, 45, DOMAIN)
    forged = tamper(header)
    assert forged != header
    assert decode_message_id(SECRET, forged) is None


def test_other_secret_and_other_purpose_fail() -> None:
    header = message_id_header(SECRET, 7, 3, DOMAIN)
    assert decode_message_id(b"other secret", header) is None
    # The VERP signature of the same id is no Message-ID signature, and back.
    verp_sig = verp_address(SECRET, 7, DOMAIN).split("-")[1].split("@")[0]
    assert decode_message_id(SECRET, f"<7.3.{verp_sig}@{DOMAIN}>") is None
    msgid_sig = header.split(".")[2].split("@")[0]
    assert decode_verp(SECRET, f"b7-{msgid_sig}@{DOMAIN}") is None


@given(st.integers(min_value=0, max_value=2**63), st.integers(min_value=0, max_value=2**32))
def test_round_trip(message_id: int, newsletter_id: int) -> None:
    header = message_id_header(SECRET, message_id, newsletter_id, DOMAIN)
    assert decode_message_id(SECRET, header) == SignedMessage(message_id, newsletter_id)


@pytest.mark.parametrize("value", ["", "<>", "garbage", "<1.2@x>", "<a.b.cccccccccccccccc@x>",
                                   "<1.2.aaaaaaaaaaaaaaaa@x@y>", "<1.2.aaaaaaaaaaaaaaaa@>"])
def test_garbage_is_not_a_message_id(value: str) -> None:
    assert decode_message_id(SECRET, value) is None


def test_claimed_newsletter_is_a_shape_check_only() -> None:
    assert claimed_newsletter("<5.7.ss@bounces.example.com>", DOMAIN) == 7
    assert claimed_newsletter(message_id_header(SECRET, 5, 7, DOMAIN), DOMAIN) == 7
    assert claimed_newsletter("<5.7.ss@other.example>", DOMAIN) is None
    assert claimed_newsletter("<CAF3k9x2@mail.example.org>", DOMAIN) is None
