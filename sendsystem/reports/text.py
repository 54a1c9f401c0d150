"""Plain-text views of ``status`` and ``stats`` for terminals and cron mail.

Pure functions over the dicts that ``sendsystem status --json`` and
``sendsystem stats ID --json`` print; no database access here. Every key is
treated as optional, because a half-started cluster (no workers, no timeline
yet, rates still unknown) is exactly when an operator looks.

Text that comes from customers or from remote servers (subjects, list names,
SMTP replies) is passed through :func:`clean` first: a subject carrying an
ANSI escape or a CR must not repaint the operator's terminal or break a line
of a cron mail.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..states import MessageState, NewsletterState, WorkerState, worker_dead
from ..tracking.present import text_lines as tracking_text_lines

log = logging.getLogger(__name__)

#: Display order of message states (waiting ones first); unknown states are appended sorted.
STATES: tuple[str, ...] = (
    MessageState.QUEUED, MessageState.MERGED, MessageState.DEFERRED, MessageState.SENT,
    MessageState.FAILED, MessageState.SKIPPED, MessageState.BOUNCED, MessageState.CANCELLED,
)
BOUNCE_CLASSES: tuple[str, ...] = ("hard", "soft", "blocked", "complaint", "autoreply")

# Filling gaps in a timeline longer than a week would only produce a huge,
# useless chart; beyond that the minutes present are shown as they are.
_MAX_FILLED_MINUTES = 7 * 24 * 60
_SPARKS = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉"
_ANSI = {"red": "\033[1;31m", "green": "\033[32m", "yellow": "\033[33m", "dim": "\033[2m",
         "bold": "\033[1m"}
_RESET = "\033[0m"
# Bidi overrides are format characters (category Cf) that can visually reorder
# the rest of a line; they are replaced like control characters.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


# --------------------------------------------------------------------------- text helpers

def clean(value: Any) -> str:
    """``value`` as one printable line: whitespace controls become spaces, others '?'."""
    if value is None:
        return ""
    out = []
    for ch in str(value):
        if ch in "\t\r\n\v\f":
            out.append(" ")
        elif unicodedata.category(ch) == "Cc" or ch in _BIDI:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def _char_width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal columns taken by ``text`` (CJK counts double, combining marks zero)."""
    return sum(_char_width(ch) for ch in text)


def fit(text: str, width: int, align: str = "<") -> str:
    """Truncate ``text`` with '…' to ``width`` columns, then pad it to exactly that width."""
    if width <= 0:
        return ""
    if display_width(text) > width:
        kept, used = [], 0
        for ch in text:
            w = _char_width(ch)
            if used + w > width - 1:
                break
            kept.append(ch)
            used += w
        text = "".join(kept) + "…"
    pad = " " * (width - display_width(text))
    return pad + text if align == ">" else text + pad


def _paint(text: str, color: str | None, enabled: bool) -> str:
    if not enabled or not color:
        return text
    return f"{_ANSI[color]}{text}{_RESET}"


# --------------------------------------------------------------------------- number helpers

def as_int(value: Any) -> int:
    """``value`` as an int; None or garbage counts as 0 (a missing count is no messages)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def as_float(value: Any) -> float | None:
    """``value`` as a float, or None when unknown."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_count(value: Any) -> str:
    """20000 -> '20,000'."""
    return f"{as_int(value):,}"


def format_rate(rate: Any) -> str:
    """Messages per second, or '-' when not measured yet."""
    r = as_float(rate)
    return "-" if r is None else f"{r:,.1f}/s"


def format_percent(fraction: Any, digits: int = 1) -> str:
    f = as_float(fraction)
    return "-" if f is None else f"{f * 100:.{digits}f}%"


