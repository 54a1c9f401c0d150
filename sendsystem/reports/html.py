"""One newsletter's statistics as a single self-contained HTML file.

``sendsystem stats ID --html FILE`` writes :func:`render_html` of the stats
dict. The file is meant to be mailed to a customer or attached to a ticket,
so it stands alone: no JavaScript, no network references, no web fonts, and
the charts are inline SVG drawn here (a charting library would mean either a
dependency or a ``<script>``). A Content-Security-Policy meta tag backs this
up: even if something slipped through, the browser would load nothing.

Everything that comes from outside (subjects and list names are written by
customers, SMTP replies by remote servers) is HTML-escaped at the point of
interpolation via :func:`_e`.
"""

from __future__ import annotations

import colorsys
import html
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from ..states import MessageState
from ..tracking.present import html_section as tracking_html_section
from .text import (
    BOUNCE_CLASSES,
    Timeline,
    as_float,
    as_int,
    clean,
    format_count,
    format_duration,
    format_percent,
    format_rate,
    ordered_counts,
    pivot_timeline,
    worker_shares,
)

log = logging.getLogger(__name__)

# Categorical palette for workers (Tableau 10 plus two); it repeats beyond 12
# workers, where the legend's order and the hover titles tell bands apart.
WORKER_COLORS: tuple[str, ...] = (
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
    "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac", "#499894", "#d37295",
)
STATE_COLORS: Mapping[str, str] = {
    MessageState.QUEUED: "#a0aab5", MessageState.MERGED: "#6c8ebf",
    MessageState.DEFERRED: "#f2b134", MessageState.SENT: "#3aa05b",
    MessageState.FAILED: "#d64541", MessageState.SKIPPED: "#b9a3d0",
    MessageState.BOUNCED: "#e8793a", MessageState.CANCELLED: "#5f6b7a",
}
BOUNCE_COLORS: Mapping[str, str] = {
    "hard": "#d64541", "soft": "#f2b134", "blocked": "#5f6b7a", "complaint": "#8e44ad",
    "autoreply": "#7f8c8d",
}
# Beyond the palette, further workers get hues a golden angle apart (still
# deterministic by worker order, and never a repeat of a neighbour's colour).
_GOLDEN_ANGLE = 137.508
# What one timeline point covers, by the bucket stats.timeline_detail chose.
_BUCKET_UNITS: Mapping[int, str] = {1: "second", 10: "10 s", 60: "minute", 600: "10 min",
                                    3600: "hour", 86400: "day"}
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400, 172800, 604800)


def worker_color(index: int) -> str:
    """The colour of the ``index``-th worker (sorted by name): the palette, then distinct hues."""
    if index < len(WORKER_COLORS):
        return WORKER_COLORS[index]
    hue = ((index - len(WORKER_COLORS)) * _GOLDEN_ANGLE + 15.0) % 360.0
    r, g, b = colorsys.hls_to_rgb(hue / 360.0, 0.45, 0.55)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def bucket_unit(bucket_seconds: int) -> str:
    return _BUCKET_UNITS.get(bucket_seconds, f"{bucket_seconds} s")


def pivot_buckets(detail: Mapping[str, Any]) -> Timeline:
    """stats' ``timeline_detail`` ({"bucket_seconds", "rows": [{"at", "worker", "sent"}]})
    as a dense :class:`Timeline`: every bucket from the first to the last, zeros filled."""
    bucket = max(1, as_int(detail.get("bucket_seconds")))
    cells: dict[tuple[datetime, str], int] = {}
    for row in detail.get("rows") or ():
        when = _parse(clean(row.get("at")))
        if when is None:
            continue
        worker = clean(row.get("worker")) or "?"
        cells[when, worker] = cells.get((when, worker), 0) + as_int(row.get("sent"))
    if not cells:
        return Timeline((), (), (), bucket)
    first, last = min(t for t, _ in cells), max(t for t, _ in cells)
    count = min(int((last - first).total_seconds()) // bucket + 1, 10_000)
    points = [first + timedelta(seconds=i * bucket) for i in range(count)]
    workers = sorted({w for _, w in cells})
    sent = tuple(tuple(cells.get((p, w), 0) for p in points) for w in workers)
    return Timeline(tuple(p.strftime("%Y-%m-%dT%H:%M:%S") for p in points), tuple(workers),
                    sent, bucket)


# Thresholds at which the health figures turn amber. Mailbox providers'
# published sender guidelines ask for spam complaints well under 0.3% and
# treat bounce rates of a few percent as a sign of a stale list.
COMPLAINT_WARN = 0.001
BOUNCE_WARN = 0.02


def _e(value: Any) -> str:
    """Escape for HTML text and attribute values (after stripping control characters)."""
    return html.escape(clean(value), quote=True)


def _compact(n: float) -> str:
    """Axis label: 950, 1,500, 12k, 1.2M."""
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:g}M"
    if abs(n) >= 10_000:
        return f"{n / 1000:g}k"
    return f"{n:,.0f}"


