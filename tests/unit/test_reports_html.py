"""The self-contained HTML stats report, checked structurally with html.parser."""

from __future__ import annotations

import copy
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from sendsystem.reports.html import nice_ticks, render_html

STATS: dict[str, Any] = {
    "newsletter": 7, "state": "done", "subject": "Black Friday", "list": "news",
    "created_at": "2026-11-27T20:59:10", "released_at": "2026-11-27T21:00:00",
    "finished_at": "2026-11-27T21:03:00", "total": 20000,
    "counts": {"queued": 0, "merged": 0, "sent": 19936, "deferred": 0, "failed": 20,
               "skipped": 30, "bounced": 14, "cancelled": 0},
    "workers": [
        {"name": "sort-a", "host": "srv1", "role": "sort", "messages": 20000, "rate": 812.5},
        {"name": "send-a", "host": "srv1", "role": "send", "messages": 12000, "rate": 350.2},
        {"name": "send-b", "host": "srv2", "role": "send", "messages": 8000, "rate": None},
    ],
    "timeline": [
        {"minute": f"2026-11-27T21:0{m}", "worker": w, "sent": n}
        for m in range(4) for w, n in (("send-a", 3000), ("send-b", 2000))
    ],
    "replies": [{"code": 250, "reply": "250 2.0.0 Ok", "count": 19950},
                {"code": 550, "reply": "550 5.1.1 <bob@example.com> unknown", "count": 20}],
    "deferrals": 42,
    "bounces": {"hard": 10, "soft": 3, "blocked": 2, "complaint": 1, "autoreply": 0},
    "bounce_rate": 0.0007, "complaint_rate": 0.00005, "pause_reason": None,
    "duration_seconds": 180.4, "rate": 110.8,
}


