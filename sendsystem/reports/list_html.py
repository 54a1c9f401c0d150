"""`sendsystem list stats NAME --html FILE`: one list's statistics as a self-contained page.

The same kind of file as ``stats --html`` (:mod:`sendsystem.reports.html`,
whose stylesheet it shares): no JavaScript, no network references, no web
fonts, a Content-Security-Policy that would block anything that slipped
through, charts drawn here as inline SVG. Three charts: subscribers by status
at each week's end (stacked areas), joins and leaves per week (bars up and
down, leaves by the status they left to), and each newsletter's bounce,
complaint and unsubscribe rates (one small chart each, since they differ by
orders of magnitude) with the least-squares line the trend is read from.
List names, subjects and reasons are escaped where they are interpolated.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import date
from typing import Any

from ..liststats import ols_slope
from .html import _CSS as BASE_CSS
from .html import nice_ticks
from .list_text import RATE_LABELS, STATUS_ORDER, digits_for, pct, points, tracked_any
from .text import as_float, as_int, clean, format_count

STATUS_COLORS: Mapping[str, str] = {"active": "#3aa05b", "unsubscribed": "#6c8ebf",
                                    "bounced": "#e8793a", "complained": "#8e44ad"}
RATE_COLORS: Mapping[str, str] = {"bounce_rate": "#e8793a", "complaint_rate": "#8e44ad",
                                  "unsubscribe_rate": "#6c8ebf"}
JOIN_COLOR = "#3aa05b"

_W, _H = 1000, 300
_L, _R, _T, _B = 70, 20, 16, 40


def _e(value: Any) -> str:
    return html.escape(clean(value), quote=True)


def _compact(n: float) -> str:
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:g}M"
    if abs(n) >= 10_000:
        return f"{n / 1000:g}k"
    return f"{n:,.0f}"


def rate_ticks(peak: float, count: int = 4) -> list[float]:
    """Axis ticks for a fraction from 0 to at least ``peak`` (steps 1, 2, 5 x 10^k)."""
    if peak <= 0:
        return [0.0, 0.001]
    raw = peak / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    top = math.ceil(peak / step - 1e-9) * step
    return [i * step for i in range(round(top / step) + 1)]


def _week_label(text: str, previous: str | None) -> str:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        return text
    if previous is None or previous[:4] != text[:4]:
        return day.strftime("%b %d %Y")
    return day.strftime("%b %d")


def _x_ticks(n: int, max_labels: int = 9) -> list[int]:
    step = max(1, math.ceil(n / max_labels))
    return list(range(0, n, step))


def _frame(cls: str, label: str, width: int = _W, height: int = _H) -> str:
    return (f'<svg class="chart {cls}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(label)}">')


def _empty(cls: str, label: str, message: str, height: int = 140) -> str:
    return (_frame(cls, label, _W, height) + f'<rect class="empty" x="1" y="1" width="{_W - 2}" '
            f'height="{height - 2}" rx="8"/><text class="empty-msg" x="{_W / 2}" '
            f'y="{height / 2 + 5}" text-anchor="middle">{_e(message)}</text></svg>')


def _y_axis(ticks: Sequence[float], y_of: Callable[[float], float], fmt: Callable[[float], str],
            width: int = _W, left: int = _L, right: int = _R) -> list[str]:
    out = []
    for t in ticks:
        y = y_of(t)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/><text class="tick" x="{left - 8}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{_e(fmt(t))}</text>')
    return out


def _x_labels(weeks: Sequence[str], x_of: Callable[[int], float], baseline: float) -> list[str]:
    out = []
    previous: str | None = None
    for i in _x_ticks(len(weeks)):
        x = x_of(i)
        out.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{baseline}" '
                   f'y2="{baseline + 5}"/><text class="tick" x="{x:.1f}" y="{baseline + 20}" '
                   f'text-anchor="middle">{_e(_week_label(weeks[i], previous))}</text>')
        previous = weeks[i]
    return out


def status_svg(weeks: Sequence[Mapping[str, Any]]) -> str:
    """Stacked areas of subscribers by status at each week's end; one
    ``class="series"`` per status."""
    if not weeks:
        return _empty("statuses", "Subscribers by status", "No weeks to show.")
    labels = [clean(w.get("week")) for w in weeks]
    series = [(s, [max(as_int(w.get(s)), 0) for w in weeks]) for s in STATUS_ORDER]
    totals = [sum(v[i] for _, v in series) for i in range(len(weeks))]
    ticks = nice_ticks(max(totals) if totals else 0)
    plot_w, plot_h = _W - _L - _R, _H - _T - _B
    baseline = _H - _B
    n = len(weeks)

    def x_of(i: int) -> float:
        return _L + plot_w / 2 if n == 1 else _L + i / (n - 1) * plot_w

    def y_of(v: float) -> float:
        return baseline - v / ticks[-1] * plot_h

    parts = [_frame("statuses", "Subscribers by status at each week's end")]
    parts += _y_axis(ticks, y_of, _compact)
    base = [0] * n
    for status, values in series:
        top = [b + v for b, v in zip(base, values, strict=True)]
        color = STATUS_COLORS[status]
        title = f"<title>{status}: {values[-1]:,} now</title>"
        if n == 1:
            parts.append(f'<rect class="series" data-status="{status}" x="{x_of(0) - 30:.1f}" '
                         f'y="{y_of(top[0]):.1f}" width="60" '
                         f'height="{y_of(base[0]) - y_of(top[0]):.1f}" fill="{color}">'
                         f"{title}</rect>")
        else:
            upper = " L".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(top))
            lower = " L".join(f"{x_of(i):.1f},{y_of(v):.1f}"
                              for i, v in reversed(list(enumerate(base))))
            parts.append(f'<path class="series" data-status="{status}" d="M{upper} L{lower} Z" '
                         f'fill="{color}" fill-opacity="0.85" stroke="{color}" '
                         f'stroke-width="1">{title}</path>')
        base = top
    parts.append(f'<line class="axis" x1="{_L}" x2="{_W - _R}" y1="{baseline}" '
                 f'y2="{baseline}"/>')
    parts += _x_labels(labels, x_of, baseline)
    parts.append("</svg>")
    return "".join(parts)


def flow_svg(weeks: Sequence[Mapping[str, Any]]) -> str:
    """Joins (up) and leaves (down, stacked by the status they left to) per week; one
    ``class="bar"`` per non-zero part."""
    if not weeks:
        return _empty("flow", "Joins and leaves per week", "No weeks to show.")
    labels = [clean(w.get("week")) for w in weeks]
    joins = [as_int(w.get("joined")) for w in weeks]
    leaves = [{s: as_int((w.get("left_by_status") or {}).get(s)) for s in STATUS_ORDER[1:]}
              for w in weeks]
    up_peak = max(joins, default=0)
    down_peak = max((sum(x.values()) for x in leaves), default=0)
    ticks = nice_ticks(max(up_peak, down_peak, 1))
    plot_w, plot_h = _W - _L - _R, _H - _T - _B
    half = plot_h / 2
    zero = _T + half
    n = len(weeks)
    slot = plot_w / n

    def x_of(i: int) -> float:
        return _L + slot * (i + 0.5)

    def h_of(v: float) -> float:
        return v / ticks[-1] * half

    parts = [_frame("flow", "Joins and leaves per week")]
    for t in ticks:
        for sign in ((1,) if t == 0 else (1, -1)):
            y = zero - sign * h_of(t)
            parts.append(f'<line class="grid" x1="{_L}" x2="{_W - _R}" y1="{y:.1f}" '
                         f'y2="{y:.1f}"/><text class="tick" x="{_L - 8}" y="{y + 4:.1f}" '
                         f'text-anchor="end">{_compact(sign * t)}</text>')
    bar_w = max(slot * 0.7, 1.0)
    for i in range(n):
        x = x_of(i) - bar_w / 2
        if joins[i]:
            parts.append(f'<rect class="bar" data-kind="joined" x="{x:.1f}" '
                         f'y="{zero - h_of(joins[i]):.1f}" width="{bar_w:.1f}" '
                         f'height="{h_of(joins[i]):.1f}" fill="{JOIN_COLOR}">'
                         f'<title>{_e(labels[i])}: {joins[i]:,} joined</title></rect>')
        y = zero
        for status, v in leaves[i].items():
            if not v:
                continue
            parts.append(f'<rect class="bar" data-kind="{status}" x="{x:.1f}" y="{y:.1f}" '
                         f'width="{bar_w:.1f}" height="{h_of(v):.1f}" '
                         f'fill="{STATUS_COLORS[status]}"><title>{_e(labels[i])}: {v:,} '
                         f'{status}</title></rect>')
            y += h_of(v)
    parts.append(f'<line class="axis" x1="{_L}" x2="{_W - _R}" y1="{zero:.1f}" '
                 f'y2="{zero:.1f}"/>')
    parts += _x_labels(labels, x_of, _H - _B)
    parts.append("</svg>")
    return "".join(parts)


def rate_svg(letters: Sequence[Mapping[str, Any]], key: str, window: int = 10) -> str:
    """One rate per newsletter (oldest to newest) with the least-squares line over the
    last ``window`` that have a rate; one ``class="point"`` per newsletter with one."""
    label = RATE_LABELS.get(key, key)
    width, height, left, right, top, bottom = 330, 200, 56, 10, 12, 30
    values = [as_float(n.get(key)) for n in letters]
    known = [(i, v) for i, v in enumerate(values) if v is not None]
    if not known:
        return (f'<svg class="chart rate" data-rate="{_e(key)}" viewBox="0 0 {width} {height}" '
                f'role="img" aria-label="{_e(label)} rate"><rect class="empty" x="1" y="1" '
                f'width="{width - 2}" height="{height - 2}" rx="8"/><text class="empty-msg" '
                f'x="{width / 2}" y="{height / 2}" text-anchor="middle">nothing delivered yet'
                f'</text></svg>')
    ticks = rate_ticks(max(v for _, v in known))
    plot_w, plot_h = width - left - right, height - top - bottom
    baseline = height - bottom
    n = len(values)

    def x_of(i: int) -> float:
        return left + plot_w / 2 if n == 1 else left + i / (n - 1) * plot_w

    def y_of(v: float) -> float:
        return baseline - v / ticks[-1] * plot_h

    color = RATE_COLORS.get(key, "#4e79a7")
    parts = [f'<svg class="chart rate" data-rate="{_e(key)}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{_e(label)} rate per newsletter">']
    parts += _y_axis(ticks, y_of, lambda t: pct(t, 2 if ticks[-1] >= 0.001 else 3),
                     width=width, left=left, right=right)
    if len(known) > 1:
        path = " L".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in known)
        parts.append(f'<path class="line" d="M{path}" fill="none" stroke="{color}" '
                     f'stroke-width="2"/>')
    fit = known[-window:]
    slope = ols_slope([v for _, v in fit]) if len(fit) >= 3 else None
    if slope is not None:
        mean_y = sum(v for _, v in fit) / len(fit)
        mid = (len(fit) - 1) / 2
        y0, y1 = mean_y - slope * mid, mean_y + slope * mid
        parts.append(f'<line class="fit" x1="{x_of(fit[0][0]):.1f}" '
                     f'y1="{y_of(max(y0, 0.0)):.1f}" x2="{x_of(fit[-1][0]):.1f}" '
                     f'y2="{y_of(max(y1, 0.0)):.1f}" stroke="#1f2933" stroke-width="1.5" '
                     f'stroke-dasharray="5 4"/>')
    for i, v in known:
        n_id = as_int(letters[i].get("id"))
        parts.append(f'<circle class="point" cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="3.5" '
                     f'fill="{color}"><title>#{n_id} {_e(letters[i].get("subject"))}: '
                     f'{_e(pct(v, 3))}</title></circle>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{baseline}" '
                 f'y2="{baseline}"/>')
    for i in _x_ticks(n, 6):
        parts.append(f'<text class="tick" x="{x_of(i):.1f}" y="{baseline + 18}" '
                     f'text-anchor="middle">#{as_int(letters[i].get("id"))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _kpi(label: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="kpi {cls}"><div class="label">{label}</div>'
            f'<div class="value">{value}</div><div class="sub">{sub}</div></div>')


def _legend(now: Mapping[str, Any]) -> str:
    items = "".join(f'<li><span class="swatch" style="background:{STATUS_COLORS[s]}"></span>'
                    f'{s} <span class="muted">{format_count(now.get(s))} now</span></li>'
                    for s in STATUS_ORDER)
    return f'<ul class="legend">{items}</ul>'


def _reasons_table(reasons: Sequence[Mapping[str, Any]]) -> str:
    if not reasons:
        return '<p class="muted">Nobody left in these weeks.</p>'
    rows = "".join(f'<tr><td class="num">{format_count(r.get("count"))}</td>'
                   f'<td><span class="swatch" style="background:'
                   f'{STATUS_COLORS.get(clean(r.get("status")), "#888888")}"></span>'
                   f'{_e(r.get("status"))}</td><td>{_e(r.get("reason"))}</td></tr>'
                   for r in reasons)
    return ('<table><thead><tr><th class="num">Count</th><th>Left to</th><th>Reason</th>'
            f'</tr></thead><tbody>{rows}</tbody></table>')


def _newsletters_table(letters: Sequence[Mapping[str, Any]]) -> str:
    if not letters:
        return '<p class="muted">No newsletter has been sent to this list yet.</p>'
    tracking = tracked_any(letters)
    rows = []
    for n in reversed(letters):  # newest first
        change = n.get("change_vs_previous") or {}
        cells = "".join(f'<td class="num">{_e(pct(n.get(k), digits_for(k)))}'
                        f'<div class="muted small">{_e(points(change.get(k), digits_for(k)))}'
                        f'</div></td>' for k in RATE_LABELS)
        if tracking:
            cells += "".join(
                f'<td class="num">{_e(pct(n.get(f"{k}_rate"), 1))}<div class="muted small">'
                f'{format_count(n.get(f"unique_{k}s"))} + {format_count(n.get(f"machine_{k}s"))}'
                f' machine</div></td>' for k in ("open", "click"))
        rows.append(f'<tr><td class="num">#{as_int(n.get("id"))}</td>'
                    f'<td>{_e(clean(n.get("sent_at"))[:10]) or "-"}</td>'
                    f'<td class="subject">{_e(n.get("subject")) or "(no subject)"}</td>'
                    f'<td class="num">{format_count(n.get("delivered"))}</td>{cells}</tr>')
    extra = ('<th class="num">Opens</th><th class="num">Clicks</th>' if tracking else "")
    note = (" Opens and clicks: unique human ones per delivered message, machine ones "
            "(privacy proxies, scanners) counted apart; '-' where not tracked." if tracking
            else "")
    return ('<table><thead><tr><th class="num">#</th><th>Sent</th><th>Subject</th>'
            '<th class="num">Delivered</th><th class="num">Bounce</th>'
            f'<th class="num">Complaint</th><th class="num">Unsubscribe</th>{extra}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>'
            '<p class="muted small">Under each rate: its change against the mean of up to '
            f'five newsletters before it, in percentage points.{note}</p>')


def _trend_card(key: str, letters: Sequence[Mapping[str, Any]],
                trend: Mapping[str, Any]) -> str:
    t = trend.get(key) or {}
    d = digits_for(key) + 1
    where = clean(t.get("direction")) or "unknown"
    return (f'<div class="card rate-card"><h2>{RATE_LABELS[key].capitalize()} rate '
            f'<span class="trend {_e(where)}">{_e(where)}</span></h2>'
            f'{rate_svg(letters, key)}'
            f'<p class="muted small">latest {_e(pct(t.get("latest"), d))}, '
            f'{_e(points(t.get("change"), d))} vs the previous five; slope '
            f'{_e(points(t.get("slope_per_newsletter"), d))} per newsletter over '
            f'{as_int(t.get("newsletters"))}</p></div>')


def render_list_html(facts: Mapping[str, Any]) -> str:
    """The whole report for :func:`sendsystem.liststats.list_stats`'s dict."""
    lst = facts.get("list") or {}
    now = facts.get("now") or {}
    weeks = list(facts.get("weeks") or [])
    letters = list(facts.get("newsletters") or [])
    trend = facts.get("trend") or {}
    total = as_int(now.get("total"))

    def share(key: str) -> str:
        return f"{as_int(now.get(key)) / total:.1%} of all" if total else ""

    kpis = "".join([
        _kpi("Active", format_count(now.get("active")), share("active"), "good"),
        _kpi("Unsubscribed", format_count(now.get("unsubscribed")), share("unsubscribed")),
        _kpi("Bounced", format_count(now.get("bounced")), share("bounced")),
        _kpi("Complained", format_count(now.get("complained")), share("complained")),
        _kpi("Blocked", format_count(now.get("blocked")), "active, stopped by the blocklist"),
    ])
    joined = sum(as_int(w.get("joined")) for w in weeks)
    left = sum(as_int(w.get("left")) for w in weeks)
    span = (f"{_e(weeks[0].get('week'))} to {_e(weeks[-1].get('end'))}" if weeks else "")
    notes = "".join(f"<li>{_e(n)}</li>" for n in facts.get("notes") or [])
    name = _e(lst.get("name")) or "?"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>List {name}: statistics</title>
