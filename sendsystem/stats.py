"""The facts behind `status` and `stats`, as plain dicts (JSON-ready).

reports/text.py and reports/html.py turn these into text and HTML; `--json` prints them
as they are, with the fields the README documents.

Every per-newsletter number comes from the kept tables (sendsystem/keptcounts.py),
never from a scan of its message rows, so `stats` and `status` cost the same
for 100 messages and for 10,000,000. What that changes in precision: the
timeline, its bucket choice and status's last-minute rate count whole
seconds (up to one second more in the minute); a worker's first and last
message and the duration are exact (microseconds).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from .admin import get_newsletter
from .config import Relay
from .db import Database
from .states import FINAL_MESSAGE_STATES, MESSAGE_STATES, MessageState, worker_alive
from .tracking import report as tracking_report


def _iso(value: Any) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else None


def _num(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def counts(db: Database, newsletter_id: int) -> dict[str, int]:
    found = {row["state"]: int(row["n"]) for row in db.fetchall("newsletter_counts",
                                                                 {"id": newsletter_id})}
    return {state: found.get(state, 0) for state in MESSAGE_STATES}


def leases(db: Database) -> dict[str, dict[str, Any]]:
    """The balancer lease of each kind: who holds it (None when free or expired)."""
    out = {}
    for row in db.fetchall("leases_all"):
        left = _num(row["expires_in"])
        held = row["holder"] is not None and left is not None and left >= 0
        out[row["kind"]] = {
            "holder": int(row["holder"]) if held else None,
            "holder_name": row["holder_name"] if held else None,
            "holder_host": row["holder_host"] if held else None,
            "epoch": int(row["epoch"]), "expires_in": left if held else None,
            "taken_at": _iso(row["taken_at"]),
        }
    return out


HEALTH_ORDER = ("set aside", "quota reached", "slowed", "ok")


def relays(db: Database, relay_list: Sequence[Relay], heartbeat_timeout: float
           ) -> list[dict[str, Any]]:
    """Each configured relay as the live send workers see it.

    Health is the worst any live worker reports (set aside > quota reached >
    slowed > ok; "unknown" when no live worker uses it), the reason and last
    error are that worker's, the current rate is the sum over workers
    (measured over their last 10 s), the quota used today is the cluster's.
    """
    used = {r["relay"]: int(r["used_today"]) for r in db.fetchall("relay_usage_all")}
    seen: dict[str, list[dict[str, Any]]] = {}
    for row in db.fetchall("relay_health_all", {"timeout": heartbeat_timeout}):
        seen.setdefault(row["relay"], []).append(row)
    out = []
    for relay in relay_list:
        name = str(relay)
        rows = seen.get(name, [])
        worst = min(rows, key=lambda r: HEALTH_ORDER.index(r["health"])
                    if r["health"] in HEALTH_ORDER else 0, default=None)
        errors = [r for r in rows if r["last_error"]]
        out.append({
            "relay": name, "group": relay.group or "default",
            "host": relay.host, "port": relay.port, "tls": relay.tls,
            "auth": bool(relay.username), "weight": relay.weight,
            "health": worst["health"] if worst else "unknown",
            "reason": (worst["last_error"] or None) if worst and worst["health"] != "ok"
            else None,
            "rate": round(sum(float(r["rate"]) for r in rows), 2),
            "rate_limit": relay.rate,
            "slowed_to": _num(worst["slow_rate"]) if worst else None,
            "quota_used_today": used.get(name, 0) if relay.limited else None,
            "daily_quota": relay.daily_quota,
            "last_error": min(errors, key=lambda r: float(r["age"]))["last_error"]
            if errors else None,
            "workers": [r["worker"] for r in rows],
        })
    return out


def status(db: Database, heartbeat_timeout: float,
           relay_list: Sequence[Relay] = ()) -> dict[str, Any]:
    lease_facts = leases(db)
    held = {kind: lease["holder"] for kind, lease in lease_facts.items()}
    workers = []
    for w in db.fetchall("workers_all"):
        age = _num(w["heartbeat_age"])
        alive = worker_alive(w["state"], age, heartbeat_timeout)
        workers.append({
            "id": w["id"], "name": w["name"], "host": w["host"], "role": w["role"],
            "pid": w["pid"], "enabled": bool(w["enabled"]), "state": w["state"],
            "alive": alive, "rate": _num(w["rate"]), "backlog": int(w["backlog"]),
            "heartbeat_age": age, "messages": int(w["processed"]), "db_node": w["db_node"],
        })
        kind = str(w["role"]).removesuffix("-balancer")
        if w["role"] != kind:  # a balancer: active means it holds its kind's lease now
            workers[-1]["active"] = held.get(kind) == w["id"]
    newsletters = []
    for n in db.fetchall("newsletters_in_progress"):
        c = counts(db, n["id"])
        done = sum(c[s] for s in FINAL_MESSAGE_STATES)
        recent = int(db.fetchval("newsletter_recent_sent", {"id": n["id"], "seconds": 60}) or 0)
        rate = recent / 60.0 if recent else None
        left = max(int(n["total"]) - done, 0)
        newsletters.append({
            "id": n["id"], "subject": n["subject"], "list": n["list_name"], "state": n["state"],
            "total": int(n["total"]), "done": done, "counts": c, "rate": _num(rate),
            "eta_seconds": _num(left / rate) if rate and left else (0 if not left else None),
            "send_at": _iso(n["send_at"]), "pause_reason": n["pause_reason"],
        })
    unverified = int(db.fetchval("bounces_unverified_recent", {"hours": 24}) or 0)
    return {"generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "workers": workers, "leases": lease_facts,
            "newsletters": newsletters,
            "relays": relays(db, relay_list, heartbeat_timeout) if relay_list else [],
            # Bounce/complaint/unsubscribe mail without signed evidence: kept, changed nothing.
            "unverified_reports_24h": unverified}


def _workers(db: Database, name: str, role: str, newsletter_id: int) -> list[dict[str, Any]]:
    out = []
    for row in db.fetchall(name, {"id": newsletter_id}):
        span = float(row["span"] or 0)
        n = int(row["messages"])
        out.append({"name": row["name"], "host": row["host"], "role": role, "messages": n,
                    "rate": round(n / span, 1) if span > 0 else None})
    return out


# Bounce rows from before any bounce arrives and after any can arrive.
_EPOCH = datetime(1970, 1, 2)
_FOREVER = datetime(9999, 1, 1)


def bounce_rows(db: Database, newsletter_id: int, since: datetime = _EPOCH,
                before: datetime = _FOREVER) -> list[dict[str, Any]]:
    """Bounce counts by (kind, verified) of the rows received in [since, before)."""
    return [{"kind": r["kind"], "verified": int(r["verified"]), "n": int(r["n"])}
            for r in db.fetchall("stats_bounces_between",
                                 {"id": newsletter_id, "since": since, "before": before})]


def merge_bounce_rows(*parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add bounce counts up by (kind, verified), sorted (so a summary is stable)."""
    total: dict[tuple[str, int], int] = {}
    for rows in parts:
        for r in rows:
            key = (str(r["kind"]), int(r["verified"]))
            total[key] = total.get(key, 0) + int(r["n"])
    return [{"kind": k, "verified": v, "n": n} for (k, v), n in sorted(total.items())]


