"""The facts behind `sendsystem list stats NAME`: a list's subscribers over time, and
how each of its newsletters did.

Everything is aggregated in the database over indexes, a row per week (or per
newsletter) coming back, never a row per subscriber:

* **Joins** per week are a covering range scan of
  ``ix_subscribers_list_created (list_id, created_at)``: a subscription's
  join is its row's creation (imports write no events).
* **Status changes** per week come from ``subscriber_events``
  (:mod:`sendsystem.history`), grouped by week, from, to and reason.
* **Kept weekly counts.** A week that has ended never changes (a join's time
  is the row's creation, an event's the moment it happened), so what a
  report counted of completed weeks is kept in ``list_stats_weeks`` and the
  next report scans only the weeks since (``list_stats_cache.until``). The
  first report of a list reads all of it (a covering index scan: measured
  0.7 s for a million subscribers, 6 s for four million on a loaded 2-core box
  with a 128 MB buffer pool; bench/liststats_bench.py); later ones read a
  week or two of rows. Rows written with a time in the past (by SQL, not by
  SendSystem) are not seen until ``--rebuild``; ``--verify`` counts the table
  itself and says when the two disagree.
* A week's **counts by status** are then folded in Python from those few
  rows (:func:`weekly_series`): joins add to ``active``, each transition
  moves its count from one status to another; everything before the window
  is the starting point, and the last week's counts are the list now. Weeks
  start on Monday 00:00 UTC (the database's sessions are UTC); the last one
  is the current, partial week, counted up to now.
* **Blocked** is a snapshot only: the active subscribers whose address or
  @domain is on the blocklist now (they are in ``active`` too; the workers
  skip them). The blocklist keeps no history (a removed entry leaves no
  trace), so "blocked at the end of week N" cannot be reconstructed
  honestly, and the series does not pretend to. The salted-hash entries of
  forgotten addresses are not counted (finding their matches would mean
  hashing every address on the list).
* **Per newsletter** (those released, newest ``newsletters`` of them):
  delivered = sent + bounced and the counts by state from
  :func:`sendsystem.stats.counts` (or the summary of a purged newsletter,
  as ``stats`` does); bounces and complaints from
  :func:`sendsystem.stats.newsletter_bounces` (signed evidence only, the
  same rates ``stats`` shows); unsubscribes are the history's unsubscribe
  events attributed to that newsletter (its token named it; links in mail
  sent before schema 13 name none and are counted apart as unattributed).
  Each rate is per delivered message. Opens and clicks (unique per
  recipient, human and machine apart) come from
  :func:`sendsystem.tracking.report.newsletters_rows`, one query for all the
  newsletters, plus a purged one's summary; the open and click rates count
  the human ones, for the newsletters that tracked them.
* **Trend** (:func:`trend`), per rate, over the newsletters with something
  delivered, oldest to newest: the latest value against the mean of the
  previous five ("change"), and the least-squares slope over the last ten.
  The direction is ``rising`` or ``falling`` when the fitted line moves by
  more than a tenth of the rate's mean level (and at least 0.01 percentage
  point) across those newsletters, else ``steady``; ``unknown`` with fewer
  than three. A slope over a handful of sends is a hint, not a test of
  significance; the per-newsletter rows are there to look at.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from . import stats
from .admin import get_list
from .config import parse_track
from .db import Database
from .states import MESSAGE_STATES, MessageState, SubscriberStatus
from .tracking import report as tracking_report

STATUSES: tuple[str, ...] = tuple(s.value for s in SubscriberStatus)
RATES = ("bounce_rate", "complaint_rate", "unsubscribe_rate")
DEFAULT_WEEKS = 26
DEFAULT_NEWSLETTERS = 20
TREND_WINDOW = 10  # newsletters in the least-squares fit
COMPARE_PREVIOUS = 5  # the latest newsletter against the mean of this many before it
STEADY_RELATIVE = 0.10  # a fitted change below 10 % of the mean level is steady ...
STEADY_ABSOLUTE = 0.0001  # ... and below 0.01 percentage point always is
# A week is kept (list_stats_weeks) once it ended at least this long ago.
CACHE_MARGIN = timedelta(days=1)


# --------------------------------------------------------------------------- pure parts

def week_start(when: date | datetime) -> date:
    """The Monday of ``when``'s week (ISO weeks; the database's clock is UTC)."""
    day = when.date() if isinstance(when, datetime) else when
    return day - timedelta(days=day.weekday())


def week_range(last: date, count: int) -> list[date]:
    """The ``count`` week starts ending with ``last``'s week, oldest first."""
    end, n = week_start(last), max(count, 1)
    return [end - timedelta(weeks=n - 1 - i) for i in range(n)]


