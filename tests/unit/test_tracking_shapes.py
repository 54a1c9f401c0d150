# ruff: noqa: E501  (HTML fragments and the frozen pattern are quoted whole)
"""The fast path of link rewriting (sendsystem/tracking/links.py, shapes) gives exactly
what the full scan gives: the same HTML, byte for byte, and the same new link rows, in
the same order, for every render, whatever the merge values hold.

Each property renders one template (or one skeleton of literal pieces) several times
with different values through two rewriters, one with the fast path and one without,
and compares every output; the first render of a shape is analysed, the later ones
take the fast path (when the shape allows it), so both are compared.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from markupsafe import Markup, escape

from sendsystem.merge import Merger, NewsletterInfo, TemplateSource
from sendsystem.tracking import links
from sendsystem.tracking.links import Rewriter, scan, skip_prefixes
from sendsystem.tracking.tokens import CLICK, Signer

SIGNER = Signer.from_secret(b"s" * 40)
CLICKS = "https://t.example.com/c/"
OPENS = "https://t.example.com/o/"
UNSUB = "https://lists.example.com/unsubscribe/{token}"
INFO = NewsletterInfo(7, "News", "News <news@example.com>")


def rewriter(fast: bool, **kw: object) -> Rewriter:
    return Rewriter(SIGNER, 7, CLICKS, OPENS, skip_prefixes(UNSUB, CLICKS, OPENS),  # type: ignore[arg-type]
                    fast=fast, **kw)


def test_the_scan_pattern_is_the_one_tracking_shipped_with() -> None:
    """The fast path is checked against the scan; the scan itself must not have moved."""
    assert links._SCAN.pattern == '(?:[^<]++|<(?![a-z!/?])|<(?!(?:a|(?:script|style))(?=[\\t\\n\\r\\f />\\x00]|$))[a-z][^\\t\\n\\r\\f />\\x00]*+(?>[\\s/]*(?:(?<=[\'"\\s/])[^\\s/>][^\\s/=>]*(?:\\s*=+\\s*(?:\'[^\']*\'|"[^"]*"|(?![\'"])[^>\\s]*)\\s*)?(?:\\s|/(?!>))*)*)?\\s*/?>?|</(?!\\s*body\\s*>)[^>]*+>|<!(?!--)\\[[\\s\\S]*?\\]\\]>|<!(?!--)[^>]*+>|<\\?[^>]*+>)*+(?:(?P<comment><!--[\\s\\S]*?--\\s*>)|(?P<raw><(?P<rawname>(?:script|style))(?=[\\t\\n\\r\\f />\\x00]|$)(?>[\\s/]*(?:(?<=[\'"\\s/])[^\\s/>][^\\s/=>]*(?:\\s*=+\\s*(?:\'[^\']*\'|"[^"]*"|(?![\'"])[^>\\s]*)\\s*)?(?:\\s|/(?!>))*)*)?\\s*/?>(?:[\\s\\S]*?</\\s*(?P=rawname)\\s*>|[\\s\\S]*\\Z))|(?P<a><a(?=[\\t\\n\\r\\f />\\x00]|$)(?>[\\s/]*(?:(?<=[\'"\\s/])[^\\s/>][^\\s/=>]*(?:\\s*=+\\s*(?:\'[^\']*\'|"[^"]*"|(?![\'"])[^>\\s]*)\\s*)?(?:\\s|/(?!>))*)*)?\\s*/?>)|(?P<body></\\s*body\\s*>)|(?P<junk><)|\\Z)'
    assert links._SCAN.flags == 34  # IGNORECASE | UNICODE


# ------------------------------------------------ skeletons of literal pieces

# Literal text a template may have around its values, whole tags and parts of them.
_LITERALS = st.sampled_from([
    "<p>", "</p>", "text ", " ", "\n", "<br/>", "<b>", "</b>", "<body>", "</body>", "</ body >",
    "</html>", "<!DOCTYPE html>", "<title>", "</title>", "<table><tr><td>", "</td></tr></table>",
    '<a href="', "<a href='", "<a href=", '<A HREF="', "<a\nhref = '", '<a data-notrack href="',
    '<a title="', '" href="', "' href='", '<a class=x href="', '<a href="https://ex.com/a">',
    '">', "'>", ">", '"', "'", "=", "</a>", "<a", "a", " href", "href=", "<", "</", "/>",
    "https://ex.com/", "http://ex.com/p?", "?a=1&amp;b=", "&", "&amp;", "mailto:", "#top",
    "https://lists.example.com/unsubscribe/", "/relative", "javascript:", "HTTPS://EX.COM/",
    '<img alt="', '<img src=x alt=', '<div class="', '<div ', '" style="c:d">', "<a name=n>",
    "<!--", "-->", "--", "- -", "<!-- <a href='https://no/1'> -->", "<!--[if mso]>", "<![endif]-->",
    "<script>", "</script>", "<script type='x'>", "<style>", "</style>", "</scr", "ipt>",
    "<![CDATA[", "]]>", "]]", "]", "<![if !mso]>", "<![endif]>", "<?php ?>", "<?", "<!x>",
])
# Merge values, some harmless, some that would change the document's structure.
_VALUE_TEXT = st.one_of(
    st.sampled_from(["", "x", "Søren", "https://ev.il/x", "href=", ' href="https://in.jected/"',
                     "<a href='https://in.jected/'>", "-->", "--", "</script>", "</body>", "]]",
                     "]", "mailto:a@b", "https://ex.com/é", "&amp;", "&", "body", "a", ">", "<",
                     '"', "'", "=", " ", "\t", "data-notrack", "#x", "x y", "https://ex.com/a b"]),
    st.text(alphabet='<>"\'=/-!]a h:&;#\n', max_size=8),
)


# Safe values (none of <>"') that would change the structure where a value may not stand.
_ADVERSARIAL = st.one_of(
    st.sampled_from(["", "", "--", "-", "-- ", "ipt", "script", "style", "]]", "]", "body", "a",
                     "a ", "a href=https://ex.com/v ", "a href=", "/", "=", "!", "?", "\t", "x=y",
                     "data-notrack", "https://ex.com/w", "&amp;", "&#34;", "\x00", "ſ", "K"]),
    st.text(alphabet="-]=/!? a\tbodyscriptf:", max_size=6),
)
# A value slot (None) in every kind of place, between the literal text around it.
_S = None
_CONSTRUCTS = st.sampled_from([
    ["<!--", _S, "-->"], ["<!--", _S, ">", '<a href="https://ex.com/in">', "-->"], ["<!-- -", _S, ">"],
    ["<script>", _S, "</script>"], ["<script>", "</scr", _S, '><a href="https://ex.com/s">', "</script>"],
    ["<style>", _S, "</style>"], ['<a href="', _S, '">'], ['<a href="', _S, 'https://ex.com/">'],
    ['<a href="https://ex.com/', _S, '">'], ["<a href='", _S, "'>"], ["<a href=", _S, ">"],
    ['<a href="https://ex.com/" ', _S, ">"], ["<a ", _S, 'href="https://ex.com/">'],
    ["<", _S, 'a href="https://ex.com/">'], ["<", _S, "</a>"], ["<", _S, "<b>"], ["<", _S],
    ["<a", _S, ' href="https://ex.com/">'], ['<a title="', _S, '" href="https://ex.com/">'],
    ["<![CDATA[", _S, "]]>"], ["<![if ", _S, "]>"], ["<![CDATA[x]", _S, ">", '<a href="https://ex.com/c">'],
    ["</body", _S, ">"], ["</", _S, "body>"], ["<p>", _S, "</p>"], [">", _S, "<"], ["<b", _S, ">"],
    ["<b ", _S, ">"], ['<b x="', _S, '">'], ["<b x=", _S, ">"], [_S, _S], ["<!", _S, ">"], ["<?", _S, ">"],
    ['<a href="https://ex.com/">', _S, "</a>"], ["</a", _S, ">"], ["-", _S, ">"], ["]", _S, ">"],
])


@st.composite
def _piece(draw: st.DrawFn, text: str) -> str:
    """A value as a template yields it: escaped (autoescape), Markup (|safe), or plain."""
    how = draw(st.sampled_from(["escape", "escape", "escape", "markup", "plain"]))
    if how == "escape":
        return escape(text)
    return Markup(text) if how == "markup" else str(text)


# Whole tags and text only: no stray '<' that would make the whole document untrusted.
_WELL_FORMED = st.sampled_from([
    "<p>", "</p>", "text ", " ", "\n", "<br/>", "<b>", "</b>", "<body>", "</body>", "</html>",
    "<!DOCTYPE html>", "<table><tr><td>", "</td></tr></table>", '<a href="https://ex.com/a">',
    "</a>", '<a data-notrack href="https://ex.com/n">', '<a href="mailto:x@example.com">',
    "<a href='https://lists.example.com/unsubscribe/x'>", "<!-- <a href='https://no/1'> -->",
    "<script>var a = '<a href=\"https://no/2\">';</script>", "<style>p {}</style>", '<img alt="">',
])


@st.composite
def _renders(draw: st.DrawFn, well_formed: bool = False) -> list[list[str]]:
    """Several renders of one skeleton: the same literal pieces, different values."""
    literal = _WELL_FORMED if well_formed else _LITERALS
    items = draw(st.lists(st.one_of(literal, st.none(), _CONSTRUCTS), max_size=20))
    skeleton: list[str | None] = []
    for item in items:
        skeleton.extend(item if isinstance(item, list) else [item])
    renders = []
    for _ in range(draw(st.integers(2, 4))):
        renders.append([draw(_piece(draw(st.one_of(_VALUE_TEXT, _ADVERSARIAL))))
                        if item is None else item for item in skeleton])
    return renders


def _compare(renders: list[list[str]], **kw: object) -> Rewriter:
    fast, full = rewriter(True, **kw), rewriter(False, **kw)
    for mid, pieces in enumerate(renders, 1):
        doc = "".join(pieces)
        new_fast: list[tuple[int, str]] = []
        new_full: list[tuple[int, str]] = []
        assert fast.html(doc, mid, new_fast, pieces) == full.html(doc, mid, new_full)
        assert new_fast == new_full
    assert fast.untracked == full.untracked and fast.known == full.known
    assert full.fast_renders == 0
    return fast


# Example counts fit `make unit` in its 20 s budget; the pinned @examples (one per
# counterexample found while building the fast path) run every time.
@settings(max_examples=250, deadline=None)
@given(_renders())
def test_fast_path_equals_full_scan_on_skeletons(renders: list[list[str]]) -> None:
    _compare(renders)


# Cases that a looser analysis gets wrong (each was one, tried on purpose).
_E = escape


@settings(max_examples=250, deadline=None)
@given(_renders(well_formed=True))
@example([["<", _E(" "), 'a href="https://ex.com/">'], ["<", _E(""), 'a href="https://ex.com/">']])
@example([["<", _E(""), "</a>"], ["<", _E("a href=https://ex.com/v "), "</a>"]])
@example([['<a href="', _E(""), 'https://ex.com/">'], ['<a href="', _E("x"), 'https://ex.com/">']])
@example([["<!--", _E("x"), '><a href="https://ex.com/">-->'], ["<!--", _E("--"), '><a href="https://ex.com/">-->']])
@example([["<script></scr", _E("x"), '><a href="https://ex.com/"></script>'],
          ["<script></scr", _E("ipt"), '><a href="https://ex.com/"></script>']])
@example([["<![CDATA[x]", _E("x"), '><a href="https://ex.com/">'], ["<![CDATA[x]", _E("]"), '><a href="https://ex.com/">']])
@example([['<a href="https://ex.com/" ', _E(""), ">"], ['<a href="https://ex.com/" ', _E("data-notrack"), ">"]])
@example([["<a ", _E("x "), 'href="https://ex.com/">'], ["<a ", _E("href=https://ex.com/v "), 'href="https://ex.com/">']])
@example([['<!--<a href="https://ex.com/">-', _E("x"), ">"], ['<!--<a href="https://ex.com/">-', _E("-"), ">"]])
@example([['<![x><a href="https://ex.com/">]', _E("x"), ">"], ['<![x><a href="https://ex.com/">]', _E("]"), ">"]])
def test_fast_path_equals_full_scan_on_well_formed_skeletons(renders: list[list[str]]) -> None:
    _compare(renders)


@settings(max_examples=60, deadline=None)
@given(_renders(), st.sampled_from([{"clicks": False}, {"opens": False}, {"max_links": 1}]))
def test_fast_path_equals_full_scan_with_options(renders: list[list[str]],
                                                 kw: dict[str, object]) -> None:
    _compare(renders, **kw)


def test_a_render_with_unsafe_values_takes_the_full_scan_but_the_shape_stays() -> None:
    skeleton: list[str | None] = ["<p>", None, '</p><a href="https://ex.com/', None, '">x</a>']
    def render(a: str, b: str) -> list[str]:
        values = iter([a, b])
        return [next(values) if item is None else item for item in skeleton]
    renders = [render(escape("Ann"), escape("1")), render(Markup("<b>Bo</b>"), escape("2")),
               render(escape("Cy"), escape("3"))]
    fast = _compare(renders)
    assert (fast.fast_renders, fast.full_scans) == (2, 1)


# ------------------------------------------------ whole templates, via Merger

_TEMPLATE_PARTS = st.sampled_from([
    "<p>Dear {{ v }},</p>", "<td>{{ v }}</td>", "<title>{{ v }}</title>", "{{ v }}{{ w }}",
    '<a href="{{ u }}">u</a>', "<a href='{{ u }}'>u</a>", "<a href={{ u }}>bare</a>",
    '<a href="https://ex.com/{{ v }}?q={{ w }}&amp;r=1">mixed</a>', '<a href="{{ u }}{{ w }}">two</a>',
    '<a title="{{ v }}" href="https://ex.com/t">titled</a>', '<a href="https://ex.com/s" title=\'{{ w }}\'>',
    '<a {{ attr }}href="https://ex.com/z">attr</a>', "<{{ tag }}>", "<a{{ tag }} href='https://ex.com/n'>",
    "<!-- {{ v }} -->", "<!-- <a href='https://ex.com/{{ v }}'> -->", "--{{ v }}>", "<!--",
    "<script>var s = '<a href=\"https://ex.com/{{ v }}\">';</script>", "<style>/* {{ v }} */</style>",
    "{{ v|safe }}", "{% autoescape false %}{{ v }}{% endautoescape %}", "{{ '<b>' }}",
    '<a href="{{ unsubscribe_url }}">unsubscribe</a>', '<a data-notrack href="https://ex.com/p">',
    '<a href="mailto:help@example.com">m</a>', '<a href="#top">top</a>', '<a href="/rel">r</a>',
    '{% if flag %}<a href="https://ex.com/if">if</a>{% else %}<b>{{ v }}</b>{% endif %}',
    '{% for i in range(n|int) %}<a href="https://ex.com/{{ i }}">{{ i }}</a>{% endfor %}',
    "<body>", "</body>", "<![if !mso]>", "<![endif]>", "]]{{ v }}>", "<p>{{ email }}</p>",
    '{% set link %}<a href="https://ex.com/set">{{ v }}</a>{% endset %}{{ link }}',
    "{% macro m(x) %}<a href='https://ex.com/m/{{ x }}'>{{ x }}</a>{% endmacro %}{{ m(v) }}",
])
_FIELDS = st.fixed_dictionaries({
    "v": _VALUE_TEXT, "w": _VALUE_TEXT, "u": st.one_of(_VALUE_TEXT, st.just("https://ex.com/u")),
    "tag": st.sampled_from(["", "b", "a", " x", "/p"]), "attr": st.sampled_from(["", "x ", "data-notrack "]),
    "flag": st.sampled_from(["", "1"]), "n": st.sampled_from(["0", "1", "3"]),
})


@settings(max_examples=60, deadline=None)
@given(st.lists(_TEMPLATE_PARTS, min_size=1, max_size=12), st.lists(_FIELDS, min_size=2, max_size=4))
def test_fast_path_equals_full_scan_on_templates(parts: list[str],
                                                 recipients: list[dict[str, str]]) -> None:
    src = TemplateSource(subject="Hi", html="".join(parts))
    fast = Merger(src, INFO, tracker=rewriter(True))
    full = Merger(src, INFO, zdict=fast.zdict, tracker=rewriter(False))
    for mid, fields in enumerate(recipients, 1):
        unsub = f"https://lists.example.com/unsubscribe/{mid}.sig"
        new_fast: list[tuple[int, str]] = []
        new_full: list[tuple[int, str]] = []
        email = f"r{mid}@example.com"
        assert (fast.render(email, fields, unsub, message_id=mid, new_links=new_fast)
                == full.render(email, fields, unsub, message_id=mid, new_links=new_full))
        assert new_fast == new_full


# ------------------------------------------------ a real newsletter

NEWSLETTER = """<!DOCTYPE html><html><head><style>a[href='https://no/style'] { color: red }</style>
<script>var s = '<a href="https://no/script">';</script></head><body>
<!-- <a href="https://no/comment"> --><!--[if mso]><a href="https://no/mso">x</a><![endif]-->
<p>Dear {{ name }},</p>
{% for a in articles %}<h2><a href="{{ a.url }}?utm_campaign={{ newsletter.id }}&amp;u=1" style="x">{{ a.title }}</a></h2>
<p><a class="button" href="{{ a.url }}">Read more about {{ a.title }}</a> {{ button(a.url) }}</p>{% endfor %}
<p><a href="https://ex.com/home">Home</a> | <a href="mailto:help@example.com">Help</a> |
<a href="#top">Top</a> | <a href="/relative">Rel</a> | <a data-notrack href="https://ex.com/private">P</a>
| <a href="https://ex.com/p/{{ name|urlencode }}">You</a></p>
<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>
</body></html>
"""
# A macro's output is HTML (Markup with '<'): the same for every recipient here, so it
# is literal text of the shape.
BUTTON = '{% macro button(url) %}<a class="btn" href="{{ url }}?b=1">Go</a>{% endmacro %}'
ARTICLES = BUTTON + ("{% set articles = [" + ", ".join(
    f'{{"url": "https://news.example.com/{i}", "title": "Article {i}"}}' for i in range(5)) + "] %}")


def test_a_newsletter_takes_the_fast_path_and_leaves_the_others_alone() -> None:
    src = TemplateSource(subject="Hi", html=ARTICLES + NEWSLETTER)
    fast = Merger(src, INFO, tracker=rewriter(True))
    full = Merger(src, INFO, zdict=fast.zdict, tracker=rewriter(False))
    names = ["Ann", "Bo & Co", 'Cy "the" <Cat>', "Dörte", "", "x' onclick='y"]
    for mid, name in enumerate(names, 1):
        unsub = f"https://lists.example.com/unsubscribe/{mid}.sig"
        out = fast.render(f"r{mid}@example.com", {"name": name}, unsub, message_id=mid)
        assert out == full.render(f"r{mid}@example.com", {"name": name}, unsub, message_id=mid)
        html = out.decode("ascii")
        for kept in ("https://no/style", "https://no/script", "https://no/comment", "https://no/mso",
                     "mailto:help@example.com", 'href=3D"#top"', 'href=3D"/relative"',
                     "https://ex.com/private", f"unsubscribe/{mid}.sig"):
            assert kept in html.replace("=\r\n", "")
        assert "news.example.com" not in html and "ex.com/home" not in html
    tracker = fast.tracker
    assert tracker is not None
    assert (tracker.fast_renders, tracker.full_scans) == (len(names), 0)
    assert all(SIGNER.verify(CLICK, SIGNER.click(7, 1, idx)) for idx in tracker.known.values())


def test_a_value_where_it_could_change_the_structure_takes_the_full_scan() -> None:
    for html in ("<a href={{ u }}>x</a>", "<!-- {{ u }} -->", "<script>{{ u }}</script>",
                 "<{{ u }}>", "<!-- unterminated {{ u }}", "<![if !mso]>{{ u }}"):
        src = TemplateSource(subject="Hi", html=html + '<a href="https://ex.com/">x</a>')
        merger = Merger(src, INFO, tracker=rewriter(True))
        for mid in (1, 2):
            merger.render("r@example.com", {"u": f"https://ex.com/{mid}"}, "https://l/u", message_id=mid)
        assert merger.tracker is not None
        assert merger.tracker.fast_renders == 0, html


@settings(max_examples=200, deadline=None)
@given(st.lists(_LITERALS, max_size=30))
def test_the_shape_walk_agrees_with_the_scan(pieces: list[str]) -> None:
    """The token walk behind a shape finds the scan's links and </body> (or it says so)."""
    doc = "".join(pieces)
    shape = links._analyse([doc], doc)
    if shape.values is not None:  # a document the walk trusts: the same links
        found, body = scan(doc)
        tracked = [x for x in found if not x.notrack]
        # One piece, no values: every offset is as it is, every href as written.
        assert list(shape.links) == [(x.start, 0, x.end, 0, x.quoted, x.raw) for x in tracked]
        assert shape.body == body


