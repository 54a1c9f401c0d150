"""Tracking tokens: ``/o/<token>`` names (newsletter, message); ``/c/<token>`` names
(newsletter, message, link). Both are signed: a forged or altered one gets 404.

Format (base64url, no padding): an open token is the *message part*
``version | varint(newsletter) | varint(message) | MAC`` and a click token is
the message part followed by the *link part* ``idx (8 bytes) | MAC``. Each MAC
is keyed BLAKE2b (a keyed hash of BLAKE2 is a PRF, hence a MAC) with its own
personalisation, truncated: the message part's to 72-88 bits (whatever makes
the part a multiple of 3 bytes, so the two parts' base64 simply concatenate),
the link part's to 80 bits. The message MAC covers newsletter and message, the
link MAC covers newsletter and link. The key is derived from the signing
secret (``[unsubscribe] secret``) with HMAC-SHA256 under its own purpose, so
tracking and unsubscribe tokens never share a key.

Why two parts rather than one MAC over all three: a message has ~30 links,
and one MAC per link cost 1.5 µs each, 45 µs a message, a fifth of the whole
merge. With two parts the message part is signed once per message and each
link part once per newsletter and URL (the render child caches it), so a
click token costs a string concatenation. What that allows, and does not:
every byte of either part is covered by its MAC (changing any gives 404); a
link part only verifies with its own newsletter; the redirect target is never
in the token but in the newsletter's link table. Someone holding tokens of
two messages of one newsletter can pair one's message part with the other's
link part: that records a click of the first recipient on a link of the same
newsletter, which is no more than clicking either genuine link, and never
reaches a URL outside that newsletter.

``idx`` is a keyed 64-bit hash of the URL (:meth:`Signer.link_idx`): every sort
worker names a URL alike without coordinating, and a customer cannot choose
URLs that collide, because the key is secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

VERSION = 1
_LINK_MAC = 10
_IDX = 8
LINK_PART_BYTES = _IDX + _LINK_MAC          # 18 bytes = 24 base64 characters
LINK_PART_CHARS = LINK_PART_BYTES * 4 // 3
_MSG_MAC_MIN = 9
CLICK, OPEN = "click", "open"
# Varints of two 64-bit ids plus the MACs, with room to spare; longer is not ours.
MAX_TOKEN_CHARS = 96


def tracking_key(secret: bytes) -> bytes:
    """The tracking MAC key, derived from the signing secret (its own purpose)."""
    return hmac.new(secret, b"sendsystem tracking key v1", hashlib.sha256).digest()


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("negative id")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and shift > 7:
                raise ValueError("non-canonical varint")
            return value, pos


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _msg_mac_len(payload_len: int) -> int:
    """The message MAC's length: at least 9 bytes, and the part a multiple of 3."""
    return _MSG_MAC_MIN + (-(payload_len + _MSG_MAC_MIN)) % 3


@dataclass(frozen=True)
class Hit:
    """What a verified token names."""

    kind: str            # CLICK or OPEN
    newsletter_id: int
    message_id: int
    link_idx: int = 0    # 0 for an open


class Signer:
    """Makes and checks tokens with one key; the keyed hash states are built once."""

    def __init__(self, key: bytes) -> None:
        key = key[:64]
        self._msg = hashlib.blake2b(key=key, digest_size=16, person=b"ss-track-msg")
        self._link = hashlib.blake2b(key=key, digest_size=_LINK_MAC, person=b"ss-track-link")
        self._idx = hashlib.blake2b(key=key, digest_size=_IDX, person=b"ss-track-idx")
        self._prefixes: dict[int, bytes] = {}   # a message part's start, per newsletter

    @classmethod
    def from_secret(cls, secret: bytes) -> Signer:
        return cls(tracking_key(secret))

    def link_idx(self, url: str) -> int:
        """The link table key of ``url`` (the same in every newsletter; never 0)."""
        h = self._idx.copy()
        h.update(url.encode("utf-8", "surrogatepass"))
        return int.from_bytes(h.digest(), "big") or 1

    def message_part(self, newsletter_id: int, message_id: int) -> str:
        """The signed message part (an open token, and the start of every click token)."""
        prefix = self._prefixes.get(newsletter_id)
        if prefix is None:
            prefix = bytes((VERSION,)) + _varint(newsletter_id)
            if len(self._prefixes) < 1000:
                self._prefixes[newsletter_id] = prefix
        payload = prefix + _varint(message_id)
        h = self._msg.copy()
        h.update(payload)
        mac = h.digest()[:_msg_mac_len(len(payload))]
        return _b64(payload + mac)

    def link_part(self, newsletter_id: int, idx: int) -> str:
        """The signed link part of a click token (cache it per newsletter and URL)."""
        raw = idx.to_bytes(_IDX, "big")
        h = self._link.copy()
        h.update(_varint(newsletter_id) + raw)
        return _b64(raw + h.digest())

    def click(self, newsletter_id: int, message_id: int, idx: int) -> str:
        return self.message_part(newsletter_id, message_id) + self.link_part(newsletter_id, idx)

    def open(self, newsletter_id: int, message_id: int) -> str:
        return self.message_part(newsletter_id, message_id)

    def verify(self, kind: str, token: str) -> Hit | None:
        """What the token names, or None when it is forged, altered, of the other kind or
        not a token at all. Never raises on input."""
        if kind not in (CLICK, OPEN) or not 8 <= len(token) <= MAX_TOKEN_CHARS:
            return None
        if kind == CLICK:
            if len(token) <= LINK_PART_CHARS:
                return None
            token, link = token[:-LINK_PART_CHARS], token[-LINK_PART_CHARS:]
        raw = _decode(token)
        if raw is None or len(raw) < 4 or raw[0] != VERSION:
            return None
        try:
            newsletter_id, pos = _read_varint(raw, 1, len(raw))
            message_id, pos = _read_varint(raw, pos, len(raw))
        except ValueError:
            return None
        if len(raw) - pos != _msg_mac_len(pos):
            return None
        h = self._msg.copy()
        h.update(raw[:pos])
        if not hmac.compare_digest(h.digest()[:len(raw) - pos], raw[pos:]):
            return None
        if kind == OPEN:
            return Hit(OPEN, newsletter_id, message_id)
        lraw = _decode(link)
        if lraw is None or len(lraw) != LINK_PART_BYTES:
            return None
        h = self._link.copy()
        h.update(_varint(newsletter_id) + lraw[:_IDX])
        if not hmac.compare_digest(h.digest(), lraw[_IDX:]):
            return None
        return Hit(CLICK, newsletter_id, message_id, int.from_bytes(lraw[:_IDX], "big"))


def _decode(text: str) -> bytes | None:
    """base64url without padding, canonical spelling only (re-encoding gives it back)."""
    if not text.isascii():
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _b64(raw) == text else None
