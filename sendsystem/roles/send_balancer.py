"""`sendsystem send-balancer`: assign merged and due deferred messages to send workers.

Besides assigning, it finishes newsletters (state `done` once no message
is queued, merged or deferred) and pauses a newsletter whose failure rate
crosses ``[sending] failure_pause_ratio`` (after ``failure_pause_min``
final outcomes), saying why in `pause_reason`, so a broken list or a
blacklisted relay does not burn the sender's reputation (the rule lives in
brakes.py, next to the sort worker's render-failure brake).
"""

from __future__ import annotations

import logging
import time

from ..brakes import failure_rate_reason
from ..config import Config
from ..keptcounts import COMPACT_STATEMENTS, compact
from ..runner import RunOptions
from ..states import SEND_PENDING, MessageState
from .balancer import BALANCER_STATEMENTS, BalancerRunner

log = logging.getLogger(__name__)

FAILURE_CHECK_SECONDS = 5.0


class SendBalancer(BalancerRunner):
    role = "send-balancer"
    worker_role = "send"
    pending_states = SEND_PENDING
    statements = (*BALANCER_STATEMENTS, "send_ready_count", "send_retry_ready_count",
                  "send_assign", "send_assign_retries", "newsletter_unfinished",
                  "newsletter_mark_done", "newsletter_counts", "newsletter_pause",
                  *COMPACT_STATEMENTS)

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        self._last_failure_check = 0.0

    def before_assign(self) -> None:
        check_failures = time.monotonic() - self._last_failure_check >= FAILURE_CHECK_SECONDS
        for nl in self.db.fetchall("newsletters_running"):
            nid = int(nl["id"])
            if not self.db.fetchval("newsletter_unfinished", {"id": nid}):
                if self.db.execute("newsletter_mark_done", {"id": nid}):
                    log.info("newsletter %s is done", nid)
                    # Its counters go quiet: fold their slots, so the metrics'
                    # totals read one row per state and reply code of it.
                    compact(self.db, nid)
            elif check_failures:
                self.check_failure_rate(nid)
        if check_failures:
            self._last_failure_check = time.monotonic()

    def check_failure_rate(self, newsletter_id: int) -> None:
        s = self.config.sending
        counts = {r["state"]: int(r["n"])
                  for r in self.db.fetchall("newsletter_counts", {"id": newsletter_id})}
        failed = counts.get(MessageState.FAILED, 0)
        attempted = failed + counts.get(MessageState.SENT, 0) + counts.get(MessageState.BOUNCED, 0)
        reason = failure_rate_reason(failed, attempted, s.failure_pause_ratio,
                                     s.failure_pause_min)
        if reason is not None and \
                self.db.execute("newsletter_pause", {"id": newsletter_id, "reason": reason}):
            log.warning("newsletter %s %s", newsletter_id, reason)

    def ready_counts(self, cap: int) -> dict[int, int]:
        ready = {}
        for nl in self.db.fetchall("newsletters_running"):
            params = {"newsletter": nl["id"], "cap": cap}
            ready[int(nl["id"])] = int(self.db.fetchval("send_retry_ready_count", params)) + \
                int(self.db.fetchval("send_ready_count", params))
        return ready

    def assign_batch(self, batch: int, newsletter_id: int, n: int) -> int:
        params = {"batch": batch, "newsletter": newsletter_id, "n": n}
        got = self.db.execute("send_assign_retries", params)
        if got < n:
            got += self.db.execute("send_assign", {**params, "n": n - got})
        return got
