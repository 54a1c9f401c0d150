# ruff: noqa: E501  (user agents and HTML samples are quoted whole)
"""Pure parts of open and click tracking: tokens, link finding and rewriting, the
machine rule, the [tracking] config. The web app and the database side:
tests/integration/test_tracking.py."""

from __future__ import annotations

import html
from datetime import datetime, timedelta
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem.config import ConfigError, format_track, load_config, parse_track
from sendsystem.tracking.links import Rewriter, scan, skip_prefixes
from sendsystem.tracking.machine import Click, Verdict, agent_verdict, bursts, with_delivery
from sendsystem.tracking.tokens import CLICK, OPEN, Hit, Signer

SIGNER = Signer.from_secret(b"s" * 40)
CLICKS = "https://t.example.com/c/"
OPENS = "https://t.example.com/o/"
UNSUB = "https://lists.example.com/unsubscribe/{token}"


# ------------------------------------------------------------------- tokens

def test_tokens_round_trip_and_are_short() -> None:
    for nid, mid, idx in [(1, 1, 1), (4711, 123_456_789, SIGNER.link_idx("https://x/")),
                          (2**32 - 1, 2**63, 2**64 - 1)]:
        click = SIGNER.click(nid, mid, idx)
        assert SIGNER.verify(CLICK, click) == Hit(CLICK, nid, mid, idx)
        assert SIGNER.verify(OPEN, SIGNER.open(nid, mid)) == Hit(OPEN, nid, mid)
    assert len(SIGNER.click(4711, 123_456, 2**63)) <= 48
    assert len(SIGNER.open(4711, 123_456)) <= 24


def test_every_altered_character_is_refused() -> None:
    token = SIGNER.click(12, 3456, SIGNER.link_idx("https://example.com/a"))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(token):
        for other in (alphabet[(alphabet.index(ch) + 1) % 64], alphabet[(alphabet.index(ch) + 7) % 64]):
            altered = token[:i] + other + token[i + 1:]
            assert SIGNER.verify(CLICK, altered) is None, (i, altered)
    assert SIGNER.verify(CLICK, token[:-1]) is None
    assert SIGNER.verify(CLICK, token + "A") is None


def test_forged_tokens_and_garbage_are_refused() -> None:
    other = Signer.from_secret(b"another secret that is long enough!!")
    assert SIGNER.verify(CLICK, other.click(1, 2, 3)) is None
    assert SIGNER.verify(OPEN, other.open(1, 2)) is None
    # An open token is not a click token and the other way round.
    assert SIGNER.verify(CLICK, SIGNER.open(1, 2) + SIGNER.open(1, 2)) is None
    assert SIGNER.verify(OPEN, SIGNER.click(1, 2, 3)) is None
    for junk in ("", "x", "../../etc/passwd", "A" * 200, "é" * 30, "AAAA====", "\x00" * 40):
        assert SIGNER.verify(CLICK, junk) is None
        assert SIGNER.verify(OPEN, junk) is None


@given(st.text(max_size=80))
def test_verify_never_raises(text: str) -> None:
    SIGNER.verify(CLICK, text)
    SIGNER.verify(OPEN, text)


def test_a_link_part_only_verifies_with_its_newsletter() -> None:
    idx = SIGNER.link_idx("https://example.com/")
    spliced = SIGNER.message_part(1, 10) + SIGNER.link_part(2, idx)
    assert SIGNER.verify(CLICK, spliced) is None


# ------------------------------------------------------------ finding links

