"""List statistics, the pure parts: weeks, the weekly series, the trend, the reports."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendsystem.liststats import (
    Transition,
    change_vs_previous,
    direction,
    leave_reasons,
    newsletter_row,
    ols_slope,
    trend,
    week_range,
    week_start,
    weekly_series,
)
from sendsystem.reports.list_html import rate_ticks, render_list_html
from sendsystem.reports.list_text import format_list_stats

MON = date(2026, 11, 23)


@pytest.mark.parametrize(("when", "monday"), [
    (date(2026, 11, 23), date(2026, 11, 23)),           # a Monday is its own week
    (datetime(2026, 11, 29, 23, 59, 59), date(2026, 11, 23)),  # Sunday night: same week
    (datetime(2026, 11, 30, 0, 0), date(2026, 11, 30)),
    (date(2027, 1, 1), date(2026, 12, 28)),              # weeks cross years
])
def test_week_start(when: date, monday: date) -> None:
    assert week_start(when) == monday


def test_week_range_ends_with_the_current_week() -> None:
    assert week_range(date(2026, 11, 29), 3) == [date(2026, 11, 9), date(2026, 11, 16), MON]
    assert week_range(date(2026, 11, 29), 0) == [MON]


def T(week: date, f: str, t: str, reason: str = "r", n: int = 1) -> Transition:
    return Transition(week, f, t, reason, n)


def test_series_folds_joins_and_transitions() -> None:
    w0, w1, w2 = date(2026, 11, 9), date(2026, 11, 16), MON
    before = date(2026, 1, 5)
    joins = {before: 10, w0: 3, w2: 2, date(2027, 1, 4): 99}  # after the window: ignored
    moves = [T(before, "active", "unsubscribed", n=4),
             T(w1, "active", "bounced", "hard bounce 5.1.1", 2),
             T(w1, "active", "unsubscribed", "List-Unsubscribe one-click"),
             T(w2, "bounced", "complained"),               # not a leave
             T(w2, "unsubscribed", "active")]              # a re-activation
    rows = weekly_series(joins, moves, [w0, w1, w2])
    table = [(r["active"], r["unsubscribed"], r["bounced"], r["complained"], r["joined"],
              r["left"], r["reactivated"]) for r in rows]
    assert table == [(9, 4, 0, 0, 3, 0, 0), (6, 5, 2, 0, 0, 3, 0), (9, 4, 1, 1, 2, 0, 1)]
    assert rows[1]["left_by_reason"] == {"hard bounce 5.1.1": 2,
                                         "List-Unsubscribe one-click": 1}
    assert rows[1]["left_by_status"] == {"bounced": 2, "unsubscribed": 1}
    assert (rows[0]["week"], rows[0]["end"]) == ("2026-11-09", "2026-11-15")
    assert leave_reasons(rows, moves) == [
        {"status": "bounced", "reason": "hard bounce 5.1.1", "count": 2},
        {"status": "unsubscribed", "reason": "List-Unsubscribe one-click", "count": 1}]


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 50)), max_size=20),
       st.lists(st.tuples(st.integers(0, 9), st.sampled_from(
           ["unsubscribed", "bounced", "complained"]), st.integers(1, 5)), max_size=20))
def test_series_conserves_subscribers(joins_in: list[tuple[int, int]],
                                      leaves_in: list[tuple[int, str, int]]) -> None:
    """Every week the statuses add up to everyone who joined so far."""
    weeks = week_range(MON, 10)
    joins: dict[date, int] = {}
    for w, n in joins_in:
        joins[weeks[w]] = joins.get(weeks[w], 0) + n
    moves = [T(weeks[w], "active", s, n=n) for w, s, n in leaves_in]
    joined = 0
    for row in weekly_series(joins, moves, weeks):
        joined += row["joined"]
        assert sum(row[s] for s in ("active", "unsubscribed", "bounced", "complained")) == joined


def test_ols_slope() -> None:
    assert ols_slope([]) is None and ols_slope([1.0]) is None
    assert ols_slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert ols_slope([5.0, 5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert ols_slope([0.1, 0.0, 0.0]) == pytest.approx(-0.05)


def test_direction_needs_three_points_and_a_real_change() -> None:
    assert direction(0.5, 1.0, 2) == "unknown"
    assert direction(None, 1.0, 5) == "unknown"
    assert direction(0.01, 0.02, 10) == "rising"    # +0.09 over the window, mean 0.02
    assert direction(-0.01, 0.02, 10) == "falling"
    assert direction(0.0001, 0.02, 10) == "steady"  # +0.0009: under a tenth of the level
    # Tiny rates: under 0.01 percentage point across the window is noise.
    assert direction(0.00001, 0.00001, 5) == "steady"


def test_trend_skips_newsletters_with_nothing_delivered() -> None:
    t = trend([0.01, None, 0.02, 0.03, None])
    assert t == {"latest": 0.03, "previous_mean": 0.015, "change": 0.015,
                 "slope_per_newsletter": 0.01, "newsletters": 3, "direction": "rising"}
    assert trend([])["direction"] == "unknown" and trend([])["latest"] is None
    # The fit covers the last ten, "previous" the five before the latest.
    long = trend([1.0] * 20 + [0.0] * 10 + [0.5])
    assert long["newsletters"] == 10 and long["previous_mean"] == 0.0


def test_change_vs_previous() -> None:
    assert change_vs_previous([0.1, None, 0.3, 0.2, 0.0, 0.0, 0.0, 0.6]) == [
        None, None, 0.2, 0.0, -0.2, -0.15, -0.12, 0.5]  # the last: vs the mean of five


def test_newsletter_row_rates_per_delivered() -> None:
    nl = {"id": 3, "subject": "S", "state": "done", "released_at": datetime(2026, 11, 2, 8),
          "finished_at": None, "total": 110}
    counts = {"sent": 95, "bounced": 5, "failed": 10}
    row = newsletter_row(nl, counts, {"hard": 4, "soft": 2, "complaint": 1}, 3)
    assert (row["delivered"], row["bounces"], row["complaints"], row["unsubscribes"]) == \
        (100, 6, 1, 3)
    assert (row["bounce_rate"], row["complaint_rate"], row["unsubscribe_rate"]) == \
        (0.06, 0.01, 0.03)
    assert row["sent_at"] == "2026-11-02T08:00:00Z"
    empty = newsletter_row(nl, {}, {}, 0)
    assert empty["bounce_rate"] is None and empty["delivered"] == 0


def facts() -> dict[str, Any]:
    weeks = weekly_series({date(2026, 11, 9): 3, MON: 1},
                          [T(date(2026, 11, 16), "active", "unsubscribed", "unsubscribe link")],
                          week_range(MON, 3))
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    letters = [newsletter_row({"id": i, "subject": evil if i == 2 else f"N{i}", "state": "done",
                               "released_at": datetime(2026, 11, i, 8)},
                              {"sent": 100}, {"hard": i, "complaint": 0}, 1)
               for i in (1, 2, 3)]
    return {"list": {"id": 1, "name": "news<&>", "from": "N <n@example.com>"},
            "generated_at": "2026-11-29T12:00:00Z", "weeks_start": "Monday 00:00 UTC",
            "now": {"active": 3, "unsubscribed": 1, "bounced": 0, "complained": 0, "total": 4,
                    "blocked": 1},
            "weeks": weeks, "left_by_reason": leave_reasons(weeks, []),
            "newsletters": letters,
            "trend": {k: trend([n[k] for n in letters])
                      for k in ("bounce_rate", "complaint_rate", "unsubscribe_rate")},
            "notes": ["a note <b>"]}


def test_html_is_self_contained_and_escaped() -> None:
    page = render_list_html(facts())
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower() and not re.search(r"https?://", page)
    assert "default-src 'none'" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "news&lt;&amp;&gt;" in page and "a note &lt;b&gt;" in page
    assert page.count('class="series"') == 4 and page.count('class="point"') == 9
    assert page.count('<svg class="chart') == 5  # statuses, flow, three rates


def test_html_and_text_take_a_bare_dict() -> None:
    assert "No weeks to show." in render_list_html({})
    text = format_list_stats({})
    assert "No newsletter has been sent" in text and "Nobody left." in text


def test_text_report() -> None:
    text = format_list_stats(facts(), width=120)
    assert "List news<&> (id 1)" in text
    assert "blocked 1 of the active" in text
    assert "2026-11-16" in text and "unsubscribe link (1)" in text
    assert "<script>alert(1)</script>" in text  # cleaned of controls, not HTML
    assert "bounce      latest 3.000%" in text and "rising" in text
    assert "\x1b" not in format_list_stats({"list": {"name": "a\x1b[2Jb"}})


@pytest.mark.parametrize(("peak", "top"), [(0.0, 0.001), (0.0004, 0.0004), (0.013, 0.015),
                                           (0.2, 0.2), (0.031, 0.04)])
def test_rate_ticks(peak: float, top: float) -> None:
    ticks = rate_ticks(peak)
    assert ticks[0] == 0 and ticks[-1] == pytest.approx(top) and ticks[-1] >= peak


def test_open_and_click_rates_only_for_what_was_tracked() -> None:
    nl = {"id": 4, "subject": "S", "state": "done", "track": "opens"}
    seen = {"unique_opens": 30, "machine_opens": 12, "unique_clicks": 5, "machine_clicks": 1}
    row = newsletter_row(nl, {"sent": 100}, {}, 0, seen)
    assert (row["tracked"], row["open_rate"], row["click_rate"]) == (["opens"], 0.3, None)
    assert row["machine_opens"] == 12
    untracked = newsletter_row({**nl, "track": None}, {"sent": 100}, {}, 0)
    assert (untracked["tracked"], untracked["open_rate"], untracked["unique_opens"]) == \
        ([], None, 0)
    f = facts()
    f["newsletters"][-1] = row
    assert "<th class=\"num\">Opens</th>" in render_list_html(f)
    assert "OPENS" in format_list_stats(f, width=140)
    assert "OPENS" not in format_list_stats(facts(), width=140)
