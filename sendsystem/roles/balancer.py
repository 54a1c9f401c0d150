"""What the sort and send balancers share.

Each tick, the active balancer (the one holding the cluster-wide lease of
its kind) reclaims the batches of dead and stopped workers, measures every
worker's backlog, asks the pure :func:`sendsystem.balancing.balance` how
much each live, enabled worker gets, and hands that out as batches, one
set-based UPDATE per batch. Other balancers of the same kind wait in standby.

The lease is a row of ``leases`` (holder, expires_at, epoch), taken and
renewed with ordinary transactional UPDATEs on the database's clock; it
lasts ``heartbeat_timeout`` and the holder renews it every tick and every
heartbeat. Not MySQL's GET_LOCK: on a Galera cluster a named lock is local
to one node (two balancers on two nodes both "held" it), and it is freed
only when the holder's TCP connection closes, which a dead host may never
do. A standby takes the lease once it has expired: within
``heartbeat_timeout`` of the holder's last renewal (it sleeps until the
expiry it reads, not a whole tick). On shutdown the holder expires its lease
so a standby takes over at once.

Fencing of the balancer itself: every reclaim and every batch transaction
first renews the lease with ``holder = me AND epoch = mine`` and rolls back
if that matched no row. So a balancer that lost the lease (it stalled past
the expiry, its node was cut off) cannot assign or reclaim anything, and on
Galera two nodes' concurrent writes to the one lease row conflict at
certification, so at most one of them commits. The heartbeat reports
``running`` only right after a successful renewal, so at most one balancer
of a kind reports itself active while its heartbeat is fresh.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from ..balancing import BalanceParams, WorkerLoad, balance
from ..config import Config
from ..errors import DatabaseConflict
from ..fairshare import split_evenly
from ..runner import Runner, RunOptions
from ..states import MessageState, WorkerState, worker_alive

log = logging.getLogger(__name__)

BALANCER_STATEMENTS = (
    "lease_seed", "lease_take", "lease_renew", "lease_release", "lease_get",
    "workers_for_role", "backlog_by_worker",
    "batches_reclaimable", "batch_release_messages", "batch_mark_reclaimed", "batch_insert",
    "batch_set_size", "batch_delete_empty", "newsletters_running", "batches_outstanding",
    "pending_for_role",
)


class LeaseLost(Exception):
    """The lease renewal inside a transaction matched no row: roll the tick back."""


class BalancerRunner(Runner):
    """Base of both balancers; subclasses fill in the role-specific queries."""

    worker_role: ClassVar[str]          # the role of the workers it feeds: 'sort' or 'send'
    pending_states: ClassVar[tuple[MessageState, ...]]

    def __init__(self, config: Config, options: RunOptions) -> None:
        super().__init__(config, options)
        b = self.config.balancer
        self.params = BalanceParams(horizon_seconds=b.horizon_seconds, batch_min=b.batch_min,
                                    batch_max=b.batch_max, probe_batch=b.probe_batch)
        self.idle_sleep = b.tick_seconds
        self.active = False
        self.epoch = 0
        self.lease_left: float | None = None  # seconds until the holder's lease expires
        self.assigned_total = 0

    @property
    def heartbeat_state(self) -> WorkerState:
        return WorkerState.RUNNING if self.active else WorkerState.STANDBY

    # -- the cluster-wide lease ------------------------------------------------------

    def _lease(self) -> dict[str, object]:
        return {"kind": self.worker_role, "holder": self.worker_id, "epoch": self.epoch,
                "length_us": int(self.config.balancer.heartbeat_timeout * 1_000_000)}

    def setup(self) -> None:
        self.db.execute("lease_seed", {"kind": self.worker_role})

    def hold_lease(self) -> bool:
        """Renew the lease if we hold it, else try to take it; True when we hold it."""
        if self.active:
            if self.db.execute("lease_renew", self._lease()):
                return True
            log.warning("%s %s lost the %s lease (epoch %d): it expired or was taken over",
                        self.role, self.options.name, self.worker_role, self.epoch)
            self.active = False
        try:
            with self.db.transaction():
                taken = self.db.execute("lease_take", self._lease())
                row = self.db.fetchone("lease_get", {"kind": self.worker_role})
        except DatabaseConflict as exc:  # another node's balancer won the row
            log.info("%s %s: lease not taken (%s)", self.role, self.options.name, exc)
            return False
        if taken and row is not None:
            self.epoch = int(row["epoch"])
            self.active = True
            self.lease_left = None
            log.info("%s %s is the active balancer (lease epoch %d)", self.role,
                     self.options.name, self.epoch)
        else:
            left = row["expires_in"] if row is not None else None
            self.lease_left = None if left is None else max(float(left), 0.0)
        return self.active

    def renew_in_transaction(self) -> None:
        """First statement of every reclaim and assignment: still ours, or roll back."""
        if not self.db.execute("lease_renew", self._lease()):
            raise LeaseLost(f"{self.worker_role} lease epoch {self.epoch} no longer ours")

    def heartbeat_fields(self) -> dict[str, object]:
        # Renew (or take) first, so the state this heartbeat reports is true now.
        if not self.stopping:
            self.hold_lease()
        return super().heartbeat_fields()

    def shutdown(self) -> None:
        if self.active:
            self.active = False
            if self.db.execute("lease_release", self._lease()):
                log.info("%s %s released the %s lease", self.role, self.options.name,
                         self.worker_role)

    # -- one tick ------------------------------------------------------------------

    def work(self) -> int:
        if not self.hold_lease():
            # Standby: wake when the holder's lease expires, not a tick later.
            if self.lease_left is None or self.lease_left >= self.idle_sleep:
                return 0
            self.sleep(self.lease_left + 0.005)
            if self.stopping or not self.hold_lease():
                return 0
        try:
            return self._tick()
        except LeaseLost as exc:
            log.warning("%s %s: %s; the tick was rolled back, back to standby", self.role,
                        self.options.name, exc)
            self.active = False
            return 0

    def _tick(self) -> int:
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
            # batch_mark_reclaimed re-reads the heartbeat under lock: a worker
            # that heartbeated since the SELECT above keeps its batch (fencing).
            with self.db.transaction():
                self.renew_in_transaction()
                marked = self.db.execute("batch_mark_reclaimed", {"batch": batch["id"],
                                                                  "timeout_us": timeout_us})
                n = self.db.execute("batch_release_messages", {"batch": batch["id"]}) \
                    if marked else 0
            if not marked:
                log.info("batch %s of %s worker %s kept: its heartbeat came back",
                         batch["id"], self.worker_role, batch["name"])
                continue
            total += n
            log.warning("reclaimed batch %s (%d messages) from %s worker %s (dead or stopped)",
                        batch["id"], n, self.worker_role, batch["name"])
        return total

    def worker_loads(self) -> list[WorkerLoad]:
        """Every worker of the role as balance() sees it; only live, enabled, running
        ones are available."""
        timeout = self.config.balancer.heartbeat_timeout
        backlog = {int(r["worker_id"]): int(r["backlog"])
                   for r in self.db.fetchall("backlog_by_worker", {"role": self.worker_role})}
        loads = []
        for w in self.db.fetchall("workers_for_role", {"role": self.worker_role}):
            available = bool(w["enabled"]) and w["state"] == WorkerState.RUNNING and \
                worker_alive(w["state"], w["heartbeat_age"], timeout)
            loads.append(WorkerLoad(worker_id=int(w["id"]),
                                    rate=float(w["rate"]) if w["rate"] else None,
                                    backlog=backlog.get(int(w["id"]), 0),
                                    available=available))
        return loads

    def ready_counts(self, cap: int) -> dict[int, int]:
        """Messages ready to assign, per running newsletter (each capped at ``cap``)."""
        raise NotImplementedError

    def assign_batch(self, worker_id: int, newsletter_id: int, n: int) -> int:
        """Put up to ``n`` ready messages of a newsletter into one batch for a worker."""
        raise NotImplementedError

    def assign(self) -> int:
        workers = self.worker_loads()
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
            self.renew_in_transaction()
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
        if self.db.fetchval("pending_for_role", {"states": self.pending_states}):
            return False
        # A standby has no batches to wait for; the active one waits for its workers.
        return not self.active or \
            not self.db.fetchval("batches_outstanding", {"role": self.worker_role})
