"""Message composition at send time (sendsystem/compose.py): pure, no database, no SMTP."""

from __future__ import annotations

import email
import email.policy
import zlib
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest

from sendsystem.compose import (
    BuildError,
    Composer,
    newsletter_parts,
    send_headers,
    wire_bytes,
)
from sendsystem.config import Config, SendingConfig, UnsubscribeConfig
from sendsystem.dkim import DkimSigner, generate_key
from sendsystem.merge import (
    Compressor,
    Merger,
    NewsletterInfo,
    TemplateSource,
    compression_dictionary,
    decompress,
)
from sendsystem.mime import finalize
from sendsystem.tokens import (
    decode_message_id,
    decode_verp,
    unsubscribe_token,
    verify_unsubscribe_token,
)

SECRET = b"s" * 32
DOMAIN = "bounces.example.com"
SRC = TemplateSource(subject="Hej {{ name }}", html="<p>Hej {{ name }}</p>",
                     text="Hej {{ name }}")


def config() -> Config:
    return Config(sending=SendingConfig(envelope_domain=DOMAIN),
                  unsubscribe=UnsubscribeConfig(url="https://lists.example.com/u/{token}",
                                                mailto="unsub@bounces.example.com"))


def newsletter_row(attachments: bool = False, list_name: str = "Medlemsnyt",
                   zdict: bytes | None = None) -> dict[str, Any]:
    return {"id": 7, "list_id": 3, "list_name": list_name, "zdict": zdict,
            "subject": SRC.subject, "html": SRC.html, "text": SRC.text,
            "attachment_count": int(attachments)}


def stored_body(attachments: bool = False) -> tuple[bytes, bytes]:
    """(compressed stored message, its dictionary), as a sort worker stores them."""
    merger = Merger(SRC, NewsletterInfo(7, "Medlemsnyt", "Nyt <nyt@example.dk>", attachments))
    message = merger.render("bo@example.com", {"name": "Søren"}, "https://x/u/t")
    return Compressor(merger.zdict).compress(message), merger.zdict


def message_row(body: bytes | None) -> dict[str, Any]:
    return {"id": 4242, "newsletter_id": 7, "subscriber_id": 99, "email": "bo@example.com",
            "body": body, "status": "active", "blocked": 0, "attempts": 0, "age": 0}


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


ATTACHMENT = {"id": 1, "filename": "program.pdf", "content_type": "application/pdf",
              "data": b"%PDF" * 100, "size": 400}


def test_envelope_has_signed_ids_and_every_per_send_header() -> None:
    body, zdict = stored_body()
    composer = Composer(config(), SECRET, clock=lambda: 1_700_000_000.5)
    parts = composer.remember(7, newsletter_row(zdict=zdict), [])
    assert parts is not None and parts.broken is None
    env = composer.envelope(message_row(body), parts)
    assert env.key == 4242 and env.recipient == "bo@example.com"
    assert decode_verp(SECRET, env.sender, DOMAIN) == 4242
    msg = parse(env.data)
    signed = decode_message_id(SECRET, msg["Message-ID"])
    assert signed is not None and (signed.message_id, signed.newsletter_id) == (4242, 7)
    assert b"\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n" in env.data
    assert msg["List-Id"] == '"Medlemsnyt" <list3.bounces.example.com>'
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Precedence"] == "bulk"
    url, mailto = (part.strip(" <>") for part in msg["List-Unsubscribe"].split(","))
    token = url.removeprefix("https://lists.example.com/u/")
    target = verify_unsubscribe_token(SECRET, token)
    assert target is not None and (target.subscriber_id, target.list_id) == (99, 3)
    assert mailto == f"mailto:unsub@bounces.example.com?subject=unsubscribe%20{token}"
    assert msg["Subject"] == "Hej Søren" and "Hej Søren" in msg.get_body(("plain",)).get_content()


@pytest.mark.parametrize("list_name", ["Medlemsnyt", 'Blåbær, "nyt"', "x" * 200])
@pytest.mark.parametrize("attachments", [False, True])
def test_envelope_bytes_equal_finalize_of_all_send_headers(list_name: str,
                                                           attachments: bool) -> None:
    """The headers that are the same for a whole newsletter are built once
    (NewsletterParts.fixed_headers): the wire bytes are those of finalize() with
    every send header, byte for byte, and the envelope carries its Message-ID."""
    body, zdict = stored_body(attachments)
    composer = Composer(config(), SECRET, clock=lambda: 1_700_000_000.5)
    parts = composer.remember(7, newsletter_row(attachments, list_name, zdict),
                              [ATTACHMENT] if attachments else [])
    assert parts is not None and parts.broken is None
    env = composer.envelope(message_row(body), parts)
    token = unsubscribe_token(SECRET, 99, 3, 7)
    headers = send_headers(message_id=composer.message_id(4242, 7),
                           date="Tue, 14 Nov 2023 22:13:20 GMT",
                           unsubscribe_url=f"https://lists.example.com/u/{token}",
                           unsubscribe_mailto="unsub@bounces.example.com", token=token,
                           list_id_header=parts.list_id_header)
    assert env.data == finalize(decompress(body, zdict), parts.tail, headers)
    assert env.message_id == composer.message_id(4242, 7)


