"""Releasing a newsletter: creating its message rows, in chunks, resumably.

A newsletter of ten million recipients needs ten million message rows. One
transaction for all of them would hold locks and an undo log for minutes and,
on Galera, replicate as one huge write set that stalls every node while it
is applied. So the rows are created by set-based ``INSERT IGNORE … SELECT``
statements over ranges of ``RELEASE_CHUNK`` subscriber ids, each chunk its
own short transaction that also moves the newsletter's cursor
(``release_next``) and adds what it created to ``total`` and to the kept
counts (keptcounts.py: message INSERTs have no trigger).

The newsletter stays ``scheduled`` until the last chunk is in, so no balancer
hands out a half-released newsletter; only then does it become ``running``.

Who releases: ``sendsystem enqueue`` (at once, with a progress bar) or the
sort balancer (when ``send_at`` comes, or when an enqueue died half-way). A
lease on the newsletter row (``release_holder``/``release_until``, renewed
with every chunk) makes sure only one of them works on a newsletter at a
time; when its holder dies, the lease runs out and the next one carries on
from the cursor. Every chunk first locks the newsletter row and checks that
the lease is still its own and the newsletter still scheduled, so a releaser
that stalled and was taken over, or a newsletter cancelled meanwhile, stops
at the next chunk. A chunk that ran twice would create nothing the second
time (IGNORE on the newsletter/subscriber key), so ``total`` stays exact.

The sort balancer releases with a time ``budget`` per tick and carries on at
its next tick, so a long release never stops it heartbeating or handing out
batches of other newsletters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .db import Database
from .errors import DatabaseConflict, DatabaseUnavailable
from .states import NewsletterState

log = logging.getLogger(__name__)

# Subscriber ids per chunk: about 0.2 s of work for MariaDB on a small box.
RELEASE_CHUNK = 20_000
# How long a releaser may go silent before another takes over.
RELEASE_LEASE = 30.0
# A chunk that hits a lock conflict or a lost connection is tried again this often.
CHUNK_ATTEMPTS = 5

RELEASE_STATEMENTS = ("newsletter_release_claim", "newsletter_lock_for_release",
                      "newsletter_release_messages", "kept_counts_add_released",
                      "newsletter_release_advance",
                      "newsletter_mark_released", "list_subscriber_id_range",
                      "newsletter_get_total")


@dataclass(frozen=True)
class Released:
    """Where a release call left a newsletter."""

    done: bool       # no longer scheduled: released (by this call or before) or cancelled
    created: int     # message rows this call created
    total: int       # message rows the newsletter has so far


def release(db: Database, newsletter_id: int, list_id: int, *, holder: str,
            progress: Callable[[int], None] | None = None, budget: float | None = None,
            lease: float = RELEASE_LEASE,
            clock: Callable[[], float] = time.monotonic) -> Released:
    """Create the message rows of a scheduled newsletter, chunk by chunk.

    ``holder`` names the caller in the lease. ``budget`` (seconds) stops after
    the chunk that exceeds it, to be called again later; None goes on to the
    end. ``progress`` is told how many subscriber ids each chunk covered.
    """
    lease_us = int(lease * 1_000_000)
    claim = {"id": newsletter_id, "holder": holder, "lease_us": lease_us}
    if not db.execute("newsletter_release_claim", claim):
        # Someone else is releasing it, or it is no longer scheduled.
        return _where(db, newsletter_id, 0)
    bounds = db.fetchone("list_subscriber_id_range", {"list_id": list_id}) or {}
    lo, hi = bounds.get("lo"), bounds.get("hi")
    started = clock()
    created = 0
    while True:
        step = _chunk(db, newsletter_id, list_id, claim,
                      int(lo) if lo is not None else 0, int(hi) if hi is not None else -1)
        if step is None:  # lost the lease, or cancelled meanwhile
            return _where(db, newsletter_id, created)
        n, covered, finished = step
        created += n
        if progress and covered:
            progress(covered)
        if finished:
            result = _where(db, newsletter_id, created)
            log.info("newsletter %s released: %d messages", newsletter_id, result.total)
            return result
        if budget is not None and clock() - started >= budget:
            return _where(db, newsletter_id, created)


def _chunk(db: Database, newsletter_id: int, list_id: int, claim: dict[str, object],
           lo: int, hi: int) -> tuple[int, int, bool] | None:
    """One chunk in its own transaction: (rows created, ids covered, finished).

    None when the lease is no longer ours or the newsletter is no longer scheduled.
    """
    for attempt in range(1, CHUNK_ATTEMPTS + 1):
        try:
            with db.transaction():
                row = db.fetchone("newsletter_lock_for_release", claim)
                if row is None or row["state"] != NewsletterState.SCHEDULED or not row["ours"]:
                    return None
                start = max(int(row["release_next"] or 0), lo)
                if start > hi:
                    db.execute("newsletter_mark_released", claim)
                    return 0, 0, True
                end = min(start + RELEASE_CHUNK - 1, hi)
                n = db.execute("newsletter_release_messages", {
                    "id": newsletter_id, "list_id": list_id, "lo": start, "hi": end})
                # The rows just created, all queued, are counted in the same
                # transaction: message INSERTs have no trigger (keptcounts.py).
                # This is the only code that creates message rows.
                db.execute("kept_counts_add_released", {"id": newsletter_id, "n": n})
                db.execute("newsletter_release_advance",
                           {**claim, "next": end + 1, "created": n})
                finished = end >= hi
                if finished:
                    db.execute("newsletter_mark_released", claim)
                return n, end - start + 1, finished
        except (DatabaseConflict, DatabaseUnavailable) as exc:
            if attempt == CHUNK_ATTEMPTS:
                raise
            log.warning("releasing newsletter %s: %s; trying the chunk again",
                        newsletter_id, exc)
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def _where(db: Database, newsletter_id: int, created: int) -> Released:
    row = db.fetchone("newsletter_get_total", {"id": newsletter_id}) or {}
    return Released(done=row.get("state") not in (None, NewsletterState.SCHEDULED),
                    created=created, total=int(row.get("total") or 0))