@dataclass(frozen=True)
class Transition:
    """Status changes of one kind in one week (a row of ``liststats_events_by_week``)."""

    week: date
    from_status: str
    to_status: str
    reason: str
    n: int


def weekly_series(joins: Mapping[date, int], transitions: Iterable[Transition],
                  weeks: Sequence[date]) -> list[dict[str, Any]]:
    """Per week of ``weeks`` (Monday dates, ascending): subscribers by status at the
    week's end, joins, leaves (from active) by reason and by status, re-activations.

    ``joins`` is subscriptions created per week (each starts ``active``);
    ``transitions`` the status changes per week. Weeks before ``weeks[0]`` make
    the starting counts; weeks after the last are ignored.
    """
    counts = dict.fromkeys(STATUSES, 0)
    by_week: dict[date, list[Transition]] = {}
    for t in transitions:
        by_week.setdefault(t.week, []).append(t)
    first = weeks[0] if weeks else date.max
    for week, n in joins.items():
        if week < first:
            counts[SubscriberStatus.ACTIVE] += n
    for week, items in by_week.items():
        if week < first:
            for t in items:
                _move(counts, t)
    out = []
    for week in weeks:
        row: dict[str, Any] = {"week": week.isoformat(),
                               "end": (week + timedelta(days=6)).isoformat()}
        joined = joins.get(week, 0)
        counts[SubscriberStatus.ACTIVE] += joined
        left_by_reason: dict[str, int] = {}
        left_by_status: dict[str, int] = {}
        reactivated = 0
        for t in by_week.get(week, ()):
            _move(counts, t)
            if t.from_status == SubscriberStatus.ACTIVE and t.to_status != SubscriberStatus.ACTIVE:
                left_by_reason[t.reason] = left_by_reason.get(t.reason, 0) + t.n
                left_by_status[t.to_status] = left_by_status.get(t.to_status, 0) + t.n
            elif t.to_status == SubscriberStatus.ACTIVE and t.from_status != t.to_status:
                reactivated += t.n
        row.update(counts)
        row.update({"joined": joined, "left": sum(left_by_reason.values()),
                    "reactivated": reactivated,
                    "left_by_status": dict(sorted(left_by_status.items())),
                    "left_by_reason": dict(sorted(left_by_reason.items(),
                                                  key=lambda kv: (-kv[1], kv[0])))})
        out.append(row)
    return out


def _move(counts: dict[str, int], t: Transition) -> None:
    counts[t.from_status] = counts.get(t.from_status, 0) - t.n
    counts[t.to_status] = counts.get(t.to_status, 0) + t.n


def leave_reasons(weeks: Iterable[Mapping[str, Any]], transitions: Iterable[Transition],
                  ) -> list[dict[str, Any]]:
    """Why they left over the weeks shown: (status, reason, count), commonest first."""
    shown = {w["week"] for w in weeks}
    total: dict[tuple[str, str], int] = {}
    for t in transitions:
        if (t.week.isoformat() in shown and t.from_status == SubscriberStatus.ACTIVE
                and t.to_status != SubscriberStatus.ACTIVE):
            total[t.to_status, t.reason] = total.get((t.to_status, t.reason), 0) + t.n
    return [{"status": s, "reason": r, "count": n}
            for (s, r), n in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))]


