"""`sendsystem list stats NAME` in a terminal: a pure function over the facts dict
(:func:`sendsystem.liststats.list_stats`, what ``--json`` prints).

Every key is optional (a list with no newsletter yet, no history yet), and
text that customers wrote (list names, subjects) goes through
:func:`~sendsystem.reports.text.clean`, as in ``stats``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .text import Column, as_float, as_int, clean, format_count, render_table, sparkline

STATUS_ORDER = ("active", "unsubscribed", "bounced", "complained")
RATE_LABELS = {"bounce_rate": "bounce", "complaint_rate": "complaint",
               "unsubscribe_rate": "unsubscribe"}


def pct(fraction: Any, digits: int = 2) -> str:
    f = as_float(fraction)
    return "-" if f is None else f"{f * 100:.{digits}f}%"


def points(change: Any, digits: int = 2) -> str:
    """A change of a rate in percentage points: '+0.12 pt'."""
    f = as_float(change)
    return "-" if f is None else f"{f * 100:+.{digits}f} pt"


def digits_for(key: str) -> int:
    """Complaint rates are a hundred times smaller: one more decimal."""
    return 3 if key == "complaint_rate" else 2


def _top_reason(week: Mapping[str, Any]) -> str:
    reasons = week.get("left_by_reason") or {}
    if not reasons:
        return ""
    reason, n = max(reasons.items(), key=lambda kv: (as_int(kv[1]), str(kv[0])))
    return f"{clean(reason)} ({as_int(n):,})"


def _weeks(weeks: Sequence[Mapping[str, Any]], width: int) -> list[str]:
    if not weeks:
        return ["  No weeks to show."]
    cols = [Column("WEEK"), Column("ACTIVE", ">"), Column("UNSUB", ">"), Column("BOUNCED", ">"),
            Column("COMPL", ">"), Column("JOINED", ">"), Column("LEFT", ">"),
            Column("COMMONEST REASON", shrink=True, min_width=10, drop=1)]
    rows = [[(clean(w.get("week")), None), (format_count(w.get("active")), None),
             (format_count(w.get("unsubscribed")), None), (format_count(w.get("bounced")), None),
             (format_count(w.get("complained")), None), (format_count(w.get("joined")), None),
             (format_count(w.get("left")), None), (_top_reason(w), None)] for w in weeks]
    lines = render_table(cols, rows, width=width, color=False)
    actives = [float(as_int(w.get("active"))) for w in weeks]
    if len(actives) > 1:
        lines.append(f"  active  {sparkline(actives, width=min(60, width - 30))}  "
                     f"{as_int(weeks[0].get('active')):,} -> {as_int(weeks[-1].get('active')):,}")
    return lines


def tracked_any(letters: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any of these newsletters tracked opens or clicks (then the reports show them)."""
    return any(n.get("tracked") for n in letters)


def _newsletters(letters: Sequence[Mapping[str, Any]], width: int) -> list[str]:
    if not letters:
        return ["  No newsletter has been sent to this list yet."]
    tracking = tracked_any(letters)
    cols = [Column("ID", ">"), Column("SENT"), Column("SUBJECT", shrink=True, min_width=8),
            Column("DELIVERED", ">"), Column("BOUNCE", ">"), Column("COMPLAINT", ">"),
            Column("UNSUB", ">"), Column("UNSUB VS PREV", ">", drop=2)]
    if tracking:
        cols += [Column("OPENS", ">", drop=1), Column("CLICKS", ">", drop=1)]
    rows = []
    for n in letters:
        change = (n.get("change_vs_previous") or {}).get("unsubscribe_rate")
        row = [(str(as_int(n.get("id"))), None),
               (clean(n.get("sent_at"))[:10] or "-", None),
               (clean(n.get("subject")) or "(no subject)", None),
               (format_count(n.get("delivered")), None),
               (pct(n.get("bounce_rate")), None), (pct(n.get("complaint_rate"), 3), None),
               (pct(n.get("unsubscribe_rate")), None), (points(change), None)]
        if tracking:
            row += [(pct(n.get("open_rate"), 1), None), (pct(n.get("click_rate"), 1), None)]
        rows.append(row)
    lines = render_table(cols, rows, width=width, color=False)
    if tracking:
        lines.append("  opens and clicks: unique human ones per delivered message "
                     "(machine ones apart in --json); '-' where not tracked")
    return lines


def _trend(trend: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, label in RATE_LABELS.items():
        t = trend.get(key) or {}
        if not as_int(t.get("newsletters")):
            continue
        d = digits_for(key)
        lines.append(f"  {label:<11} latest {pct(t.get('latest'), d + 1)}, "
                     f"vs previous {points(t.get('change'), d + 1)}, "
                     f"slope {points(t.get('slope_per_newsletter'), d + 1)}/newsletter over "
                     f"{as_int(t.get('newsletters'))}: {clean(t.get('direction')) or '?'}")
    return lines or ["  Nothing delivered yet."]


def format_list_stats(facts: Mapping[str, Any], *, width: int = 100) -> str:
    """The whole report as plain text."""
    lst = facts.get("list") or {}
    now = facts.get("now") or {}
    lines = [f"List {clean(lst.get('name')) or '?'} (id {as_int(lst.get('id'))}), "
             f"{clean(lst.get('from'))}",
             f"  now: {format_count(now.get('total'))} subscribers: "
             + ", ".join(f"{s} {format_count(now.get(s))}" for s in STATUS_ORDER)
             + f"; blocked {format_count(now.get('blocked'))} of the active",
             f"  generated {clean(facts.get('generated_at')) or '-'}; weeks start "
             f"{clean(facts.get('weeks_start')) or 'Monday'}", "",
             "Subscribers at each week's end"]
    lines += _weeks(list(facts.get("weeks") or []), width)
    reasons = list(facts.get("left_by_reason") or [])
    lines += ["", "Why they left (these weeks)"]
    if reasons:
        lines += render_table([Column("COUNT", ">"), Column("STATUS"),
                               Column("REASON", shrink=True, min_width=10)],
                              [[(format_count(r.get("count")), None),
                                (clean(r.get("status")), None), (clean(r.get("reason")), None)]
                               for r in reasons], width=width, color=False)
    else:
        lines.append("  Nobody left.")
    lines += ["", "Newsletters (oldest first; rates per delivered message)"]
    lines += _newsletters(list(facts.get("newsletters") or []), width)
    lines += ["", "Trend"]
    lines += _trend(facts.get("trend") or {})
    notes = [clean(n) for n in facts.get("notes") or []]
    if notes:
        lines += ["", "Notes"] + [f"  - {n}" for n in notes]
    return "\n".join(lines) + "\n"