def test_no_disagreement_is_logged_on_generated_documents(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sendsystem.tracking.links")
    test_the_shape_walk_agrees_with_the_scan()
    assert not [r for r in caplog.records if "disagrees" in r.getMessage()]


def test_a_planned_render_follows_its_plan_only_while_value_links_stay_untracked() -> None:
    """A shape's plan is kept when its tracked links are literal text; a link whose href
    is a merge value is checked in every render: tracked for one recipient (an http
    URL), left alone for another (mailto:, the unsubscribe link), and the bytes are
    those of the full scan each time."""
    html = ('<p><a href="https://ex.com/a">A</a> <a href="{{ u }}">you</a> '
            '<a href="x{{ v }}">x</a> <a href="https://ex.com/b">B</a></p></body>')
    src = TemplateSource(subject="Hi", html=html)
    fast = Merger(src, INFO, tracker=rewriter(True))
    full = Merger(src, INFO, zdict=fast.zdict, tracker=rewriter(False))
    urls = ["mailto:a@example.com", "https://ex.com/you", UNSUB.replace("{token}", "t1"),
            "https://ex.com/you", "#top", UNSUB.replace("{token}", "t2"), "mailto:b@ex.com"]
    for mid, u in enumerate(urls * 2, 1):
        new_fast: list[tuple[int, str]] = []
        new_full: list[tuple[int, str]] = []
        fields = {"u": u, "v": "y" * mid}
        out = fast.render("r@example.com", fields, "https://l/u", message_id=mid,
                          new_links=new_fast)
        assert out == full.render("r@example.com", fields, "https://l/u", message_id=mid,
                                  new_links=new_full)
        assert new_fast == new_full
    tracker = fast.tracker
    assert tracker is not None and tracker.plans_made >= 1
    assert tracker.fast_renders == 2 * len(urls)