def ols_slope(values: Sequence[float]) -> float | None:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (None below two points)."""
    n = len(values)
    if n < 2:
        return None
    mean_x = (n - 1) / 2
    mean_y = sum(values) / n
    sxx = sum((x - mean_x) ** 2 for x in range(n))
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    return sxy / sxx


def direction(slope: float | None, level: float, points: int) -> str:
    """``rising``, ``falling`` or ``steady`` from the fitted change across ``points``
    newsletters (see the module docstring); ``unknown`` below three points."""
    if slope is None or points < 3:
        return "unknown"
    drift = slope * (points - 1)
    threshold = max(STEADY_RELATIVE * abs(level), STEADY_ABSOLUTE)
    if drift > threshold:
        return "rising"
    if drift < -threshold:
        return "falling"
    return "steady"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def trend(rates: Sequence[float | None]) -> dict[str, Any]:
    """The trend of one rate over newsletters, oldest first (None: nothing delivered)."""
    values = [r for r in rates if r is not None]
    window = values[-TREND_WINDOW:]
    latest = values[-1] if values else None
    previous = _mean(values[-1 - COMPARE_PREVIOUS:-1])
    slope = ols_slope(window)
    level = _mean(window) or 0.0
    return {"latest": _round(latest), "previous_mean": _round(previous),
            "change": _round(latest - previous)
            if latest is not None and previous is not None else None,
            "slope_per_newsletter": _round(slope), "newsletters": len(window),
            "direction": direction(slope, level, len(window))}


def change_vs_previous(rates: Sequence[float | None]) -> list[float | None]:
    """Each rate minus the mean of up to five earlier ones (oldest first; None where
    there is no rate or nothing before it)."""
    out: list[float | None] = []
    seen: list[float] = []
    for r in rates:
        before = _mean(seen[-COMPARE_PREVIOUS:])
        out.append(_round(r - before) if r is not None and before is not None else None)
        if r is not None:
            seen.append(r)
    return out


TRACKING_KEYS = ("unique_opens", "machine_opens", "unique_clicks", "machine_clicks")


def newsletter_row(nl: Mapping[str, Any], counts: Mapping[str, int],
                   bounces: Mapping[str, Any], unsubscribes: int,
                   tracking: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One newsletter's line: delivered and the rates per delivered message.

    ``tracking``: its unique opens and clicks (:mod:`sendsystem.tracking.report`);
    the open and click rates count human ones only, and only for what the
    newsletter tracked (``nl["track"]``), else they are None.
    """
    delivered = int(counts.get(MessageState.SENT, 0)) + int(counts.get(MessageState.BOUNCED, 0))
    bounced = int(bounces.get("hard", 0)) + int(bounces.get("soft", 0))
    complaints = int(bounces.get("complaint", 0))
    tracked = sorted(parse_track(str(nl.get("track") or ""), "newsletters.track"))
    seen = {key: int((tracking or {}).get(key, 0)) for key in TRACKING_KEYS}

    def rate(n: int) -> float | None:
        return round(n / delivered, 6) if delivered else None

    return {"id": int(nl["id"]), "subject": nl["subject"], "state": nl["state"],
            "sent_at": _iso(nl.get("released_at")), "finished_at": _iso(nl.get("finished_at")),
            "total": int(nl.get("total") or 0), "delivered": delivered,
            "counts": dict(counts), "bounces": bounced, "complaints": complaints,
            "unsubscribes": unsubscribes, "bounce_rate": rate(bounced),
            "complaint_rate": rate(complaints), "unsubscribe_rate": rate(unsubscribes),
            "tracked": tracked, **seen,
            "open_rate": rate(seen["unique_opens"]) if "opens" in tracked else None,
            "click_rate": rate(seen["unique_clicks"]) if "clicks" in tracked else None}


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else None


# --------------------------------------------------------------------------- the database

def _letter(db: Database, nl: Mapping[str, Any], unsubscribes: int,
            tracking: Mapping[str, int]) -> dict[str, Any]:
    """One newsletter's row; a purged one's counts and opens/clicks also from its
    summary (as ``stats`` does)."""
    nid = int(nl["id"])
    summary = db.fetchone("summary_get", {"id": nid})
    if summary is None:
        counts = stats.counts(db, nid)
    else:
        facts = json.loads(summary["facts"])
        found = facts.get("counts") or {}
        counts = {state: int(found.get(state, 0)) for state in MESSAGE_STATES}
        folded = facts.get("tracking") or {}
        tracking = {k: int(tracking.get(k, 0)) + int(folded.get(k) or 0) for k in TRACKING_KEYS}
    return newsletter_row(nl, counts, stats.newsletter_bounces(db, nid), unsubscribes, tracking)


def _history(db: Database, list_id: int, now: datetime, rebuild: bool
             ) -> tuple[dict[date, int], list[Transition]]:
    """Joins per week and status changes per week, over the list's whole life.

    Completed weeks come from the kept aggregates (``list_stats_weeks``); only
    the weeks since ``list_stats_cache.until`` are counted from the tables,
    and those that have ended (a day ago or more, so a late commit is never
    missed) are kept for next time. The first report of a list counts it all.
    """
    if rebuild:
        with db.transaction():
            db.execute("liststats_cache_drop_weeks", {"list_id": list_id})
            db.execute("liststats_cache_drop", {"list_id": list_id})
    until = db.fetchval("liststats_cache_until", {"list_id": list_id})
    until = _as_date(until) if until is not None else None
    joins: dict[date, int] = {}
    moves: list[Transition] = []
    for r in db.fetchall("liststats_cached_weeks", {"list_id": list_id}) if until else ():
        week = _as_date(r["week"])
        if r["kind"] == "join":
            joins[week] = joins.get(week, 0) + int(r["n"])
        else:
            moves.append(Transition(week, str(r["from_status"]), str(r["to_status"]),
                                    str(r["reason"]), int(r["n"])))
    since = datetime.combine(until or date(1970, 1, 5), datetime.min.time())
    live_joins = {_as_date(r["week"]): int(r["n"]) for r in db.fetchall(
        "liststats_joins_by_week", {"list_id": list_id, "since": since})}
    live_moves = [Transition(_as_date(r["week"]), str(r["from_status"]), str(r["to_status"]),
                             str(r["reason"]), int(r["n"]))
                  for r in db.fetchall("liststats_events_by_week",
                                       {"list_id": list_id, "since": since})]
    for week, n in live_joins.items():
        joins[week] = joins.get(week, 0) + n
    moves += live_moves
    complete = week_start(now - CACHE_MARGIN)
    if until is None or complete > until:
        keep = [{"list_id": list_id, "week": w, "kind": "join", "from_status": "active",
                 "to_status": "active", "reason": "", "n": n}
                for w, n in live_joins.items() if w < complete]
        keep += [{"list_id": list_id, "week": t.week, "kind": "change",
                  "from_status": t.from_status, "to_status": t.to_status, "reason": t.reason,
                  "n": t.n} for t in live_moves if t.week < complete]
        with db.transaction():
            db.executemany("liststats_cache_week", keep)
            db.execute("liststats_cache_set", {"list_id": list_id, "until": complete})
    return joins, moves