def nice_ticks(peak: float, count: int = 5) -> list[float]:
    """Round axis ticks from 0 to at least ``peak`` (steps of 1, 2, 2.5 or 5 x 10^k)."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / count
    magnitude = 10 ** math.floor(math.log10(raw))
    # Message counts are whole numbers: no 2.5 steps below 10, no steps below 1.
    steps = (1, 2, 2.5, 5, 10) if magnitude >= 10 else (1, 2, 5, 10)
    step = max(1.0, next(m * magnitude for m in steps if m * magnitude >= raw))
    top = math.ceil(peak / step - 1e-9) * step
    return [i * step for i in range(round(top / step) + 1)]


# --------------------------------------------------------------------------- chart (a)

_W, _H = 1000, 320
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 64, 20, 16, 44


def _minute_labels(minutes: Sequence[str], max_labels: int = 9, bucket: int = 60
                   ) -> list[tuple[int, str]]:
    """(index, label) of the x-axis ticks, on round clock times when they parse."""
    n = len(minutes)
    span = n * bucket
    step = next((s for s in _TICK_STEPS if s >= bucket and span / s <= max_labels),
                max(bucket, span // max_labels))
    every = max(1, step // bucket)
    fmt = "%H:%M:%S" if step < 60 else "%H:%M"
    parsed = [_parse(m) for m in minutes]
    ticks: list[tuple[int, str]] = []
    last_day = None
    epoch = datetime(1970, 1, 1)
    for i, (raw, when) in enumerate(zip(minutes, parsed, strict=True)):
        on_tick = int((when.replace(tzinfo=None) - epoch).total_seconds()) % step == 0 \
            if when else i % every == 0
        if not on_tick:
            continue
        if when is None:
            ticks.append((i, raw[-5:]))
            continue
        day = when.date()
        label = when.strftime(fmt) if day == last_day or last_day is None \
            else when.strftime(f"%b %d {fmt}")
        last_day = day
        ticks.append((i, label))
    return ticks or [(0, minutes[0][-5:])]


def _parse(minute: str) -> datetime | None:
    try:
        return datetime.fromisoformat(minute)
    except ValueError:
        return None


def _y_axis(ticks: list[float], y_of: Any, title: str) -> list[str]:
    out = []
    for t in ticks:
        y = y_of(t)
        out.append(f'<line class="grid" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{_PAD_L - 8}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{_compact(t)}</text>')
    mid = _PAD_T + (_H - _PAD_T - _PAD_B) / 2
    out.append(f'<text class="axis-title" transform="translate(16 {mid:.0f}) rotate(-90)" '
               f'text-anchor="middle">{_e(title)}</text>')
    return out


def _empty_svg(cls: str, label: str, message: str, width: int = _W, height: int = 160) -> str:
    return (f'<svg class="chart {cls}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{_e(label)}"><rect class="empty" x="1" y="1" width="{width - 2}" '
            f'height="{height - 2}" rx="8"/><text class="empty-msg" x="{width / 2}" '
            f'y="{height / 2 + 5}" text-anchor="middle">{_e(message)}</text></svg>')


def timeline_svg(timeline: Timeline) -> str:
    """Stacked area chart of messages sent per bucket (second to day), one band per worker.

    A single minute cannot make an area, so it is drawn as one stacked column;
    either way there is exactly one ``class="series"`` element per worker.
    """
    unit = bucket_unit(timeline.bucket_seconds)
    if not timeline.minutes:
        return _empty_svg("timeline", f"Messages sent per {unit}",
                          "Nothing sent yet: the chart appears with the first delivered message.")
    totals = timeline.totals()
    ticks = nice_ticks(max(totals))
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B
    x_bottom = _H - _PAD_B

    def y_of(v: float) -> float:
        return x_bottom - v / ticks[-1] * plot_h

    n = len(timeline.minutes)
    single = n == 1

    def x_of(i: int) -> float:
        return _PAD_L + plot_w / 2 if single else _PAD_L + i / (n - 1) * plot_w

    parts = [f'<svg class="chart timeline" viewBox="0 0 {_W} {_H}" role="img" '
             f'aria-label="Messages sent per {unit} by worker">']
    parts += _y_axis(ticks, y_of, f"messages / {unit}")
    base = [0] * n
    for w, (worker, series) in enumerate(zip(timeline.workers, timeline.sent, strict=True)):
        color = worker_color(w)
        top = [b + v for b, v in zip(base, series, strict=True)]
        title = f"<title>{_e(worker)}: {sum(series):,} sent</title>"
        if single:
            x = x_of(0) - 40
            parts.append(f'<rect class="series" data-worker="{_e(worker)}" x="{x:.1f}" '
                         f'y="{y_of(top[0]):.1f}" width="80" '
                         f'height="{y_of(base[0]) - y_of(top[0]):.1f}" fill="{color}">'
                         f'{title}</rect>')
        else:
            upper = " L".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(top))
            lower = " L".join(f"{x_of(i):.1f},{y_of(v):.1f}"
                              for i, v in reversed(list(enumerate(base))))
            parts.append(f'<path class="series" data-worker="{_e(worker)}" '
                         f'd="M{upper} L{lower} Z" fill="{color}" fill-opacity="0.82" '
                         f'stroke="{color}" stroke-width="1.5" stroke-linejoin="round">'
                         f'{title}</path>')
        base = top
    parts.append(f'<line class="axis" x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{x_bottom}" '
                 f'y2="{x_bottom}"/>')
    for i, label in _minute_labels(timeline.minutes, bucket=timeline.bucket_seconds):
        x = x_of(i)
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{x_bottom}" '
                     f'y2="{x_bottom + 5}"/>')
        anchor = "start" if x < _PAD_L + 20 and not single else \
            "end" if x > _W - _PAD_R - 20 and not single else "middle"
        parts.append(f'<text class="tick" x="{x:.1f}" y="{x_bottom + 20}" '
                     f'text-anchor="{anchor}">{_e(label)}</text>')
    parts.append(f'<text class="axis-title" x="{_PAD_L + plot_w / 2:.0f}" y="{_H - 4}" '
                 f'text-anchor="middle">'
                 f'{"minute" if timeline.bucket_seconds == 60 else "time"} (UTC)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _timeline_legend(timeline: Timeline) -> str:
    items = []
    for w, (worker, series) in enumerate(zip(timeline.workers, timeline.sent, strict=True)):
        color = worker_color(w)
        per = "min" if timeline.bucket_seconds == 60 else bucket_unit(timeline.bucket_seconds)
        items.append(f'<li><span class="swatch" style="background:{color}"></span>'
                     f'{_e(worker)} <span class="muted">{sum(series):,} sent, peak '
                     f'{max(series):,}/{_e(per)}</span></li>')
    return f'<ul class="legend">{"".join(items)}</ul>' if items else ""


# --------------------------------------------------------------------------- chart (b)

def _segment_widths(values: Sequence[int], width: float, minimum: float = 5.0) -> list[float]:
    """Proportional widths where no non-zero value is thinner than ``minimum`` pixels.

    20 failures out of 20,000 must stay visible; the room they need is taken
    from the widest segment, which barely changes by it.
    """
    total = sum(values)
    if not total:
        return [0.0] * len(values)
    widths = [v / total * width for v in values]
    extra = 0.0
    for i, (v, w) in enumerate(zip(values, widths, strict=True)):
        if v and w < minimum:
            extra += minimum - w
            widths[i] = minimum
    widest = max(range(len(widths)), key=lambda i: widths[i])
    widths[widest] -= extra
    return widths


def states_svg(counts: list[tuple[str, int]]) -> str:
    """Horizontal stacked bar of messages by state; one ``class="segment"`` per non-zero state."""
    total = sum(n for _, n in counts)
    if not total:
        return _empty_svg("states", "Messages by state", "No messages yet.", height=72)
    width, height, bar_h = 1000, 56, 40
    widths = _segment_widths([n for _, n in counts], width)
    parts = [f'<svg class="chart states" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="Messages by state"><clipPath id="states-clip"><rect x="0" y="8" '
             f'width="{width}" height="{bar_h}" rx="6"/></clipPath>'
             f'<g clip-path="url(#states-clip)">']
    x = 0.0
    for (state, n), w in zip(counts, widths, strict=True):
        if not n:
            continue
        color = STATE_COLORS.get(state, "#888888")
        parts.append(f'<rect class="segment" data-state="{_e(state)}" x="{x:.2f}" y="8" '
                     f'width="{w:.2f}" height="{bar_h}" fill="{color}">'
                     f'<title>{_e(state)}: {n:,} ({n / total:.1%})</title></rect>')
        label = f"{state} {n / total:.1%}"
        if w > len(label) * 8.5 + 24:   # only where the label fits (14px bold ≈ 8.5px/char)
            parts.append(f'<text class="seg-label" x="{x + 12:.1f}" y="{8 + bar_h / 2 + 5}">'
                         f'{_e(label)}</text>')
        x += w
    parts.append("</g></svg>")
    return "".join(parts)


def _states_legend(counts: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in counts)
    items = []
    for state, n in counts:
        color = STATE_COLORS.get(state, "#888888")
        share = f"{n / total:.1%}" if total else "-"
        items.append(f'<li class="{"zero" if not n else ""}"><span class="swatch" '
                     f'style="background:{color}"></span><span class="name">{_e(state)}</span>'
                     f'<span class="num">{n:,}</span><span class="muted">{share}</span></li>')
    return f'<ul class="state-legend">{"".join(items)}</ul>'


# --------------------------------------------------------------------------- chart (c)

def bounces_svg(bounces: Mapping[str, Any]) -> str:
    """Vertical bars of bounces by class; always one ``class="bar"`` per class."""
    width, height = 520, 260
    left, right, top_pad, bottom = 48, 12, 24, 36
    values = [as_int(bounces.get(k)) for k in BOUNCE_CLASSES]
    # With nothing to show, a 0..1 scale would only suggest a measurement.
    ticks = nice_ticks(max(values), 4) if any(values) else [0.0, 1.0]
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    baseline = height - bottom
    slot = plot_w / len(values)
    parts = [f'<svg class="chart bounces" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="Bounces by class">']
    for t in ticks if any(values) else ():
        y = baseline - t / ticks[-1] * plot_h
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="tick" x="{left - 8}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{_compact(t)}</text>')
    for i, (cls, v) in enumerate(zip(BOUNCE_CLASSES, values, strict=True)):
        h = v / ticks[-1] * plot_h
        x = left + i * slot + slot * 0.2
        cx = left + i * slot + slot / 2
        parts.append(f'<rect class="bar" data-class="{cls}" x="{x:.1f}" y="{baseline - h:.1f}" '
                     f'width="{slot * 0.6:.1f}" height="{h:.1f}" rx="3" '
                     f'fill="{BOUNCE_COLORS[cls]}"><title>{cls}: {v:,}</title></rect>')
        parts.append(f'<text class="value" x="{cx:.1f}" y="{baseline - h - 7:.1f}" '
                     f'text-anchor="middle">{v:,}</text>')
        parts.append(f'<text class="tick" x="{cx:.1f}" y="{baseline + 20}" '
                     f'text-anchor="middle">{cls}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{width - right}" y1="{baseline}" '
                 f'y2="{baseline}"/>')
    if not any(values):
        parts.append(f'<text class="empty-msg" x="{left + plot_w / 2:.0f}" '
                     f'y="{top_pad + plot_h / 2:.0f}" text-anchor="middle">'
                     f'No bounces recorded</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- tables

def _workers_table(workers: list[Mapping[str, Any]], timeline: Timeline) -> str:
    if not workers:
        return '<p class="muted">No worker has handled this newsletter yet.</p>'
    colors = {w: worker_color(i) for i, w in enumerate(timeline.workers)}
    role_rank = {"sort": 0, "send": 1}
    shares = sorted(worker_shares(workers),
                    key=lambda ws: (role_rank.get(clean(ws[0].get("role")), 2),
                                    -as_int(ws[0].get("messages")), clean(ws[0].get("name"))))
    rows = []
    for w, share in shares:
        name = clean(w.get("name"))
        swatch = (f'<span class="swatch" style="background:{colors[name]}"></span>'
                  if name in colors else '<span class="swatch blank"></span>')
        rows.append(
            f"<tr><td>{swatch}{_e(name) or '-'}</td><td>{_e(w.get('host')) or '-'}</td>"
            f"<td><span class=\"role\">{_e(w.get('role')) or '-'}</span></td>"
            f'<td class="num">{format_count(w.get("messages"))}</td>'
            f'<td class="share"><span class="meter"><span style="width:{share * 100:.1f}%">'
            f"</span></span>{share:.1%}</td>"
            f'<td class="num">{_e(format_rate(w.get("rate")))}</td></tr>')
    return ('<table><thead><tr><th>Worker</th><th>Host</th><th>Role</th>'
            '<th class="num">Messages</th><th>Share of role</th><th class="num">Rate</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _replies_table(replies: list[Mapping[str, Any]]) -> str:
    if not replies:
        return '<p class="muted">No SMTP replies recorded yet.</p>'
    rows = []
    for r in replies:
        code = clean(r.get("code"))
        kind = {"2": "ok", "4": "temp", "5": "perm"}.get(code[:1], "other")
        rows.append(f'<tr><td class="num">{format_count(r.get("count"))}</td>'
                    f'<td><span class="code {kind}">{_e(code) or "-"}</span></td>'
                    f'<td class="reply">{_e(r.get("reply"))}</td></tr>')
    return ('<table><thead><tr><th class="num">Count</th><th>Code</th><th>Reply</th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _failures_table(failures: list[Mapping[str, Any]]) -> str:
    if not failures:
        return '<p class="muted">No message failed.</p>'
    rows = "".join(f'<tr><td class="num">{format_count(f.get("count"))}</td>'
                   f'<td class="reply">{_e(f.get("reason"))}</td></tr>' for f in failures)
    return ('<table><thead><tr><th class="num">Count</th><th>Reason</th></tr>'
            f'</thead><tbody>{rows}</tbody></table>')


# --------------------------------------------------------------------------- page

def _kpi(label: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="kpi {cls}"><div class="label">{label}</div>'
            f'<div class="value">{value}</div><div class="sub">{sub}</div></div>')


def _level(rate: float | None, warn: float) -> str:
    return "unknown" if rate is None else "warn" if rate >= warn else "ok"


def _health(stats: Mapping[str, Any]) -> str:
    bounce_rate = as_float(stats.get("bounce_rate"))
    complaint_rate = as_float(stats.get("complaint_rate"))
    rows = [
        ("Deferral events", format_count(stats.get("deferrals")), "",
         "4xx replies and unreachable relays; each was retried with back-off"),
        ("Bounce rate", _e(format_percent(bounce_rate, 2)), _level(bounce_rate, BOUNCE_WARN),
         f"bounces per sent message; watch above {BOUNCE_WARN:.0%}"),
        ("Complaint rate", _e(format_percent(complaint_rate, 3)),
         _level(complaint_rate, COMPLAINT_WARN),
         f"spam reports per sent message; keep below {COMPLAINT_WARN:.1%}"),
        ("Unverified reports", format_count((stats.get("bounces") or {}).get("unverified")), "",
         "bounces and complaints without signed evidence: kept, changed nothing, "
         "not in the rates above"),
    ]
    return '<dl class="health">' + "".join(
        f'<div class="{cls}"><dt>{label}</dt><dd>{value}</dd><dd class="hint">{hint}</dd></div>'
        for label, value, cls, hint in rows) + "</dl>"


def render_html(stats: Mapping[str, Any]) -> str:
    """The whole report for one newsletter's stats dict, as one HTML document."""
    counts = ordered_counts(stats.get("counts"))
    counted = sum(n for _, n in counts)
    total = as_int(stats.get("total")) or counted
    by_state = dict(counts)
    detail = stats.get("timeline_detail")
    timeline = pivot_buckets(detail) if isinstance(detail, Mapping) and detail.get("rows") \
        else pivot_timeline(stats.get("timeline"))
    ident, subject = _e(stats.get("newsletter", "?")), _e(stats.get("subject"))
    state = clean(stats.get("state")) or "unknown"
    # The stored subject is the template every recipient's subject came from.
    raw_subject = str(stats.get("subject") or "")
    templated = " · subject template" if "{{" in raw_subject or "{%" in raw_subject else ""

    def pct(n: int) -> str:
        return f"{n / total:.1%} of total" if total else ""

    times = " · ".join(f"{k} {_e(stats.get(f'{k}_at')).replace('T', ' ')}" for k in
                       ("created", "released", "finished") if stats.get(f"{k}_at"))
    pause = (f'<div class="banner">Paused: {_e(stats.get("pause_reason"))}</div>'
             if stats.get("pause_reason") else "")
    sent, failed = by_state[MessageState.SENT], by_state[MessageState.FAILED]
    kpis = "".join([
        _kpi("Total", format_count(total), "recipients"),
        _kpi("Sent", format_count(sent), pct(sent), "good"),
        _kpi("Failed", format_count(failed), pct(failed), "bad" if failed else ""),
        _kpi("Rate", _e(format_rate(stats.get("rate"))).removesuffix("/s"), "messages / second"),
        _kpi("Duration", _e(format_duration(stats.get("duration_seconds"))),
             "release to finish" if stats.get("finished_at") else "so far"),
    ])
    generated = _e(stats.get("generated_at"))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Newsletter #{ident}: {subject}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<header>
  <div class="eyebrow">Newsletter #{ident} · list {_e(stats.get("list")) or "-"}{templated}</div>
  <h1>{subject or '<span class="muted">(no subject)</span>'}</h1>
  <div class="meta"><span class="badge state-{_e(state)}">{_e(state)}</span>
  <span class="muted">{times}</span></div>
