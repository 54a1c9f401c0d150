"""Retention: `sendsystem purge` deletes the message rows of old finished newsletters.

The messages table grows by one row per recipient per newsletter and is what
every role's hot queries read, so an old newsletter's rows cost index space and
buffer pool long after anyone needs them. What people still look at is `stats`;
so before a newsletter loses a row, everything `stats` derives from its rows
(stats.message_facts, plus its bounce counts) is stored as its summary in
`newsletter_summaries`, and stats reads the summary from then on: the text,
JSON and HTML reports show the same numbers after the purge as before.

Only newsletters that finished (done or cancelled) before the cut-off are
touched; subscribers and lists are not (forgetting a person is a separate
command, `sendsystem subscriber forget`). Bounce rows of such a newsletter
received before the cut-off go too; one that arrives later stays and is added
on top of the summary, and a later purge folds it in (the summary's `cutoff`
says which rows it holds, so nothing is counted twice or lost, whatever order
the steps are interrupted in).

The subscribers' history (`subscriber_events`) is not purged: it is the
list's history, which `list stats` draws as far back as the list goes; it is
one small row per status change (not per message), holds no address, and
`forget` unlinks a person's rows from them.

Deleting is chunked so it never holds many locks nor makes one big
transaction (a Galera write set or a replication event of a million rows
stalls every node): each chunk is one autocommitted DELETE over a range of at
most `chunk` primary keys, and between chunks the purge sleeps
`sleep_coef` times as long as the chunk took, and at least `pause` seconds
(pt-archiver's --sleep-coef): the purge then uses at most 1/(1+coef) of the
database's time whatever the load, and slows down by itself when the server
is busy. Measured (bench/purge_bench.py -n 100000, 1,000,000 rows, an idle
2-core box with MariaDB and every role on it): a 100,000-recipient send
overlapping the whole purge ran 3 % slower (1,218 -> 1,181 msgs/s, ratio
0.970; the purge took 127 s). InnoDB's background purge of the deleted rows
is not counted in a chunk's time.

The summary is read from the kept tables (keptcounts.py), not from the rows:
a few small reads instead of the unpaced scans it took before (those cost a
send overlapping them ~30 % of its rate). Once the summary is stored, the
newsletter's history rows there (timeline, sort workers, failure reasons)
are dropped, since stats now reads the summary; its kept counts follow the
deletes (the delete trigger), and the zero rows left are dropped at the end.
A newsletter's messages were inserted together at enqueue, so their ids are
(nearly) contiguous and a range of `chunk` ids is about `chunk` rows; the
running newsletter's rows have newer ids and never share a range with them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import keptcounts, stats
from .db import Database
from .errors import UserError
from .tracking import report as tracking_report

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")

STATEMENTS = (
    "retention_cutoff", "retention_candidates", "retention_message_span",
    "retention_old_bounces", "retention_delete_messages", "retention_delete_bounces",
    "summary_get", "summary_get_for_update", "summary_insert", "summary_fold_bounces",
    "summary_mark_purged", "stats_bounces_between",
    "retention_delete_tracking_events", "retention_delete_tracking_unique",
    "kept_history_delete_timeline", "kept_history_delete_sort_workers",
    "kept_history_delete_failures", *keptcounts.COMPACT_STATEMENTS,
)


def parse_duration(text: str) -> int:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` in seconds."""
    match = _DURATION_RE.match(text)
    if not match:
        raise UserError(f"Cannot read the duration {text!r}: give a number and a unit, "
                        "like 90d, 12h, 30m, 45s or 2w.")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise UserError("The duration must be more than zero, like 90d.")
    return seconds


@dataclass
class Purged:
    """What a purge did (or, with --dry-run, would do) to one newsletter."""

    newsletter_id: int
    state: str
    finished_at: datetime
    messages: int
    bounces: int
    summarized: bool  # the summary was written by this run
    tracking: int = 0  # open/click rows (events and unique rows) deleted


@dataclass
class Options:
    older_than: int  # seconds
    dry_run: bool = False
    chunk: int = 5000
    pause: float = 0.1  # at least this many seconds between chunks
    sleep_coef: float = 4.0  # and this many times as long as the last chunk took