def list_stats(db: Database, list_name: str, *, weeks: int = DEFAULT_WEEKS,
               newsletters: int = DEFAULT_NEWSLETTERS, verify: bool = False,
               rebuild: bool = False) -> dict[str, Any]:
    """Everything `list stats` shows, JSON-ready (the README documents the keys).

    ``verify`` also counts the subscribers table by status (a scan of the
    list's index entries) and notes any difference from the history;
    ``rebuild`` forgets the kept weekly aggregates and counts everything anew.
    """
    lst = get_list(db, list_name)
    list_id = int(lst["id"])
    now = db.fetchval("db_now")
    now = now if isinstance(now, datetime) else datetime.now(UTC).replace(tzinfo=None)
    shown = week_range(now.date(), weeks)

    joins, transitions = _history(db, list_id, now, rebuild)
    series = weekly_series(joins, transitions, shown)
    last = series[-1]
    snapshot = {s: int(last[s]) for s in STATUSES}
    blocked = int(db.fetchval("liststats_blocked_active", {"list_id": list_id}) or 0)

    rows = list(reversed(db.fetchall("liststats_newsletters",
                                     {"list_id": list_id, "limit": max(newsletters, 0)})))
    ids = tuple(int(r["id"]) for r in rows)
    unsub = {int(r["newsletter_id"]): int(r["n"])
             for r in (db.fetchall("liststats_unsubscribes", {"ids": ids}) if ids else [])}
    seen = tracking_report.newsletters_rows(db, ids)
    letters = [_letter(db, r, unsub.get(int(r["id"]), 0), seen.get(int(r["id"]), {}))
               for r in rows]
    for rate in RATES:
        for row, change in zip(letters, change_vs_previous([x[rate] for x in letters]),
                               strict=True):
            row.setdefault("change_vs_previous", {})[rate] = change
    unattributed = int(db.fetchval("liststats_unattributed_unsubscribes",
                                   {"list_id": list_id,
                                    "since": datetime.combine(shown[0], datetime.min.time())})
                       or 0)

    notes = ["Blocked is a snapshot: active subscribers the blocklist stops now (counted in "
             "active too); the blocklist keeps no history, so there is no blocked series."]
    if verify:
        table = dict.fromkeys(STATUSES, 0)
        for r in db.fetchall("liststats_status_now", {"list_id": list_id}):
            table[str(r["status"])] = int(r["n"])
        drift = {s: table[s] - snapshot[s] for s in STATUSES if table[s] != snapshot[s]}
        if drift:
            notes.append("The history and the subscribers table disagree by "
                         + ", ".join(f"{s} {d:+,}" for s, d in sorted(drift.items()))
                         + ": statuses were changed without a history event, or rows were "
                           "created with a past time (outside SendSystem, e.g. by SQL); "
                           "`now` shows the table. `--rebuild` counts the history anew.")
            snapshot = table
    if unattributed:
        notes.append(f"{unattributed:,} unsubscribe(s) in these weeks name no newsletter "
                     "(links in mail sent before schema 13, or an admin's) and are in no "
                     "newsletter's unsubscribe rate.")
    return {
        "list": {"id": list_id, "name": lst["name"],
                 "from": f"{lst['from_name']} <{lst['from_address']}>"},
        "generated_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "weeks_start": "Monday 00:00 UTC",
        "now": {**snapshot, "total": sum(snapshot.values()), "blocked": blocked},
        "weeks": series,
        "left_by_reason": leave_reasons(series, transitions),
        "unattributed_unsubscribes": unattributed,
        "newsletters": letters,
        "trend": {rate: trend([x[rate] for x in letters]) for rate in RATES},
        "notes": notes,
    }


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])
