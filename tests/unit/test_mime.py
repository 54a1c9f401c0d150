"""Attachments tail, per-send finalisation and header helpers."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from sendsystem.merge import Merger, NewsletterInfo, TemplateSource, compress, decompress
from sendsystem.mime import (
    Attachment,
    attachment_tail,
    encode_qp,
    finalize,
    header_line,
    list_id,
    safe_header_value,
)

UNSUB = "https://lists.example.com/u/tok"
PER_SEND = [
    ("Message-ID", "<1.42.abc@mail.example.com>"),
    ("Date", "Mon, 01 Jan 2024 10:00:00 +0000"),
    ("List-Unsubscribe", f"<mailto:unsub@example.com?subject=tok>, <{UNSUB}>"),
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ("List-Id", '"Medlemsnyt" <7.lists.example.com>'),
    ("Precedence", "bulk"),
]
ATTACHMENTS = [
    Attachment("program.pdf", "application/pdf", bytes(range(256)) * 40),
    Attachment("blåbærgrød opskrift.txt", "text/plain", "æøå\r\nline 2\n".encode()),
    Attachment("noext", "weird", b"\x00\x01\x02"),
]


def parse(raw: bytes) -> EmailMessage:
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    for part in msg.walk():
        assert not part.defects, part.defects
    return msg


@pytest.mark.parametrize("with_text", [True, False])
def test_message_with_attachments_is_mixed_alternative_plus_files(with_text: bool) -> None:
    info = NewsletterInfo(7, "Medlemsnyt", "Nyt <nyt@example.dk>", has_attachments=True)
    src = TemplateSource("Hej {{ n }}", "<p>Hej {{ n }}</p>", "Hej {{ n }}" if with_text else None)
    merger = Merger(src, info)
    stored = compress(merger.render("bo@example.dk", {"n": "Bo"}, UNSUB), merger.zdict)
    tail = attachment_tail(7, ATTACHMENTS)
    wire = finalize(decompress(stored, merger.zdict), tail, PER_SEND)
    msg = parse(wire)

    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_parts())
    assert len(parts) == 1 + len(ATTACHMENTS)
    first = parts[0]
    if with_text:
        assert first.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in first.iter_parts()] == ["text/plain", "text/html"]
    else:
        assert first.get_content_type() == "text/html"
    html = msg.get_body(("html",))
    assert html is not None and html.get_content().strip() == "<p>Hej Bo</p>"
    for part, att in zip(parts[1:], ATTACHMENTS, strict=True):
        assert part.get_content_disposition() == "attachment"
        assert part.get_filename() == att.filename
        assert part.get_payload(decode=True) == att.data
    assert parts[3].get_content_type() == "application/octet-stream"
    assert wire.endswith(b"--=_ss_mix_7--\r\n")


def test_finalize_prepends_per_send_headers() -> None:
    info = NewsletterInfo(9, "L", "A <a@example.com>", has_attachments=False)
    stored = Merger(TemplateSource("s", "h", "t"), info).render("x@example.com", {}, UNSUB)
    wire = finalize(stored, b"", PER_SEND)
    assert wire.endswith(stored)
    msg = parse(wire)
    for name, value in PER_SEND:
        assert msg[name] == value
    assert msg["To"] == "x@example.com"
    assert msg.get_content_type() == "multipart/alternative"
    assert attachment_tail(9, []) == b""


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Test", "a\r\nBcc: victim@example.com"),
        ("X-Test", "a\nb"),
        ("X-Test", "a\rb"),
        ("X-Test", "a\x00b"),
        ("Bad Name", "v"),
        ("Bad:Name", "v"),
        ("X-Test\r\nBcc", "v"),
        ("", "v"),
    ],
)
def test_finalize_refuses_header_injection(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        finalize(b"To: a@example.com\r\n\r\nbody\r\n", b"", [(name, value)])


def test_finalize_encodes_non_ascii_values() -> None:
    wire = finalize(b"To: a@example.com\r\n\r\nbody\r\n", b"", [("X-Liste", "Blåbær")])
    assert wire.isascii()
    assert parse(wire)["X-Liste"] == "Blåbær"


def test_safe_header_value() -> None:
    assert safe_header_value(" a\r\nb\tc\x00\x1b\x85d\u2028e ") == "a b c d e"
    assert safe_header_value("ok") == "ok"


def test_header_line_round_trips_and_stays_short() -> None:
    for value in ["", "plain", "x" * 300, "Søren " * 40, "=?utf-8?q?fake?=", "😀" * 30]:
        line = header_line("Subject", value)
        assert line.isascii() and line.endswith(b"\r\n")
        assert all(len(x) <= 78 for x in line.split(b"\r\n"))
        msg = parse(line + b"\r\nbody\r\n")
        assert msg["Subject"] == value


def test_list_id() -> None:
    assert list_id("Medlemsnyt", "7", "lists.example.com") == '"Medlemsnyt" <7.lists.example.com>'
    encoded = list_id('Blåbær "nyt"', "7", "lists.example.com")
    assert encoded.isascii() and encoded.endswith(" <7.lists.example.com>")
    msg = parse(f"List-Id: {encoded}\r\n\r\nx\r\n".encode())
    assert msg["List-Id"] == "Blåbær nyt <7.lists.example.com>"


def test_encode_qp_never_produces_boundary_prefix() -> None:
    text = "--=_ss_alt_1\n=_ \n" + "".join(chr(i) for i in range(1, 300))
    qp = encode_qp(text)
    assert b"=_" not in qp
    assert b"\n" not in qp.replace(b"\r\n", b"")
