"""DKIM signing (RFC 6376), rsa-sha256, relaxed/relaxed, for the send worker.

Why not simply ``dkim.sign()`` from dkimpy: it re-parses the PEM key and does
the RSA operation in pure Python on every call, about 7 ms per message on a
2048-bit key, which would cap one send worker's core at ~140 messages/s.
Here the key is loaded once with the ``cryptography`` package, the
canonicalisation is a few C-speed regex passes, and the SHA-256 digest of the
canonical header block is signed as a prehashed digest with PKCS#1 v1.5
(OpenSSL underneath, ~0.5 ms). dkimpy is only the independent verifier in the
tests.

Signed headers: From, To, Subject, Date, Message-ID, MIME-Version,
Content-Type, List-Unsubscribe, List-Unsubscribe-Post, List-Id (those
present). From, To and Subject are over-signed (listed once more than they
occur) so that nobody can add a second one without breaking the signature.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import time
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from sendsystem.errors import ConfigError

log = logging.getLogger(__name__)

SIGNED_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
)
_OVERSIGNED = frozenset({b"from", b"to", b"subject"})
_MIN_KEY_BITS = 1024

_WSP_RUN = re.compile(rb"[ \t]+")
_HEADER_FIELD = re.compile(rb"^([^:\s]+)[ \t]*:(.*?)\r\n(?=[^ \t]|\Z)", re.S | re.M)
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: collapse WSP runs, drop WSP at line ends and empty lines at the end."""
    body = _WSP_RUN.sub(b" ", body).replace(b" \r\n", b"\r\n")
    body = body.rstrip(b"\r\n ")
    return body + b"\r\n" if body else b""


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfold, collapse WSP, trim."""
    value = _WSP_RUN.sub(b" ", _FOLD.sub(b"", value)).strip(b" ")
    return name.lower() + b":" + value + b"\r\n"


class DkimSigner:
    """Signs finalised messages for one domain/selector; build once per worker."""

    def __init__(self, domain: str, selector: str, private_key_pem: bytes) -> None:
        if not _DOMAIN.match(domain) or not _DOMAIN.match(selector):
            raise ConfigError(
                f"[dkim] domain {domain!r} / selector {selector!r} are not valid DNS names"
            )
        try:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(
                f"[dkim] key_file is not a PEM RSA private key ({exc}); "
                "create one with: sendsystem dkim keygen"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(
                "[dkim] key_file holds a non-RSA key; rsa-sha256 needs an RSA key: "
                "create one with: sendsystem dkim keygen"
            )
        if key.key_size < _MIN_KEY_BITS:
            raise ConfigError(
                f"[dkim] the RSA key has {key.key_size} bits; use 2048 (at least 1024)"
            )
        self.domain = domain
        self.selector = selector
        self._key = key

    @classmethod
    def from_file(cls, domain: str, selector: str, key_file: Path) -> DkimSigner:
        try:
            pem = Path(key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"[dkim] key_file {key_file} cannot be read ({exc.strerror}); "
                "fix the path or permissions, or remove key_file to send unsigned"
            ) from None
        return cls(domain, selector, pem)

    def sign(self, message: bytes, timestamp: int | None = None) -> bytes:
        """``message`` (CRLF line endings) with a DKIM-Signature header prepended."""
        end = message.find(b"\r\n\r\n")
        if end < 0:
            raise ValueError("message has no header/body separator (CRLF CRLF)")
        head, body = message[: end + 2], message[end + 4 :]
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())

        fields: dict[bytes, list[bytes]] = {}
        for m in _HEADER_FIELD.finditer(head):
            fields.setdefault(m.group(1).lower(), []).append(m.group(2))
        names: list[bytes] = []
        canon: list[bytes] = []
        for wanted in SIGNED_HEADERS:
            key = wanted.lower().encode("ascii")
            found = fields.get(key, [])
            # RFC 6376 5.4.2: multiple instances are signed bottom-up.
            for value in reversed(found):
                names.append(key)
                canon.append(_relaxed_header(key, value))
            if found and key in _OVERSIGNED:
                # Listing a name once more than it occurs (an empty instance)
                # forbids adding another one later.
                names.append(key)
        if b"from" not in fields:
            raise ValueError("a DKIM-signed message needs a From header")

        t = int(time.time()) if timestamp is None else timestamp
        sig_value = (
            (
                f" v=1; a=rsa-sha256; c=relaxed/relaxed; d={self.domain};"
                f"\r\n s={self.selector}; t={t};\r\n h="
            ).encode()
            + _fold_list(b":".join(names))
            + b";\r\n bh="
            + body_hash
            + b";\r\n b="
        )
        signed_input = b"".join(canon) + _relaxed_header(b"dkim-signature", sig_value)[:-2]
        digest = hashlib.sha256(signed_input).digest()
        signature = self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        b64 = base64.b64encode(signature)
        folded = b"\r\n ".join(b64[i : i + 72] for i in range(0, len(b64), 72))
        return b"DKIM-Signature:" + sig_value + folded + b"\r\n" + message

    def dns_txt_record(self) -> str:
        """The TXT record to publish at ``<selector>._domainkey.<domain>``."""
        return dns_txt_record(self._key.public_key())

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def dns_txt_record(public_key: rsa.RSAPublicKey) -> str:
    """``v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo, base64>``."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def generate_key(path: Path, bits: int = 2048) -> rsa.RSAPrivateKey:
    """Write a new RSA key to ``path`` (PEM, mode 0600); never overwrites a file."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; remove it first or choose another path "
                          "(a key in use must not be replaced before DNS has the new one)"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


def _fold_list(h: bytes) -> bytes:
    """Fold the h= tag at colons so the header stays under 78 columns."""
    out: list[bytes] = []
    line = b""
    for name in h.split(b":"):
        piece = name if not line else b":" + name
        if len(line) + len(piece) > 60:
            out.append(line)
            line = b"\r\n " + piece
        else:
            line += piece
    out.append(line)
    return b"".join(out)