</header>
{pause}
<section class="kpis">{kpis}</section>
<section class="card">
  <h2>Messages sent per {_e(bucket_unit(timeline.bucket_seconds))}</h2>
  {timeline_svg(timeline)}
  {_timeline_legend(timeline)}
</section>
<section class="card">
  <h2>Messages by state <span class="muted">{counted:,} counted</span></h2>
  {states_svg(counts)}
  {_states_legend(counts)}
</section>
<section class="grid2">
  <div class="card">
    <h2>Bounces by class</h2>
    {bounces_svg(stats.get("bounces") or {})}
  </div>
  <div class="card">
    <h2>Delivery health</h2>
    {_health(stats)}
  </div>
</section>
{tracking_html_section(stats)}<section class="card">
  <h2>Workers</h2>
  {_workers_table(list(stats.get("workers") or []), timeline)}
</section>
<section class="card">
  <h2>Top SMTP replies</h2>
  {_replies_table(list(stats.get("replies") or []))}
</section>
<section class="card">
  <h2>Why messages failed</h2>
  {_failures_table(list(stats.get("failures") or []))}
</section>
<footer>SendSystem report{" · generated " + generated if generated else ""}</footer>
</main>
</body>
</html>
"""


_CSS = """
:root { --ink:#1f2933; --muted:#6b7785; --line:#e4e7eb; --bg:#f5f6f8; --card:#fff; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 24px 40px; }
header { margin-bottom: 18px; }
.eyebrow { color: var(--muted); font-size: 13px; letter-spacing: .02em; }
h1 { font-size: 26px; margin: 4px 0 8px; line-height: 1.25; overflow-wrap: anywhere; }
h2 { font-size: 15px; margin: 0 0 14px; font-weight: 600; }
h2 .muted { font-weight: 400; font-size: 13px; margin-left: 6px; }
.meta { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; font-size: 13px; }
.muted { color: var(--muted); }
.badge { display:inline-block; padding: 2px 10px; border-radius: 999px; font-size: 12px;
  font-weight: 600; text-transform: uppercase; letter-spacing: .04em;
  background: #e4e7eb; color: #3e4c59; }
.state-done, .state-running { background: #dcf3e3; color: #1e6b3a; }
.state-paused, .state-scheduled { background: #fdf0d5; color: #8a5a00; }
.state-cancelled, .state-failed { background: #fbe1e0; color: #9b2320; }
.banner { background: #fdf0d5; border: 1px solid #f2d08a; color: #6e4700; padding: 10px 14px;
  border-radius: 8px; margin-bottom: 16px; overflow-wrap: anywhere; }
.kpis { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; margin-bottom: 16px; }
.kpi { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 16px; }
.kpi .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .05em; }
.kpi .value { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums;
  margin-top: 2px; }
.kpi .sub { color: var(--muted); font-size: 12px; min-height: 1.2em; }
.kpi.good .value { color: #1e7a41; } .kpi.bad .value { color: #b3261e; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 20px; margin-bottom: 16px; }
.grid2 { display: grid; grid-template-columns: 1.2fr 1fr; gap: 16px; }
.grid2 .card { margin-bottom: 16px; }
svg.chart { display: block; width: 100%; height: auto; }
svg .grid { stroke: #edf0f3; stroke-width: 1; }
svg .axis { stroke: #9aa5b1; stroke-width: 1; }
svg .tick { fill: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
svg .axis-title { fill: var(--muted); font-size: 12px; }
svg .value { fill: var(--ink); font-size: 13px; font-weight: 600; }
svg .seg-label { fill: #fff; font-size: 14px; font-weight: 600; }
svg .empty { fill: #fafbfc; stroke: var(--line); stroke-dasharray: 4 4; }
svg .empty-msg { fill: var(--muted); font-size: 14px; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 6px 22px; padding: 0;
  margin: 10px 0 0 64px; font-size: 13px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 3px;
  margin-right: 7px; vertical-align: -1px; }
.swatch.blank { background: transparent; border: 1px solid var(--line); }
.state-legend { list-style: none; padding: 0; margin: 12px 0 0; display: grid;
  grid-template-columns: repeat(4, 1fr); gap: 6px 18px; font-size: 13px; }
.state-legend li { display: flex; align-items: baseline; gap: 6px; }
.state-legend .name { flex: 1; }
.state-legend .num { font-weight: 600; font-variant-numeric: tabular-nums; }
.state-legend .muted { width: 48px; text-align: right; font-variant-numeric: tabular-nums; }
.state-legend li.zero { color: #aab3bd; } .state-legend li.zero .num { font-weight: 400; }
.health { margin: 0; display: grid; gap: 14px; }
.health div { border-left: 3px solid #3aa05b; padding-left: 12px; }
.health div.warn { border-left-color: #f2b134; }
.health div.unknown { border-left-color: var(--line); }
.health dt { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .05em; }
.health dd { margin: 0; font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
.health dd.hint { font-size: 12px; font-weight: 400; color: var(--muted); }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th { text-align: left; color: var(--muted); font-weight: 600; font-size: 12px;
  text-transform: uppercase; letter-spacing: .04em; border-bottom: 1px solid var(--line);
  padding: 6px 10px; }
td { padding: 7px 10px; border-bottom: 1px solid #f0f2f4; vertical-align: top; }
tbody tr:last-child td { border-bottom: 0; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.role { background: #eef1f4; border-radius: 4px; padding: 1px 7px; font-size: 12px; }
.share { white-space: nowrap; font-variant-numeric: tabular-nums; }
.meter { display: inline-block; width: 140px; height: 8px; background: #eef1f4;
  border-radius: 4px; margin-right: 10px; vertical-align: 1px; overflow: hidden; }
.meter span { display: block; height: 100%; background: #4e79a7; border-radius: 4px; }
.reply { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12px; overflow-wrap: anywhere; }
.code { font-family: ui-monospace, Menlo, Consolas, monospace; font-weight: 600;
  padding: 1px 6px; border-radius: 4px; font-size: 12px; }
.code.ok { background: #dcf3e3; color: #1e6b3a; } .code.temp { background: #fdf0d5;
  color: #8a5a00; } .code.perm { background: #fbe1e0; color: #9b2320; }
.code.other { background: #eef1f4; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 8px; }
@media (max-width: 760px) { .kpis { grid-template-columns: repeat(2, 1fr); }
  .grid2 { grid-template-columns: 1fr; } .state-legend { grid-template-columns: repeat(2, 1fr); } }
@media print { body { background: #fff; } .card, .kpi { break-inside: avoid; } }
"""
