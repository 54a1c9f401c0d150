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
                  "sort_ready_count", "sort_assign")

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
        return {int(nl["id"]): int(self.db.fetchval("sort_ready_count",
                                                    {"newsletter": nl["id"], "cap": cap}))
                for nl in self.db.fetchall("newsletters_running")}

    def assign_batch(self, batch: int, newsletter_id: int, n: int) -> int:
        return self.db.execute("sort_assign", {"batch": batch, "newsletter": newsletter_id,
                                               "n": n})
