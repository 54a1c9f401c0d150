"""The mail merge: correctness, sandbox, header safety, structure, compression."""

from __future__ import annotations

import email
import email.policy
import zlib
from email.message import EmailMessage

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem.errors import TemplateError
from sendsystem.merge import (
    Compressor,
    MergeError,
    Merger,
    NewsletterInfo,
    TemplateSource,
    check_template,
    compress,
    compression_dictionary,
    decompress,
    template_variables,
)
from sendsystem.mime import safe_header_value

INFO = NewsletterInfo(
    newsletter_id=42,
    list_name="Medlemsnyt",
    from_header="Foreningen Ærø <nyt@example.dk>",
    has_attachments=False,
)
UNSUB = "https://lists.example.com/u/abc.def?x=1&y=2"


def parse(raw: bytes) -> EmailMessage:
    """Parse strictly and check the invariants every stored message must have."""
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert raw.isascii(), "stored messages are 7-bit"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects
    return msg


def body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    return part.get_content().replace("\r\n", "\n")


def merge(
    src: TemplateSource,
    fields: dict[str, str] | None = None,
    addr: str = "søren@example.dk".replace("ø", "o"),
    info: NewsletterInfo = INFO,
) -> EmailMessage:
    raw = Merger(src, info).render(addr, fields or {}, UNSUB)
    return parse(raw)


def test_fields_and_reserved_variables() -> None:
    src = TemplateSource(
        subject="Hi {{ first_name }}",
        html="<p>{{ first_name }} {{ city }} {{ email }} {{ list.name }} {{ list.from_address }}"
        " {{ list.from }} {{ newsletter.id }} [{{ newsletter.subject }}]"
        " <a href='{{ unsubscribe_url }}'>u</a></p>",
        text="{{ first_name }} {{ subscriber['zip code'] }} {{ unsubscribe_url }}",
    )
    msg = merge(src, {"first_name": "Anna", "city": "Aarhus", "zip code": "8000"})
    assert msg["To"] == "soren@example.dk"
    assert msg["Subject"] == "Hi Anna"
    assert msg["From"] == "Foreningen Ærø <nyt@example.dk>"
    assert msg["MIME-Version"] == "1.0"
    html = body(msg, "html")
    assert "Anna Aarhus soren@example.dk Medlemsnyt nyt@example.dk" in html
    assert "Foreningen Ærø &lt;nyt@example.dk&gt; 42 [Hi Anna]" in html
    assert "href='https://lists.example.com/u/abc.def?x=1&amp;y=2'" in html
    assert body(msg, "plain") == f"Anna 8000 {UNSUB}"


def test_reserved_names_beat_csv_columns() -> None:
    src = TemplateSource(subject="s", html="{{ unsubscribe_url }} {{ email }}", text=None)
    msg = merge(src, {"unsubscribe_url": "https://evil.example", "email": "x@evil.example"})
    assert body(msg, "html") == f"{UNSUB.replace('&', '&amp;')} soren@example.dk\n"


def test_loop_of_ten_articles_and_set() -> None:
    src = TemplateSource(
        subject="{% set n = 10 %}{{ n }} articles",
        html="{% set articles = range(1, 11) %}<ul>{% for a in articles %}"
        "<li>Article {{ a }} for {{ name }}</li>{% endfor %}</ul>",
        text="{% set ns = namespace(total=0) %}{% for a in range(1, 11) %}"
        "{% set ns.total = ns.total + a %}{% endfor %}sum={{ ns.total }}",
    )
    msg = merge(src, {"name": "Bo"})
    assert msg["Subject"] == "10 articles"
    html = body(msg, "html")
    for i in range(1, 11):
        assert f"<li>Article {i} for Bo</li>" in html
    assert body(msg, "plain") == "sum=55"


def test_html_is_escaped_but_text_and_subject_are_not() -> None:
    src = TemplateSource(subject="{{ x }}", html="<p>{{ x }}</p>", text="{{ x }}")
    msg = merge(src, {"x": "<script>alert('x')</script> & co"})
    assert body(msg, "html") == "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</p>"
    assert body(msg, "plain") == "<script>alert('x')</script> & co"
    assert msg["Subject"] == "<script>alert('x')</script> & co"


def test_danish_characters_round_trip() -> None:
    danish = "Søren Ærø Åse — blåbærgrød æøå ÆØÅ"
    src = TemplateSource(
        subject="{{ name }}: nyt om blåbærgrød og æbleskiver fra Ærøskøbing i denne uge",
        html="<p>Kære {{ name }}</p>",
        text="Kære {{ name }}\nHilsen Ærø",
    )
    msg = merge(src, {"name": danish})
    assert msg["Subject"] == f"{danish}: nyt om blåbærgrød og æbleskiver fra Ærøskøbing i denne uge"
    assert body(msg, "html") == f"<p>Kære {danish}</p>"
    assert body(msg, "plain") == f"Kære {danish}\nHilsen Ærø"
    for part in msg.get_body(("html",)), msg.get_body(("plain",)):
        assert part is not None
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"


