"""What ``stats`` shows of a newsletter's opens and clicks, and what ``purge`` keeps.

Everything is counted from ``tracking_unique`` (one row per recipient, kind and
link), never by scanning every hit, so a report costs the same at a million
hits as at a thousand. Unique means per recipient: a recipient who opened
five times is one open; a recipient counts as a *human* open (click) when at
least one of their opens (clicks) was human, and as a *machine* one when all
of them were a machine's (:mod:`.machine`), under the reason of their
strongest verdict. Human and machine figures are always given side by side.

The raw facts (:func:`raw_facts`) add up (:func:`merge`): ``purge`` stores those
of the rows it deletes in the newsletter's summary, and ``stats`` adds the
live rows of hits that came after the purge's cut-off. A recipient with hits
on both sides of a purge counts on both sides (purges only touch newsletters
finished months ago, where that is rare).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from ..config import parse_track
from ..db import Database
from .machine import VERDICT_NAMES, Verdict

_EPOCH = datetime(1970, 1, 2)
_FOREVER = datetime(9999, 1, 1)
TOP_LINKS = 10
# Every link's counts are kept in a summary (a newsletter has at most
# [tracking] max_links of them per sort worker; this bounds the JSON).
ALL_LINKS = 5000
# Per hour up to this many days of hits, then per day.
HOURLY_DAYS = 3


def _empty() -> dict[str, Any]:
    return {"unique_opens": 0, "machine_opens": 0, "unique_clicks": 0, "machine_clicks": 0,
            "machine_reasons": {"opens": {}, "clicks": {}}, "hits": {"opens": 0, "clicks": 0},
            "links": [], "timeline": []}


def raw_facts(db: Database, newsletter_id: int, since: datetime = _EPOCH,
              before: datetime = _FOREVER) -> dict[str, Any]:
    """The additive facts of the unique rows whose first hit is in [since, before)."""
    p = {"id": newsletter_id, "since": since, "before": before}
    out = _empty()
    for r in db.fetchall("tracking_counts", p):
        kind = "opens" if r["kind"] == "open" else "clicks"
        n, verdict = int(r["recipients"]), int(r["verdict"])
        out["hits"][kind] += int(r["hits"] or 0)
        if kind == "opens":
            out["unique_opens" if verdict == 0 else "machine_opens"] += n
        if verdict:
            name = VERDICT_NAMES[Verdict(verdict)]
            reasons = out["machine_reasons"][kind]
            reasons[name] = reasons.get(name, 0) + n
    row = db.fetchone("tracking_clickers", p) or {}
    clickers, human = int(row.get("recipients") or 0), int(row.get("human") or 0)
    out["unique_clicks"], out["machine_clicks"] = human, clickers - human
    out["links"] = [{"idx": str(r["idx"]), "url": r["url"], "clicks": int(r["clicks"]),
                     "machine_clicks": int(r["machine_clicks"]), "hits": int(r["hits"])}
                    for r in db.fetchall("tracking_links_counts", {**p, "limit": ALL_LINKS})]
    timeline: dict[str, dict[str, Any]] = {}
    for r in db.fetchall("tracking_timeline", p):
        point = timeline.setdefault(r["hour"], {"at": r["hour"], "opens": 0, "machine_opens": 0,
                                                "clicks": 0, "machine_clicks": 0})
        kind = "opens" if r["kind"] == "open" else "clicks"
        point[kind] += int(r["human"] or 0)
        point[f"machine_{kind}"] += int(r["machine"] or 0)
    out["timeline"] = [timeline[k] for k in sorted(timeline)]
    return out


def merge(*parts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add raw facts up (a summary's and the live rows')."""
    out = _empty()
    links: dict[str, dict[str, Any]] = {}
    timeline: dict[str, dict[str, Any]] = {}
    for part in parts:
        if not part:
            continue
        for key in ("unique_opens", "machine_opens", "unique_clicks", "machine_clicks"):
            out[key] += int(part.get(key) or 0)
        for kind in ("opens", "clicks"):
            out["hits"][kind] += int((part.get("hits") or {}).get(kind) or 0)
            mine = out["machine_reasons"][kind]
            for name, n in ((part.get("machine_reasons") or {}).get(kind) or {}).items():
                mine[name] = mine.get(name, 0) + int(n)
        for link in part.get("links") or ():
            have = links.setdefault(str(link["idx"]), {"idx": str(link["idx"]),
                                                       "url": link.get("url"), "clicks": 0,
                                                       "machine_clicks": 0, "hits": 0})
            for key in ("clicks", "machine_clicks", "hits"):
                have[key] += int(link.get(key) or 0)
        for point in part.get("timeline") or ():
            have = timeline.setdefault(point["at"], {"at": point["at"], "opens": 0,
                                                     "machine_opens": 0, "clicks": 0,
                                                     "machine_clicks": 0})
            for key in ("opens", "machine_opens", "clicks", "machine_clicks"):
                have[key] += int(point.get(key) or 0)
    out["links"] = sorted(links.values(), key=lambda x: (-x["clicks"], -x["hits"], x["idx"]))
    out["timeline"] = [timeline[k] for k in sorted(timeline)]
    return out


