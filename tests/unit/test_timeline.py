"""The HTML timeline's resolution and worker colours (pure functions)."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendsystem.reports.html import WORKER_COLORS, pivot_buckets, render_html, worker_color
from sendsystem.stats import TIMELINE_MAX_BUCKETS, bucket_start, timeline_bucket


@pytest.mark.parametrize(("span", "bucket"), [
    (0, 1), (15, 1), (299, 1), (300, 10), (45 * 60, 10), (3600, 60), (5 * 3600 - 1, 60),
    (5 * 3600, 600), (24 * 3600, 600), (3 * 86400, 3600), (400 * 86400, 86400)])
def test_bucket_from_the_send_length(span: float, bucket: int) -> None:
    assert timeline_bucket(span) == bucket


@given(st.floats(min_value=0, max_value=299 * 86400))
def test_never_more_than_300_buckets(span: float) -> None:
    bucket = timeline_bucket(span)
    # +1: the first bucket starts on a round clock time before the first message.
    assert span // bucket + 1 <= TIMELINE_MAX_BUCKETS + 1


def test_bucket_start_is_a_round_clock_time() -> None:
    t = datetime(2026, 11, 29, 21, 47, 13, 500000)
    assert bucket_start(t, 1) == datetime(2026, 11, 29, 21, 47, 13)
    assert bucket_start(t, 10) == datetime(2026, 11, 29, 21, 47, 10)
    assert bucket_start(t, 600) == datetime(2026, 11, 29, 21, 40)
    assert bucket_start(t, 86400) == datetime(2026, 11, 29)


def test_every_worker_gets_its_own_colour_in_order() -> None:
    colours = [worker_color(i) for i in range(60)]
    assert colours[:len(WORKER_COLORS)] == list(WORKER_COLORS)
    assert len(set(colours)) == 60
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours)
    assert colours == [worker_color(i) for i in range(60)]


def _detail(bucket: int, points: list[tuple[str, str, int]]) -> dict[str, object]:
    return {"bucket_seconds": bucket,
            "rows": [{"at": at, "worker": w, "sent": n} for at, w, n in points]}


def test_pivot_fills_empty_seconds() -> None:
    t = pivot_buckets(_detail(1, [("2026-11-29T21:00:00", "a", 5),
                                  ("2026-11-29T21:00:03", "b", 2)]))
    assert t.bucket_seconds == 1 and t.workers == ("a", "b")
    assert t.minutes[0] == "2026-11-29T21:00:00" and len(t.minutes) == 4
    assert t.sent == ((5, 0, 0, 0), (0, 0, 0, 2))


def test_html_short_send_is_per_second_with_a_colour_per_worker() -> None:
    rows = [(f"2026-11-29T21:00:{s:02d}", f"send-{w}", 10 + w) for s in range(15)
            for w in range(14)]
    page = render_html({"newsletter": 1, "counts": {"sent": 100}, "total": 100,
                        "timeline": [{"minute": "2026-11-29T21:00", "worker": "send-0",
                                      "sent": 100}],
                        "timeline_detail": _detail(1, rows)})
    assert "Messages sent per second" in page and "messages / second" in page
    assert re.search(r">21:00:\d\d<", page)  # tick labels with seconds
    fills = re.findall(r'class="series" data-worker="send-\d+" d="[^"]*" fill="(#[0-9a-f]{6})"',
                       page)
    assert len(fills) == 14 and len(set(fills)) == 14


def test_html_without_detail_stays_per_minute() -> None:
    page = render_html({"newsletter": 1, "counts": {"sent": 5}, "total": 5,
                        "timeline": [{"minute": "2026-11-29T21:00", "worker": "w", "sent": 5}]})
    assert "Messages sent per minute" in page