def test_long_ascii_subject_is_folded_and_round_trips() -> None:
    subject = " ".join(f"word{i}" for i in range(60))
    msg = merge(TemplateSource(subject=subject, html="x", text=None))
    assert msg["Subject"] == subject


def test_structure_alternative_text_then_html() -> None:
    msg = merge(TemplateSource(subject="s", html="<b>h</b>", text="t"))
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]


def test_structure_html_only_when_no_text() -> None:
    msg = merge(TemplateSource(subject="s", html="<b>h</b>", text=None))
    assert msg.get_content_type() == "text/html"
    assert not msg.is_multipart()
    assert body(msg, "html") == "<b>h</b>\n"  # a single part ends with a newline


def test_with_attachments_the_stored_message_is_an_open_mixed() -> None:
    info = NewsletterInfo(7, "L", "A <a@example.com>", has_attachments=True)
    raw = Merger(TemplateSource("s", "<b>h</b>", "t"), info).render("x@example.com", {}, UNSUB)
    assert not raw.rstrip().endswith(b"--=_ss_mix_7--")
    assert raw.endswith(b"--=_ss_alt_7--\r\n")
    assert b'Content-Type: multipart/mixed; boundary="=_ss_mix_7"' in raw
    # (the completed message is checked in test_mime.py)


def test_long_lines_and_special_bytes_in_bodies() -> None:
    line = "x" * 500 + " = . \t"
    src = TemplateSource(subject="s", html=line + "\n.\nFrom me\r\nend  ", text="a\r\rb\n\n")
    msg = merge(src)
    assert body(msg, "html") == line + "\n.\nFrom me\nend  "
    assert body(msg, "plain") == "a\n\nb\n"


# --- safety ---------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''['__class__'] }}",
        "{{ list.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ range.__self__ }}",
        "{{ 'x' * 100000000 }}",
        "{{ 10 ** 100000000 }}",
        "{{ lipsum() }}",
        "{{ list.name.format.__globals__ }}",
        "{{ '{0.__class__}'.format(list) }}",
        "{{ newsletter.update({'id': 1}) }}",
        "{{ newsletter.clear() }}",
    ],
)
def test_sandbox_escapes_fail_safely(payload: str) -> None:
    src = TemplateSource(subject="s", html=payload, text=None)
    try:
        check_template(src)
    except TemplateError:
        return  # refused up front: fine
    with pytest.raises(MergeError):
        Merger(src, INFO).render("a@example.com", {}, UNSUB)


def test_mutating_shared_objects_cannot_leak_between_recipients() -> None:
    src = TemplateSource(subject="s", html="{{ list.name }}", text="{% set x = list %}{{ x.name }}")
    merger = Merger(src, INFO)
    for _ in range(2):
        msg = parse(merger.render("a@example.com", {}, UNSUB))
        assert body(msg, "html") == "Medlemsnyt"


@pytest.mark.parametrize(
    ("tag", "keyword"),
    [
        ("{% include '/etc/passwd' %}", "include"),
        ("{% extends '/etc/passwd' %}", "extends"),
        ("{% import '/etc/passwd' as p %}", "import"),
        ("{% from '/etc/passwd' import x %}", "from ... import"),
    ],
)
def test_no_filesystem_access(tag: str, keyword: str) -> None:
    src = TemplateSource(subject="s", html=f"line 1\n{tag}", text=None)
    with pytest.raises(TemplateError, match=rf"html template, line 2: .*{keyword}.*not allowed"):
        check_template(src)
    with pytest.raises(TemplateError):
        Merger(src, INFO)


def test_dynamic_include_fails_at_render_too() -> None:
    # Even if the static check were bypassed, the loader refuses everything.
    import jinja2

    from sendsystem.merge import _Environment  # internals on purpose

    env = _Environment(jinja2.StrictUndefined)
    with pytest.raises(jinja2.TemplateNotFound, match="cannot include"):
        env.from_string("{% include name %}").render(name="/etc/passwd")


def test_underscore_attribute_refused_when_added() -> None:
    src = TemplateSource(subject="s", html="ok\n{{ x.__class__ }}", text=None)
    with pytest.raises(TemplateError, match=r"html template, line 2: .*'__class__'"):
        check_template(src)


def test_crlf_injection_into_subject_is_impossible() -> None:
    src = TemplateSource(subject="Hi {{ name }}", html="<p>{{ newsletter.subject }}</p>", text=None)
    evil = "Bob\r\nBcc: victim@example.com\r\n\r\n<h1>body</h1>\x00\x1b\u2028X"
    raw = Merger(src, INFO).render("a@example.com", {"name": evil}, UNSUB)
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hi Bob Bcc: victim@example.com <h1>body</h1> X"
    assert "\r" not in msg["Subject"] and "\n" not in msg["Subject"]
    header_lines = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert not [line for line in header_lines if line.lower().startswith(b"bcc")]
    assert (
        body(msg, "html") == "<p>Hi Bob Bcc: victim@example.com &lt;h1&gt;body&lt;/h1&gt; X</p>\n"
    )


