"""DKIM signing (RFC 6376), rsa-sha256, relaxed/relaxed, for the send worker.

Why not simply ``dkim.sign()`` from dkimpy: it re-parses the PEM key and does
the RSA operation in pure Python on every call, about 7 ms per message on a
2048-bit key, which would cap one send worker's core at ~140 messages/s.
Here the key is parsed once, the canonicalisation is a few C-speed regex
passes, and the RSA private-key operation goes to the system's OpenSSL
``libcrypto`` through ctypes (~0.3 ms). When libcrypto cannot be loaded, or
its signature differs from the pure-Python one in a start-up self-check (RSA
PKCS#1 v1.5 signatures are deterministic, so they must be identical), the
pure-Python CRT implementation is used instead, with a warning. dkimpy
remains the key parser and, in the tests, the independent verifier.

Signed headers: From, To, Subject, Date, Message-ID, MIME-Version,
Content-Type, List-Unsubscribe, List-Unsubscribe-Post, List-Id (those
present). From, To and Subject are over-signed (listed once more than they
occur) so that nobody can add a second one without breaking the signature.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any

from dkim.crypto import UnparsableKeyError, parse_pem_private_key

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
# DER DigestInfo prefix for SHA-256 (RFC 8017, section 9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
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


class _PythonRsa:
    """RSASSA-PKCS1-v1_5 with the Chinese remainder theorem, in pure Python."""

    def __init__(self, key: dict[str, int]) -> None:
        self._key = key
        self.size = (key["modulus"].bit_length() + 7) // 8

    def sign_digest(self, digest: bytes) -> bytes:
        k = self._key
        t = _SHA256_DIGEST_INFO + digest
        em = b"\x00\x01" + b"\xff" * (self.size - len(t) - 3) + b"\x00" + t
        m = int.from_bytes(em, "big")
        m1 = pow(m, k["exponent1"], k["prime1"])
        m2 = pow(m, k["exponent2"], k["prime2"])
        h = (k["coefficient"] * (m1 - m2)) % k["prime1"]
        s = m2 + h * k["prime2"]
        # A computational fault in one CRT half would leak the key
        # (Bellcore attack): check with the cheap public operation.
        if pow(s, k["publicExponent"], k["modulus"]) != m:
            raise RuntimeError("RSA signature self-check failed")
        return s.to_bytes(self.size, "big")


class _OpenSslRsa:
    """The same operation through libcrypto (OpenSSL 3) via ctypes."""

    _RSA_PKCS1_PADDING = 1

    def __init__(self, pem: bytes, size: int) -> None:
        name = ctypes.util.find_library("crypto")
        if name is None:
            raise OSError("libcrypto not found")
        lib = ctypes.CDLL(name)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for fn, res, args in (
            ("BIO_new_mem_buf", vp, [ctypes.c_char_p, ctypes.c_int]),
            ("BIO_free", ctypes.c_int, [vp]),
            ("PEM_read_bio_PrivateKey", vp, [vp, vp, vp, vp]),
            ("EVP_PKEY_free", None, [vp]),
            ("EVP_PKEY_CTX_new", vp, [vp, vp]),
            ("EVP_PKEY_CTX_free", None, [vp]),
            ("EVP_PKEY_sign_init", ctypes.c_int, [vp]),
            ("EVP_PKEY_CTX_set_rsa_padding", ctypes.c_int, [vp, ctypes.c_int]),
            ("EVP_PKEY_CTX_set_signature_md", ctypes.c_int, [vp, vp]),
            ("EVP_sha256", vp, []),
            ("EVP_PKEY_sign", ctypes.c_int, [vp, ctypes.c_char_p, ctypes.POINTER(sz), vp, sz]),
        ):
            f = getattr(lib, fn)  # AttributeError on OpenSSL 1.x (macros): fall back
            f.restype, f.argtypes = res, args
        self._lib = lib
        self.size = size
        bio = lib.BIO_new_mem_buf(pem, len(pem))
        if not bio:
            raise OSError("BIO_new_mem_buf failed")
        try:
            self._pkey = lib.PEM_read_bio_PrivateKey(bio, None, None, None)
        finally:
            lib.BIO_free(bio)
        if not self._pkey:
            raise OSError("libcrypto could not read the private key")
        self._sha256 = lib.EVP_sha256()

    def __del__(self) -> None:
        pkey = getattr(self, "_pkey", None)
        if pkey:
            self._lib.EVP_PKEY_free(pkey)

    def sign_digest(self, digest: bytes) -> bytes:
        lib = self._lib
        # A context per call: cheap, and safe if workers ever sign from threads.
        ctx = lib.EVP_PKEY_CTX_new(self._pkey, None)
        if not ctx:
            raise RuntimeError("EVP_PKEY_CTX_new failed")
        try:
            sig = ctypes.create_string_buffer(self.size)
            siglen = ctypes.c_size_t(self.size)
            buf = ctypes.create_string_buffer(digest, len(digest))
            if (
                lib.EVP_PKEY_sign_init(ctx) <= 0
                or lib.EVP_PKEY_CTX_set_rsa_padding(ctx, self._RSA_PKCS1_PADDING) <= 0
                or lib.EVP_PKEY_CTX_set_signature_md(ctx, self._sha256) <= 0
                or lib.EVP_PKEY_sign(ctx, sig, ctypes.byref(siglen), buf, len(digest)) <= 0
            ):
                raise RuntimeError("OpenSSL RSA signing failed")
            return sig.raw[: siglen.value]
        finally:
            lib.EVP_PKEY_CTX_free(ctx)


class DkimSigner:
    """Signs finalised messages for one domain/selector; build once per worker."""

    def __init__(self, domain: str, selector: str, private_key_pem: bytes) -> None:
        if not _DOMAIN.match(domain) or not _DOMAIN.match(selector):
            raise ConfigError(
                f"[dkim] domain {domain!r} / selector {selector!r} are not valid DNS names"
            )
        pem = private_key_pem.replace(b"\r\n", b"\n")
        try:
            key: dict[str, Any] = parse_pem_private_key(pem)
        except (UnparsableKeyError, ValueError, IndexError, TypeError) as exc:
            raise ConfigError(
                f"[dkim] key_file is not a PEM RSA private key ({exc}); "
                "create one with: openssl genrsa -out dkim.pem 2048"
            ) from None
        bits = key["modulus"].bit_length()
        if bits < _MIN_KEY_BITS:
            raise ConfigError(f"[dkim] the RSA key has {bits} bits; use 2048 (at least 1024)")
        self.domain = domain
        self.selector = selector
        self._python = _PythonRsa(key)
        self._rsa: _PythonRsa | _OpenSslRsa = self._python
        try:
            fast = _OpenSslRsa(pem, self._python.size)
            probe = hashlib.sha256(b"sendsystem dkim self-check").digest()
            if fast.sign_digest(probe) == self._python.sign_digest(probe):
                self._rsa = fast
            else:
                log.warning("libcrypto RSA signature differs from the reference; using Python RSA")
        except (OSError, AttributeError, RuntimeError) as exc:
            log.warning("DKIM: OpenSSL unavailable (%s); pure-Python RSA (~7 ms/message)", exc)
        self._public = (key["modulus"], key["publicExponent"])

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

    @property
    def uses_openssl(self) -> bool:
        return isinstance(self._rsa, _OpenSslRsa)

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
        signature = self._rsa.sign_digest(hashlib.sha256(signed_input).digest())
        b64 = base64.b64encode(signature)
        folded = b"\r\n ".join(b64[i : i + 72] for i in range(0, len(b64), 72))
        return b"DKIM-Signature:" + sig_value + folded + b"\r\n" + message

    def dns_txt_record(self) -> str:
        """The TXT record to publish at ``<selector>._domainkey.<domain>``."""
        n, e = self._public
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(_rsa_public_key_der(n, e)).decode()


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


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _der_int(v: int) -> bytes:
    return _der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big"))


def _rsa_public_key_der(n: int, e: int) -> bytes:
    """SubjectPublicKeyInfo (what DKIM's p= carries) for an RSA key."""
    rsa_oid = _der(0x30, bytes.fromhex("06092a864886f70d0101010500"))
    public = _der(0x30, _der_int(n) + _der_int(e))
    return _der(0x30, rsa_oid + _der(0x03, b"\x00" + public))
