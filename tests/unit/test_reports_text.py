"""Text views of status and stats: pure functions over sample dicts."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from sendsystem.reports.text import (
    bar,
    clean,
    display_width,
    fit,
    format_age,
    format_duration,
    format_rate,
    format_stats,
    format_status,
    pivot_timeline,
    sparkline,
    worker_shares,
)

STATUS: dict[str, Any] = {
    "generated_at": "2026-11-27T21:00:00Z",
    "workers": [
        {"id": 3, "name": "sort-a", "host": "srv1", "role": "sort", "pid": 1234, "enabled": True,
         "state": "running", "alive": True, "rate": 812.5, "backlog": 1200,
         "heartbeat_age": 1.3, "messages": 20000},
        {"id": 5, "name": "send-b", "host": "srv2", "role": "send", "pid": 99, "enabled": True,
         "state": "running", "alive": False, "rate": None, "backlog": 500,
         "heartbeat_age": 312.0, "messages": 4000},
        {"id": 6, "name": "send-c", "host": "srv3", "role": "send", "pid": None,
         "enabled": False, "state": "stopped", "alive": False, "rate": None, "backlog": 0,
         "heartbeat_age": 4000, "messages": 0},
    ],
    "newsletters": [
        {"id": 7, "subject": "Black Friday", "list": "news", "state": "running", "total": 20000,
         "done": 12000, "counts": {"sent": 11900, "failed": 100}, "rate": 700.0,
         "eta_seconds": 72.4, "send_at": None, "pause_reason": None},
        {"id": 8, "subject": "Paused one", "list": "promo", "state": "paused", "total": 5000,
         "done": 10, "counts": {}, "rate": None, "eta_seconds": None,
         "pause_reason": "complaint rate over limit"},
    ],
}

STATS: dict[str, Any] = {
    "newsletter": 7, "state": "done", "subject": "Black Friday", "list": "news",
    "created_at": "2026-11-27T20:59:10", "released_at": "2026-11-27T21:00:00",
    "finished_at": "2026-11-27T21:03:00", "total": 20000,
    "counts": {"queued": 0, "merged": 0, "sent": 19936, "deferred": 0, "failed": 20,
               "skipped": 30, "bounced": 14, "cancelled": 0},
    "workers": [
        {"name": "sort-a", "host": "srv1", "role": "sort", "messages": 20000, "rate": 812.5},
        {"name": "send-a", "host": "srv1", "role": "send", "messages": 15000, "rate": 350.2},
        {"name": "send-b", "host": "srv2", "role": "send", "messages": 5000, "rate": None},
    ],
    "timeline": [
        {"minute": "2026-11-27T21:00", "worker": "send-a", "sent": 5000},
        {"minute": "2026-11-27T21:00", "worker": "send-b", "sent": 2000},
        {"minute": "2026-11-27T21:02", "worker": "send-a", "sent": 10000},
        {"minute": "2026-11-27T21:02", "worker": "send-b", "sent": 3000},
    ],
    "replies": [{"code": 250, "reply": "250 2.0.0 Ok", "count": 19950},
                {"code": 550, "reply": "550 5.1.1 User unknown", "count": 20}],
    "deferrals": 42,
    "bounces": {"hard": 10, "soft": 3, "blocked": 2, "complaint": 1, "autoreply": 0},
    "bounce_rate": 0.0007, "complaint_rate": 0.00005, "pause_reason": None,
    "duration_seconds": 180.4, "rate": 110.8,
}


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0, "0s"), (0.4, "0s"), (42, "42s"), (72.4, "1m 12s"), (3600, "1h 00m"),
    (7500, "2h 05m"), (90000, "1d 01h"), (-5, "0s"), ("garbage", "-"),
])
def test_format_duration(seconds: Any, text: str) -> None:
    assert format_duration(seconds) == text


def test_small_formatters() -> None:
    assert format_rate(None) == "-"
    assert format_rate(812.5) == "812.5/s"
    assert format_rate(12345.67) == "12,345.7/s"
    assert format_age(1.25) == "1.2s" or format_age(1.25) == "1.3s"
    assert format_age(312) == "5m 12s"
    assert format_age(None) == "-"


def test_clean_removes_terminal_escapes_and_line_breaks() -> None:
    assert clean("a\x1b[31mred\r\nb\u202e") == "a?[31mred  b?"
    assert clean(None) == ""


def test_fit_respects_wide_characters() -> None:
    assert fit("日本語のニュース", 7) == "日本語…"
    assert display_width(fit("日本語のニュース", 7)) == 7
    assert fit("abc", 5, ">") == "  abc"
    assert fit("abcdef", 4) == "abc…"


def test_bar_and_sparkline() -> None:
    assert bar(0.5, 10, ascii_only=True) == "#####....."
    assert display_width(bar(0.33, 20)) == 20
    assert bar(2.0, 4) == "████"
    assert sparkline([0, 1, 2, 4]) == " ▂▄█"
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    assert len(sparkline(list(range(500)), width=50)) == 50


def test_status_marks_dead_worker_but_not_cleanly_stopped_one() -> None:
    text = format_status(STATUS)
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert "DEAD" in lines["5"]
    assert "DEAD" not in lines["6"] and "stopped" in lines["6"] and "NO" in lines["6"]
    assert "1 DEAD" in text
    assert "5m 12s" in lines["5"]


def test_status_newsletters_progress_rate_eta_and_pause_reason() -> None:
    text = format_status(STATUS)
    row = next(line for line in text.splitlines() if "Black Friday" in line)
    assert "60.0%" in row and "700.0/s" in row and "1m 12s" in row and "12,000/20,000" in row
    assert "#8 paused: complaint rate over limit" in text
    assert "#7 failed 100" in text


def test_status_fits_width() -> None:
    for width in (60, 80, 100, 140):
        for line in format_status(STATUS, width=width).splitlines():
            assert display_width(line) <= width, (width, line)


def test_status_shows_db_node_and_balancer_leases() -> None:
    facts = {**STATUS,
             "workers": [{**w, "db_node": f"db{i}:3306"} for i, w in enumerate(STATUS["workers"])],
             "leases": {"send": {"holder": 9, "holder_name": "b", "holder_host": "srv2",
                                 "epoch": 4, "expires_in": 12.5},
                        "sort": {"holder": None, "epoch": 0, "expires_in": None}}}
    text = format_status(facts, width=140)
    assert "DB NODE" in text and "db1:3306" in text
    assert "send balancer lease: worker 9 b on srv2, epoch 4" in text
    assert "sort balancer lease: free (no active balancer)" in text
    assert "DB NODE" not in format_status(facts, width=80)  # dropped first when narrow


def test_status_colour_only_when_asked() -> None:
    assert "\x1b[" not in format_status(STATUS)
    coloured = format_status(STATUS, color=True)
    assert "\x1b[1;31mDEAD" in coloured


def test_status_ascii_only() -> None:
    text = format_status(STATUS, ascii_only=True)
    assert text.isascii() or all(ord(c) < 128 or c == "…" for c in text)
    assert "############" in text


def test_status_empty_and_missing_keys() -> None:
    text = format_status({})
    assert "No workers registered" in text
    assert "No newsletters in progress" in text
    text = format_status({"workers": [{"id": 1}], "newsletters": [{"id": 2, "total": 0}]})
    assert "0.0%" in text


def test_status_does_not_pass_control_characters_through() -> None:
    status = copy.deepcopy(STATUS)
    status["newsletters"][0]["subject"] = "Hi\x1b]0;pwned\x07\r\nthere"
    text = format_status(status, width=200)
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "Hi?]0;pwned?  there" in text


def test_stats_sections() -> None:
    text = format_stats(STATS)
    assert "Newsletter #7: Black Friday" in text
    assert "duration 3m 00s" in text
    assert "sent          19,936   99.7%" in text
    assert "Deferrals: 42" in text
    assert "550 5.1.1 User unknown" in text
    assert "hard 10, soft 3, blocked 2, complaint 1, autoreply 0" in text
    assert "bounce rate 0.070%" in text and "complaint rate 0.0050%" in text
    # The missing minute 21:01 shows as a zero, not as a silently skipped line.
    minutes = [line.split()[0] for line in text.splitlines() if line.startswith("  21:")]
    assert minutes == ["21:00", "21:01", "21:02"]
    workers = text.split("\nWorkers\n")[1].splitlines()
    send_a = next(line for line in workers if line.strip().startswith("send-a"))
    assert "75.0%" in send_a and "350.2/s" in send_a
    sort_a = next(line for line in workers if line.strip().startswith("sort-a"))
    assert "100.0%" in sort_a   # shares are within a role


def test_stats_pause_reason_and_none_rates() -> None:
    stats = dict(STATS, pause_reason="relay down", rate=None, duration_seconds=None,
                 bounce_rate=None)
    text = format_stats(stats)
    assert "PAUSED: relay down" in text
    assert "rate -" in text and "duration -" in text and "bounce rate -" in text


def test_stats_empty() -> None:
    text = format_stats({"newsletter": 9})
    assert "Nothing sent yet" in text
    assert "No worker has handled" in text
    assert "No SMTP replies" in text


def test_stats_long_timeline_uses_sparklines() -> None:
    timeline = [{"minute": f"2026-11-27T{h:02d}:{m:02d}", "worker": "w", "sent": m}
                for h in (21, 22) for m in range(60)]
    text = format_stats(dict(STATS, timeline=timeline))
    assert "21:00 … 22:59, peak 59/min" in text
    assert any(line.strip().startswith("w ") for line in text.splitlines())


def test_pivot_timeline_fills_gaps_and_sums_duplicates() -> None:
    tl = pivot_timeline([
        {"minute": "2026-11-27 23:59", "worker": "b", "sent": 1},
        {"minute": "2026-11-28T00:02", "worker": "a", "sent": 2},
        {"minute": "2026-11-28T00:02", "worker": "a", "sent": 3},
        {"minute": "", "worker": "a", "sent": 99},
    ])
    assert tl.minutes == ("2026-11-27T23:59", "2026-11-28T00:00", "2026-11-28T00:01",
                          "2026-11-28T00:02")
    assert tl.workers == ("a", "b")
    assert tl.sent == ((0, 0, 0, 5), (1, 0, 0, 0))
    assert tl.totals() == [1, 0, 0, 5]
    assert pivot_timeline(None).minutes == ()


def test_worker_shares_per_role_and_zero() -> None:
    shares = worker_shares([{"role": "send", "messages": 3}, {"role": "send", "messages": 1},
                            {"role": "sort", "messages": 0}])
    assert [round(s, 2) for _, s in shares] == [0.75, 0.25, 0.0]
