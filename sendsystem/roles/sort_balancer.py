"""`sendsystem sort-balancer`: release due newsletters, assign queued messages."""

from __future__ import annotations

import logging

from .. import admin
from ..states import SORT_PENDING
from .balancer import BALANCER_STATEMENTS, BalancerRunner

log = logging.getLogger(__name__)


class SortBalancer(BalancerRunner):
    role = "sort-balancer"
    worker_role = "sort"
    pending_states = SORT_PENDING
    statements = (*BALANCER_STATEMENTS, "newsletters_due", "newsletter_lock_for_release",
                  "newsletter_release_messages", "newsletter_mark_released",
                  "list_subscriber_id_range",
                  "sort_ready_count", "sort_assign")

    def before_assign(self) -> None:
        for nl in self.db.fetchall("newsletters_due"):
            admin.release(self.db, int(nl["id"]), int(nl["list_id"]))

    def ready_counts(self, cap: int) -> dict[int, int]:
        return {int(nl["id"]): int(self.db.fetchval("sort_ready_count",
                                                    {"newsletter": nl["id"], "cap": cap}))
                for nl in self.db.fetchall("newsletters_running")}

    def assign_batch(self, batch: int, newsletter_id: int, n: int) -> int:
        return self.db.execute("sort_assign", {"batch": batch, "newsletter": newsletter_id,
                                               "n": n})