def fold_bounces(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Bounces by kind with signed evidence, and unverified reports counted apart.

    ``unverified`` is the number of reports that claimed to be about this
    newsletter but carried no signed evidence (they changed nothing);
    ``unverified_kinds`` splits it by what they claimed to be.
    """
    bounces: dict[str, Any] = {"hard": 0, "soft": 0, "blocked": 0, "complaint": 0, "autoreply": 0}
    unverified: dict[str, int] = {}
    for row in rows:
        if int(row["verified"]):
            bounces[row["kind"]] = bounces.get(row["kind"], 0) + int(row["n"])
        else:
            unverified[row["kind"]] = unverified.get(row["kind"], 0) + int(row["n"])
    bounces["unverified"] = sum(unverified.values())
    bounces["unverified_kinds"] = dict(sorted(unverified.items()))
    return bounces


def newsletter_bounces(db: Database, newsletter_id: int) -> dict[str, Any]:
    """Bounces of a newsletter, including those a purge folded into its summary."""
    summary = db.fetchone("summary_get", {"id": newsletter_id})
    if summary is None:
        return fold_bounces(bounce_rows(db, newsletter_id))
    facts = json.loads(summary["facts"])
    return fold_bounces(merge_bounce_rows(facts["bounce_rows"],
                                          bounce_rows(db, newsletter_id, since=summary["cutoff"])))


# The timeline's resolution: the finest of these that keeps a send within
# TIMELINE_MAX_BUCKETS points (per second up to 5 minutes, per 10 s up to 50,
# per minute up to 5 hours, per 10 minutes up to ~2 days, then hours, days).
TIMELINE_BUCKETS = (1, 10, 60, 600, 3600, 86400)
TIMELINE_MAX_BUCKETS = 300


def timeline_bucket(span_seconds: float) -> int:
    """Seconds per timeline point for a send that lasted ``span_seconds``."""
    for bucket in TIMELINE_BUCKETS:
        if span_seconds < bucket * TIMELINE_MAX_BUCKETS:
            return bucket
    return TIMELINE_BUCKETS[-1]


def bucket_start(first: datetime, bucket: int) -> datetime:
    """``first`` rounded down to a whole bucket of the (naive UTC) clock."""
    epoch = datetime(1970, 1, 1)
    seconds = int((first - epoch).total_seconds())
    return epoch + timedelta(seconds=seconds - seconds % bucket)


# The resolutions of the kept timeline rows (migration 014), in seconds.
KEPT_RESOLUTIONS = (1, 10, 60, 600, 3600)


def timeline_resolution(bucket: int) -> int:
    """The kept timeline rows a bucket is added up from: the coarsest resolution
    that divides it (so at most 24 rows per bucket and worker, for day buckets)."""
    return max(r for r in KEPT_RESOLUTIONS if bucket % r == 0)


def _epoch_seconds(at: datetime) -> int:
    return int((at - _UNIX_EPOCH).total_seconds())


_UNIX_EPOCH = datetime(1970, 1, 1)


def timeline_detail(db: Database, newsletter_id: int) -> dict[str, Any]:
    """Sent per worker per bucket, the bucket chosen from the send's length (HTML report)."""
    span = db.fetchone("stats_sent_span", {"id": newsletter_id})
    if not span or span["first"] is None:
        return {"bucket_seconds": 1, "rows": []}
    bucket = timeline_bucket(float(span["last"]) - float(span["first"]))
    start = bucket_start(_UNIX_EPOCH + timedelta(seconds=int(span["first"])), bucket)
    rows = db.fetchall("stats_timeline_buckets",
                       {"id": newsletter_id, "start": _epoch_seconds(start), "bucket": bucket,
                        "resolution": timeline_resolution(bucket)})
    return {"bucket_seconds": bucket,
            "rows": [{"at": (start + timedelta(seconds=int(r["bucket"]) * bucket))
                      .strftime("%Y-%m-%dT%H:%M:%S"), "worker": r["worker"],
                      "sent": int(r["sent"])} for r in rows]}


def minute_timeline(db: Database, newsletter_id: int) -> list[dict[str, Any]]:
    """Delivered per minute and worker name, in time then name order (the JSON
    ``timeline``; workers that share a name on two hosts are added together)."""
    names = {int(r["id"]): str(r["name"]) for r in db.fetchall("worker_names")}
    sent: dict[tuple[int, str], int] = {}
    for r in db.fetchall("stats_timeline", {"id": newsletter_id}):
        key = (int(r["minute"]), names.get(int(r["worker_id"]), str(r["worker_id"])))
        sent[key] = sent.get(key, 0) + int(r["sent"])
    labels: dict[int, str] = {}
    out = []
    for (minute, worker), n in sorted(sent.items()):
        if n <= 0:
            continue
        label = labels.get(minute)
        if label is None:
            label = labels[minute] = (_UNIX_EPOCH + timedelta(seconds=minute)).strftime(
                "%Y-%m-%dT%H:%M")
        out.append({"minute": label, "worker": worker, "sent": n})
    return out


def message_facts(db: Database, newsletter_id: int) -> dict[str, Any]:
    """Everything `stats` derives from the message rows (through their kept
    tables, keptcounts.py): what a purge keeps.

    The keys are newsletter_stats' keys; retention.py stores this dict as the
    newsletter's summary before it deletes the rows, and newsletter_stats reads
    it back, so a purged newsletter reports the same numbers.
    """
    return {
        "counts": counts(db, newsletter_id),
        "workers": _workers(db, "stats_sort_workers", "sort", newsletter_id)
        + _workers(db, "stats_send_workers", "send", newsletter_id),
        "timeline": minute_timeline(db, newsletter_id),
        "timeline_detail": timeline_detail(db, newsletter_id),
        "replies": [{"code": int(r["code"]), "reply": r["reply"], "count": int(r["count"])}
                    for r in db.fetchall("stats_replies", {"id": newsletter_id})],
        # The ten commonest reasons, so a poison message or a render limit is
        # visible without SQL (replies alone group them under code 0).
        "failures": [{"reason": r["reason"], "count": int(r["count"])}
                     for r in db.fetchall("stats_failures", {"id": newsletter_id})],
        "deferrals": int(db.fetchval("stats_deferrals", {"id": newsletter_id}) or 0),
        "duration_seconds": _num(db.fetchval("stats_span", {"id": newsletter_id})),
    }


def newsletter_stats(db: Database, newsletter_id: int) -> dict[str, Any]:
    nl = get_newsletter(db, newsletter_id)
    summary = db.fetchone("summary_get", {"id": newsletter_id})
    if summary is None:
        facts = message_facts(db, newsletter_id)
        bounces = fold_bounces(bounce_rows(db, newsletter_id))
    else:  # purged (or being purged): the rows may be gone; the summary has them
        facts = json.loads(summary["facts"])
        bounces = fold_bounces(merge_bounce_rows(
            facts["bounce_rows"], bounce_rows(db, newsletter_id, since=summary["cutoff"])))
    c = facts["counts"]
    delivered = c[MessageState.SENT] + c[MessageState.BOUNCED]
    duration = facts["duration_seconds"]
    finished = sum(c[s] for s in FINAL_MESSAGE_STATES)
    out: dict[str, Any] = {
        "newsletter": newsletter_id, "state": nl["state"], "subject": nl["subject"],
        "list": nl["list_name"], "created_at": _iso(nl["created_at"]),
        "released_at": _iso(nl["released_at"]), "finished_at": _iso(nl["finished_at"]),
        "total": int(nl["total"]), "counts": c,
        "workers": facts["workers"], "timeline": facts["timeline"],
        "timeline_detail": facts["timeline_detail"],
        "replies": facts["replies"], "failures": facts["failures"],
        "deferrals": facts["deferrals"],
        "bounces": bounces,
        "bounce_rate": round((bounces["hard"] + bounces["soft"]) / delivered, 6)
        if delivered else 0.0,
        "complaint_rate": round(bounces["complaint"] / delivered, 6) if delivered else 0.0,
        "pause_reason": nl["pause_reason"],
        "duration_seconds": duration,
        "rate": round(finished / duration, 1) if duration else None,
        "purged_at": _iso(summary["purged_at"]) if summary else None,
    }
    # Opens and clicks (sendsystem/tracking/report.py): counted from their own tables.
    out["tracking"] = tracking_report.newsletter_tracking(db, newsletter_id, summary)
    return out