@pytest.mark.parametrize(
    "addr", ["a@b.com\r\nBcc: x@y.com", "a b@c.com", "no-at-sign", "å@b.dk", "a@b.com>", ""]
)
def test_bad_recipient_address_is_a_merge_error(addr: str) -> None:
    merger = Merger(TemplateSource("s", "h", None), INFO)
    with pytest.raises(MergeError, match="recipient address"):
        merger.render(addr, {}, UNSUB)


MERGER_ANY = Merger(TemplateSource("{{ v }}", "<p>{{ v }}</p>", "{{ v }}"), INFO)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_no_field_value_can_break_the_message(value: str) -> None:
    raw = MERGER_ANY.render("a@example.com", {"v": value}, UNSUB)
    msg = parse(raw)
    assert set(msg.keys()) == {"From", "To", "Subject", "MIME-Version", "Content-Type"}
    assert msg["Subject"] == safe_header_value(value)
    assert body(msg, "plain") == value.replace("\r\n", "\n").replace("\r", "\n")


# --- errors ---------------------------------------------------------------


def test_syntax_error_names_part_and_line() -> None:
    src = TemplateSource(subject="ok", html="<p>\n<p>\n{{ name }\n", text=None)
    with pytest.raises(TemplateError, match=r"^html template, line 3: unexpected '}'"):
        check_template(src)
    with pytest.raises(TemplateError, match=r"^subject template, line 1:"):
        check_template(TemplateSource(subject="{% if %}", html="", text=None))
    with pytest.raises(TemplateError, match=r"^text template, line 2:"):
        check_template(TemplateSource(subject="", html="", text="a\n{% for %}"))


def test_undefined_variable_fails_the_message_with_the_reason() -> None:
    merger = Merger(TemplateSource("s", "<p>\n{{ frist_name }}</p>", None), INFO)
    with pytest.raises(MergeError, match=r"html template, line 2: 'frist_name' is undefined"):
        merger.render("a@example.com", {"first_name": "Bo"}, UNSUB)


def test_default_filter_and_is_defined_work_with_strict_undefined() -> None:
    src = TemplateSource(
        subject="{{ nick | default('friend') }}",
        html="{% if nick is defined %}{{ nick }}{% else %}none{% endif %}",
        text=None,
    )
    msg = merge(src)
    assert msg["Subject"] == "friend"
    assert body(msg, "html") == "none\n"


def test_runtime_error_is_a_merge_error() -> None:
    merger = Merger(TemplateSource("s", "{{ 1 // n|int }}", None), INFO)
    with pytest.raises(MergeError, match="html template, line 1"):
        merger.render("a@example.com", {"n": "0"}, UNSUB)


def test_template_variables() -> None:
    src = TemplateSource(
        subject="{{ first_name }}",
        html="{% set x = 1 %}{{ x }}{{ city }}{{ list.name }}{{ range(2)|list }}",
        text="{{ email }}",
    )
    assert template_variables(src) == {"first_name", "city", "list", "email"}


# --- compression ------------------------------------------------------------


def test_compress_round_trip_with_the_newsletters_dictionary() -> None:
    src = TemplateSource(
        subject="Nyt til {{ name }}",
        html="{% for i in range(10) %}<p>Artikel {{ i }}: blåbærgrød for {{ name }}</p>\n"
        "{% endfor %}",
        text="{% for i in range(10) %}Artikel {{ i }}\n{% endfor %}",
    )
    merger = Merger(src, INFO)
    # Another process derives the same one from the template and the newsletter.
    other_process_zdict = compression_dictionary(src, info=INFO)
    assert other_process_zdict == merger.zdict
    for name in ("Søren", "Anna"):
        raw = merger.render(f"{name.lower().replace('ø', 'o')}@example.dk", {"name": name}, UNSUB)
        blob = merger.compress(raw)
        assert blob == compress(raw, merger.zdict)
        assert len(blob) < len(raw) / 4
        assert decompress(blob, other_process_zdict) == raw
        assert Compressor(merger.zdict).compress(raw) == blob


def test_decompress_with_wrong_dictionary_fails_loudly() -> None:
    blob = compress(b"hello world " * 50, b"hello world dictionary")
    with pytest.raises(zlib.error):
        decompress(blob, b"another dictionary")
    with pytest.raises(zlib.error):
        decompress(blob[:-3], b"hello world dictionary")


def test_dictionary_is_deterministic_and_bounded() -> None:
    src = TemplateSource("s", "{% for i in range(5000) %}<p>{{ i }}</p>{% endfor %}", None)
    assert compression_dictionary(src) == compression_dictionary(src)
    assert len(compression_dictionary(src)) == 32 * 1024
    # A template that cannot render with empty fields still yields a dictionary.
    odd = TemplateSource("s", "{{ 1 // (n|int) }}", "t")
    assert compression_dictionary(odd)
