"""DKIM signing, verified independently with dkimpy."""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest

from sendsystem.cli import run
from sendsystem.dkim import DkimSigner, generate_key
from sendsystem.errors import ConfigError
from sendsystem.merge import Merger, NewsletterInfo, TemplateSource
from sendsystem.mime import Attachment, attachment_tail, finalize

DOMAIN = "example.dk"
SELECTOR = "news2024"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dkim") / "dkim.pem"
    generate_key(path)
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


def test_bad_key_file_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        DkimSigner.from_file(DOMAIN, SELECTOR, tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM RSA private key"):
        DkimSigner.from_file(DOMAIN, SELECTOR, bad)
    with pytest.raises(ConfigError, match="dkim keygen"):
        DkimSigner(DOMAIN, SELECTOR, b"garbage")


def test_bad_domain_or_selector(key_file: Path) -> None:
    with pytest.raises(ConfigError, match="valid DNS names"):
        DkimSigner("exa mple.dk", SELECTOR, key_file.read_bytes())
    with pytest.raises(ConfigError, match="valid DNS names"):
        DkimSigner(DOMAIN, "sel;x=1", key_file.read_bytes())


def test_message_without_header_separator_is_refused(signer: DkimSigner) -> None:
    with pytest.raises(ValueError, match="separator"):
        signer.sign(b"From: a@example.com\r\n")


def test_keygen_writes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "new.pem"
    generate_key(path, 1024)
    assert path.stat().st_mode & 0o777 == 0o600
    DkimSigner.from_file(DOMAIN, SELECTOR, path)  # loads
    with pytest.raises(ConfigError, match="already exists"):
        generate_key(path)


def test_non_rsa_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with pytest.raises(ConfigError, match="non-RSA"):
        DkimSigner(DOMAIN, SELECTOR, pem)


def test_cli_keygen_then_dns_record_verifies(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "dkim.pem"
    config = tmp_path / "config.ini"
    config.write_text(f"[dkim]\ndomain = {DOMAIN}\nselector = {SELECTOR}\nkey_file = {key}\n")
    assert run(["--config", str(config), "dkim", "keygen"]) == 0
    assert run(["--config", str(config), "dkim", "dns"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"{SELECTOR}._domainkey.{DOMAIN}. IN TXT ( \"v=DKIM1; k=rsa; p=")
    # The zone-file strings joined are the record a verifier fetches.
    record = "".join(part for part in out.split('"')[1::2]).encode()
    signed = DkimSigner.from_file(DOMAIN, SELECTOR, key).sign(wire_message())
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
    assert run(["--config", str(config), "dkim", "keygen"]) == 1  # never overwrites
