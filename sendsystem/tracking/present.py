"""The "Opens and clicks" section of ``stats`` (text) and ``stats --html``.

Human and machine figures side by side, the top links, and opens/clicks over
time (per hour, or per day for long spans). Everything that comes from
outside (URLs are written by customers) is escaped in the HTML; the chart is
inline SVG like the rest of the report.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

_W, _H, _PAD_L, _PAD_B, _PAD_T = 1000, 220, 56, 34, 12


def _n(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _reasons(reasons: Mapping[str, Any] | None) -> str:
    items = [f"{k} {_n(v):,}" for k, v in sorted((reasons or {}).items()) if _n(v)]
    return f" ({', '.join(items)})" if items else ""


def text_lines(stats: Mapping[str, Any]) -> list[str]:
    """The section for ``sendsystem stats ID``; empty when nothing was tracked or hit."""
    t = stats.get("tracking")
    if not isinstance(t, Mapping) or not (t.get("tracked") or _n((t.get("hits") or {}).get(
            "opens")) or _n((t.get("hits") or {}).get("clicks"))):
        return []
    delivered = _n((stats.get("counts") or {}).get("sent")) + \
        _n((stats.get("counts") or {}).get("bounced"))
    reasons = t.get("machine_reasons") or {}
    hits = t.get("hits") or {}
    lines = ["", f"Opens and clicks (tracked: {', '.join(t.get('tracked') or []) or 'no'}; "
                 "unique recipients; human | machine)"]
    for kind in ("opens", "clicks"):
        human = _n(t.get(f"unique_{kind}"))
        lines.append(f"  {kind:<7} {human:>9,} ({_share(human, delivered)}) | "
                     f"{_n(t.get(f'machine_{kind}')):,}{_reasons(reasons.get(kind))}   "
                     f"{_n(hits.get(kind)):,} hits")
    links = list(t.get("top_links") or [])
    if links:
        lines.append("  top links (human | machine clicks):")
        for link in links:
            url = "".join(c if c.isprintable() else "?" for c in str(link.get("url") or "?"))
            lines.append(f"    {_n(link.get('clicks')):>7,} | {_n(link.get('machine_clicks')):<7,} "
                         f"{url[:90]}")
    return lines


def _e(value: Any) -> str:
    return html.escape("".join(c for c in str(value) if c.isprintable()), quote=True)


def _chart(rows: Sequence[Mapping[str, Any]], bucket: int) -> str:
    series = (("opens", "#3aa05b", ""), ("machine_opens", "#3aa05b", "5 4"),
              ("clicks", "#4e79a7", ""), ("machine_clicks", "#4e79a7", "5 4"))
    unit = "hour" if bucket == 3600 else "day"
    if not rows:
        return (f'<svg class="chart tracking" viewBox="0 0 {_W} 80" role="img" '
                f'aria-label="Opens and clicks per {unit}"><text x="{_W / 2}" y="45" '
                'text-anchor="middle" class="empty-msg">No opens or clicks yet.</text></svg>')
    peak = max(1, *(_n(r.get(k)) for r in rows for k, _, _ in series))
    plot_w, plot_h = _W - _PAD_L - 16, _H - _PAD_T - _PAD_B
    n = len(rows)

    def x(i: int) -> float:
        return _PAD_L + (plot_w / 2 if n == 1 else i / (n - 1) * plot_w)

    def y(v: int) -> float:
        return _PAD_T + plot_h - v / peak * plot_h

    out = [f'<svg class="chart tracking" viewBox="0 0 {_W} {_H}" role="img" '
           f'aria-label="Unique opens and clicks per {unit}, human and machine">',
           f'<line class="axis" x1="{_PAD_L}" x2="{_W - 16}" y1="{_PAD_T + plot_h}" '
           f'y2="{_PAD_T + plot_h}"/>',
           f'<text class="tick" x="{_PAD_L - 8}" y="{_PAD_T + 4}" '
           f'text-anchor="end">{peak:,}</text>',
           f'<text class="tick" x="{_PAD_L - 8}" y="{_PAD_T + plot_h + 4}" '
           'text-anchor="end">0</text>']
    for key, color, dash in series:
        points = " ".join(f"{x(i):.1f},{y(_n(r.get(key))):.1f}" for i, r in enumerate(rows))
        out.append(f'<polyline class="series" data-series="{key}" fill="none" stroke="{color}" '
                   f'stroke-width="2" stroke-dasharray="{dash}" points="{points}">'
                   f'<title>{key.replace("_", " ")}: {sum(_n(r.get(key)) for r in rows):,}'
                   '</title></polyline>')
    for i in sorted({0, n - 1}):
        label = str(rows[i].get("at", ""))[: 16 if bucket == 3600 else 10].replace("T", " ")
        out.append(f'<text class="tick" x="{x(i):.1f}" y="{_H - 10}" '
                   f'text-anchor="{"start" if i == 0 else "end"}">{_e(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def html_section(stats: Mapping[str, Any]) -> str:
    """The report's "Opens and clicks" card; empty when nothing was tracked or hit."""
    if not text_lines(stats):
        return ""
    t = stats["tracking"]
    reasons = t.get("machine_reasons") or {}
    timeline = t.get("timeline") or {}
    bucket = _n(timeline.get("bucket_seconds")) or 3600
    rows = "".join(
        f'<tr><td class="num">{_n(link.get("clicks")):,}</td>'
        f'<td class="num">{_n(link.get("machine_clicks")):,}</td>'
        f'<td class="num">{_n(link.get("hits")):,}</td>'
        f'<td class="reply">{_e(link.get("url") or "?")}</td></tr>'
        for link in t.get("top_links") or [])
    table = ('<table><thead><tr><th class="num">Human</th><th class="num">Machine</th>'
             '<th class="num">Hits</th><th>Link</th></tr></thead>'
             f'<tbody>{rows}</tbody></table>') if rows else \
        '<p class="muted">No link clicked yet.</p>'
    kpis = "".join(
        f'<div><dt>{label}</dt><dd>{_n(t.get(human)):,} <span class="muted">human</span> · '
        f'{_n(t.get(mach)):,} <span class="muted">machine{_e(_reasons(reasons.get(kind)))}'
        '</span></dd></div>'
        for label, human, mach, kind in (("Unique opens", "unique_opens", "machine_opens", "opens"),
                                         ("Unique clicks", "unique_clicks", "machine_clicks",
                                          "clicks")))
    unit = "hour" if bucket == 3600 else "day"
    return f"""<section class="card">
  <h2>Opens and clicks <span class="muted">unique recipients; machine = scanners, proxies,
  hits within seconds of delivery, bursts of clicks (dashed)</span></h2>
  <dl class="health">{kpis}</dl>
  <h2>Per {unit}</h2>
  {_chart(list(timeline.get("rows") or []), bucket)}
  <h2>Top links</h2>
  {table}
</section>
"""