class _Reference(HTMLParser):
    """What the stdlib parser sees: the first href of every <a>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.append(next((v for k, v in attrs if k == "href"), None))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


def reference(doc: str) -> list[str]:
    p = _Reference()
    p.feed(doc)
    p.close()
    return [h for h in p.hrefs if h is not None]


_PIECES = st.sampled_from([
    "text ", "a < b ", "x > y ", "&amp; ", "<p>", "</p>", "<br/>", "<div class='x'>", "</div>",
    '<a href="https://ex.com/1?a=1&amp;b=2">one</a>', "<a href='https://ex.com/2'>two</a>",
    "<a href=https://ex.com/3>three</a>", '<A HREF="https://ex.com/4" class="b">4</A>',
    '<a class="btn" href = "https://ex.com/5" style="c:d">5</a>', "<a name=top></a>",
    '<a href="mailto:x@example.com">m</a>', '<a href="#top">t</a>', "<!-- <a href='https://no/1'> -->",
    "<script>var s = '<a href=\"https://no/2\">';</script>", "<style>a[href='<a href=x>']{}</style>",
    '<img alt="<a href=\'https://no/3\'>" src="i.png">', "<img alt=it's src=x>",
    '<a data-notrack href="https://ex.com/6">6</a>', "<!DOCTYPE html>", "<title>T</title>",
    '<a href="https://ex.com/7" href="https://ex.com/8">dup</a>', "<a\nhref\n=\n'https://ex.com/9'\n>",
    "<body>", "</body>", "</html>", "<table><tr><td>", "</td></tr></table>",
])


@settings(max_examples=400)
@given(st.lists(_PIECES, max_size=25))
def test_scan_finds_what_html_parser_finds(pieces: list[str]) -> None:
    doc = "".join(pieces)
    links, _ = scan(doc)
    assert [link.url for link in links] == reference(doc)
    for link in links:
        assert html.unescape(doc[link.start:link.end]) == link.url


def test_scan_skips_comments_raw_text_and_attribute_values() -> None:
    doc = ("<html><body><!-- <a href='https://no/1'> --><script>'<a href=\"https://no/2\">'"
           "</script><img alt=\"<a href='https://no/3'>\"><a href='https://yes/1'>x</a>"
           "</body></html>")
    links, body = scan(doc)
    assert [link.url for link in links] == ["https://yes/1"]
    assert doc[body:].startswith("</body>")


# ---------------------------------------------------------------- rewriting

def rewriter(**kw: object) -> Rewriter:
    return Rewriter(SIGNER, 7, CLICKS, OPENS, skip_prefixes(UNSUB, CLICKS, OPENS), **kw)  # type: ignore[arg-type]


DOC = """<html><body>
<p><a href="https://news.example.com/a?x=1&amp;y=2">A</a>
<a href="https://lists.example.com/unsubscribe/abc.def.ghi">Unsubscribe</a>
<a href="mailto:help@example.com">Mail</a> <a href="#top">Top</a> <a href="/relative">R</a>
<a data-notrack href="https://news.example.com/private">P</a>
<a href=https://news.example.com/b>B</a></p>
</body></html>"""


def test_rewrites_http_links_only_and_adds_the_pixel_before_body_end() -> None:
    new: list[tuple[int, str]] = []
    out = rewriter().html(DOC, 99, new)
    hrefs = reference(out)
    tracked = [h for h in hrefs if h.startswith(CLICKS)]
    assert len(tracked) == 2
    hits = [SIGNER.verify(CLICK, h[len(CLICKS):]) for h in tracked]
    urls = dict(new)
    assert [urls[h.link_idx] for h in hits if h] == ["https://news.example.com/a?x=1&y=2",
                                                      "https://news.example.com/b"]
    assert all(h is not None and h.message_id == 99 and h.newsletter_id == 7 for h in hits)
    # Left exactly as written.
    for kept in ('href="https://lists.example.com/unsubscribe/abc.def.ghi"',
                 'href="mailto:help@example.com"', 'href="#top"', 'href="/relative"',
                 'data-notrack href="https://news.example.com/private"'):
        assert kept in out
    pixel = out.index(f'<img src="{OPENS}')
    assert out.index("</body>") > pixel
    token = out[pixel + len(f'<img src="{OPENS}'):].split('"', 1)[0]
    assert SIGNER.verify(OPEN, token) == Hit(OPEN, 7, 99)


def test_new_links_are_reported_once_and_unlearned_after_a_failure() -> None:
    rw = rewriter()
    first: list[tuple[int, str]] = []
    rw.html(DOC, 1, first)
    again: list[tuple[int, str]] = []
    rw.html(DOC, 2, again)
    assert len(first) == 2 and again == []
    rw.unlearn(first)
    third: list[tuple[int, str]] = []
    rw.html(DOC, 3, third)
    assert sorted(third) == sorted(first)


def test_opens_only_clicks_only_and_max_links() -> None:
    new: list[tuple[int, str]] = []
    assert CLICKS not in rewriter(clicks=False).html(DOC, 1, new)
    assert OPENS not in rewriter(opens=False).html(DOC, 1, new)
    capped = rewriter(max_links=1)
    out = capped.html(DOC, 1, [])
    assert out.count(CLICKS) == 1 and capped.untracked == 1


def test_text_part_untouched_unless_enabled() -> None:
    text = ("Read https://news.example.com/a?x=1&y=2.\nUnsubscribe: "
            "https://lists.example.com/unsubscribe/abc.def.ghi\n")
    assert rewriter().text(text, 5, []) == text
    new: list[tuple[int, str]] = []
    out = rewriter(text_links=True).text(text, 5, new)
    assert "https://lists.example.com/unsubscribe/abc.def.ghi" in out
    assert new == [(SIGNER.link_idx("https://news.example.com/a?x=1&y=2"),
                    "https://news.example.com/a?x=1&y=2")]
    line = out.splitlines()[0]
    assert line.startswith("Read " + CLICKS) and line.endswith(".")


def test_no_body_tag_puts_the_pixel_at_the_end() -> None:
    out = rewriter(clicks=False).html("<p>hi</p>", 1, [])
    assert out.startswith("<p>hi</p><img src=")


PIXEL_START = f'<img src="{OPENS}'


def test_links_after_the_last_body_end_keep_the_document_whole() -> None:
    doc = '<body><p>x</p></body><a href="https://x.example/">late</a>'
    out = rewriter().html(doc, 3, [])
    pixel = out.index(PIXEL_START)
    assert out[:pixel] == "<body><p>x</p>"
    tail = out[out.index(">", pixel) + 1:]
    assert tail.startswith('</body><a href="' + CLICKS) and tail.endswith('">late</a>')
    assert out.count("<a ") == 1 and out.count(PIXEL_START) == 1


@settings(max_examples=300)
@given(st.lists(_PIECES, max_size=25))
def test_rewriting_changes_only_hrefs_and_adds_one_pixel(pieces: list[str]) -> None:
    doc = "".join(pieces)
    new: list[tuple[int, str]] = []
    out = rewriter().html(doc, 42, new)
    urls = dict(new)
    before, after = reference(doc), reference(out.replace(PIXEL_START, '<img src="', 1))
    # The pixel is an <img>, not an <a>: the same links, each kept or tracked to its URL.
    assert len(before) == len(after)
    for was, now in zip(before, after, strict=True):
        if now != was:
            hit = SIGNER.verify(CLICK, now[len(CLICKS):])
            assert now.startswith(CLICKS) and hit is not None and urls.get(hit.link_idx,
                                                                          was) == was
    assert out.count(PIXEL_START) == 1
    _, body = scan(doc)
    if body >= 0:
        assert out.index(PIXEL_START) == len(rewriter(opens=False).html(doc[:body], 42, []))


# ----------------------------------------------------------- machine rule

T0 = datetime(2026, 1, 1, 12, 0, 0)


@pytest.mark.parametrize(("method", "agent", "verdict"), [
    ("GET", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120", Verdict.HUMAN),
    ("GET", "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17029)", Verdict.HUMAN),
    ("HEAD", "Mozilla/5.0 (Windows NT 10.0) Chrome/120", Verdict.SCANNER),
    ("GET", "", Verdict.SCANNER),
    ("GET", None, Verdict.SCANNER),
    ("GET", "Mozilla/5.0 (compatible; BingPreview/1.0b)", Verdict.SCANNER),
    ("GET", "Barracuda Sentinel (EE)", Verdict.SCANNER),
    ("GET", "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
     Verdict.PROXY),
    ("GET", "Mozilla/5.0", Verdict.PROXY),
    ("GET", "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", Verdict.PROXY),
])
def test_agent_verdict(method: str, agent: str | None, verdict: Verdict) -> None:
    assert agent_verdict(method, agent) == verdict


def test_hits_within_seconds_of_delivery_are_machine() -> None:
    assert with_delivery(0, T0 + timedelta(seconds=3), T0, 10) == Verdict.EARLY
    assert with_delivery(0, T0 + timedelta(seconds=30), T0, 10) == Verdict.HUMAN
    assert with_delivery(0, T0, None, 10) == Verdict.HUMAN
    assert with_delivery(Verdict.SCANNER, T0, T0, 10) == Verdict.SCANNER


def test_a_scanner_clicking_every_link_in_one_second_is_a_burst() -> None:
    scanner = [Click(i, 1, i, T0 + timedelta(milliseconds=30 * i)) for i in range(30)]
    later_human = Click("h", 1, 5, T0 + timedelta(minutes=10))
    person = [Click("p1", 2, 1, T0), Click("p2", 2, 2, T0 + timedelta(seconds=40)),
              Click("p3", 2, 3, T0 + timedelta(seconds=90))]
    double = [Click("d1", 3, 1, T0), Click("d2", 3, 1, T0 + timedelta(milliseconds=300))]
    found = bursts([*scanner, later_human, *person, *double], links=3, seconds=2)
    assert found == set(range(30))


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 20_000)),
                max_size=30))
def test_burst_marks_exactly_the_windows_with_enough_links(raw: list[tuple[int, int, int]]) -> None:
    clicks = [Click(i, m, link, T0 + timedelta(milliseconds=ms))
              for i, (m, link, ms) in enumerate(raw)]
    found = bursts(clicks, links=3, seconds=2)
    for c in clicks:
        windows = [[d for d in clicks if d.message_id == c.message_id
                    and s.at <= d.at <= s.at + timedelta(seconds=2)]
                   for s in clicks if s.message_id == c.message_id and s.at <= c.at]
        expected = any(len({d.link_idx for d in w}) >= 3 and c in w for w in windows)
        assert (c.key in found) == expected


# ------------------------------------------------------------------ config

def test_track_kinds() -> None:
    assert parse_track("opens,clicks") == {"opens", "clicks"}
    assert parse_track("clicks") == {"clicks"}
    assert parse_track("none") == set() == parse_track("")
    assert format_track(parse_track("clicks, opens")) == "opens,clicks"
    with pytest.raises(ConfigError, match="not a tracking kind"):
        parse_track("reads")


def test_tracking_config(tmp_path: object) -> None:
    from pathlib import Path
    path = Path(str(tmp_path)) / "c.ini"
    path.write_text("[tracking]\nenabled = yes\nbase_url = https://t.example.com/x\n")
    t = load_config(path).tracking
    assert t.enabled and t.click_prefix == "https://t.example.com/x/c/"
    path.write_text("[tracking]\nenabled = yes\n")
    with pytest.raises(ConfigError, match="needs base_url"):
        load_config(path)
    path.write_text("[tracking]\nbase_url = ftp://x\n")
    with pytest.raises(ConfigError, match="http"):
        load_config(path)
    path.write_text("[tracking]\nflush_intervall = 1\n")
    with pytest.raises(ConfigError, match="flush_interval"):
        load_config(path)


# ------------------------------------------------------------------- recorder

def test_hits_recorded_by_threads_at_a_workers_first_request_are_all_kept() -> None:
    """gunicorn's gthread workers call record() from several threads at once.

    The first call in a process sets the process up (own id prefix, empty
    buffer). It used to publish "set up" (the pid) before clearing the buffer,
    so a second thread could buffer a hit that the first then cleared:
    bench/tracking_load.py counted 4 of 60,200 redirects missing, one per
    gunicorn worker. Every round here starts a fresh recorder with 8 threads
    released at once.
    """
    import threading

    from sendsystem.config import TrackingConfig
    from sendsystem.tracking.recorder import Recorder

    def no_database() -> object:
        raise AssertionError("nothing is flushed here")

    hit = Hit(CLICK, 1, 1, 1)
    threads, per_thread = 8, 50
    for _ in range(100):
        recorder = Recorder(TrackingConfig(flush_rows=10**9), no_database,  # type: ignore[arg-type]
                            start_thread=False)
        gate = threading.Barrier(threads)

        def burst(r: Recorder = recorder, g: threading.Barrier = gate) -> None:
            g.wait()
            for _ in range(per_thread):
                r.record(hit, 0)

        workers = [threading.Thread(target=burst) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        ids = [row.hit for row in recorder._buffer]
        assert len(ids) == threads * per_thread
        assert len(set(ids)) == len(ids)