def test_list_id_comes_from_mime_list_id_and_is_safe_for_any_list_name() -> None:
    parts = newsletter_parts(newsletter_row(list_name='Blåbær, "nyt"\r\nBcc: x', zdict=b"z"),
                             [], DOMAIN)
    assert parts.broken is None
    assert "\r" not in parts.list_id_header and "\n" not in parts.list_id_header
    msg = parse(f"List-Id: {parts.list_id_header}\r\n\r\nx\r\n".encode())
    assert msg["List-Id"] == "Blåbær, nyt Bcc: x <list3.bounces.example.com>"


def test_send_headers_order() -> None:
    names = [name for name, _ in send_headers(
        message_id="<m>", date="d", unsubscribe_url="u", unsubscribe_mailto="m", token="t",
        list_id_header="l")]
    assert names == ["Message-ID", "Date", "List-Unsubscribe", "List-Unsubscribe-Post",
                     "List-Id", "Precedence"]


def test_attachments_are_appended_from_the_parts() -> None:
    body, zdict = stored_body(attachments=True)
    parts = newsletter_parts(newsletter_row(attachments=True, zdict=zdict), [ATTACHMENT], DOMAIN)
    assert parts.broken is None and parts.tail
    msg = parse(wire_bytes(body, parts, [("Message-ID", "<x@y>")], None))
    files = [p for p in msg.iter_attachments()]
    assert [(p.get_filename(), p.get_content()) for p in files] == [("program.pdf",
                                                                     b"%PDF" * 100)]


def test_a_corrupt_attachment_breaks_the_newsletter_not_the_worker() -> None:
    bad = dict(ATTACHMENT, size=401)
    parts = newsletter_parts(newsletter_row(attachments=True, zdict=b"z"), [bad], DOMAIN)
    assert parts.broken == ("newsletter 7: attachment 'program.pdf' (id 1) is corrupt: "
                            "400 bytes stored, 401 expected")
    with pytest.raises(BuildError, match="is corrupt"):
        Composer(config(), SECRET).envelope(message_row(b"x"), parts)


def test_newsletter_without_a_stored_dictionary_derives_the_template_one() -> None:
    # Before schema version 3 the dictionary was the template's alone, never stored.
    legacy = compression_dictionary(SRC)
    merger = Merger(SRC, NewsletterInfo(7, "Medlemsnyt", "Nyt <nyt@example.dk>"), zdict=legacy)
    body = Compressor(legacy).compress(
        merger.render("bo@example.com", {"name": "Søren"}, "https://x/u/t"))
    parts = newsletter_parts(newsletter_row(zdict=None), [], DOMAIN)
    assert parts.zdict == legacy
    assert b"Hej S" in wire_bytes(body, parts, [], None)


def test_the_dictionary_a_sort_worker_stores_is_the_newsletters_own() -> None:
    # Rendered with the newsletter's id, list and From: smaller messages than the
    # template's alone, and the one a send worker uses (it is always stored).
    body, zdict = stored_body()
    assert zdict != compression_dictionary(SRC)
    assert zdict.startswith(b"From: Nyt <nyt@example.dk>")
    parts = newsletter_parts(newsletter_row(zdict=zdict), [], DOMAIN)
    assert b"Hej S" in wire_bytes(body, parts, [], None)


@pytest.mark.parametrize(("body", "expected"), [
    (b"not zlib", "stored body is corrupt (zlib: "),
    (zlib.compress(b"no header block at all"), "refused by finalize: the stored message has "
                                                "no header block"),
])
def test_a_message_that_cannot_be_built_says_which_step_refused_it(body: bytes,
                                                                   expected: str) -> None:
    parts = newsletter_parts(newsletter_row(zdict=b""), [], DOMAIN)
    with pytest.raises(BuildError) as info:
        wire_bytes(body, parts, [], None)
    assert str(info.value).startswith(expected)


def test_attachments_missing_for_a_mixed_message_is_a_build_error() -> None:
    body, zdict = stored_body(attachments=True)
    parts = newsletter_parts(newsletter_row(zdict=zdict), [], DOMAIN)
    with pytest.raises(BuildError, match="expects attachments"):
        wire_bytes(body, parts, [], None)


def test_dkim_signature_verifies(tmp_path: Path) -> None:
    key = tmp_path / "dkim.pem"
    generate_key(key)
    signer = DkimSigner.from_file("example.dk", "s1", key)
    record = signer.dns_txt_record().encode()
    body, zdict = stored_body()
    composer = Composer(config(), SECRET, signer)
    parts = composer.remember(7, newsletter_row(zdict=zdict), [])
    assert parts is not None
    data = composer.envelope(message_row(body), parts).data
    assert data.startswith(b"DKIM-Signature:")
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record)


def test_a_vanished_newsletter_is_remembered_as_none() -> None:
    composer = Composer(config(), SECRET)
    assert composer.remember(8, None, []) is None
    assert 8 in composer.parts and composer.parts[8] is None


def test_date_is_formatted_once_a_second() -> None:
    now = [100.2]
    composer = Composer(config(), SECRET, clock=lambda: now[0])
    first = composer.date()
    now[0] = 100.9
    assert composer.date() is first
    now[0] = 101.0
    assert composer.date() == "Thu, 01 Jan 1970 00:01:41 GMT"