def bucket_timeline(hourly: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Hourly points, or daily ones when the hits span more than HOURLY_DAYS."""
    if not hourly:
        return {"bucket_seconds": 3600, "rows": []}
    first = datetime.fromisoformat(hourly[0]["at"])
    last = datetime.fromisoformat(hourly[-1]["at"])
    if last - first <= timedelta(days=HOURLY_DAYS):
        return {"bucket_seconds": 3600, "rows": [dict(p) for p in hourly]}
    days: dict[str, dict[str, Any]] = {}
    for p in hourly:
        day = p["at"][:10] + "T00:00:00"
        have = days.setdefault(day, {"at": day, "opens": 0, "machine_opens": 0, "clicks": 0,
                                     "machine_clicks": 0})
        for key in ("opens", "machine_opens", "clicks", "machine_clicks"):
            have[key] += int(p.get(key) or 0)
    return {"bucket_seconds": 86400, "rows": [days[k] for k in sorted(days)]}


def present(raw: Mapping[str, Any], tracked: str | None) -> dict[str, Any]:
    """The ``tracking`` key of ``stats --json``."""
    kinds = parse_track(tracked or "")
    return {
        "tracked": sorted(kinds),
        "unique_opens": raw["unique_opens"], "machine_opens": raw["machine_opens"],
        "unique_clicks": raw["unique_clicks"], "machine_clicks": raw["machine_clicks"],
        "machine_reasons": raw["machine_reasons"], "hits": raw["hits"],
        "top_links": list(raw["links"][:TOP_LINKS]),
        "timeline": bucket_timeline(raw["timeline"]),
    }


def newsletter_tracking(db: Database, newsletter_id: int,
                        summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``stats``' tracking facts of one newsletter; ``summary`` is its summary row (or None),
    whose facts hold what a purge folded."""
    tracked = db.fetchval("newsletter_track", {"id": newsletter_id})
    if summary is None:
        return present(raw_facts(db, newsletter_id), tracked)
    folded = json.loads(summary["facts"]).get("tracking")
    return present(merge(folded, raw_facts(db, newsletter_id, since=summary["cutoff"])),
                   tracked)


def newsletters_rows(db: Database, newsletter_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """For ``list stats``' per-newsletter rows: unique human and machine opens and clicks
    of many newsletters in one query (live rows; add a purged one's summary)."""
    ids = sorted(set(newsletter_ids))
    out = {nid: {"unique_opens": 0, "machine_opens": 0, "unique_clicks": 0,
                 "machine_clicks": 0} for nid in ids}
    if not ids:
        return out
    for r in db.fetchall("tracking_newsletters_facts", {"ids": ids}):
        kind = "opens" if r["kind"] == "open" else "clicks"
        row = out[int(r["newsletter_id"])]
        human = int(r["human"] or 0)
        row[f"unique_{kind}"] = human
        row[f"machine_{kind}"] = int(r["recipients"] or 0) - human
    return out