<style>{BASE_CSS}{_CSS}</style>
</head>
<body>
<main>
<header>
  <div class="eyebrow">List #{as_int(lst.get("id"))} · {_e(lst.get("from"))}</div>
  <h1>{name}</h1>
  <div class="meta"><span class="muted">{format_count(total)} subscriptions ·
  weeks start {_e(facts.get("weeks_start")) or "Monday"} · {span}</span></div>
</header>
<section class="kpis">{kpis}</section>
<section class="card">
  <h2>Subscribers at each week's end <span class="muted">by status</span></h2>
  {status_svg(weeks)}
  {_legend(now)}
</section>
<section class="card">
  <h2>Joins and leaves per week <span class="muted">{joined:,} joined, {left:,} left</span></h2>
  {flow_svg(weeks)}
  <ul class="legend"><li><span class="swatch" style="background:{JOIN_COLOR}"></span>joined</li>
  {"".join(f'<li><span class="swatch" style="background:{STATUS_COLORS[s]}"></span>'
           f'left: {s}</li>' for s in STATUS_ORDER[1:])}</ul>
</section>
<section class="card">
  <h2>Why they left</h2>
  {_reasons_table(list(facts.get("left_by_reason") or []))}
</section>
<section class="grid3">
  {"".join(_trend_card(k, letters, trend) for k in RATE_LABELS)}
</section>
<section class="card">
  <h2>Newsletters <span class="muted">rates per delivered message</span></h2>
  {_newsletters_table(letters)}
</section>
{f'<section class="card"><h2>Notes</h2><ul class="notes">{notes}</ul></section>' if notes else ""}
<footer>SendSystem list report · generated {_e(facts.get("generated_at"))}</footer>
</main>
</body>
</html>
"""


_CSS = """
.grid3 { display: grid; grid-template-columns: repeat(3, 1fr); gap: 16px; }
.grid3 .card { margin-bottom: 16px; }
.small { font-size: 12px; }
td .small { font-size: 11px; }
td.subject { overflow-wrap: anywhere; }
.trend { font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em;
  padding: 1px 8px; border-radius: 999px; margin-left: 8px; background: #eef1f4; }
.trend.rising { background: #fbe1e0; color: #9b2320; }
.trend.falling { background: #dcf3e3; color: #1e6b3a; }
.notes { margin: 0; padding-left: 18px; }
.legend { margin-left: 70px; }
@media (max-width: 760px) { .grid3 { grid-template-columns: 1fr; } }
"""
