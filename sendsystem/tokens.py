"""HMAC-signed identifiers: VERP envelope senders, Message-IDs and unsubscribe tokens.

All are derived from ``Config.secret()``; none can be forged or guessed
without it (128-bit truncated HMAC-SHA256 for tokens, 80 bits for VERP and
Message-IDs, which must stay short and case-insensitive because MTAs may
lower-case the local part of an address, and some mail systems fold the
case of a quoted Message-ID). Each kind has its own HMAC purpose, so a
signature of one kind never verifies as another.

These signatures are what lets a bounce or complaint change a subscriber
(see :mod:`sendsystem.bounce.intake`): anyone on the internet can mail the
bounce address, but only someone who saw one of our messages knows a signed
identifier, and then only for that message. Our Message-IDs used to be
sequential (``<id.newsletter.ss@domain>``), so an outsider could quote a
guessed one; those are no longer accepted as evidence.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field

_VERP_RE = re.compile(r"^b(?P<id>[0-9a-z]+)-(?P<sig>[a-z2-7]{16})$")
_MSGID_RE = re.compile(r"^<?(?P<id>[0-9]{1,20})\.(?P<nl>[0-9]{1,20})\.(?P<sig>[a-z2-7]{16})"
                       r"@[^<>@\s]+>?$")
_TOKEN_RE = re.compile(r"^(?P<sub>[0-9a-z]+)\.(?P<list>[0-9a-z]+)(?:\.(?P<nl>[0-9a-z]+))?"
                       r"\.(?P<sig>[A-Za-z0-9_-]{22})$")


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    if n < 0:
        raise ValueError("negative id")
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _mac(secret: bytes, purpose: str, payload: str) -> bytes:
    return hmac.new(secret, f"{purpose}:{payload}".encode(), hashlib.sha256).digest()


def _short_sig(secret: bytes, purpose: str, payload: str) -> str:
    """80 bits of HMAC as 16 lower-case base32 characters."""
    return base64.b32encode(_mac(secret, purpose, payload)[:10]).decode().lower()


def verp_address(secret: bytes, message_id: int, domain: str) -> str:
    """The envelope sender for one message: ``b<id36>-<sig>@domain``."""
    ident = _b36(message_id)
    sig = _short_sig(secret, "verp", ident)
    return f"b{ident}-{sig}@{domain}"


def decode_verp(secret: bytes, address: str, domain: str | None = None) -> int | None:
    """The message id a VERP address names, or None if it is not ours or forged."""
    address = address.strip().strip("<>").lower()
    local, _, addr_domain = address.rpartition("@")
    if domain is not None and addr_domain != domain.lower():
        return None
    # Postfix may keep an extension (b123-sig+ext); ignore what follows '+'.
    local = local.split("+", 1)[0]
    m = _VERP_RE.match(local)
    if not m:
        return None
    ident = m.group("id")
    if not hmac.compare_digest(_short_sig(secret, "verp", ident), m.group("sig")):
        return None
    return int(ident, 36)


@dataclass(frozen=True)
class SignedMessage:
    """The message a signed Message-ID names."""

    message_id: int
    newsletter_id: int


def message_id_header(secret: bytes, message_id: int, newsletter_id: int, domain: str) -> str:
    """The Message-ID of one message: ``<id.newsletter.sig@domain>``.

    Deterministic (a retry keeps its Message-ID, so a bounce of any attempt
    maps to the one message); the signature covers both ids, so it cannot be
    guessed from a neighbour's, and only this function's counterpart
    :func:`decode_message_id` accepts it.
    """
    if message_id < 0 or newsletter_id < 0:
        raise ValueError("negative id")
    sig = _short_sig(secret, "msgid", f"{message_id}.{newsletter_id}")
    return f"<{message_id}.{newsletter_id}.{sig}@{domain}>"


def decode_message_id(secret: bytes, value: str) -> SignedMessage | None:
    """The message a Message-ID names if its signature verifies, else None.

    The domain is not checked (it is not signed, and ``envelope_domain`` may
    change); case is folded, since some mail systems fold it.
    """
    m = _MSGID_RE.match(value.strip().lower())
    if not m:
        return None
    # Signed as written: a non-canonical spelling ("007") never verifies.
    expected = _short_sig(secret, "msgid", f"{m.group('id')}.{m.group('nl')}")
    if not hmac.compare_digest(expected, m.group("sig")):
        return None
    return SignedMessage(int(m.group("id")), int(m.group("nl")))


_LOOSE_MSGID_RE = re.compile(r"^<?(?P<id>[0-9]{1,20})\.(?P<nl>[0-9]{1,20})\.[^<>@\s]*"
                             r"@(?P<domain>[^<>@\s]+?)>?$")


def claimed_newsletter(value: str, domain: str) -> int | None:
    """The newsletter a Message-ID of our shape and domain *claims*; no signature check.

    Only for counting unverified reports against a newsletter in ``stats``;
    never evidence: anyone can write this.
    """
    m = _LOOSE_MSGID_RE.match(value.strip().lower())
    if not m or m.group("domain") != domain.lower():
        return None
    return int(m.group("nl"))


@dataclass(frozen=True)
class UnsubscribeTarget:
    subscriber_id: int
    list_id: int
    # The newsletter whose message carried the token (None: a token from before
    # schema 13, which named only the subscription).
    newsletter_id: int | None = None
    # How the request came, when the web app passes it on (not part of the token,
    # nor of what a target is): the reason in the subscriber's history
    # (sendsystem/history.py).
    via: str | None = field(default=None, compare=False)


def unsubscribe_token(secret: bytes, subscriber_id: int, list_id: int,
                      newsletter_id: int | None = None) -> str:
    """``<sub>.<list>[.<newsletter>].<sig>`` (ids in base 36; 128-bit HMAC).

    The newsletter lets ``list stats`` attribute the unsubscribe to the
    newsletter it came from. The signature covers every id present, and a
    two-id payload never equals a three-id one, so an old token cannot be
    extended with a newsletter nor a new one shortened; both forms verify.
    """
    payload = f"{_b36(subscriber_id)}.{_b36(list_id)}"
    if newsletter_id is not None:
        payload += f".{_b36(newsletter_id)}"
    sig = base64.urlsafe_b64encode(_mac(secret, "unsub", payload)[:16]).decode().rstrip("=")
    return f"{payload}.{sig}"


def verify_unsubscribe_token(secret: bytes, token: str) -> UnsubscribeTarget | None:
    """The subscriber, list (and newsletter) a token names, or None if it was forged
    or mangled."""
    m = _TOKEN_RE.match(token.strip())
    if not m:
        return None
    payload = f"{m.group('sub')}.{m.group('list')}"
    if m.group("nl") is not None:
        payload += f".{m.group('nl')}"
    expected = base64.urlsafe_b64encode(_mac(secret, "unsub", payload)[:16]).decode().rstrip("=")
    if not hmac.compare_digest(expected, m.group("sig")):
        return None
    nl = m.group("nl")
    return UnsubscribeTarget(int(m.group("sub"), 36), int(m.group("list"), 36),
                             int(nl, 36) if nl is not None else None)