def purge(db: Database, options: Options,
          sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic) -> list[Purged]:
    """Purge every finished newsletter older than the cut-off; what was (or would be) done."""
    if options.chunk < 1:
        raise UserError("--chunk-size must be at least 1.")
    db.check_schema_version()
    cutoff = db.fetchval("retention_cutoff", {"seconds": options.older_than})
    out = []
    for row in db.fetchall("retention_candidates", {"cutoff": cutoff}):
        nid = int(row["id"])
        span = db.fetchone("retention_message_span", {"id": nid}) or {}
        messages = int(span.get("n") or 0)
        old_bounces = int(db.fetchval("retention_old_bounces", {"id": nid, "cutoff": cutoff})
                          or 0)
        if row["purged_at"] is not None and not messages and not old_bounces:
            continue  # purged before, nothing new
        item = Purged(nid, str(row["state"]), row["finished_at"], messages, old_bounces,
                      summarized=row["summary_cutoff"] is None)
        out.append(item)
        if options.dry_run:
            continue
        _summarize(db, nid, cutoff)
        keptcounts.drop_history(db, nid, options.chunk)  # stats reads the summary now
        pace = _Pacer(options, sleep, clock)
        deleted = _delete_messages(db, nid, span, options, pace)
        gone = _delete_bounces(db, nid, cutoff, options, pace)
        item.tracking = _delete_tracking(db, nid, cutoff, options, pace)
        keptcounts.compact(db, nid)
        db.execute("summary_mark_purged", {"id": nid, "messages": deleted, "bounces": gone})
        item.messages, item.bounces = deleted, gone
        log.info("purged newsletter %d: %d messages, %d bounce rows", nid, deleted, gone)
    return out


def _summarize(db: Database, newsletter_id: int, cutoff: datetime) -> None:
    """Write the summary, or fold the bounce rows that arrived since the last purge into it.

    One transaction, with the summary row locked: the bounce rows counted are
    exactly those received before `cutoff` (all of which are deleted next),
    and the summary's own cutoff moves to the same instant.
    """
    with db.transaction():
        existing = db.fetchone("summary_get_for_update", {"id": newsletter_id})
        if existing is None:
            facts: dict[str, Any] = stats.message_facts(db, newsletter_id)
            facts["bounce_rows"] = stats.bounce_rows(db, newsletter_id, before=cutoff)
            # Opens and clicks whose first hit came before the cut-off (those rows go).
            facts["tracking"] = tracking_report.raw_facts(db, newsletter_id, before=cutoff)
            db.execute("summary_insert", {"id": newsletter_id, "cutoff": cutoff,
                                          "facts": json.dumps(facts, sort_keys=True)})
        elif existing["cutoff"] < cutoff:
            facts = json.loads(existing["facts"])
            facts["bounce_rows"] = stats.merge_bounce_rows(
                facts["bounce_rows"],
                stats.bounce_rows(db, newsletter_id, since=existing["cutoff"], before=cutoff))
            facts["tracking"] = tracking_report.merge(
                facts.get("tracking"),
                tracking_report.raw_facts(db, newsletter_id, since=existing["cutoff"],
                                          before=cutoff))
            db.execute("summary_fold_bounces", {"id": newsletter_id, "cutoff": cutoff,
                                                "facts": json.dumps(facts, sort_keys=True)})


class _Pacer:
    """Times each chunk; the pause after it is ``max(pause, sleep_coef * its time)``."""

    def __init__(self, options: Options, sleep: Callable[[float], None],
                 clock: Callable[[], float]) -> None:
        self.options, self.sleep, self.clock = options, sleep, clock
        self.started = clock()

    def start(self) -> None:
        self.started = self.clock()

    def rest(self) -> None:
        took = self.clock() - self.started
        self.sleep(max(self.options.pause, self.options.sleep_coef * took))


def _delete_messages(db: Database, newsletter_id: int, span: dict[str, Any], options: Options,
                     pace: _Pacer) -> int:
    if not span.get("n"):
        return 0
    lo, hi = int(span["lo"]), int(span["hi"])
    deleted = 0
    while lo <= hi:
        pace.start()
        n = db.execute("retention_delete_messages",
                       {"id": newsletter_id, "lo": lo, "chunk": options.chunk})
        deleted += n
        lo += options.chunk
        if n and lo <= hi:
            pace.rest()
    return deleted


def _delete_bounces(db: Database, newsletter_id: int, cutoff: datetime, options: Options,
                    pace: _Pacer) -> int:
    deleted = 0
    while True:
        pace.start()
        n = db.execute("retention_delete_bounces",
                       {"id": newsletter_id, "cutoff": cutoff, "chunk": options.chunk})
        deleted += n
        if n < options.chunk:
            return deleted
        pace.rest()


def _delete_tracking(db: Database, newsletter_id: int, cutoff: datetime, options: Options,
                     pace: _Pacer) -> int:
    """Open and click rows from before the cut-off (their counts are in the summary): the
    per-recipient rows, then every hit, in the same paced chunks. The link table stays:
    links in old mail keep redirecting."""
    deleted = 0
    for statement in ("retention_delete_tracking_unique", "retention_delete_tracking_events"):
        while True:
            pace.start()
            n = db.execute(statement, {"id": newsletter_id, "cutoff": cutoff,
                                       "chunk": options.chunk})
            deleted += n
            if n < options.chunk:
                break
            pace.rest()
    return deleted
