"""`sendsystem sort-balancer`: release due newsletters, assign queued messages."""

from __future__ import annotations

import logging
import time

from ..release import RELEASE_STATEMENTS, release
from ..states import SORT_PENDING
from .balancer import BALANCER_STATEMENTS, BalancerRunner

log = logging.getLogger(__name__)

# Seconds of releasing per tick, across the due newsletters' chunks.
RELEASE_BUDGET = 1.0


class SortBalancer(BalancerRunner):
    role = "sort-balancer"
    worker_role = "sort"
    pending_states = SORT_PENDING
    statements = (*BALANCER_STATEMENTS, *RELEASE_STATEMENTS, "newsletters_due",
                  "sort_ready_count", "sort_assign", "newsletter_merged")
    held: frozenset[int] = frozenset()   # newsletters whose merging waits for the sends

    def before_assign(self) -> None:
        # A slice of each due newsletter per tick (release.py): a ten-million
        # row release never stops this balancer from heartbeating or handing
        # out the batches of newsletters already running.
        deadline = time.monotonic() + RELEASE_BUDGET
        for nl in self.db.fetchall("newsletters_due"):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            release(self.db, int(nl["id"]), int(nl["list_id"]),
                    holder=f"sort-balancer:{self.worker_id}", budget=left)

    def ready_counts(self, cap: int) -> dict[int, int]:
        """Queued messages to merge, per running newsletter, but no more than keeps its
        merged-and-not-yet-sent messages within ``[balancer] merged_backlog_max``: the
        merge is the faster stage, and running ahead only takes CPU from the send
        workers and stores bodies (about one batch a worker more can be in flight)."""
        limit = self.config.balancer.merged_backlog_max
        ready: dict[int, int] = {}
        for nl in self.db.fetchall("newsletters_running"):
            nid = int(nl["id"])
            n = int(self.db.fetchval("sort_ready_count", {"newsletter": nid, "cap": cap}))
            if limit and n:
                room = max(0, limit - int(self.db.fetchval("newsletter_merged", {"id": nid})))
                self._note_held(nid, room < n)
                n = min(n, room)
            ready[nid] = n
        return ready

    def _note_held(self, newsletter_id: int, held: bool) -> None:
        if held and newsletter_id not in self.held:
            self.held = self.held | {newsletter_id}
            log.info("newsletter %s: %d merged messages wait for the send workers "
                     "([balancer] merged_backlog_max); merging more of it waits too",
                     newsletter_id, self.config.balancer.merged_backlog_max)
        elif not held and newsletter_id in self.held:
            self.held = self.held - {newsletter_id}
            log.info("newsletter %s: merging again", newsletter_id)

    def assign_batch(self, batch: int, newsletter_id: int, n: int) -> int:
        return self.db.execute("sort_assign", {"batch": batch, "newsletter": newsletter_id,
                                               "n": n})