class Tree(HTMLParser):
    """Collects every start tag with its attributes, and the text, in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.svg_children: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.current_svg: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "svg":
            # "chart timeline" -> "timeline"
            self.current_svg = a.get("class", "").split()[-1]
            self.svg_children[self.current_svg] = []
        elif self.current_svg:
            self.svg_children[self.current_svg].append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.current_svg = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_class(self, chart: str, cls: str) -> list[dict[str, str]]:
        return [a for _, a in self.svg_children[chart] if cls in a.get("class", "").split()]


def parse(stats: dict[str, Any]) -> tuple[str, Tree]:
    page = render_html(stats)
    tree = Tree()
    tree.feed(page)
    tree.close()
    return page, tree


def assert_self_contained(page: str, tree: Tree) -> None:
    assert not any(tag == "script" for tag, _ in tree.tags)
    assert "<script" not in page.lower()
    assert not re.search(r"https?://", page), "no network references, not even an xmlns"
    for tag, attrs in tree.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)       # no inline event handlers
            if name in ("href", "src", "xlink:href"):
                assert value.startswith("#"), (tag, name, value)
    assert not any(tag in ("link", "img", "iframe", "object", "embed") for tag, _ in tree.tags)


def test_three_charts_with_expected_series_and_bars() -> None:
    page, tree = parse(STATS)
    assert_self_contained(page, tree)
    assert set(tree.svg_children) == {"timeline", "states", "bounces"}
    series = tree.with_class("timeline", "series")
    assert [s["data-worker"] for s in series] == ["send-a", "send-b"]
    assert all(tag == "path" for tag, a in tree.svg_children["timeline"]
               if "series" in a.get("class", ""))
    segments = tree.with_class("states", "segment")
    assert [s["data-state"] for s in segments] == ["sent", "failed", "skipped", "bounced"]
    bars = tree.with_class("bounces", "bar")
    assert [b["data-class"] for b in bars] == ["hard", "soft", "blocked", "complaint",
                                              "autoreply"]
    heights = {b["data-class"]: float(b["height"]) for b in bars}
    assert heights["hard"] > heights["soft"] > heights["blocked"] > heights["complaint"] \
        > heights["autoreply"] == 0


def test_timeline_has_axes_ticks_and_legend() -> None:
    page, tree = parse(STATS)
    ticks = tree.with_class("timeline", "tick")
    assert len(ticks) >= 6             # y ticks and the four minutes
    assert ">21:00<" in page and ">21:03<" in page
    assert "messages / minute" in page
    assert 'class="legend"' in page and "12,000 sent" in page


def test_headline_numbers_and_tables() -> None:
    page, _ = parse(STATS)
    text = re.sub(r"<[^>]+>", " ", page)
    for expected in ("20,000", "19,936", "110.8", "3m 00s", "812.5/s", "60.0%", "40.0%",
                     "250 2.0.0 Ok", "0.07%", "0.005%", "Newsletter #7", "list news"):
        assert expected in text, expected


def test_malicious_subject_and_reply_are_escaped() -> None:
    stats = copy.deepcopy(STATS)
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    stats["subject"] = evil
    stats["list"] = "<b>list</b>"
    stats["pause_reason"] = "<iframe>"
    stats["replies"][1]["reply"] = "550 <svg onload=alert(3)>"
    stats["timeline"][0]["worker"] = 'w"><script>'
    stats["workers"][1]["host"] = "<marquee>"
    page, tree = parse(stats)
    assert_self_contained(page, tree)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;svg onload=alert(3)&gt;" in page
    assert "<b>list</b>" not in page and "<marquee>" not in page
    assert evil in "".join(tree.text)   # shown to the reader as text, verbatim
    assert sum(1 for tag, _ in tree.tags if tag == "svg") == 3


def test_no_timeline_yet() -> None:
    stats = dict(STATS, timeline=[], counts={"queued": 100}, bounces={}, replies=[],
                 workers=[], rate=None, duration_seconds=None, finished_at=None)
    page, tree = parse(stats)
    assert_self_contained(page, tree)
    assert set(tree.svg_children) == {"timeline", "states", "bounces"}
    assert tree.with_class("timeline", "series") == []
    assert "Nothing sent yet" in page
    assert [s["data-state"] for s in tree.with_class("states", "segment")] == ["queued"]
    assert len(tree.with_class("bounces", "bar")) == 5
    assert "No bounces recorded" in page


def test_single_minute_draws_one_stacked_column_per_worker() -> None:
    stats = dict(STATS, timeline=[{"minute": "2026-11-27T21:01", "worker": "a", "sent": 5},
                                  {"minute": "2026-11-27T21:01", "worker": "b", "sent": 3}])
    _, tree = parse(stats)
    series = tree.with_class("timeline", "series")
    assert len(series) == 2
    assert {tag for tag, a in tree.svg_children["timeline"] if "series" in a.get("class", "")} \
        == {"rect"}
    assert all(float(s["height"]) > 0 for s in series)


def test_zero_bounces_and_empty_counts() -> None:
    stats = dict(STATS, bounces=dict.fromkeys(STATS["bounces"], 0),  # type: ignore[arg-type]
                 counts={}, total=0)
    page, tree = parse(stats)
    assert all(float(b["height"]) == 0 for b in tree.with_class("bounces", "bar"))
    assert tree.with_class("states", "segment") == []
    assert "No messages yet" in page


def test_paused_banner_and_bare_dict() -> None:
    page, _ = parse(dict(STATS, state="paused", pause_reason="complaints over 0.3%"))
    assert 'class="banner"' in page and "complaints over 0.3%" in page
    page, tree = parse({})
    assert_self_contained(page, tree)
    assert len(tree.svg_children) == 3


def test_tiny_state_segments_stay_visible() -> None:
    _, tree = parse(STATS)
    widths = {s["data-state"]: float(s["width"]) for s in tree.with_class("states", "segment")}
    assert widths["failed"] >= 5 and widths["bounced"] >= 5
    assert sum(widths.values()) == pytest.approx(1000, abs=0.1)


def test_many_minutes_keep_tick_labels_sparse() -> None:
    timeline = [{"minute": f"2026-11-27T{21 + m // 60:02d}:{m % 60:02d}", "worker": "a",
                 "sent": m} for m in range(180)]
    page, tree = parse(dict(STATS, timeline=timeline))
    labels = [a for a in tree.with_class("timeline", "tick") if a.get("y") == "296"]
    assert 2 <= len(labels) <= 10
    assert "23:30" in page


@pytest.mark.parametrize(("peak", "expected_top"), [(0, 1), (3, 3), (10, 10), (4000, 4000),
                                                    (4001, 5000), (123456, 125000)])
def test_nice_ticks(peak: float, expected_top: float) -> None:
    ticks = nice_ticks(peak)
    assert ticks[0] == 0 and ticks[-1] == expected_top
    assert all(float(t).is_integer() for t in ticks)