def format_duration(seconds: Any) -> str:
    """Human duration: '42s', '1m 12s', '2h 05m', '3d 04h'; '-' when unknown."""
    s = as_float(seconds)
    if s is None:
        return "-"
    total = max(0, round(s))
    days, rem = divmod(total, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_age(seconds: Any) -> str:
    """Heartbeat age: '1.3s' while fresh, then like :func:`format_duration`."""
    s = as_float(seconds)
    if s is None:
        return "-"
    return f"{max(s, 0.0):.1f}s" if s < 10 else format_duration(s)


def ordered_counts(counts: Mapping[str, Any] | None) -> list[tuple[str, int]]:
    """(state, n) in the canonical state order, unknown states last; all known states present."""
    counts = counts or {}
    extra = sorted(k for k in counts if k not in STATES)
    return [(state, as_int(counts.get(state))) for state in (*STATES, *extra)]


# --------------------------------------------------------------------------- timeline

@dataclass(frozen=True)
class Timeline:
    """Sent messages per minute (or per ``bucket_seconds``) per worker, gaps filled with zeros.

    ``sent[w][m]`` is what worker ``workers[w]`` sent in minute ``minutes[m]``
    (the HTML report's buckets: the ``bucket_seconds`` starting at ``minutes[m]``).
    """

    minutes: tuple[str, ...]
    workers: tuple[str, ...]
    sent: tuple[tuple[int, ...], ...]
    bucket_seconds: int = 60

    def totals(self) -> list[int]:
        """Sent per minute, all workers together."""
        return [sum(col) for col in zip(*self.sent, strict=True)] if self.sent else []


def _parse_minute(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.strip().replace("Z", ""))
    except ValueError:
        return None


def pivot_timeline(rows: Iterable[Mapping[str, Any]] | None) -> Timeline:
    """Turn ``[{"minute", "worker", "sent"}, ...]`` into a dense :class:`Timeline`.

    Minutes with no traffic inside the run are filled with zeros so a stall
    shows as a dip rather than being silently skipped.
    """
    cells: dict[tuple[str, str], int] = {}
    for row in rows or ():
        minute = clean(row.get("minute")).strip()
        if not minute:
            continue
        parsed = _parse_minute(minute)
        key = parsed.strftime("%Y-%m-%dT%H:%M") if parsed else minute
        worker = clean(row.get("worker")) or "?"
        cells[key, worker] = cells.get((key, worker), 0) + as_int(row.get("sent"))
    if not cells:
        return Timeline((), (), ())
    present = sorted({m for m, _ in cells})
    parsed_all = [_parse_minute(m) for m in present]
    minutes: list[str] = present
    if all(parsed_all):
        known = [p for p in parsed_all if p is not None]
        first, last = min(known), max(known)
        span = int((last - first).total_seconds() // 60) + 1
        if span <= _MAX_FILLED_MINUTES:
            minutes = [(first + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M")
                       for i in range(span)]
    workers = sorted({w for _, w in cells})
    sent = tuple(tuple(cells.get((m, w), 0) for m in minutes) for w in workers)
    return Timeline(tuple(minutes), tuple(workers), sent)


def sparkline(values: Sequence[float], width: int = 60) -> str:
    """Unicode sparkline; longer series are averaged into ``width`` buckets."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [
            sum(values[int(i * step):max(int((i + 1) * step), int(i * step) + 1)])
            / max(1, int((i + 1) * step) - int(i * step))
            for i in range(width)
        ]
    peak = max(values)
    if peak <= 0:
        return _SPARKS[0] * len(values)
    return "".join(_SPARKS[min(7, int(v / peak * 7.999))] if v > 0 else " " for v in values)


def bar(fraction: float, width: int, *, ascii_only: bool = False, track: bool = True) -> str:
    """A bar ``width`` columns wide filled to ``fraction`` (eighth precision in Unicode).

    With ``track`` the unfilled part is drawn too ('░' or '.'), as a progress
    bar needs; without it the bar is padded with spaces, as a bar chart wants.
    """
    fraction = min(max(fraction, 0.0), 1.0)
    if ascii_only:
        full = round(fraction * width)
        return "#" * full + ("." if track else " ") * (width - full)
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[part] if part else "")
    return text + ("░" if track else " ") * (width - display_width(text))


# --------------------------------------------------------------------------- generic table

@dataclass(frozen=True)
class Column:
    title: str
    align: str = "<"        # "<" left, ">" right
    shrink: bool = False    # may be truncated when the table is wider than the screen
    min_width: int = 4
    drop: int = 0           # >0: left out on narrow screens, highest first; 0: always shown


Cell = tuple[str, str | None]   # (text, color name or None)


def _fit_widths(columns: Sequence[Column], natural: list[int], budget: int) -> list[int]:
    widths = list(natural)
    while sum(widths) + 2 * (len(widths) - 1) > budget:
        candidates = [i for i, c in enumerate(columns) if c.shrink and widths[i] > c.min_width]
        if not candidates:
            break
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1
    return widths


def render_table(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], *,
                 width: int, color: bool, indent: str = "  ") -> list[str]:
    """Fixed-width table for a screen ``width`` columns wide.

    Shrinkable columns are truncated first; if that is not enough, optional
    columns are left out (highest ``drop`` first) rather than wrapping lines.
    """
    keep = list(range(len(columns)))
    natural = [max([display_width(c.title)] + [display_width(r[i][0]) for r in rows])
               for i, c in enumerate(columns)]
    budget = width - len(indent)
    while True:
        cols = [columns[i] for i in keep]
        widths = _fit_widths(cols, [natural[i] for i in keep], budget)
        droppable = [i for i in keep if columns[i].drop]
        if sum(widths) + 2 * (len(widths) - 1) <= budget or not droppable:
            break
        keep.remove(max(droppable, key=lambda i: columns[i].drop))
    columns = cols
    rows = [[row[i] for i in keep] for row in rows]
    head = "  ".join(fit(c.title, w, c.align) for c, w in zip(columns, widths, strict=True))
    lines = [indent + _paint(head.rstrip(), "bold", color)]
    for row in rows:
        cells = [_paint(fit(text, w, c.align), tint, color)
                 for (text, tint), c, w in zip(row, columns, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


# --------------------------------------------------------------------------- status

_WORKER_TINTS: Mapping[str, str] = {
    WorkerState.RUNNING: "green", WorkerState.STOPPING: "yellow", WorkerState.STARTING: "yellow",
    WorkerState.STOPPED: "dim",
}
_NEWSLETTER_TINTS: Mapping[str, str] = {
    NewsletterState.RUNNING: "green", NewsletterState.PAUSED: "yellow",
    NewsletterState.SCHEDULED: "dim",
}


def _is_dead(worker: Mapping[str, Any]) -> bool:
    # Only when the facts say so: a dict without "alive" is not judged here.
    return worker.get("alive") is False and worker_dead(str(worker.get("state")), False)


def _worker_row(w: Mapping[str, Any]) -> list[Cell]:
    state = clean(w.get("state")) or "?"
    if _is_dead(w):
        state_cell: Cell = ("DEAD", "red")
    else:
        state_cell = (state, _WORKER_TINTS.get(state))
    enabled = w.get("enabled")
    return [
        (clean(w.get("id", "")), None),
        (clean(w.get("host")) or "-", None),
        (clean(w.get("role")) or "-", None),
        (clean(w.get("name")) or "-", None),
        ("yes" if enabled else "NO" if enabled is not None else "-",
         None if enabled or enabled is None else "yellow"),
        state_cell,
        (format_rate(w.get("rate")), None),
        (format_count(w.get("backlog")), None),
        (format_age(w.get("heartbeat_age")), "red" if _is_dead(w) else None),
        (format_count(w.get("messages")), None),
        (clean(w.get("db_node")) or "-", None),
    ]


def _format_workers(workers: list[Mapping[str, Any]], width: int, color: bool) -> list[str]:
    if not workers:
        return ["  No workers registered. Cron starts them within a minute of installation."]
    columns = [Column("ID", ">"), Column("HOST", shrink=True, min_width=6), Column("ROLE"),
               Column("NAME", shrink=True, min_width=8), Column("ENABLED", drop=2), Column("STATE"),
               Column("RATE", ">"), Column("BACKLOG", ">", drop=3),
               Column("HEARTBEAT", ">", drop=1), Column("MESSAGES", ">", drop=4),
               Column("DB NODE", shrink=True, min_width=8, drop=5)]
    ordered = sorted(workers, key=lambda w: (clean(w.get("host")), clean(w.get("role")),
                                             clean(w.get("name"))))
    return render_table(columns, [_worker_row(w) for w in ordered], width=width, color=color)


def _progress(nl: Mapping[str, Any], bar_width: int, ascii_only: bool) -> str:
    total, done = as_int(nl.get("total")), as_int(nl.get("done"))
    fraction = done / total if total else 0.0
    return f"{bar(fraction, bar_width, ascii_only=ascii_only)} {fraction * 100:5.1f}%"


def _format_newsletters(newsletters: list[Mapping[str, Any]], width: int, color: bool,
                        ascii_only: bool) -> list[str]:
    if not newsletters:
        return ["  No newsletters in progress."]
    bar_width = max(10, min(30, width // 5))
    columns = [Column("ID", ">"), Column("LIST", shrink=True, drop=2), Column("STATE"),
               Column("PROGRESS"), Column("DONE/TOTAL", ">", drop=3), Column("RATE", ">", drop=1),
               Column("ETA", ">"), Column("SUBJECT", shrink=True, min_width=10)]
    rows: list[list[Cell]] = []
    notes: list[str] = []
    for nl in newsletters:
        state = clean(nl.get("state")) or "?"
        ident = clean(nl.get("id", "?"))
        rows.append([
            (ident, None),
            (clean(nl.get("list")) or "-", None),
            (state, _NEWSLETTER_TINTS.get(state)),
            (_progress(nl, bar_width, ascii_only), None),
            (f"{format_count(nl.get('done'))}/{format_count(nl.get('total'))}", None),
            (format_rate(nl.get("rate")), None),
            (format_duration(nl.get("eta_seconds")), None),
            (clean(nl.get("subject")), None),
        ])
        counts = nl.get("counts") or {}
        trouble = [f"{s} {format_count(counts[s])}"
                   for s in (MessageState.DEFERRED, MessageState.FAILED)
                   if as_int(counts.get(s))]
        if state == NewsletterState.PAUSED:
            reason = clean(nl.get("pause_reason")) or "by an operator"
            notes.append(_paint(f"#{ident} paused: {reason}", "yellow", color))
        if state == NewsletterState.SCHEDULED and nl.get("send_at"):
            notes.append(f"#{ident} scheduled for {clean(nl.get('send_at'))}")
        if trouble:
            notes.append(f"#{ident} " + ", ".join(trouble))
    # The subject gets whatever room is left, so it is the first to shrink.
    lines = render_table(columns, rows, width=width, color=color)
    return lines + [("  " + n if color else fit("  " + n, width)).rstrip() for n in notes]


def _unverified_summary(bounces: Mapping[str, Any]) -> str:
    kinds = bounces.get("unverified_kinds") or {}
    detail = ", ".join(f"{clean(k)} {format_count(v)}" for k, v in sorted(kinds.items()) if v)
    return format_count(bounces.get("unverified") or 0) + (f" ({detail})" if detail else "")


def _format_leases(leases: Mapping[str, Any], width: int) -> list[str]:
    """One line per balancer kind: who holds the lease (the active balancer)."""
    lines = []
    for kind in sorted(leases):
        lease = leases[kind] or {}
        if lease.get("holder") is None:
            text = f"{clean(kind)} balancer lease: free (no active balancer)"
        else:
            text = (f"{clean(kind)} balancer lease: worker {clean(lease.get('holder'))} "
                    f"{clean(lease.get('holder_name'))} on {clean(lease.get('holder_host'))}, "
                    f"epoch {clean(lease.get('epoch'))}, renewed "
                    f"(expires in {format_duration(lease.get('expires_in'))})")
        lines.append(fit("  " + text, width).rstrip())
    return lines


def format_status(status: Mapping[str, Any], *, width: int = 100, color: bool = False,
                  ascii_only: bool = False) -> str:
    """The ``sendsystem status`` screen: the workers table, then newsletters in progress.

    ``width`` is the terminal width the tables are fitted to; ``color`` adds
    ANSI colours (DEAD in red); ``ascii_only`` draws bars with '#' for mail
    readers that mangle Unicode.
    """
    width = max(width, 60)
    workers = list(status.get("workers") or [])
    newsletters = list(status.get("newsletters") or [])
    dead = sum(1 for w in workers if _is_dead(w))
    rates: dict[str, float] = {}
    for w in workers:
        r = as_float(w.get("rate"))
        if r is not None and not _is_dead(w):
            role = clean(w.get("role")) or "?"
            rates[role] = rates.get(role, 0.0) + r
    summary = f"{len(workers)} worker(s)"
    if dead:
        summary += f", {_paint(f'{dead} DEAD', 'red', color)}"
    if rates:
        summary += "; " + ", ".join(f"{role} {format_rate(r)}" for role, r in sorted(rates.items()))
    stamp = clean(status.get("generated_at"))
    lines = [f"SendSystem status{' at ' + stamp if stamp else ''}", "", f"Workers: {summary}"]
    lines += _format_workers(workers, width, color)
    lines += _format_leases(status.get("leases") or {}, width)
    lines += ["", f"Newsletters in progress: {len(newsletters)}"]
    lines += _format_newsletters(newsletters, width, color, ascii_only)
    relays = list(status.get("relays") or [])
    if relays:
        lines += ["", "Relays:"]
        lines += format_relays(relays, width)
    unverified = status.get("unverified_reports_24h")
    if unverified is not None:
        lines += ["", f"Unverified bounce/complaint reports, last 24 h: "
                      f"{format_count(unverified)} (no signed evidence; kept, changed nothing)"]
    return "\n".join(lines) + "\n"


def format_relays(relays: Iterable[Mapping[str, Any]], width: int = 100) -> list[str]:
    """One line per relay (``sendsystem relays`` and the status screen). The last
    error is the relay's own words: cleaned of control characters, cut to the width."""
    out = [f"{'RELAY':<20} {'GROUP':<12} {'HEALTH':<20} {'RATE':>8} {'LIMIT':>7} "
           f"{'TODAY':>13}  LAST ERROR"]
    for r in relays:
        used = r.get("quota_used_today")
        quota = "" if used is None else f"{as_int(used)}/{r.get('daily_quota') or '-'}"
        limit = "" if r.get("rate_limit") is None else f"{float(r['rate_limit']):g}/s"
        health = clean(r.get("health"))
        if r.get("slowed_to"):
            health += f" ({float(r['slowed_to']):.1f}/s)"
        line = (f"{clean(r.get('relay')):<20} {clean(r.get('group')):<12} {health:<20} "
                f"{float(r.get('rate') or 0):>6.1f}/s {limit:>7} {quota:>13}  "
                f"{clean(r.get('last_error'))}")
        out.append(line[:max(width, 60)])
    return out


# --------------------------------------------------------------------------- stats

def worker_shares(workers: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], float]]:
    """Each worker with its share of the messages *of its own role* (0..1)."""
    workers = list(workers)
    per_role: dict[str, int] = {}
    for w in workers:
        role = clean(w.get("role"))
        per_role[role] = per_role.get(role, 0) + as_int(w.get("messages"))
    return [(w, as_int(w.get("messages")) / per_role[clean(w.get("role"))]
             if per_role[clean(w.get("role"))] else 0.0) for w in workers]


def _minute_label(minute: str) -> str:
    return minute[11:16] if len(minute) >= 16 and minute[10] in "T " else minute


def _format_timeline(timeline: Timeline, ascii_only: bool) -> list[str]:
    if not timeline.minutes:
        return ["  Nothing sent yet."]
    totals = timeline.totals()
    peak = max(totals) or 1
    lines: list[str] = []
    if len(totals) <= 30:
        for minute, n in zip(timeline.minutes, totals, strict=True):
            lines.append(f"  {fit(_minute_label(minute), 5)}  "
                         f"{bar(n / peak, 40, ascii_only=ascii_only, track=False)} {n:>9,}")
    else:
        lines.append(f"  {_minute_label(timeline.minutes[0])} … "
                     f"{_minute_label(timeline.minutes[-1])}, peak {peak:,}/min")
    if not ascii_only and (len(totals) > 30 or len(timeline.workers) > 1):
        name_w = min(16, max(display_width(w) for w in timeline.workers))
        for worker, series in zip(timeline.workers, timeline.sent, strict=True):
            lines.append(f"  {fit(worker, name_w)}  {sparkline(series)}  "
                         f"peak {max(series):,}/min")
    return lines


def format_stats(stats: Mapping[str, Any], *, ascii_only: bool = False) -> str:
    """The ``sendsystem stats ID`` report for one newsletter, as plain text."""
    counts = ordered_counts(stats.get("counts"))
    total = as_int(stats.get("total")) or sum(n for _, n in counts)
    subject = clean(stats.get("subject"))
    lines = [f"Newsletter #{clean(stats.get('newsletter', '?'))}: {subject or '(no subject)'}",
             f"  list {clean(stats.get('list')) or '-'}, state {clean(stats.get('state')) or '?'}"]
    times = [(k, clean(stats.get(f"{k}_at"))) for k in ("created", "released", "finished")]
    lines.append("  " + ", ".join(f"{k} {v or '-'}" for k, v in times))
    lines.append(f"  total {format_count(total)}, duration "
                 f"{format_duration(stats.get('duration_seconds'))}, "
                 f"rate {format_rate(stats.get('rate'))}")
    if stats.get("pause_reason"):
        lines.append(f"  PAUSED: {clean(stats.get('pause_reason'))}")

    lines += ["", "Messages by state"]
    for state, n in counts:
        share = n / total if total else 0.0
        lines.append(f"  {state:<10} {n:>9,}  {share * 100:5.1f}%  "
                     f"{bar(share, 30, ascii_only=ascii_only, track=False)}".rstrip())

    lines += ["", "Sent per minute"]
    lines += _format_timeline(pivot_timeline(stats.get("timeline")), ascii_only)

    lines += ["", "Workers"]
    shares = worker_shares(stats.get("workers") or [])
    if shares:
        rows = [[(clean(w.get("name")) or "-", None), (clean(w.get("host")) or "-", None),
                 (clean(w.get("role")) or "-", None), (format_count(w.get("messages")), None),
                 (format_percent(s), None), (format_rate(w.get("rate")), None)]
                for w, s in shares]
        cols = [Column("NAME", shrink=True), Column("HOST", shrink=True), Column("ROLE"),
                Column("MESSAGES", ">"), Column("SHARE", ">"), Column("RATE", ">")]
        lines += render_table(cols, rows, width=100, color=False)
    else:
        lines.append("  No worker has handled this newsletter yet.")

    lines += ["", f"Deferrals: {format_count(stats.get('deferrals'))} event(s)", "",
              "Top SMTP replies"]
    replies = list(stats.get("replies") or [])
    if replies:
        rows = [[(format_count(r.get("count")), None), (clean(r.get("code")) or "-", None),
                 (clean(r.get("reply")), None)] for r in replies]
        lines += render_table([Column("COUNT", ">"), Column("CODE"),
                               Column("REPLY", shrink=True, min_width=20)], rows,
                              width=100, color=False)
    else:
        lines.append("  No SMTP replies recorded yet.")
    failures = list(stats.get("failures") or [])
    if failures:
        lines += ["", "Why messages failed"]
        rows = [[(format_count(f.get("count")), None), (clean(f.get("reason")), None)]
                for f in failures]
        lines += render_table([Column("COUNT", ">"),
                               Column("REASON", shrink=True, min_width=20)], rows,
                              width=100, color=False)

    bounces = stats.get("bounces") or {}
    lines += ["", "Bounces: " + ", ".join(f"{k} {format_count(bounces.get(k))}"
                                          for k in BOUNCE_CLASSES),
              f"  bounce rate {format_percent(stats.get('bounce_rate'), 3)}, "
              f"complaint rate {format_percent(stats.get('complaint_rate'), 4)}",
              f"  unverified reports (no signed evidence, changed nothing): "
              f"{_unverified_summary(bounces)}"]
    lines += tracking_text_lines(stats)
    return "\n".join(lines) + "\n"
