"""DKIM signing, verified independently with dkimpy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dkim
import pytest

from sendsystem.dkim import DkimSigner
from sendsystem.errors import ConfigError
from sendsystem.merge import Merger, NewsletterInfo, TemplateSource
from sendsystem.mime import Attachment, attachment_tail, finalize

DOMAIN = "example.dk"
SELECTOR = "news2024"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True
    )
    return path


@pytest.fixture(scope="module")
def signer(key_file: Path) -> DkimSigner:
    return DkimSigner.from_file(DOMAIN, SELECTOR, key_file)


def dnsfunc_for(signer: DkimSigner):
    record = signer.dns_txt_record().encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        assert name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
        return record

    return dnsfunc


def wire_message(attachments: bool = False, subject_extra: str = "") -> bytes:
    info = NewsletterInfo(3, "Medlemsnyt", "Foreningen Ærø <nyt@example.dk>", attachments)
    src = TemplateSource(
        subject="Hej {{ name }} " + subject_extra,
        html="<p>Hej   {{ name }}</p>\n<p>trailing spaces   \n\n\n",
        text="Hej {{ name }}\t\tx  \n\n",
    )
    stored = Merger(src, info).render("bo@example.com", {"name": "Søren"}, "https://x/u/t")
    tail = attachment_tail(3, [Attachment("a.pdf", "application/pdf", b"%PDF" * 3000)])
    headers = [
        ("Message-ID", "<1.3.x@mail.example.dk>"),
        ("Date", "Mon, 01 Jan 2024 10:00:00 +0000"),
        ("List-Unsubscribe", "<mailto:u@example.dk?subject=t>, <https://x/u/t>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("List-Id", '"Medlemsnyt" <3.example.dk>'),
        ("Precedence", "bulk"),
    ]
    return finalize(stored, tail if attachments else b"", headers)


@pytest.mark.parametrize("attachments", [False, True])
def test_signature_verifies_with_dkimpy(signer: DkimSigner, attachments: bool) -> None:
    signed = signer.sign(wire_message(attachments, subject_extra="x" * 120))
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(signer))
    header = signed.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in header.split(b"\r\n"))
    d = dkim.DKIM(signed)
    assert d.verify(dnsfunc=dnsfunc_for(signer))
    signed_names = set(d.include_headers)
    for name in (
        b"from",
        b"to",
        b"subject",
        b"date",
        b"message-id",
        b"mime-version",
        b"content-type",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"list-id",
    ):
        assert name in signed_names


def test_tampering_breaks_the_signature(signer: DkimSigner) -> None:
    signed = signer.sign(wire_message())
    dnsfunc = dnsfunc_for(signer)
    assert not dkim.verify(signed.replace(b"Hej", b"Hey", 1), dnsfunc=dnsfunc)
    assert not dkim.verify(
        signed.replace(b"bulk", b"junk").replace(b"=C3=B8", b"o"), dnsfunc=dnsfunc
    )
    # Over-signed: a second Subject (or From) cannot be added.
    assert not dkim.verify(b"Subject: other\r\n" + signed, dnsfunc=dnsfunc)
    # Relaxed canonicalisation tolerates re-folding and trailing whitespace.
    refolded = signed.replace(b"\r\nTo: bo@example.com", b"\r\nTo:  \r\n\tbo@example.com  ")
    assert dkim.verify(refolded, dnsfunc=dnsfunc)


def test_pure_python_rsa_matches_openssl(signer: DkimSigner, key_file: Path) -> None:
    python_only = DkimSigner(DOMAIN, SELECTOR, key_file.read_bytes())
    python_only._rsa = python_only._python  # force the fallback path
    message = wire_message()
    assert python_only.sign(message, timestamp=1) == signer.sign(message, timestamp=1)
    assert dkim.verify(python_only.sign(message), dnsfunc=dnsfunc_for(signer))


def test_openssl_is_used_when_available(signer: DkimSigner) -> None:
    if not signer.uses_openssl:
        pytest.skip("libcrypto not loadable here; the pure-Python fallback is in use")
    assert signer.uses_openssl


def test_bad_key_file_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        DkimSigner.from_file(DOMAIN, SELECTOR, tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM RSA private key"):
        DkimSigner.from_file(DOMAIN, SELECTOR, bad)
    with pytest.raises(ConfigError, match="openssl genrsa"):
        DkimSigner(DOMAIN, SELECTOR, b"garbage")


def test_bad_domain_or_selector(key_file: Path) -> None:
    with pytest.raises(ConfigError, match="valid DNS names"):
        DkimSigner("exa mple.dk", SELECTOR, key_file.read_bytes())
    with pytest.raises(ConfigError, match="valid DNS names"):
        DkimSigner(DOMAIN, "sel;x=1", key_file.read_bytes())


def test_message_without_header_separator_is_refused(signer: DkimSigner) -> None:
    with pytest.raises(ValueError, match="separator"):
        signer.sign(b"From: a@example.com\r\n")
