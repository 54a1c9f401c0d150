"""Kept counts: what `status`, `stats`, the HTML report and the metrics read
instead of scanning the messages table.

Counting a newsletter's rows by state is a scan of its index entries: a
1,000,000-message newsletter took ~0.4 s per `stats` and the scans grew with
every newsletter. Now four small tables (migration 014) are kept up to date
by MariaDB triggers on `messages`, inside the statement that changes a
message and so inside its transaction: the kept numbers are exact at every
commit, whoever writes (a role, an admin command, a test's SQL), and there
is one home for the rule. Their size grows with states x reply codes x
slots, workers x seconds of sending and distinct failure reasons, never
with the number of messages, and every report reads a bounded part of them
(at most ~300 timeline rows per worker, the top ten failure reasons from an
index): `stats --json` takes a few milliseconds at any size
(bench/stats_bench.py).

* INSERTs have no trigger: a newsletter's rows are created by set-based
  INSERT ... SELECTs over chunks of subscriber ids (release.py), and a
  per-row trigger would more than double a 10,000,000-row release. Each
  chunk adds its statement's row count (kept_counts_add_released) in its own
  transaction; release.py is the only code that creates message rows (tests
  and benchmarks that insert rows directly call :func:`repair`).
* DELETEs decrement the counts only. The other tables are history (who sent
  what when, why messages failed); `purge` stores the newsletter's summary
  from them, then drops them (:func:`drop_history`) and deletes the rows.
* Hot counters are sharded: a counts row is per (newsletter, state, reply
  code, slot), the slot being the writing role's worker id (mod 64; each
  role sets it on its connections, Database.set_slot; other sessions use
  their connection id), so two workers committing outcomes for one
  newsletter neither queue on one row lock nor, through two Galera nodes,
  fail certification on it (measured on the 3-node test cluster: slots by
  connection id alone collided and tripled the sort workers' retries).
  Readers add the slots up; a single slot's value means nothing alone (it
  may be negative). Timeline and sort-worker rows are per worker and need
  no slot; failure reasons have none either, so that their top ten is read
  from an index. A newsletter that finishes has its slots folded into one
  row per state and reply code (:func:`compact`), so the metrics' totals
  stay a small read.
* Cost, measured on the 2-core test box: ~20-25 us per statement a trigger
  runs per changed row, whether it writes one row or five; a sort outcome
  runs two, a send outcome two, a failure three, an assignment (batch_id
  only) none. bench/README.md has the pipeline's figures with and without.

What is exact, and what is not: the counts by state (and reply code) and the
deferrals always equal the rows (`sendsystem counts verify` checks it, and
the tests check it after every fault scenario); so do the timeline, the
send and sort workers' message counts and the failure reasons, for a
newsletter that has not been summarised by `purge`. Times (a worker's first
and last message, the span, the last-minute rate) are in whole seconds for
the timeline and the status rate; the first/last marks and the sample reply
are the least/greatest ever recorded, so a message retried by
`newsletter retry-failed` keeps its first mark where a scan would not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .db import Database
from .errors import TemporaryError

log = logging.getLogger(__name__)

SLOTS = 64  # kept_counts.slot is 0..63 (migration 014)
NO_REPLY = 65535  # kept_counts.reply_code of rows without a reply code
_ALL = 2**62  # "no LIMIT" for the chunked deletes
_EPOCH = datetime(1970, 1, 1)  # kept_timeline.bucket counts seconds from it

# What :func:`compact` runs (a role that calls it prepares them at start-up).
COMPACT_STATEMENTS = ("kept_counts_for_update", "kept_counts_delete", "kept_counts_insert")


@dataclass(frozen=True)
class Difference:
    """One key where the kept tables and the message rows disagree."""

    newsletter_id: int
    what: str  # "counts", "deferrals", "timeline", "sort workers", "failures"
    key: str
    kept: int
    actual: int

    def __str__(self) -> str:
        return (f"newsletter {self.newsletter_id} {self.what} {self.key}: "
                f"kept {self.kept}, rows {self.actual}")


def _code(value: Any) -> str:
    return "no reply" if int(value) == NO_REPLY else f"reply {int(value)}"


def verify(db: Database, newsletter_id: int | None = None) -> list[Difference]:
    """Every difference between the kept tables and COUNT(*) over the rows
    (of one newsletter, or all); [] when they agree.

    Each comparison is one statement (one snapshot), so it is exact while
    roles write. It scans the rows compared: an operator's and the tests'
    tool, not something to run every minute on a large database.
    """
    params = {"id": newsletter_id}
    out = []
    for r in db.fetchall("kept_verify_counts", params):
        key = f"{r['state']} {_code(r['reply_code'])}"
        if int(r["kept"]) != int(r["actual"]):
            out.append(Difference(int(r["newsletter_id"]), "counts", key,
                                  int(r["kept"]), int(r["actual"])))
        if int(r["kept_deferrals"]) != int(r["actual_deferrals"]):
            out.append(Difference(int(r["newsletter_id"]), "deferrals", key,
                                  int(r["kept_deferrals"]), int(r["actual_deferrals"])))
    for r in db.fetchall("kept_verify_timeline", params):
        stamp = (_EPOCH + timedelta(seconds=int(r["bucket"]))).strftime("%Y-%m-%dT%H:%M:%S")
        for field in ("sent", "failed"):
            kept, actual = int(r[f"kept_{field}"]), int(r[f"actual_{field}"])
            if kept != actual:
                out.append(Difference(
                    int(r["newsletter_id"]), "timeline",
                    f"{field} per {int(r['resolution'])}s at {stamp} by worker "
                    f"{r['worker_id']}", kept, actual))
    for r in db.fetchall("kept_verify_sort_workers", params):
        out.append(Difference(int(r["newsletter_id"]), "sort workers",
                              f"worker {r['worker_id']}", int(r["kept"]), int(r["actual"])))
    for r in db.fetchall("kept_verify_failures", params):
        out.append(Difference(int(r["newsletter_id"]), "failures", repr(r["reason"]),
                              int(r["kept"]), int(r["actual"])))
    return out


def repair(db: Database, newsletter_id: int) -> int:
    """Recount a newsletter's kept rows from its message rows; the rows counted.

    One transaction that first share-locks the newsletter's message rows:
    a writer that changed one before waits for the lock, one that comes
    after waits for the commit, so the recount and every later change add
    up exactly, on one server, while the roles run (they wait, for about the
    time a GROUP BY over the newsletter takes). On Galera the lock holds only
    on the node the repair runs on: run it when nothing writes the
    newsletter (it is finished, or paused with its batches done, or the
    roles are stopped), or repeat it until `verify` agrees.
    """
    params = {"id": newsletter_id}
    with db.transaction():
        n = int(db.fetchval("kept_lock_messages", params) or 0)
        db.execute("kept_counts_delete", params)
        db.execute("kept_rebuild_counts", params)
        chunk = {**params, "chunk": _ALL}
        for name in ("timeline", "sort_workers", "failures"):
            db.execute(f"kept_history_delete_{name}", chunk)
        if not db.fetchval("kept_has_summary", params):  # summarised: stats reads the summary
            for name in ("timeline", "sort_workers", "failures"):
                db.execute(f"kept_rebuild_{name}", params)
    log.info("kept counts of newsletter %s rebuilt from %d message rows", newsletter_id, n)
    return n


def drop_history(db: Database, newsletter_id: int, chunk: int = 5000) -> int:
    """Delete a summarised newsletter's timeline, sort-worker and failure rows
    (chunked, each DELETE autocommitted); how many rows went."""
    params = {"id": newsletter_id, "chunk": chunk}
    gone = 0
    for name in ("timeline", "sort_workers", "failures"):
        while True:
            n = db.execute(f"kept_history_delete_{name}", params)
            gone += n
            if n < chunk:
                break
    return gone


def fold_counts(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Kept counts rows folded over their slots: one per (state, reply code), none
    for those whose messages all moved on (count and deferrals add up to zero;
    their sample would never be shown). Counts and deferrals add up, the sample
    is the least."""
    folded: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (str(r["state"]), int(r["reply_code"]))
        into = folded.get(key)
        if into is None:
            folded[key] = into = {"state": key[0], "reply_code": key[1], "n": 0,
                                  "deferrals": 0, "sample": None}
        into["n"] += int(r["n"])
        into["deferrals"] += int(r["deferrals"])
        if r["sample"] is not None:
            into["sample"] = r["sample"] if into["sample"] is None \
                else min(into["sample"], r["sample"])
    return [v for _, v in sorted(folded.items()) if v["n"] or v["deferrals"]]


def compact(db: Database, newsletter_id: int) -> bool:
    """Fold a newsletter's kept counts over the slots (see :func:`fold_counts`);
    False when a concurrent writer kept it from happening (it is an
    optimisation: nothing is wrong with the slots as they are).

    The rows are locked FOR UPDATE while they are folded, so a concurrent
    change waits (one server) or fails certification and is retried
    (Galera): the sums stay exact either way. After `purge` deleted every
    message row of a newsletter, nothing of it is left.
    """
    params = {"id": newsletter_id}
    for _attempt in range(3):
        try:
            with db.transaction():
                rows = db.fetchall("kept_counts_for_update", params)
                folded = fold_counts(rows)
                if len(folded) == len(rows) and all(int(r["slot"]) == 0 for r in rows):
                    return True  # nothing to fold
                db.execute("kept_counts_delete", params)
                db.executemany("kept_counts_insert", [{"id": newsletter_id, **r}
                                                      for r in folded])
            return True
        except TemporaryError as exc:
            log.info("folding the kept counts of newsletter %s: %s", newsletter_id, exc)
    return False
