"""What the sort and send balancers share.

Each tick, the active balancer (the one holding the cluster-wide MySQL named
lock) reclaims the batches of dead and stopped workers, measures every
worker's backlog, asks the pure :func:`sendsystem.balancing.balance` how
much each live, enabled worker gets, and hands that out as batches, one
set-based UPDATE per batch. Other balancers of the same kind wait in standby
and take over as soon as the lock is free (the holder's connection died).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from ..balancing import BalanceParams, WorkerState, balance
from ..fairshare import split_evenly
from ..runner import Runner

log = logging.getLogger(__name__)

BALANCER_STATEMENTS = (
    "lock_get", "lock_held", "lock_release", "workers_for_role", "backlog_by_worker",
    "batches_reclaimable", "batch_release_messages", "batch_mark_reclaimed", "batch_insert",
    "batch_set_size", "batch_delete_empty", "newsletters_running", "batches_outstanding",
    "pending_for_role",
)


class BalancerRunner(Runner):
    """Base of both balancers; subclasses fill in the role-specific queries."""

    worker_role: ClassVar[str]          # the role of the workers it feeds: 'sort' or 'send'
    pending_states: ClassVar[tuple[str, ...]]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        b = self.config.balancer
        self.params = BalanceParams(horizon_seconds=b.horizon_seconds, batch_min=b.batch_min,
                                    batch_max=b.batch_max, probe_batch=b.probe_batch)
        self.idle_sleep = b.tick_seconds
        self.active = False
        self.assigned_total = 0

    @property
    def lock_name(self) -> str:
        return f"sendsystem.{self.config.database.name}.{self.role}"

    @property
    def heartbeat_state(self) -> str:
        return "running" if self.active else "standby"

    # -- the cluster-wide singleton -----------------------------------------------

    def _hold_lock(self) -> bool:
        if self.active and self.db.fetchval("lock_held", {"name": self.lock_name}):
            return True
        if self.active:
            log.warning("%s %s lost the cluster lock (database restarted?)", self.role,
                        self.options.name)
        self.active = bool(self.db.fetchval("lock_get", {"name": self.lock_name, "timeout": 0}))
        if self.active:
            log.info("%s %s is the active balancer", self.role, self.options.name)
        return self.active

    def shutdown(self) -> None:
        if self.active:
            self.db.fetchval("lock_release", {"name": self.lock_name})
            self.active = False

    # -- one tick ------------------------------------------------------------------

    def work(self) -> int:
        if not self._hold_lock():
            return 0
        self.before_assign()
        self.reclaim()
        assigned = self.assign()
        self.assigned_total += assigned
        self.processed = self.assigned_total
        if assigned:
            # Assign once per tick, not as fast as workers free room: tiny
            # batches would cost more than they balance.
            self.sleep(self.config.balancer.tick_seconds)
        return assigned

    def before_assign(self) -> None:
        """Role-specific housekeeping (release due newsletters, finish done ones)."""

    def reclaim(self) -> int:
        timeout_us = int(self.config.balancer.heartbeat_timeout * 1_000_000)
        total = 0
        for batch in self.db.fetchall("batches_reclaimable", {"role": self.worker_role,
                                                              "timeout_us": timeout_us}):
            with self.db.transaction():
                n = self.db.execute("batch_release_messages", {"batch": batch["id"]})
                self.db.execute("batch_mark_reclaimed", {"batch": batch["id"]})
            total += n
            log.warning("reclaimed batch %s (%d messages) from %s worker %s (dead or stopped)",
                        batch["id"], n, self.worker_role, batch["name"])
        return total

    def worker_states(self) -> list[WorkerState]:
        timeout = self.config.balancer.heartbeat_timeout
        backlog = {int(r["worker_id"]): int(r["backlog"])
                   for r in self.db.fetchall("backlog_by_worker", {"role": self.worker_role})}
        states = []
        for w in self.db.fetchall("workers_for_role", {"role": self.worker_role}):
            age = w["heartbeat_age"]
            alive = age is not None and float(age) <= timeout
            available = bool(w["enabled"]) and w["state"] == "running" and alive
            states.append(WorkerState(worker_id=int(w["id"]),
                                      rate=float(w["rate"]) if w["rate"] else None,
                                      backlog=backlog.get(int(w["id"]), 0),
                                      available=available))
        return states

    def ready_counts(self, cap: int) -> dict[int, int]:
        """Messages ready to assign, per running newsletter (each capped at ``cap``)."""
        raise NotImplementedError

    def assign_batch(self, worker_id: int, newsletter_id: int, n: int) -> int:
        """Put up to ``n`` ready messages of a newsletter into one batch for a worker."""
        raise NotImplementedError

    def assign(self) -> int:
        workers = self.worker_states()
        live = [w for w in workers if w.available]
        if not live:
            return 0
        # Never count further than the workers could take this tick.
        cap = max(self.params.batch_max, self.params.probe_batch) * len(live)
        ready = self.ready_counts(cap)
        total_ready = sum(ready.values())
        if not total_ready:
            return 0
        plan = balance(workers, total_ready, self.params)
        assigned = 0
        for worker_id, amount in sorted(plan.items()):
            for newsletter_id, n in split_evenly(amount, ready).items():
                got = self._new_batch(worker_id, newsletter_id, n)
                ready[newsletter_id] -= got
                assigned += got
        return assigned

    def _new_batch(self, worker_id: int, newsletter_id: int, n: int) -> int:
        with self.db.transaction():
            batch = self.db.insert("batch_insert", {"role": self.worker_role,
                                                    "worker": worker_id,
                                                    "newsletter": newsletter_id})
            got = self.assign_batch(batch, newsletter_id, n)
            if got:
                self.db.execute("batch_set_size", {"batch": batch, "size": got})
            else:
                self.db.execute("batch_delete_empty", {"batch": batch})
        if got:
            log.debug("batch %s: %d messages of newsletter %s to worker %s", batch, got,
                      newsletter_id, worker_id)
        return got

    def drained(self) -> bool:
        if not self.active:
            return not self.db.fetchval("pending_for_role", {"states": self.pending_states})
        return (not self.db.fetchval("pending_for_role", {"states": self.pending_states})
                and not self.db.fetchval("batches_outstanding", {"role": self.worker_role}))
