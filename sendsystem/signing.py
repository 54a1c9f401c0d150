"""HMAC-signed identifiers: VERP envelope senders and unsubscribe tokens.

Both are derived from ``Config.secret()``; neither can be forged or guessed
without it (128-bit truncated HMAC-SHA256 for tokens, 80 bits for VERP,
which must stay short and case-insensitive because MTAs may lower-case the
local part).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

_VERP_RE = re.compile(r"^b(?P<id>[0-9a-z]+)-(?P<sig>[a-z2-7]{16})$")
_TOKEN_RE = re.compile(r"^(?P<sub>[0-9a-z]+)\.(?P<list>[0-9a-z]+)\.(?P<sig>[A-Za-z0-9_-]{22})$")


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


def verp_address(secret: bytes, message_id: int, domain: str) -> str:
    """The envelope sender for one message: ``b<id36>-<sig>@domain``."""
    ident = _b36(message_id)
    sig = base64.b32encode(_mac(secret, "verp", ident)[:10]).decode().lower()
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
    expected = base64.b32encode(_mac(secret, "verp", ident)[:10]).decode().lower()
    if not hmac.compare_digest(expected, m.group("sig")):
        return None
    return int(ident, 36)


@dataclass(frozen=True)
class UnsubscribeTarget:
    subscriber_id: int
    list_id: int


def unsubscribe_token(secret: bytes, subscriber_id: int, list_id: int) -> str:
    payload = f"{_b36(subscriber_id)}.{_b36(list_id)}"
    sig = base64.urlsafe_b64encode(_mac(secret, "unsub", payload)[:16]).decode().rstrip("=")
    return f"{payload}.{sig}"


def verify_unsubscribe_token(secret: bytes, token: str) -> UnsubscribeTarget | None:
    """The subscriber and list a token names, or None if it was forged or mangled."""
    m = _TOKEN_RE.match(token.strip())
    if not m:
        return None
    payload = f"{m.group('sub')}.{m.group('list')}"
    expected = base64.urlsafe_b64encode(_mac(secret, "unsub", payload)[:16]).decode().rstrip("=")
    if not hmac.compare_digest(expected, m.group("sig")):
        return None
    return UnsubscribeTarget(int(m.group("sub"), 36), int(m.group("list"), 36))
