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

tests/unit/test_tracking_links.py checks against ``html.parser`` itself on
generated documents that the same links are found. The scan costs ~15 µs for
the bench newsletter (C speed; matches only at links, comments, raw text and
``</body>``).

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
from bisect import bisect_left
from dataclasses import dataclass, field
from html.parser import attrfind_tolerant, tagfind_tolerant  # type: ignore[attr-defined]

from .tokens import Signer

log = logging.getLogger(__name__)

# Longer URLs are left untracked (the link table's TEXT holds them, but a
# 2 KB URL is a data blob, not a link).
MAX_URL = 2048
# Decisions remembered per newsletter (href as written -> what to do).
_CACHE_MAX = 20_000

# html.parser's locatestarttagend_tolerant without the tag name: the attributes.
_ATTRS = (r"""(?>[\s/]*(?:(?<=['"\s/])[^\s/>][^\s/=>]*(?:\s*=+\s*(?:'[^']*'|"[^"]*"|"""
          r"""(?!['"])[^>\s]*)\s*)?(?:\s|/(?!>))*)*)?\s*""")
_NAME_END = r"(?=[\t\n\r\f />\x00]|$)"
_RAW = r"(?:script|style)"

_SCAN = re.compile(
    # Everything uninteresting, consumed in C without yielding a match.
    r"(?:[^<]++"
    r"|<(?![a-z!/?])"                                        # a lone '<' is text
    rf"|<(?!(?:a|{_RAW}){_NAME_END})[a-z][^\t\n\r\f />\x00]*+{_ATTRS}/?>?"  # another tag
    r"|</(?!\s*body\s*>)[^>]*+>"                              # an end tag
    r"|<!(?!--)\[[\s\S]*?\]\]>"                               # <![CDATA[ ... ]]>
    r"|<!(?!--)[^>]*+>"                                       # <!DOCTYPE ...>
    r"|<\?[^>]*+>"                                            # <?pi ...>
    r")*+"
    # Then exactly one of these.
    r"(?:(?P<comment><!--[\s\S]*?--\s*>)"
    rf"|(?P<raw><(?P<rawname>{_RAW}){_NAME_END}{_ATTRS}/?>(?:[\s\S]*?</\s*(?P=rawname)\s*>"
    r"|[\s\S]*\Z))"
    rf"|(?P<a><a{_NAME_END}{_ATTRS}/?>)"
    r"|(?P<body></\s*body\s*>)"
    r"|(?P<junk><)"                                           # e.g. an unterminated comment
    r"|\Z)",
    re.IGNORECASE)


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


_TEXT_URL = re.compile(r"https?://[^\s<>\"]+", re.IGNORECASE)
_TRAILING = ".,;:!?)]}'\""


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

    def _decide(self, raw: str, url: str, new: list[tuple[int, str]]) -> str | None:
        if raw in self._decided:
            return self._decided[raw]
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

    def html(self, document: str, message_id: int, new: list[tuple[int, str]]) -> str:
        """The HTML part with tracked links and the open pixel; new link rows go to ``new``."""
        if not (self.clicks or self.opens):
            return document
        links, body = scan(document)
        token = self.signer.message_part(self.newsletter_id, message_id)
        starts: list[int] = []
        ends: list[int] = []
        replacements: list[str] = []
        if self.clicks:
            base = self.click_base + token
            for link in links:
                if link.notrack:
                    continue
                part = self._decide(link.raw, link.url, new)
                if part is None:
                    continue
                starts.append(link.start)
                ends.append(link.end)
                replacements.append(base + part if link.quoted else f'"{base}{part}"')
        if self.opens:
            # Before the last </body>, which links may follow (a footer written after it).
            at = body if body >= 0 else len(document)
            i = bisect_left(starts, at)
            starts.insert(i, at)
            ends.insert(i, at)
            replacements.insert(i, f'<img src="{self.open_base}{token}" width="1" height="1" '
                                   'alt="" style="display:block;border:0;width:1px;height:1px">')
        return _splice(document, starts, ends, replacements)

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


def _splice(document: str, starts: list[int], ends: list[int], replacements: list[str]) -> str:
    """``document`` with document[starts[i]:ends[i]] replaced by replacements[i] (in order,
    not overlapping); the same object when there is nothing to replace."""
    if not replacements:
        return document
    out: list[str] = [""] * (2 * len(replacements) + 1)
    out[0::2] = map(document.__getitem__, map(slice, [0, *ends], [*starts, len(document)]))
    out[1::2] = replacements
    return "".join(out)


def skip_prefixes(unsubscribe_url: str, click_base: str, open_base: str) -> tuple[str, ...]:
    """URL prefixes never tracked: the unsubscribe link's, and our own tracking links."""
    unsub = unsubscribe_url.split("{token}", 1)[0]
    return tuple(p for p in (unsub, click_base, open_base) if p)

