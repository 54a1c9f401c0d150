"""Finding and rewriting the links of one rendered message (runs in the render child).

Where: after a recipient's HTML is rendered and before it is encoded, in the
sort worker's render child (render_child.py), so customer HTML is never parsed
in a process that holds a database connection, and the CPU alarm covers it.

How the links are found. ``html.parser`` is the obvious tool, but it calls
Python for every tag and text run: 730 µs for the 11 KB bench newsletter,
more than the whole render (300 µs), where the budget is 20 % of it. So the
tokenizer here is one compiled regular expression that walks the document the
way ``html.parser`` does and stops only where something matters:

* comments (``<!-- ... -->``), declarations (``<!DOCTYPE>``, ``<![CDATA[...]]>``),
  processing instructions, and the raw text of ``<script>`` and ``<style>``
  (up to their end tag) are skipped whole, so a link inside them is not seen;
* every other tag is matched with ``html.parser``'s own attribute grammar
  (``locatestarttagend_tolerant``), so a ``<a href=...>`` written inside another
  tag's quoted attribute value is not mistaken for a link, and a quote inside an
  unquoted value does not swallow the rest of the document;
* an ``<a>`` start tag's attributes are read with ``html.parser``'s
  ``attrfind_tolerant`` and unescaped with :func:`html.unescape`, exactly as
  ``HTMLParser.handle_starttag`` would receive them, and the byte span of the
  ``href`` value is kept so that only that value is replaced.

tests/unit/test_tracking.py checks against ``html.parser`` itself on
generated documents that the same links are found. The scan runs in C, but
Python's regex engine still steps through every character: ~120 µs for the
12 KB, 30-link newsletter of ``bench/merge_bench.py --track``, and ~135 µs
with the rewriting, against ~310 µs for merging the message without tracking.
That made tracking 33 % slower where the goal is 20 %; so most messages do not
get scanned at all:

The fast path (shapes). A message is rendered from the template's literal
text (the same ``str`` objects in every render) and merge values, which
autoescape makes ``Markup`` without ``<``, ``>``, ``"`` or ``'``. Where values
stand only in text or inside quoted attribute values, every render made of the
same literal pieces has the same tags: the links are at the same places
relative to the literal pieces, only shifted by the values' lengths. So the
first render of each *shape* (its literal pieces at their positions in the
piece list) is analysed once (:func:`_analyse`, ~1 ms: a token walk with the
scan's own alternatives, which must also find the scan's links); for every
later render of that shape the rewriter checks that the literal pieces are
the same (one tuple comparison, identical objects), that the values hold none
of those four characters (one ``join`` and four ``in``), and finds each
link's span from the values' lengths. ~20 µs a message instead of ~135 µs.
HTML from a macro, a ``{% set %}`` block or ``|safe`` counts as literal text of
the shape (so it must be the same in the later renders). Anything else takes
the full scan, with the same result: a render whose values hold those four
characters where the shape has a value, a shape with a value in a
tag or attribute name, an unquoted attribute value, a comment, ``<script>`` or
``<style>``, after a lone ``<``, or a document where a lazy search of the scan
failed (an unterminated comment, ``<![if ...]>``), and every shape after the
first :data:`_SHAPES_MAX` of a newsletter. :func:`_analyse` says why this is
exact; tests/unit/test_tracking_shapes.py renders generated templates and
skeletons (values in every kind of place, values made to break the structure)
through both paths and compares every byte.

Plans and marks (what makes a tracked message cost ~15 % more than an untracked
one, bench/merge_bench.py --track, where it was ~45 % once hoisting made the untracked
render cheap). The rewritten HTML is handed to merge.py as pieces, not one string:
the render's own pieces, cut only where a link or the pixel goes in, so the hoisted
literals keep their encoding made once. For the token, which differs in every
message, the rewriter writes a mark of the same length (:meth:`Rewriter.mark`), which
merge.py replaces after encoding (mime.MarkedRuns). With the mark, a render of a known
shape whose tracked links are literal text is rewritten the same way every time: the
first such render's result is kept as a plan (the text between merge values joined,
the values by index) and every later one only follows it, as long as the links with a
merge value in them (the unsubscribe link) are left as written.

What is rewritten (:class:`Rewriter`): in the HTML part, ``href`` values that are
absolute ``http``/``https`` URLs, except the unsubscribe links (anything under
``[unsubscribe] url``'s prefix), our own tracking links, links marked
``data-notrack`` (any value), and URLs longer than :data:`MAX_URL`; ``mailto:``,
``#anchors``, relative and other links are left alone. The text part only with
``[tracking] track_text_links``: ``http(s)://`` runs up to white space, without
trailing punctuation. List-Unsubscribe is a header added at send time
(compose.py) and is never in what is rewritten. The open pixel, a 1x1 image of
``/o/<token>``, goes right before the last ``</body>`` (or at the end).

URLs that differ per recipient (a merge field in the URL): the link table is
keyed by URL, so each distinct URL is one row; a URL with the recipient's data
in it makes a row per recipient. At most ``[tracking] max_links`` distinct URLs
are tracked per newsletter (per render child); links beyond are left as
written and counted in :attr:`Rewriter.untracked`. Write ``data-notrack`` on
such a link to keep it out on purpose.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import string
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html.parser import attrfind_tolerant, tagfind_tolerant  # type: ignore[attr-defined]
from itertools import accumulate
from operator import itemgetter
from typing import cast

from .tokens import Signer

log = logging.getLogger(__name__)

# Longer URLs are left untracked (the link table's TEXT holds them, but a
# 2 KB URL is a data blob, not a link).
MAX_URL = 2048
# Decisions remembered per newsletter (href as written -> what to do).
_CACHE_MAX = 20_000
_MARK_ALPHABET = string.ascii_letters + string.digits + "-_"

# html.parser's locatestarttagend_tolerant without the tag name: one attribute, and all of
# them. The shape analysis below walks the attributes one at a time with _ATTR_ONE.
_ATTR_ONE = (r"""(?<=['"\s/])[^\s/>][^\s/=>]*(?:\s*=+\s*(?:'[^']*'|"[^"]*"|"""
             r"""(?!['"])[^>\s]*)\s*)?(?:\s|/(?!>))*""")
_ATTRS = rf"(?>[\s/]*(?:{_ATTR_ONE})*)?\s*"
_NAME_END = r"(?=[\t\n\r\f />\x00]|$)"
_RAW = r"(?:script|style)"

# Everything uninteresting, consumed in C without yielding a match, tried in this order.
_SKIP = (
    ("text", r"[^<]++"),
    ("lone", r"<(?![a-z!/?])"),                                           # a lone '<' is text
    ("tag", rf"<(?!(?:a|{_RAW}){_NAME_END})[a-z][^\t\n\r\f />\x00]*+{_ATTRS}/?>?"),  # another tag
    ("end", r"</(?!\s*body\s*>)[^>]*+>"),                                 # an end tag
    ("cdata", r"<!(?!--)\[[\s\S]*?\]\]>"),                                # <![CDATA[ ... ]]>
    ("decl", r"<!(?!--)[^>]*+>"),                                         # <!DOCTYPE ...>
    ("pi", r"<\?[^>]*+>"),                                                # <?pi ...>
)
# Then exactly one of these (or the end of the document).
_STOP = (
    ("comment", r"<!--[\s\S]*?--\s*>"),
    ("raw", rf"<(?P<rawname>{_RAW}){_NAME_END}{_ATTRS}/?>(?:[\s\S]*?</\s*(?P=rawname)\s*>"
            r"|[\s\S]*\Z)"),
    ("a", rf"<a{_NAME_END}{_ATTRS}/?>"),
    ("body", r"</\s*body\s*>"),
    ("junk", r"<"),                                           # e.g. an unterminated comment
)
_SCAN = re.compile(
    "(?:" + "|".join(p for _, p in _SKIP) + ")*+"
    "(?:" + "|".join(f"(?P<{name}>{p})" for name, p in _STOP) + r"|\Z)",
    re.IGNORECASE)
# The same alternatives one token at a time, for the shape analysis (slow, once per shape).
_TOKEN = re.compile("|".join(f"(?P<{name}>{p})" for name, p in _SKIP + _STOP), re.IGNORECASE)


@dataclass(frozen=True)
class Link:
    """One ``<a href>``: the value as written, where it is, and its other attributes."""

    start: int        # span of the value in the document (inside the quotes, if any)
    end: int
    quoted: bool
    raw: str          # as written (HTML-escaped)
    url: str          # unescaped, as html.parser gives it
    notrack: bool


# <a ...> tag text -> its href (offsets relative to the tag), parsed once: a
# newsletter's tags repeat across recipients. Bounded; cleared when full.
_ANCHORS: dict[str, Link | None] = {}
_ANCHORS_MAX = 50_000


def scan(document: str) -> tuple[list[Link], int]:
    """The links of ``<a href>`` tags, in order, and where the last ``</body>`` starts
    (-1 when there is none)."""
    links: list[Link] = []
    body = -1
    anchors = _ANCHORS
    for m in _SCAN.finditer(document):
        start, end = m.span("a")
        if start >= 0:
            tag = document[start:end]
            if tag in anchors:
                rel = anchors[tag]
            else:
                if len(anchors) >= _ANCHORS_MAX:
                    anchors.clear()
                rel = anchors[tag] = _anchor(tag, 0, len(tag))
            if rel is not None:
                links.append(Link(start + rel.start, start + rel.end, rel.quoted, rel.raw,
                                  rel.url, rel.notrack))
        elif m.start("body") >= 0:
            body = m.start("body")
    return links, body


def _anchor(document: str, start: int, end: int) -> Link | None:
    """The first href of the ``<a`` tag at document[start:end], as HTMLParser parses it."""
    name = tagfind_tolerant.match(document, start + 1)
    k = name.end() if name else start + 2
    href: Link | None = None
    notrack = False
    while k < end:
        m = attrfind_tolerant.match(document, k, end)
        if not m or m.end() == k:
            break
        attr = m.group(1).lower()
        if attr == "data-notrack":
            notrack = True
        elif attr == "href" and href is None and m.group(2):
            vstart, vend = m.start(3), m.end(3)
            value = document[vstart:vend]
            quoted = value[:1] in ("'", '"') and value[:1] == value[-1:] and len(value) > 1
            if quoted:
                vstart, vend = vstart + 1, vend - 1
            raw = document[vstart:vend]
            href = Link(vstart, vend, quoted, raw, html.unescape(raw) if raw else raw, False)
        k = m.end()
    if href is None:
        return None
    if notrack:
        return Link(href.start, href.end, href.quoted, href.raw, href.url, True)
    return href


# ------------------------------------------------------------- shapes (the fast path)

# Characters no merge value may hold for the fast path: with them a value could open or
# close a tag, a quoted attribute value or a comment. Autoescaped output never has them.
_UNSAFE = ("<", ">", '"', "'")
# Shapes analysed per newsletter (per render child) before the fast path gives up: a
# template whose literal text differs per recipient makes a new shape for every message.
_SHAPES_MAX = 64

# One attribute of _ATTRS, with its quoted value's inside captured; then how a tag ends.
_ATTR_CAPTURE = re.compile(
    _ATTR_ONE.replace("'[^']*'", "'([^']*)'").replace('"[^"]*"', '"([^"]*)"'), re.IGNORECASE)
_ATTR_LEAD = re.compile(r"[\s/]*")
_TAG_NAME = re.compile(r"<[a-z][^\t\n\r\f />\x00]*+", re.IGNORECASE)
_TAG_TAIL = re.compile(r"\s*/?>?")
_A_TAIL = re.compile(r"\s*/?>")


def _getter(indices: list[int]) -> Callable[[Sequence[str]], tuple[str, ...]]:
    """``tuple(pieces[i] for i in indices)`` at C speed (itemgetter needs 2+ indices)."""
    if not indices:
        return lambda _pieces: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda pieces: (pieces[i],)
    return itemgetter(*indices)


# A link to decide: where its href value starts and ends, each as (offset less the merge
# values before it, how many values are before it), whether the value is quoted, and
# the href as written when no value is in it (else None).
_Span = tuple[int, int, int, int, bool, str | None]


@dataclass(frozen=True)
class _Shape:
    """What :func:`scan` finds in every render made of the same literal pieces.

    ``literals(pieces) == literal_values`` says a render has this shape; ``values(pieces)``
    are its merge values, which must hold none of :data:`_UNSAFE`. ``values`` None: a
    shape where merge values stand where they could change the structure (the full
    scan, every time). A position kept as (offset, count) is, in a render,
    ``offset + sum(len(v) for v in values[:count])``.
    """

    literals: Callable[[Sequence[str]], tuple[str, ...]]
    literal_values: tuple[str, ...]
    values: Callable[[Sequence[str]], tuple[str, ...]] | None
    links: tuple[_Span, ...] = ()   # in document order, without data-notrack ones
    body: int = -1                  # the last </body> (offset, count), or -1
    body_count: int = 0
    value_idx: frozenset[int] = frozenset()   # which pieces are the merge values


def _quoted_insides(document: str, start: int, end: int, kind: str) -> list[tuple[int, int]] | None:
    """The insides of the quoted attribute values of the tag token document[start:end], as
    the scan's attribute grammar reads them; None when walking it one attribute at a time
    does not end where the token does (then the shape is not trusted)."""
    if kind == "a":
        pos = start + 2
    else:
        name = _TAG_NAME.match(document, start)
        if name is None:
            return None
        pos = name.end()
    pos = _ATTR_LEAD.match(document, pos).end()  # type: ignore[union-attr]
    insides: list[tuple[int, int]] = []
    while (m := _ATTR_CAPTURE.match(document, pos)) is not None and m.end() > pos:
        for g in (1, 2):
            if m.start(g) >= 0:
                insides.append(m.span(g))
        pos = m.end()
    tail = (_A_TAIL if kind == "a" else _TAG_TAIL).match(document, pos)
    if tail is None or tail.end() != end:
        return None
    if kind == "a":
        # _anchor reads the attributes with html.parser's own regex: the value must be
        # quoted for that reading too.
        theirs = set()
        name = tagfind_tolerant.match(document, start + 1)
        k = name.end() if name else start + 2
        while k < end:
            m = attrfind_tolerant.match(document, k, end)
            if not m or m.end() == k:
                break
            if m.group(3) and m.group(3)[:1] in ("'", '"'):
                theirs.add((m.start(3) + 1, m.end(3) - 1))
            k = m.end()
        insides = [span for span in insides if span in theirs]
    return insides


def _analyse(pieces: Sequence[str], document: str) -> _Shape:
    """The shape of one render (``document == "".join(pieces)``).

    Which pieces are merge values: those that are not plain ``str`` (Jinja yields the
    template's literal text as ``str`` constants and autoescaped values as ``Markup``)
    and hold none of :data:`_UNSAFE`. The others are taken as literal text, so their
    exact text is part of the shape: a plain ``str`` value (``{% autoescape false %}``)
    and HTML from a macro, a ``{% set %}`` block or ``|safe``, which is often the same
    for every recipient (a button macro called with the article's URL). A literal
    taken as a value is checked like one. These choices do not matter to correctness,
    only to how often a shape is found again.

    Why the links found here are where the scan finds them in any render of the same
    literal pieces, whatever values without :data:`_UNSAFE` stand in between. The scan
    is a sequence of tokens, each matched by the first of its alternatives that fits
    (:data:`_TOKEN` is the same alternatives one at a time); a token's extent depends
    on its own characters, plus one character of look-ahead for a text run, a lone
    '<' and a tag without its '>'. A value may only stand

    * in a text run ("[^<]++"; an empty value: between two tokens), which no value
      without '<' can end early or make longer, when the token before the run ends
      with '>' (it did not look ahead) or the run starts the document;
    * inside the quotes of a quoted attribute value of a tag, which no value without
      that quote can close; for an <a> tag, as both the scan's grammar and
      :func:`_anchor` read its attributes.

    Then every token other than those runs and values is the same literal text, so it
    matches the same way. A value anywhere else (a tag or attribute name, an unquoted
    value, a comment, script or style, a declaration, after a lone '<') makes a shape
    that always takes the full scan, and so does a document where a lazy search failed
    (a junk '<', e.g. an unterminated comment, or a '<![' that is not CDATA): that
    search read on to the end of the document, where a value could complete it (``-``
    before a literal ``>``). Margin, not needed by the argument: '>' is refused in
    values too, the attributes walked one at a time must end where the token does, and
    the <a> tags and </body> of the walk must be those :func:`scan` finds.
    """
    value_set = {i for i, p in enumerate(pieces)
                 if type(p) is not str and not any(c in p for c in _UNSAFE)}
    value_idx = sorted(value_set)
    literal_idx = [i for i in range(len(pieces)) if i not in value_set]
    literals = _getter(literal_idx)
    never = _Shape(literals, literals(pieces), None)
    cum = list(accumulate(map(len, pieces), initial=0))

    tokens: list[tuple[str, int, int]] = []
    pos, n = 0, len(document)
    while pos < n:
        m = _TOKEN.match(document, pos)
        if m is None or m.lastgroup is None or m.end() <= pos:  # cannot be: '<' or text
            return never
        kind = m.lastgroup
        if kind == "junk" or (kind == "decl" and document.startswith("<![", pos)):
            return never
        tokens.append((kind, pos, m.end()))
        pos = m.end()
    starts = [t[1] for t in tokens]
    insides: dict[int, list[tuple[int, int]]] = {}

    def run_ok(j: int) -> bool:
        ts = tokens[j][1]
        return ts == 0 or document[ts - 1] == ">"

    def inside_ok(j: int, s: int, e: int) -> bool:
        kind, ts, te = tokens[j]
        if kind == "text":
            return run_ok(j)
        if kind not in ("tag", "a"):
            return False
        if j not in insides:
            found = _quoted_insides(document, ts, te, kind)
            if found is None:
                return False
            insides[j] = found
        return any(vs <= s and e <= ve for vs, ve in insides[j])

    for i in value_idx:
        s, e = cum[i], cum[i + 1]
        j = bisect_right(starts, s) - 1
        if s < e or (j >= 0 and tokens[j][1] < s < tokens[j][2]):
            if j < 0 or e > tokens[j][2] or not inside_ok(j, s, e):
                return never
            continue
        # An empty value between two tokens (or at either end of the document).
        before = j - 1 if j >= 0 and tokens[j][1] == s else j
        after = j + 1 if before == j else j
        if before >= 0 and tokens[before][0] == "text":
            ok = run_ok(before)
        elif after < len(tokens) and after >= 0 and tokens[after][0] == "text":
            ok = run_ok(after)
        else:
            ok = s == 0 or document[s - 1] == ">"
        if not ok:
            return never

    links, body = scan(document)
    walked = [_anchor(document, ts, te) for kind, ts, te in tokens if kind == "a"]
    bodies = [ts for kind, ts, _ in tokens if kind == "body"]
    if ([(x.start, x.end, x.raw, x.notrack) for x in links]
            != [(x.start, x.end, x.raw, x.notrack) for x in walked if x is not None]
            or body != (bodies[-1] if bodies else -1)):
        log.warning("tracking: the shape analysis disagrees with the link scan; this "
                    "template takes the full scan (please report it)")
        return never

    def shaped(offset: int, piece: int) -> tuple[int, int]:
        """``offset`` (in ``piece``, which is literal text) as a shape keeps it."""
        if piece in value_set:  # cannot be (see above); never guess
            raise ValueError(offset)
        count = bisect_left(value_idx, piece)
        return offset - vcum[count], count

    def piece(offset: int) -> int:
        """The piece of the character at ``offset``."""
        return bisect_right(cum, offset) - 1

    def has_value(link: Link) -> bool:
        """Whether a merge value stands in the link's href (an empty one counts)."""
        return any(cum[i] <= link.end and cum[i + 1] >= link.start for i in value_idx)

    vcum = list(accumulate(map(len, (pieces[i] for i in value_idx)), initial=0))
    try:
        # The characters around a value (a quote, '=', a space, '>') are literal text.
        spans = tuple((*shaped(link.start, piece(link.start - 1)),
                       *shaped(link.end, piece(link.end)),
                       link.quoted, None if has_value(link) else link.raw)
                      for link in links if not link.notrack)
        where = shaped(body, piece(body)) if body >= 0 else (-1, 0)
    except ValueError:
        return never
    return _Shape(literals, never.literal_values, _getter(value_idx), spans, *where,
                  frozenset(value_idx))


_TEXT_URL = re.compile(r"https?://[^\s<>\"]+", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'\""


# What a rewritten render is made of: a whole piece of the render (its index) or text.
_Plan = list[int | str]


def _splice(pieces: Sequence[str], edits: Sequence[tuple[int, int, str]]) -> _Plan:
    """``pieces`` with each document span [start, end) replaced (edits in document order,
    not overlapping), as a plan: whole pieces outside every span by index, the cut ends
    of pieces and the edits as text.

    A render has hundreds of pieces and a few dozen edits: the pieces are found by
    bisecting their end offsets and taken by ranges, not walked one by one.
    """
    ends = list(accumulate(map(len, pieces)))   # where each piece ends in the document
    n = len(pieces)
    plan: _Plan = []
    i = 0     # pieces before i are out
    done = 0  # how much of pieces[i] is already out (or replaced)
    for start, end, text in edits:
        j = bisect_right(ends, start, i)   # the piece the edit starts in
        if j > i:
            plan.append(pieces[i][done:] if done else i)
            plan.extend(range(i + 1, j))
            done = 0
        if j < n:
            head = start - (ends[j] - len(pieces[j]))
            if head > done:
                plan.append(pieces[j][done:head])
        plan.append(text)
        i = bisect_right(ends, end, j)    # the piece the edit ends in
        done = end - (ends[i] - len(pieces[i])) if i < n else 0
    if i < n:
        plan.append(pieces[i][done:] if done else i)
        plan.extend(range(i + 1, n))
    return plan


def _follow(plan: _Plan, pieces: Sequence[str]) -> list[str]:
    return [pieces[x] if isinstance(x, int) else x for x in plan]


def _follower(plan: _Plan) -> Callable[[Sequence[str]], list[str]]:
    """:func:`_follow` for this plan, in C when it alternates text and merge values
    (text first and last, as a joined plan between values almost always is)."""
    texts = plan[::2]
    values = plan[1::2]
    if (len(plan) % 2 == 0 or not all(isinstance(t, str) for t in texts)
            or not all(isinstance(v, int) for v in values)):
        return lambda pieces: _follow(plan, pieces)
    get = _getter(cast(list[int], values))
    size = len(plan)

    def follow(pieces: Sequence[str]) -> list[str]:
        out: list[str] = [""] * size
        out[::2] = cast(list[str], texts)
        out[1::2] = get(pieces)
        return out

    return follow


def _text(pieces: Sequence[str], ends: Sequence[int], start: int, end: int) -> str:
    """``"".join(pieces)[start:end]`` without joining them all (``ends``: where each ends)."""
    i = bisect_right(ends, start)
    j = bisect_left(ends, end, i)
    base = ends[i] - len(pieces[i]) if i < len(pieces) else ends[-1] if ends else 0
    return "".join(pieces[i:j + 1])[start - base:end - base]


def _whole_value(span: _Span, vcum: Sequence[int], pieces: Sequence[str],
                 value_idx: frozenset[int]) -> int:
    """Which merge value the href of ``span`` is, all of it and nothing else, or -1.

    Checked on one render of the shape, it holds for all of them: the href starts
    and ends at fixed distances from the literal text around that value."""
    count = span[1]
    if span[3] != count + 1:
        return -1
    index = sorted(value_idx)[count]
    before = sum(map(len, pieces[:index]))
    if (span[0] + vcum[count], span[2] + vcum[span[3]]) == (before, before + len(pieces[index])):
        return count
    return -1


def _joined(plan: _Plan, pieces: Sequence[str], values: frozenset[int]) -> _Plan:
    """``plan`` with each stretch between merge values joined into one text: the same
    for every render of the shape, so merge.py learns its encoding whole."""
    out: _Plan = []
    run: list[str] = []
    for x in plan:
        if isinstance(x, int) and x in values:
            if run:
                out.append("".join(run))
                run = []
            out.append(x)
        else:
            run.append(pieces[x] if isinstance(x, int) else x)
    if run:
        out.append("".join(run))
    return out


@dataclass
class Rewriter:
    """Rewrites one newsletter's messages; everything per newsletter is cached here.

    ``skip_prefixes``: URLs starting with any of these are never tracked (the
    unsubscribe URL's prefix and our own /c/ and /o/). Each URL that gets a link
    table row is appended once to the ``new`` list a call is given, as (idx, url).
    """

    signer: Signer
    newsletter_id: int
    click_base: str          # ".../c/"
    open_base: str           # ".../o/"
    skip_prefixes: tuple[str, ...]
    clicks: bool = True
    opens: bool = True
    text_links: bool = False
    max_links: int = 1000
    known: dict[str, int] = field(default_factory=dict)       # url -> idx
    _by_idx: dict[int, str] = field(default_factory=dict)
    # href as written -> the signed link part, or None: left as written.
    _decided: dict[str, str | None] = field(default_factory=dict)
    untracked: int = 0
    # Per shape whose links hold no merge value: its rewritten pieces (_splice), by mark.
    _plans: dict[int, tuple[str, _Plan, tuple[tuple[_Span, int], ...],
                            Callable[[Sequence[str]], list[str]]]] = field(default_factory=dict)
    _marks: dict[int, str] = field(default_factory=dict)   # by token length
    # The fast path (shapes, above); off only to compare it with the full scan.
    fast: bool = True
    _shapes: dict[int, list[_Shape]] = field(default_factory=dict)   # by number of pieces
    _analysed: int = 0
    plans_made: int = 0           # html_pieces' plans (merge.py learns from their first use)
    fast_renders: int = 0         # messages rewritten by a shape, and by the full scan
    full_scans: int = 0

    def _decide(self, raw: str, url: str | None, new: list[tuple[int, str]]) -> str | None:
        """What ``raw`` (an href as written) becomes; ``url``: it unescaped, if known."""
        if raw in self._decided:
            return self._decided[raw]
        if url is None:
            url = html.unescape(raw) if raw else raw
        part: str | None = None
        if (url[:8].lower().startswith(("http://", "https://")) and len(url) <= MAX_URL
                and not url.startswith(self.skip_prefixes)):
            idx = self.known.get(url)
            if idx is None:
                candidate = self.signer.link_idx(url)
                if len(self.known) >= self.max_links:
                    self.untracked += 1
                    if self.untracked == 1:
                        log.warning("newsletter %s has more than %d distinct links: the others "
                                    "are not tracked (a URL with per-recipient data?)",
                                    self.newsletter_id, self.max_links)
                elif candidate in self._by_idx:  # 2^-64; never guess which one it is
                    log.error("tracking link id collision between %r and %r: the second is "
                              "not tracked", self._by_idx[candidate], url)
                else:
                    idx = candidate
                    self.known[url] = idx
                    self._by_idx[idx] = url
                    new.append((idx, url))
            if idx is not None:
                part = self.signer.link_part(self.newsletter_id, idx)
        if len(self._decided) < _CACHE_MAX:
            self._decided[raw] = part
        return part

    def unlearn(self, links: list[tuple[int, str]]) -> None:
        """Forget links first seen by a message that then failed: they were never stored,
        so the next message using them must report them again."""
        if not links:
            return
        for idx, url in links:
            self.known.pop(url, None)
            self._by_idx.pop(idx, None)
        self._decided.clear()
        self._plans.clear()

    def _shape(self, pieces: Sequence[str], document: str | None
               ) -> tuple[_Shape, tuple[str, ...]] | None:
        """The shape of this render and its merge values, when the fast path can take it."""
        for shape in self._shapes.get(len(pieces), ()):
            if shape.literals(pieces) == shape.literal_values:
                if shape.values is None:
                    return None
                values = shape.values(pieces)
                joined = "".join(values)
                if "<" in joined or ">" in joined or '"' in joined or "'" in joined:
                    return None
                return shape, values
        if self._analysed >= _SHAPES_MAX:
            return None
        found = _analyse(pieces, "".join(pieces) if document is None else document)
        self._analysed += 1
        if self._analysed == _SHAPES_MAX:
            log.info("newsletter %s: %d template shapes seen; renders of other shapes "
                     "take the full link scan", self.newsletter_id, _SHAPES_MAX)
        self._shapes.setdefault(len(pieces), []).append(found)
        return None if found.values is None else (found, found.values(pieces))

    def html(self, document: str, message_id: int, new: list[tuple[int, str]],
             pieces: Sequence[str] | None = None) -> str:
        """The HTML part with tracked links and the open pixel; new link rows go to ``new``.

        ``pieces``: the render's output pieces (``document == "".join(pieces)``); with
        them a render of a known shape skips the scan, and the result is the same.
        """
        return "".join(self.html_pieces(document, message_id, new, pieces))

    def token(self, message_id: int) -> str:
        """The message's signed part: its open token, and the start of its click tokens."""
        return self.signer.message_part(self.newsletter_id, message_id)

    def sample(self, document: str) -> str:
        """``document`` rewritten as in a message of this newsletter (message id 0), for
        the compression dictionary (merge.py); by a fresh rewriter, so that this one
        learns no link it would then not report as new."""
        fresh = Rewriter(self.signer, self.newsletter_id, self.click_base, self.open_base,
                         self.skip_prefixes, clicks=self.clicks, opens=self.opens,
                         max_links=self.max_links)
        return fresh.html(document, 0, [])

    def mark(self, length: int) -> str:
        """What stands for a token of ``length`` characters in :meth:`html_pieces`' output,
        until merge.py puts the token in after encoding (mime.MarkedRuns says why):
        random URL-safe base64, never written anywhere, so no document holds it."""
        mark = self._marks.get(length)
        if mark is None:
            mark = "".join(secrets.choice(_MARK_ALPHABET) for _ in range(length))
            self._marks[length] = mark
        return mark

    def html_pieces(self, document: str | None, message_id: int, new: list[tuple[int, str]],
                    pieces: Sequence[str] | None = None, mark: str | None = None
                    ) -> list[str]:
        """:meth:`html` as pieces: the render's own pieces (the same ``str`` objects where
        nothing is rewritten), cut only where a link or the pixel goes in. ``mark``:
        written where the message's token goes (:meth:`mark`; merge.py puts the token in
        after encoding), else the token itself. ``document`` None: ``"".join(pieces)``,
        made only if needed (a planned render does without it).

        Why keep the render's pieces rather than the text between links: the hoisted
        template's literal pieces are the same in every message, so merge.py finds their
        quoted-printable already made (mime.encode_qp_pieces) and encodes only the merge
        values, the links and the few cut ends; text between links that spans merge values
        would be new in every message and encoded whole each time. And with a mark, a
        render of a shape whose links hold no merge value is rewritten the same way every
        time: the first one's result is kept as a plan (which piece, which text) and
        followed by the others.
        """
        if pieces is None:
            if document is None:
                raise ValueError("html_pieces needs the document or its pieces")
            pieces = (document,)
        if not (self.clicks or self.opens):
            return list(pieces)
        found = self._shape(pieces, document) if self.fast else None
        spans: Sequence[_Span]
        vcum: Sequence[int]
        keep = None
        if found is None:
            self.full_scans += 1
            if document is None:
                document = "".join(pieces)
            links, body = scan(document)
            spans = [(link.start, 0, link.end, 0, link.quoted, link.raw)
                     for link in links if not link.notrack]
            vcum = (0,)
        else:
            self.fast_renders += 1
            shape, values = found
            spans = shape.links
            # The length of the values before each place (they shift the shape's offsets).
            vcum = list(accumulate(map(len, values), initial=0))
            if mark is not None:
                kept = self._plans.get(id(shape))
                if kept is not None and kept[0] == mark and self._left_alone(
                        kept[2], vcum, pieces, values, new):
                    return kept[3](pieces)
                keep = id(shape)
            if document is None:
                document = "".join(pieces)
            body = shape.body + vcum[shape.body_count] if shape.body >= 0 else -1
        token = mark if mark is not None else self.token(message_id)
        # The pixel goes before the last </body>, which links may follow (a footer
        # written after it); -1: no pixel, or already placed.
        at = (body if body >= 0 else len(document)) if self.opens else -1
        pixel = (f'<img src="{self.open_base}{token}" width="1" height="1" alt="" '
                 'style="display:block;border:0;width:1px;height:1px">')
        edits: list[tuple[int, int, str]] = []   # (start, end, what replaces it)
        if self.clicks:
            base = self.click_base + token
            decided = self._decided
            for span in spans:
                start, start_count, end, end_count, quoted, raw = span
                start += vcum[start_count]
                end += vcum[end_count]
                if raw is None:
                    raw = document[start:end]
                part = decided[raw] if raw in decided else self._decide(raw, None, new)
                if part is None:
                    continue
                if span[5] is None:  # a merge value in a tracked link: this render's own
                    keep = None
                if 0 <= at < start:
                    edits.append((at, at, pixel))
                    at = -1
                edits.append((start, end, base + part if quoted else f'"{base}{part}"'))
        if at >= 0:
            edits.append((at, at, pixel))
        plan = _splice(pieces, edits)
        if keep is not None and found is not None and len(self._plans) < _SHAPES_MAX:
            # Every tracked link is literal text: the same plan for each render of this
            # shape whose links with a merge value (the unsubscribe link) stay as written.
            shape, values = found
            plan = _joined(plan, pieces, shape.value_idx)
            self._plans[keep] = (cast(str, mark), plan, tuple(
                (sp, _whole_value(sp, vcum, pieces, shape.value_idx)) for sp in spans
                if sp[5] is None), _follower(plan))
            self.plans_made += 1
        return _follow(plan, pieces)

    def _left_alone(self, spans: Sequence[tuple[_Span, int]], vcum: Sequence[int],
                    pieces: Sequence[str], values: Sequence[str],
                    new: list[tuple[int, str]]) -> bool:
        """Whether this render leaves each of these links (with a merge value) as written."""
        ends: list[int] = []
        decided = self._decided
        for (start, start_count, end, end_count, _quoted, _raw), whole in spans:
            if whole >= 0:
                raw = values[whole]
            else:
                ends = ends or list(accumulate(map(len, pieces)))
                raw = _text(pieces, ends, start + vcum[start_count], end + vcum[end_count])
            if "&" not in raw and raw.startswith(self.skip_prefixes):
                continue  # the unsubscribe link: not remembered, it differs for everyone
            if (decided[raw] if raw in decided else self._decide(raw, None, new)) is not None:
                return False
        return True

    def text(self, document: str, message_id: int, new: list[tuple[int, str]]) -> str:
        """The text part with its http(s) links tracked (only with ``text_links``)."""
        if not (self.text_links and self.clicks):
            return document
        base = self.click_base + self.signer.message_part(self.newsletter_id, message_id)

        def one(m: re.Match[str]) -> str:
            url = m.group(0)
            trail = ""
            while url and url[-1] in _TRAILING:
                trail = url[-1] + trail
                url = url[:-1]
            part = self._decide("\x00text\x00" + url, url, new)
            return m.group(0) if part is None else base + part + trail

        return _TEXT_URL.sub(one, document)


def skip_prefixes(unsubscribe_url: str, click_base: str, open_base: str) -> tuple[str, ...]:
    """URL prefixes never tracked: the unsubscribe link's, and our own tracking links."""
    unsub = unsubscribe_url.split("{token}", 1)[0]
    return tuple(p for p in (unsub, click_base, open_base) if p)

